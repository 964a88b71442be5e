//! The shared operations of the decoder family: RMS norm, rotary embedding tables, causal
//! mask, grouped-query head repetition. One copy each, used by every model file.
//!
//! - [`grad`]: fused versions with their own backward pass (causal attention, causal softmax,
//!   RMS norm, SwiGLU), for training on the CPU.
//! - [`sublayer`]: a decoder block's attention and MLP halves (norm, projections, core,
//!   residual) each as one such op, for training with plain trainable float weights.
//! - [`host`]: the host views of CPU tensors and the f32 matrix product those fused
//!   operations (and the linear layers' and the encoder's) are written with.

use std::sync::{Arc, RwLock};

use candle_core::{Device, Result, Tensor};

pub(crate) mod grad;
pub(crate) mod host;
pub(crate) mod sublayer;

/// How rotary position embedding pairs up the channels of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate-half (GPT-NeoX / Hugging Face `rotate_half`): channel i pairs with i + D/2.
    Neox,
    /// Interleaved (original Llama / GGUF `llama` arch, whose converter permutes Q and K):
    /// channel 2i pairs with 2i + 1.
    Interleaved,
}

/// Rotary position embedding for positions 0..max_len, its cos/sin tables computed only up
/// to the positions used so far and grown on demand: a model's context may be a million
/// positions or more (tables of 512 MB for 4 billion positions were once allocated up front
/// from a model file's `context_length`), while a chat uses a few thousand.
#[derive(Debug)]
pub(crate) struct Rope {
    head_dim: usize,
    theta: f32,
    max_len: usize,
    style: RopeStyle,
    ggml_angles: bool,
    device: Device,
    tables: RwLock<Arc<RopeTables>>,
}

impl Clone for Rope {
    fn clone(&self) -> Self {
        Self {
            head_dim: self.head_dim,
            theta: self.theta,
            max_len: self.max_len,
            style: self.style,
            ggml_angles: self.ggml_angles,
            device: self.device.clone(),
            tables: RwLock::new(self.current()),
        }
    }
}

/// Positions the first tables cover; they then at least double each time they grow.
const ROPE_FIRST: usize = 512;

impl Rope {
    /// Angles p·θ^(-2i/D) as transformers computes them (inverse frequencies, then one
    /// product), or as llama.cpp does (`ggml_rope_cache_init`: the angle of pair i+1 is that
    /// of pair i times θ^(-2/D), in f32) when `ggml_angles`.
    pub(crate) fn new(
        head_dim: usize,
        theta: f32,
        max_len: usize,
        style: RopeStyle,
        ggml_angles: bool,
        dev: &Device,
    ) -> Result<Self> {
        let rope = Self {
            head_dim,
            theta,
            max_len,
            style,
            ggml_angles,
            device: dev.clone(),
            tables: RwLock::new(Arc::new(RopeTables::empty(head_dim / 2, style, dev)?)),
        };
        rope.upto(ROPE_FIRST.min(max_len))?;
        Ok(rope)
    }

