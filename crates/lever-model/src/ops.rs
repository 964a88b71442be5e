//! The shared kernels of the decoder family: RMS norm, rotary embedding tables, causal mask,
//! grouped-query head repetition. One copy each, used by every model file.

use candle_core::{D, DType, Device, Result, Tensor};

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
    style: RopeStyle,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f32,
        max_len: usize,
        style: RopeStyle,
        dev: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let t = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = t.matmul(&inv_freq)?; // (max_len, D/2)
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            style,
        })
    }

    /// x: (B, H, T, D) at positions pos..pos+T.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let x = x.contiguous()?;
        match self.style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x, &cos, &sin),
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
        }
    }
}

/// RMS norm over the last dimension, weight w: (C,).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
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
