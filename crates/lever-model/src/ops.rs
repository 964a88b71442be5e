//! The shared kernels of the decoder family: RMS norm, rotary embedding tables, causal mask,
//! grouped-query head repetition. One copy each, used by every model file.

use candle_core::{D, Device, Result, Tensor};

/// How rotary position embedding pairs up the channels of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate-half (GPT-NeoX / Hugging Face `rotate_half`): channel i pairs with i + D/2.
    Neox,
    /// Interleaved (original Llama / GGUF `llama` arch, whose converter permutes Q and K):
    /// channel 2i pairs with 2i + 1.
    Interleaved,
}

/// Precomputed cos/sin tables for positions 0..max_len. Derived from the config, read-only.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor, // (max_len, D/2)
    sin: Tensor, // (max_len, D/2)
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl Rope {
    /// Angles p·θ^(-2i/D) as transformers computes them (inverse frequencies, then one
    /// product), or as llama.cpp does (`ggml_rope_cache_init`: the angle of pair i+1 is that
    /// of pair i times θ^(-2/D), in f32) when `ggml_angles`.
    pub fn new(
        head_dim: usize,
        theta: f32,
        max_len: usize,
        style: RopeStyle,
        ggml_angles: bool,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let step = theta.powf(-2.0 / head_dim as f32);
        let mut cos_host = Vec::with_capacity(max_len * half);
        let mut sin_host = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            let mut angle = p as f32;
            for f in &inv_freq {
                let a = if ggml_angles { angle } else { p as f32 * f };
                cos_host.push(a.cos());
                sin_host.push(a.sin());
                angle *= step;
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos_host, (max_len, half), dev)?,
            sin: Tensor::from_slice(&sin_host, (max_len, half), dev)?,
            cos_host,
            sin_host,
            half,
            style,
        })
    }

    /// x: (B, H, T, D) at positions pos..pos+T.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let x = x.contiguous()?;
        // candle's fused RoPE kernels have no backward; when gradients flow, the same rotation
        // in elementary ops.
        match (self.style, x.track_op()) {
            (RopeStyle::Neox, false) => candle_nn::rotary_emb::rope(&x, &cos, &sin),
            (RopeStyle::Interleaved, false) => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
            (RopeStyle::Neox, true) => candle_nn::rotary_emb::rope_slow(&x, &cos, &sin),
            (RopeStyle::Interleaved, true) => candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin),
        }
    }

    /// The host tables for positions pos..pos+t, each (t, D/2): (cos, sin).
    pub(crate) fn host_tables(&self, pos: usize, t: usize) -> (&[f32], &[f32]) {
        let span = pos * self.half..(pos + t) * self.half;
        (&self.cos_host[span.clone()], &self.sin_host[span])
    }

    pub(crate) fn style(&self) -> RopeStyle {
        self.style
    }

    /// The same rotation in place on host rows x: (T, heads, D) at positions pos..pos+T.
    pub fn apply_host(&self, x: &mut [f32], heads: usize, pos: usize) {
        let (half, d) = (self.half, 2 * self.half);
        for (ti, token) in x.chunks_exact_mut(heads * d).enumerate() {
            let at = (pos + ti) * half;
            let (cos, sin) = (&self.cos_host[at..at + half], &self.sin_host[at..at + half]);
            for head in token.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Neox => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

/// RMS norm over the last dimension, weight w: (C,).
/// The fused kernel for inference; elementary (differentiable) ops when gradients flow.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.track_op() || w.track_op() {
        crate::grad_ops::rms_norm(x, w, eps)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
    }
}

/// Additive causal mask for T new queries after `past` cached keys: (T, past + T),
/// 0 where a query may look, -inf where it may not.
pub fn causal_mask(t: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), dev)
}

/// (B, KVH, T, D) -> (B, KVH * n_rep, T, D): each key/value head serves n_rep query heads.
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}

/// Numerically stable log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(x, D::Minus1)
}