    fn current(&self) -> Arc<RopeTables> {
        // A panic while growing leaves the old tables in place: still valid.
        self.tables
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Tables covering positions 0..end (at least), computing the missing ones.
    pub(crate) fn upto(&self, end: usize) -> Result<Arc<RopeTables>> {
        if end > self.max_len {
            candle_core::bail!(
                "position {end} is beyond the context of {} tokens",
                self.max_len
            );
        }
        let have = self.current();
        if have.len >= end {
            return Ok(have);
        }
        let mut slot = self
            .tables
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.len >= end {
            return Ok(slot.clone());
        }
        let len = end.max(2 * slot.len).max(ROPE_FIRST).min(self.max_len);
        let grown = Arc::new(self.extend(&slot, len)?);
        *slot = grown.clone();
        Ok(grown)
    }

    /// `have` extended to positions 0..len. Each position's angles depend on it alone, so
    /// the tables are the same however they grew.
    fn extend(&self, have: &RopeTables, len: usize) -> Result<RopeTables> {
        let (head_dim, theta, half) = (self.head_dim, self.theta, self.head_dim / 2);
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let step = theta.powf(-2.0 / head_dim as f32);
        let mut cos_host = Vec::with_capacity(len * half);
        let mut sin_host = Vec::with_capacity(len * half);
        cos_host.extend_from_slice(&have.cos_host);
        sin_host.extend_from_slice(&have.sin_host);
        for p in have.len..len {
            let mut angle = p as f32;
            for f in &inv_freq {
                let a = if self.ggml_angles {
                    angle
                } else {
                    p as f32 * f
                };
                cos_host.push(a.cos());
                sin_host.push(a.sin());
                angle *= step;
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(&cos_host, (len, half), &self.device)?,
            sin: Tensor::from_slice(&sin_host, (len, half), &self.device)?,
            cos_host,
            sin_host,
            half,
            len,
            style: self.style,
        })
    }
}

/// cos/sin tables for positions 0..len, read-only (see [`Rope::upto`]).
#[derive(Debug)]
pub(crate) struct RopeTables {
    cos: Tensor, // (len, D/2)
    sin: Tensor, // (len, D/2)
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    half: usize,
    len: usize,
    style: RopeStyle,
}

impl RopeTables {
    fn empty(half: usize, style: RopeStyle, dev: &Device) -> Result<Self> {
        Ok(Self {
            cos: Tensor::zeros((0, half), candle_core::DType::F32, dev)?,
            sin: Tensor::zeros((0, half), candle_core::DType::F32, dev)?,
            cos_host: Vec::new(),
            sin_host: Vec::new(),
            half,
            len: 0,
            style,
        })
    }

    /// x: (B, H, T, D) at positions pos..pos+T.
    pub(crate) fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
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
    pub(crate) fn apply_host(&self, x: &mut [f32], heads: usize, pos: usize) {
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
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.track_op() || w.track_op() {
        grad::rms_norm(x, w, eps)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
    }
}

/// Additive causal mask for T new queries after `past` cached keys: (T, past + T),
/// 0 where a query may look, -inf where it may not.
pub(crate) fn causal_mask(t: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), dev)
}

/// The same for local attention with a window of W keys: query p also may not look at keys
/// j ≤ p − W (transformers `sliding_window_overlay`, llama.cpp `is_masked_swa`).
pub(crate) fn causal_mask_window(
    t: usize,
    past: usize,
    window: usize,
    dev: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let p = past + i;
            (0..past + t).map(move |j| {
                if j > p || p - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, past + t), dev)
}

/// GELU, tanh approximation (Hendrycks & Gimpel 2016, arXiv:1606.08415): what transformers'
/// `gelu_pytorch_tanh` and llama.cpp's `ggml_gelu_f32` compute, in f32.
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// llama.cpp's GELU on the CPU: the f32 value of its table of GELU at every f16, indexed by
/// the input rounded to f16, with 0 below −10 and the identity above 10 (`ggml_vec_gelu_f32`
/// and `ggml_vec_geglu_f32` under `GGML_GELU_FP16`).
fn gelu_f16_table(x: f32) -> f32 {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                half::f16::from_f32(gelu_tanh(half::f16::from_bits(bits).to_f32())).to_f32()
            })
            .collect()
    });
    table[half::f16::from_f32(x).to_bits() as usize]
}

/// GeGLU's middle: gelu(g) · u elementwise, with llama.cpp's f16 table when `f16_table`.
pub(crate) fn gelu_mul(g: &[f32], u: &[f32], f16_table: bool) -> Vec<f32> {
    if f16_table {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| gelu_f16_table(g) * u)
            .collect()
    } else {
        g.iter().zip(u).map(|(&g, &u)| gelu_tanh(g) * u).collect()
    }
}

/// (B, KVH, T, D) -> (B, KVH * n_rep, T, D): each key/value head serves n_rep query heads.
pub(crate) fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}

