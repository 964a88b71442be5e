//! The BERT encoder: its weights, loaded by transformers' key names (or seeded at random for
//! tests), and its forward pass; the last hidden states pooled into one vector per text.
//!
//! Dimension legend: B batch (texts), T tokens (padded to the batch's longest), C hidden
//! size, H heads, D head size (C = H·D), F feed-forward size, V vocabulary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};

use super::config::{EncoderConfig, Pooling};
use super::ops::{TextAttention, add_norm, bias_gelu, masked_softmax};
use crate::error::{Error, Result};
use crate::kernels::bf16_gemm::{self, PackedBf16};
use crate::ops::host::f32_slice;
use crate::rng::SplitMix64;

/// Where encoder tensors come from: a safetensors file (keys as in transformers' BertModel,
/// with or without a `bert.` prefix) or seeded random values for tests.
enum Source {
    File {
        files: MmapedSafetensors,
        path: PathBuf,
        prefix: &'static str,
    },
    Random(SplitMix64),
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        crate::formats::weights::check_safetensors_header(path)?;
        // SAFETY: read-only memory map of a model file lever does not write while it is open
        // (as in formats/weights.rs).
        #[allow(unsafe_code)]
        let files = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Tensor {
            path: path.to_path_buf(),
            tensor: "(header)".into(),
            problem: e.to_string(),
        })?;
        let prefix = if files.get("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        Ok(Source::File {
            files,
            path: path.to_path_buf(),
            prefix,
        })
    }

    /// The tensor `key` (without prefix), checked to have shape `want`, as f32.
    fn get(&mut self, key: &str, want: &[usize], init: Init) -> Result<Tensor> {
        match self {
            Source::File {
                files,
                path,
                prefix,
            } => {
                let full = format!("{prefix}{key}");
                let view = files.get(&full).map_err(|_| Error::Tensor {
                    path: path.clone(),
                    tensor: full.clone(),
                    problem: "missing".into(),
                })?;
                crate::formats::weights::check_shape(path, &full, view.shape(), want)?;
                let t = files.load(&full, &Device::Cpu).map_err(|e| Error::Tensor {
                    path: path.clone(),
                    tensor: full.clone(),
                    problem: e.to_string(),
                })?;
                Ok(t.to_dtype(DType::F32)?)
            }
            Source::Random(rng) => {
                let n: usize = want.iter().product();
                let v: Vec<f32> = match init {
                    Init::Normal => (0..n).map(|_| rng.normal() * 0.02).collect(),
                    // Norms near 1 and biases near 0, but not exactly, so tests see them.
                    Init::One => (0..n).map(|_| 1.0 + rng.normal() * 0.1).collect(),
                    Init::Zero => (0..n).map(|_| rng.normal() * 0.02).collect(),
                };
                Ok(Tensor::from_vec(v, want, &Device::Cpu)?)
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    One,
    Zero,
}

/// y = x·Wᵀ + b, W: (out, in).
#[derive(Debug, Clone)]
pub(crate) struct Dense {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// W rounded to bf16 and packed for [`MatMul::Bf16`]: at load where the CPU runs it, on
    /// demand ([`BertModel::set_matmul`]) elsewhere.
    packed: Option<Arc<PackedBf16>>,
}

impl Dense {
    fn load(src: &mut Source, name: &str, out: usize, inp: usize) -> Result<Self> {
        let weight = src.get(&format!("{name}.weight"), &[out, inp], Init::Normal)?;
        let mut dense = Self {
            weight,
            bias: src.get(&format!("{name}.bias"), &[out], Init::Zero)?,
            packed: None,
        };
        if bf16_gemm::supported() {
            dense.pack()?;
        }
        Ok(dense)
    }

    /// Round W to bf16 and pack it, unless that is done.
    fn pack(&mut self) -> Result<()> {
        if self.packed.is_none() {
            let (out, inp) = self.weight.dims2()?;
            let w = self.weight.flatten_all()?.to_vec1::<f32>()?;
            self.packed = Some(Arc::new(PackedBf16::pack(&w, out, inp)));
        }
        Ok(())
    }

    /// x: (N, in) -> (N, out), without the bias (the fused kernels add it in their pass).
    fn matmul(&self, x: &Tensor, mm: MatMul) -> candle_core::Result<Tensor> {
        match mm {
            MatMul::F32 => x.matmul(&self.weight.t()?),
            MatMul::Bf16 => {
                let Some(packed) = &self.packed else {
                    candle_core::bail!("bf16 matmul: the weights are not packed for it");
                };
                x.contiguous()?.apply_op1_no_bwd(&Bf16Linear(packed))
            }
        }
    }

    /// x: (N, in) -> (N, out)
    fn forward(&self, x: &Tensor, mm: MatMul) -> candle_core::Result<Tensor> {
        self.matmul(x, mm)?.broadcast_add(&self.bias)
    }
}

/// How the linear layers multiply on the CPU in the fused (inference) forward; the
/// elementary (training) forward always multiplies in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatMul {
    /// candle's f32 matrix product (gemm crate): the reference.
    F32,
    /// bf16 inputs, f32 sums ([`crate::kernels::bf16_gemm`]): about twice as fast with
    /// AVX-512 BF16, vectors within cosine 0.9999 of the f32 ones. Without it, only by
    /// [`BertModel::set_matmul`] (the portable kernel, slow).
    Bf16,
}

impl MatMul {
    /// `LEVER_ENCODER_GEMM` (`f32` or `bf16`) when set, else bf16 where the CPU has AVX-512
    /// BF16 and f32 elsewhere. Asking for bf16 on a CPU without it is an error.
    pub fn from_env() -> Result<Self> {
        let bad = |problem: String| {
            Error::Candle(candle_core::Error::Msg(format!(
                "LEVER_ENCODER_GEMM: {problem}"
            )))
        };
        match std::env::var("LEVER_ENCODER_GEMM").as_deref() {
            Err(_) | Ok("") if bf16_gemm::supported() => Ok(MatMul::Bf16),
            Err(_) | Ok("") | Ok("f32") => Ok(MatMul::F32),
            Ok("bf16") if bf16_gemm::supported() => Ok(MatMul::Bf16),
            Ok("bf16") => Err(bad("bf16 needs AVX-512 BF16, which this CPU lacks".into())),
            Ok(other) => Err(bad(format!("`{other}`: expected `f32` or `bf16`"))),
        }
    }
}

/// x·Wᵀ through [`PackedBf16::matmul`]. x: (N, in) contiguous f32 -> (N, out).
struct Bf16Linear<'a>(&'a PackedBf16);