/// e^x in f32, branch-free so that loops over slices vectorize: the training ops' softmax,
/// SiLU and cross-entropy spent a tenth of a small model's step in libm's scalar `expf`. The
/// usual reduction (Cody & Waite, "Software Manual for the Elementary Functions", 1980):
/// x = n·ln 2 + r with |r| ≤ ln 2 / 2 (n rounded by adding 1.5·2²³, which SSE2 can do without
/// a rounding instruction), e^r by its Taylor series to r⁷ (truncation below 6e-9), 2ⁿ built
/// in the exponent bits. Relative error under 3e-7 (`exp_is_within_3e7_of_f64`); inputs are
/// clamped to [-87, 88], so results below e^-87 are e^-87 rather than denormal; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: the first has few bits, so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let c = x.clamp(-87.0, 88.0);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND; // round(c·log2 e)
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // t's low mantissa bits hold n + 2²²; 2ⁿ has n + 127 in the exponent.
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    if x.is_nan() { x } else { p * two_n }
}

/// Σ e^(x − shift) over `xs`, in eight lanes so that the compiler vectorizes it.
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut rows = xs.chunks_exact(8);
    for row in &mut rows {
        for (acc, &x) in lanes.iter_mut().zip(row) {
            *acc += exp(x - shift);
        }
    }
    let tail: f32 = rows.remainder().iter().map(|&x| exp(x - shift)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// xs ← e^(scale·x − shift), and their sum.
pub fn exp_in_place(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
    xs.iter_mut().for_each(|x| *x = exp(*x * scale - shift));
    let mut lanes = [0f32; 8];
    let mut rows = xs.chunks_exact(8);
    for row in &mut rows {
        for (acc, &x) in lanes.iter_mut().zip(row) {
            *acc += x;
        }
    }
    lanes.iter().sum::<f32>() + rows.remainder().iter().sum::<f32>()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Against f64's exp over the range training meets (and a NaN, and the clamps).
    #[test]
    fn exp_is_within_3e7_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_97;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 2e-38);
        assert!(exp(1000.0).is_finite());
        let xs: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 2.0).collect();
        let want: f32 = xs.iter().map(|x| (x - 0.5f32).exp()).sum();
        assert!((sum_exp(&xs, 0.5) - want).abs() < 1e-5 * want);
        let mut ys = xs.clone();
        let s = exp_in_place(&mut ys, 2.0, 1.0);
        assert!((ys[3] - (xs[3] * 2.0 - 1.0).exp()).abs() < 1e-6);
        assert!((s - ys.iter().sum::<f32>()).abs() < 1e-5 * s);
    }

    /// Regression: the tables for every position of the context were built up front (512 GB
    /// for a context of 0xFFFFFFFF). Now they grow with use, and grown tables equal tables
    /// built at once.
    #[test]
    fn rope_tables_grow_on_demand_to_the_same_values() {
        let dev = Device::Cpu;
        for ggml in [false, true] {
            let huge =
                Rope::new(64, 10_000.0, 1 << 24, RopeStyle::Interleaved, ggml, &dev).unwrap();
            assert_eq!(huge.current().len, ROPE_FIRST);
            let t = huge.upto(700).unwrap();
            assert_eq!(t.len, 2 * ROPE_FIRST, "at least doubles");
            let t = huge.upto(3000).unwrap();
            assert_eq!(t.len, 3000);
            let at_once = Rope::new(64, 10_000.0, 3000, RopeStyle::Interleaved, ggml, &dev)
                .unwrap()
                .upto(3000)
                .unwrap();
            assert_eq!(t.host_tables(0, 3000), at_once.host_tables(0, 3000));
            assert_eq!(
                t.cos.to_vec2::<f32>().unwrap(),
                at_once.cos.to_vec2::<f32>().unwrap()
            );
            // A clone shares what is built; growth stops at the context.
            assert_eq!(huge.clone().current().len, 3000);
            let small = Rope::new(64, 10_000.0, 100, RopeStyle::Neox, ggml, &dev).unwrap();
            assert_eq!(small.upto(100).unwrap().len, 100);
            let e = small.upto(101).unwrap_err().to_string();
            assert!(e.contains("beyond the context of 100"), "{e}");
        }
    }
}