impl CustomOp1 for Bf16Linear<'_> {
    fn name(&self) -> &'static str {
        "lever-bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        if k != self.0.k() {
            candle_core::bail!("bf16 linear: input {:?} for K {}", l.dims(), self.0.k());
        }
        let x = f32_slice(s, l, self.name())?;
        let y = self.0.matmul(x);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.n()))))
    }
}

/// LayerNorm over the last dimension (Ba et al. 2016), weight and bias (C,).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f32,
}

impl LayerNorm {
    fn load(src: &mut Source, name: &str, c: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: src.get(&format!("{name}.weight"), &[c], Init::One)?,
            bias: src.get(&format!("{name}.bias"), &[c], Init::Zero)?,
            eps,
        })
    }
}

/// Which implementation of the memory-bound steps runs (matrix products are candle's in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's elementary ops: differentiable, any device.
    Elementary,
    /// One-pass CPU loops (no backward): inference on the CPU.
    Fused,
}

impl Kernels {
    /// Fused for CPU inference, elementary when gradients are tracked or off the CPU.
    pub fn auto(x: &Tensor) -> Self {
        if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
            Kernels::Fused
        } else {
            Kernels::Elementary
        }
    }
}

/// One post-norm transformer layer (BertLayer).
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) query: Dense,
    pub(crate) key: Dense,
    pub(crate) value: Dense,
    pub(crate) attn_out: Dense,
    pub(crate) attn_norm: LayerNorm,
    pub(crate) up: Dense,
    pub(crate) down: Dense,
    pub(crate) ffn_norm: LayerNorm,
}

impl Layer {
    fn load(src: &mut Source, i: usize, cfg: &EncoderConfig) -> Result<Self> {
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = format!("encoder.layer.{i}");
        Ok(Self {
            query: Dense::load(src, &format!("{p}.attention.self.query"), c, c)?,
            key: Dense::load(src, &format!("{p}.attention.self.key"), c, c)?,
            value: Dense::load(src, &format!("{p}.attention.self.value"), c, c)?,
            attn_out: Dense::load(src, &format!("{p}.attention.output.dense"), c, c)?,
            attn_norm: LayerNorm::load(src, &format!("{p}.attention.output.LayerNorm"), c, eps)?,
            up: Dense::load(src, &format!("{p}.intermediate.dense"), f, c)?,
            down: Dense::load(src, &format!("{p}.output.dense"), c, f)?,
            ffn_norm: LayerNorm::load(src, &format!("{p}.output.LayerNorm"), c, eps)?,
        })
    }

    /// The layer's weights under their transformers key names (layer `i`), in load order.
    fn tensors_mut(&mut self, i: usize) -> Vec<(String, &mut Tensor)> {
        let p = format!("encoder.layer.{i}");
        let mut out = Vec::new();
        for (name, d) in [
            ("attention.self.query", &mut self.query),
            ("attention.self.key", &mut self.key),
            ("attention.self.value", &mut self.value),
            ("attention.output.dense", &mut self.attn_out),
        ] {
            out.push((format!("{p}.{name}.weight"), &mut d.weight));
            out.push((format!("{p}.{name}.bias"), &mut d.bias));
        }
        let n = &mut self.attn_norm;
        out.push((
            format!("{p}.attention.output.LayerNorm.weight"),
            &mut n.weight,
        ));
        out.push((format!("{p}.attention.output.LayerNorm.bias"), &mut n.bias));
        for (name, d) in [
            ("intermediate.dense", &mut self.up),
            ("output.dense", &mut self.down),
        ] {
            out.push((format!("{p}.{name}.weight"), &mut d.weight));
            out.push((format!("{p}.{name}.bias"), &mut d.bias));
        }
        let n = &mut self.ffn_norm;
        out.push((format!("{p}.output.LayerNorm.weight"), &mut n.weight));
        out.push((format!("{p}.output.LayerNorm.bias"), &mut n.bias));
        out
    }

    fn denses_mut(&mut self) -> [&mut Dense; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// x: (B·T, C) -> (B·T, C); `mask` as built by [`BertModel::forward`].
    fn forward(
        &self,
        x: &Tensor,
        mask: &Mask,
        cfg: &EncoderConfig,
        k: Kernels,
        mm: MatMul,
    ) -> Result<Tensor> {
        let (b, t) = (mask.b, mask.t);
        let (h, d) = (cfg.num_heads, cfg.head_dim());
        // The 1/√D of scaled dot-product attention goes on q (B·T·C values), not on the
        // scores (B·H·T·T values).
        let scale = 1.0 / (d as f64).sqrt();
        let q = (self.query.forward(x, mm)? * scale)?; // (B·T, C)
        let kk = self.key.forward(x, mm)?; // (B·T, C)
        let v = self.value.forward(x, mm)?; // (B·T, C)
        let ctx = match k {
            Kernels::Elementary => {
                let heads = |y: Tensor| -> candle_core::Result<Tensor> {
                    // (B·T, C) -> (B, H, T, D)
                    y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
                };
                let scores = heads(q)?.matmul(&heads(kk)?.t()?)?; // (B, H, T, T)
                let probs = masked_softmax(&scores, mask)?; // (B, H, T, T)
                let ctx = probs.matmul(&heads(v)?)?; // (B, H, T, D)
                ctx.transpose(1, 2)?.reshape((b * t, h * d))? // (B·T, C)
            }
            Kernels::Fused => q.apply_op3_no_bwd(
                &kk,
                &v,
                &TextAttention {
                    t,
                    heads: h,
                    lens: mask.lens.clone(),
                },
            )?, // (B·T, C)
        };
        let a = add_norm(
            self.attn_out.matmul(&ctx, mm)?,
            &self.attn_out.bias,
            x,
            &self.attn_norm,
            k,
        )?; // (B·T, C)
        let f = bias_gelu(self.up.matmul(&a, mm)?, &self.up.bias, k)?; // (B·T, F)
        add_norm(
            self.down.matmul(&f, mm)?,
            &self.down.bias,
            &a,
            &self.ffn_norm,
            k,
        ) // (B·T, C)
    }
}

/// The padding mask of a batch, in the two forms the kernels use.
pub(super) struct Mask {
    pub(super) b: usize,
    pub(super) t: usize,
    /// (B, T): 1 for a token, 0 for padding.
    pub(super) ones: Tensor,
    /// Tokens per text (host copy for the fused softmax).
    pub(super) lens: Vec<usize>,
}

/// The BERT encoder: embeddings, then `num_layers` layers. Weights are candle tensors
/// (trainable once wrapped in `Var`s).
#[derive(Debug, Clone)]
pub struct BertModel {
    pub(crate) word_embeddings: Tensor,       // (V, C)
    pub(crate) position_embeddings: Tensor,   // (max_positions, C)
    pub(crate) token_type_embeddings: Tensor, // (type_vocab, C)
    pub(crate) embed_norm: LayerNorm,
    pub(crate) layers: Vec<Layer>,
    pub(crate) cfg: EncoderConfig,
    /// The linear layers' product in the fused forward ([`MatMul::from_env`] at load).
    matmul: MatMul,
}

impl BertModel {
    fn load_from(src: &mut Source, cfg: &EncoderConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let word_embeddings = src.get(
            "embeddings.word_embeddings.weight",
            &[cfg.vocab_size, c],
            Init::Normal,
        )?;
        let position_embeddings = src.get(
            "embeddings.position_embeddings.weight",
            &[cfg.max_positions, c],
            Init::Normal,
        )?;
        let token_type_embeddings = src.get(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, c],
            Init::Normal,
        )?;
        let embed_norm = LayerNorm::load(src, "embeddings.LayerNorm", c, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::load(src, i, cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embed_norm,
            layers,
            cfg: cfg.clone(),
            matmul: MatMul::from_env()?,
        })
    }

    /// Load from a safetensors file with transformers' BertModel key names.
    pub fn load(weights: &Path, cfg: &EncoderConfig) -> Result<Self> {
        Self::load_from(&mut Source::open(weights)?, cfg)
    }

    /// Seeded random weights (tests).
    pub fn random(cfg: &EncoderConfig, seed: u64) -> Result<Self> {
        Self::load_from(&mut Source::Random(SplitMix64(seed)), cfg)
    }

    pub fn matmul(&self) -> MatMul {
        self.matmul
    }

    /// Choose the fused forward's matrix product. Bf16 on a CPU without AVX-512 BF16 (which
    /// [`MatMul::from_env`] never picks there) packs the weights now and runs the portable
    /// kernel: the same arithmetic, slowly (for tests).
    pub fn set_matmul(&mut self, mm: MatMul) -> Result<()> {
        if mm == MatMul::Bf16 {
            for l in &mut self.layers {
                for d in l.denses_mut() {
                    d.pack()?;
                }
            }
        }
        self.matmul = mm;
        Ok(())
    }

    /// Training: the weights of the top `top_layers` layers (all layers, the embeddings and
    /// their norm when None) become f32 variables, returned under their transformers key
    /// names (`encoder.layer.5.attention.self.query.weight`, ...) in load order. The rest
    /// stay constant. The fused forward then multiplies in f32 (a bf16 packing of the old
    /// values would be stale); gradients need the elementary kernels ([`Kernels::Elementary`]).
    pub fn make_trainable(&mut self, top_layers: Option<usize>) -> Result<Vec<(String, Var)>> {
        let n = self.layers.len();
        let first = match top_layers {
            None => 0,
            Some(k) if k <= n => n - k,
            Some(k) => {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "{k} trained layers asked of an encoder with {n}"
                ))));
            }
        };
        let mut vars = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        if top_layers.is_none() {
            var(
                "embeddings.word_embeddings.weight".into(),
                &mut self.word_embeddings,
            )?;
            var(
                "embeddings.position_embeddings.weight".into(),
                &mut self.position_embeddings,
            )?;
            var(
                "embeddings.token_type_embeddings.weight".into(),
                &mut self.token_type_embeddings,
            )?;
            var(
                "embeddings.LayerNorm.weight".into(),
                &mut self.embed_norm.weight,
            )?;
            var(
                "embeddings.LayerNorm.bias".into(),
                &mut self.embed_norm.bias,
            )?;
        }
        for (i, layer) in self.layers.iter_mut().enumerate().skip(first) {
            for (name, t) in layer.tensors_mut(i) {
                var(name, t)?;
            }
            for d in layer.denses_mut() {
                d.packed = None;
            }
        }
        self.matmul = MatMul::F32;
        Ok(vars)
    }

    /// Every weight under its transformers key name (without a `bert.` prefix), in load
    /// order: what a model folder's model.safetensors holds.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        // Tensors are shared handles: the copy costs nothing.
        let mut model = self.clone();
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                self.word_embeddings.clone(),
            ),
            (
                "embeddings.position_embeddings.weight".to_string(),
                self.position_embeddings.clone(),
            ),
            (
                "embeddings.token_type_embeddings.weight".to_string(),
                self.token_type_embeddings.clone(),
            ),
            (
                "embeddings.LayerNorm.weight".to_string(),
                self.embed_norm.weight.clone(),
            ),
            (
                "embeddings.LayerNorm.bias".to_string(),
                self.embed_norm.bias.clone(),
            ),
        ];
        for (i, layer) in model.layers.iter_mut().enumerate() {
            out.extend(
                layer
                    .tensors_mut(i)
                    .into_iter()
                    .map(|(k, t)| (k, t.clone())),
            );
        }
        out
    }

    /// ids: (B, T) u32, right-padded; lens: tokens per text. -> last hidden states (B, T, C).
    /// Padding positions hold values but influence nothing else.
    pub fn forward(&self, ids: &Tensor, lens: &[usize], k: Kernels) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.hidden_size;
        if t > self.cfg.max_positions {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "{t} tokens exceed the {} positions of the encoder",
                self.cfg.max_positions
            ))));
        }
        let mask = Mask {
            b,
            t,
            ones: padding_mask(lens, t, ids.device())?,
            lens: lens.to_vec(),
        };
        let words = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?; // (B, T, C)
        let pos = self.position_embeddings.narrow(0, 0, t)?; // (T, C)
        // Every token has segment 0 (single texts).
        let seg = self.token_type_embeddings.get(0)?; // (C,)
        let x = words.broadcast_add(&pos)?.reshape((b * t, c))?; // (B·T, C)
        let zeros = Tensor::zeros((b * t, c), DType::F32, ids.device())?;
        let mut x = add_norm(x, &seg, &zeros, &self.embed_norm, k)?; // (B·T, C)
        // Training (elementary kernels) multiplies in f32 whatever was chosen.
        let mm = match k {
            Kernels::Fused => self.matmul,
            Kernels::Elementary => MatMul::F32,
        };
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &self.cfg, k, mm)?;
        }
        Ok(x.reshape((b, t, c))?)
    }
}

/// (B, T): 1.0 where j < lens[b], else 0.0.
fn padding_mask(lens: &[usize], t: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = lens
        .iter()
        .flat_map(|&n| (0..t).map(move |j| if j < n { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (lens.len(), t), dev)
}

/// hidden: (B, T, C), mask (B, T) -> (B, C): pooled, then L2-normalized when asked
/// (sentence-transformers: mean = Σ mask·h / max(Σ mask, 1e-9); F.normalize eps 1e-12).
pub(crate) fn pool(
    hidden: &Tensor,
    lens: &[usize],
    pooling: Pooling,
    normalize: bool,
) -> Result<Tensor> {
    let (_, t, _) = hidden.dims3()?;
    let v = match pooling {
        Pooling::Mean => {
            let m = padding_mask(lens, t, hidden.device())?.unsqueeze(2)?; // (B, T, 1)
            let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (B, C)
            let n = m.sum(1)?.clamp(1e-9, f64::INFINITY)?; // (B, 1)
            sum.broadcast_div(&n)?
        }
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?, // (B, C)
    };
    if !normalize {
        return Ok(v);
    }
    let norm = v
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?; // (B, 1)
    Ok(v.broadcast_div(&norm)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_normalizes_and_cls_takes_the_first_token() {
        // hidden (1, 3, 2): two real tokens, one padding token.
        let h = Tensor::new(&[[[3f32, 0.0], [1.0, 4.0], [100.0, 100.0]]], &Device::Cpu).unwrap();
        let mean = pool(&h, &[2], Pooling::Mean, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mean, vec![vec![2.0, 2.0]]);
        let norm = pool(&h, &[2], Pooling::Mean, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let s = 0.5f32.sqrt();
        assert!((norm[0][0] - s).abs() < 1e-6 && (norm[0][1] - s).abs() < 1e-6);
        let cls = pool(&h, &[2], Pooling::Cls, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(cls, vec![vec![3.0, 0.0]]);
    }
}
