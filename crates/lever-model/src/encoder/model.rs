//! The sentence-embedding encoder: a BERT encoder (Devlin et al. 2018, "BERT: Pre-training of
//! Deep Bidirectional Transformers", §3 and Vaswani et al. 2017 §3.2) followed by
//! Sentence-BERT pooling (Reimers & Gurevych 2019, "Sentence-BERT", §3: mean or CLS of the
//! last hidden states, then L2 normalization when the model folder asks for it).
//!
//! Matches transformers `models/bert/modeling_bert.py` (BertEmbeddings, BertSelfAttention
//! with the additive padding mask, BertSelfOutput/BertOutput post-norm residuals, exact erf
//! GELU) and sentence-transformers `models/Pooling.py` + `models/Normalize.py`; checked
//! against a sentence-transformers dump of all-MiniLM-L6-v2 in `tests/encoder.rs`. candle's
//! `candle-transformers/src/models/bert.rs` was read as a second reference; this file is our
//! own (one forward for inference and training, fused CPU kernels, counted truncation).
//!
//! Dimension legend: B batch (texts), T tokens (padded to the batch's longest), C hidden
//! size, H heads, D head size (C = H·D), F feed-forward size, V vocabulary.
//!
//! Two kernel sets run the same forward ([`Kernels`]): `Elementary` is candle's
//! differentiable ops (what training uses, chosen automatically when a tensor tracks
//! gradients); `Fused` replaces the memory-bound steps (masked softmax, bias + GELU,
//! bias + residual + LayerNorm) with one-pass CPU loops. Matrix products are candle's
//! (gemm crate) in both. The test `fused_and_elementary_kernels_agree` holds them together.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, Layout, Shape, Tensor,
};
use rayon::prelude::*;
use serde::Deserialize;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::{Error, Result, io_err};
use crate::kernels::bf16_gemm::{self, PackedBf16};
use crate::weights::SplitMix64;

// ---------------------------------------------------------------------------------------------
// Configuration

/// Mirror of a BERT `config.json` (transformers `BertConfig`): optional fields default as
/// transformers does.
#[derive(Debug, Clone, Deserialize)]
pub struct BertHfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

/// How token states become one vector (sentence-transformers `Pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the non-padding tokens' last hidden states (special tokens included).
    Mean,
    /// The first ([CLS]) token's last hidden state.
    Cls,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }
}

/// Resolved encoder hyper-parameters, every field required.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub pooling: Pooling,
    /// L2-normalize the pooled vector (sentence-transformers `Normalize` module).
    pub normalize: bool,
    /// Tokens per text, special tokens included; longer texts are cut (and counted).
    pub max_seq_len: usize,
}

impl EncoderConfig {
    /// A tiny encoder for unit tests: 2 layers, width 32, 4 heads.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            intermediate_size: 64,
            max_positions: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pooling: Pooling::Mean,
            normalize: true,
            max_seq_len: 64,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Resolve `config.json` plus the sentence-transformers settings read from the folder.
    pub fn resolve(
        hf: &BertHfConfig,
        path: &Path,
        pooling: Pooling,
        normalize: bool,
        max_seq_len: usize,
    ) -> Result<Self> {
        let bad = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            problem,
        };
        if let Some(t) = &hf.model_type
            && !matches!(t.as_str(), "bert")
        {
            return Err(bad(
                "model_type",
                format!("`{t}`: lever's encoder runs `bert`"),
            ));
        }
        if hf.hidden_act != "gelu" {
            return Err(bad(
                "hidden_act",
                format!("`{}`: lever's encoder runs `gelu` (erf)", hf.hidden_act),
            ));
        }
        if let Some(p) = &hf.position_embedding_type
            && p != "absolute"
        {
            return Err(bad(
                "position_embedding_type",
                format!("`{p}`: lever's encoder runs `absolute`"),
            ));
        }
        if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    hf.num_attention_heads, hf.hidden_size
                ),
            ));
        }
        if max_seq_len < 2 || max_seq_len > hf.max_position_embeddings {
            return Err(bad(
                "max_seq_length",
                format!(
                    "{max_seq_len}: must be between 2 and max_position_embeddings ({})",
                    hf.max_position_embeddings
                ),
            ));
        }
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_positions: hf.max_position_embeddings,
            type_vocab_size: hf.type_vocab_size.max(1),
            layer_norm_eps: hf.layer_norm_eps as f32,
            pooling,
            normalize,
            max_seq_len,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Weights

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
        crate::weights::check_safetensors_header(path)?;
        // SAFETY: read-only memory map of a model file lever does not write while it is open
        // (as in weights.rs).
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
                crate::weights::check_shape(path, &full, view.shape(), want)?;
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
pub struct Dense {
    pub weight: Tensor,
    pub bias: Tensor,
    /// W rounded to bf16 and packed for [`MatMul::Bf16`]; present when the CPU runs it.
    packed: Option<Arc<PackedBf16>>,
}

impl Dense {
    fn load(src: &mut Source, name: &str, out: usize, inp: usize) -> Result<Self> {
        let weight = src.get(&format!("{name}.weight"), &[out, inp], Init::Normal)?;
        let packed = if bf16_gemm::supported() {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(PackedBf16::pack(&w, out, inp)))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias: src.get(&format!("{name}.bias"), &[out], Init::Zero)?,
            packed,
        })
    }

    /// x: (N, in) -> (N, out), without the bias (the fused kernels add it in their pass).
    fn matmul(&self, x: &Tensor, mm: MatMul) -> candle_core::Result<Tensor> {
        match mm {
            MatMul::F32 => x.matmul(&self.weight.t()?),
            MatMul::Bf16 => {
                let Some(packed) = &self.packed else {
                    candle_core::bail!("bf16 matmul: this CPU lacks AVX-512 BF16");
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
    /// bf16 inputs, f32 sums ([`crate::kernels::bf16_gemm`]): about twice as fast, vectors within
    /// cosine 0.9999 of the f32 ones. Needs AVX-512 BF16.
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
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
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
pub struct Layer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub attn_out: Dense,
    pub attn_norm: LayerNorm,
    pub up: Dense,
    pub down: Dense,
    pub ffn_norm: LayerNorm,
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
pub struct Mask {
    b: usize,
    t: usize,
    /// (B, T): 1 for a token, 0 for padding.
    ones: Tensor,
    /// Tokens per text (host copy for the fused softmax).
    lens: Vec<usize>,
}

/// The BERT encoder: embeddings, then `num_layers` layers. Weights are candle tensors
/// (trainable once wrapped in `Var`s).
#[derive(Debug, Clone)]
pub struct BertModel {
    pub word_embeddings: Tensor,       // (V, C)
    pub position_embeddings: Tensor,   // (max_positions, C)
    pub token_type_embeddings: Tensor, // (type_vocab, C)
    pub embed_norm: LayerNorm,
    pub layers: Vec<Layer>,
    pub cfg: EncoderConfig,
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

    /// Choose the fused forward's matrix product; bf16 needs a CPU with AVX-512 BF16.
    pub fn set_matmul(&mut self, mm: MatMul) -> Result<()> {
        if mm == MatMul::Bf16 && !bf16_gemm::supported() {
            return Err(Error::Candle(candle_core::Error::Msg(
                "bf16 matmul needs AVX-512 BF16, which this CPU lacks".into(),
            )));
        }
        self.matmul = mm;
        Ok(())
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
pub fn pool(hidden: &Tensor, lens: &[usize], pooling: Pooling, normalize: bool) -> Result<Tensor> {
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

// ---------------------------------------------------------------------------------------------
// The memory-bound steps: elementary (differentiable) or fused (CPU, one pass)

/// softmax over keys with padding keys excluded, as transformers does it: finfo.min added
/// to the scores of padding keys. scores: (B, H, T, T) -> (B, H, T, T).
fn masked_softmax(scores: &Tensor, mask: &Mask) -> Result<Tensor> {
    let bias = ((mask.ones.ones_like()? - &mask.ones)? * f32::MIN as f64)?
        .reshape((mask.b, 1, 1, mask.t))?; // (B, 1, 1, T)
    Ok(candle_nn::ops::softmax_last_dim(
        &scores.broadcast_add(&bias)?,
    )?)
}

/// gelu(x + b) with the exact (erf) GELU. x: (N, F), b: (F,). Fused: in place on x (fresh).
fn bias_gelu(x: Tensor, b: &Tensor, k: Kernels) -> Result<Tensor> {
    Ok(match k {
        Kernels::Elementary => x.broadcast_add(b)?.gelu_erf()?,
        Kernels::Fused => {
            let x = x.contiguous()?;
            x.inplace_op1(&BiasGelu { bias: b.to_vec1()? })?;
            x
        }
    })
}

/// LayerNorm(x + b + residual). x, residual: (N, C), b: (C,). Fused: in place on x (fresh).
fn add_norm(
    x: Tensor,
    b: &Tensor,
    residual: &Tensor,
    ln: &LayerNorm,
    k: Kernels,
) -> Result<Tensor> {
    Ok(match k {
        Kernels::Elementary => {
            let y = (x.broadcast_add(b)? + residual)?;
            candle_nn::ops::layer_norm_slow(&y, &ln.weight, &ln.bias, ln.eps)?
        }
        Kernels::Fused => {
            let x = x.contiguous()?;
            x.inplace_op2(
                &residual.contiguous()?,
                &AddNorm {
                    bias: b.to_vec1()?,
                    weight: ln.weight.to_vec1()?,
                    beta: ln.bias.to_vec1()?,
                    eps: ln.eps,
                },
            )?;
            x
        }
    })
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expects f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expects a contiguous tensor");
    };
    Ok(&v[a..b])
}

fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expects f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expects a contiguous tensor");
    };
    Ok(&mut v[a..b])
}

/// Rows of work per rayon task for the row-wise kernels.
const ROWS_PER_TASK: usize = 16;

/// Defines a function whose body also runs in copies compiled for AVX-512 (else AVX2), picked
/// when the CPU has them. lever builds for baseline x86-64, where the row loops below (exp,
/// erf, the lane sums) vectorize 4 lanes wide; here they take 16. The lane sums fix their order
/// and nothing is contracted into FMAs, so the results are the same bits on every path.
///
/// The body is an `#[inline(always)]` function called straight from each copy: a closure
/// handed to a generic `#[target_feature]` function is not reliably inlined into it (LLVM kept
/// it out of line, compiled for the baseline, and the copy only jumped to it).
macro_rules! wide_fn {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has the features `avx512` is compiled for (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above, for AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Sum and maximum in 8 independent lanes, so that the compiler vectorizes them (a single
/// f32 accumulator is a serial dependency it must keep in order).
#[inline(always)]
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().fold(rest, |m, x| m.max(*x))
}

#[inline(always)]
fn lanes_sum_sq(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Attention of each text over its own tokens only, so padding costs nothing and needs no
/// mask: per text and head, S = q·kᵀ (n × n, n the text's length), softmax by rows, S·v,
/// written to the head's columns of the output. q (already scaled), k, v: (B·T, C) ->
/// (B·T, C), padding rows zero. Texts run in parallel; their matrix products call gemm
/// single-threaded (candle's batched matmul would split each small product over the
/// threads and synchronize 2·B·H times per layer).
struct TextAttention {
    t: usize,
    heads: usize,
    lens: Vec<usize>,
}

impl CustomOp3 for TextAttention {
    fn name(&self) -> &'static str {
        "lever-text-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, c) = l1.shape().dims2()?;
        let (t, h) = (self.t, self.heads);
        if l2.dims() != l1.dims()
            || l3.dims() != l1.dims()
            || rows != self.lens.len() * t
            || c % h != 0
            || self.lens.iter().any(|&n| n > t)
        {
            candle_core::bail!(
                "text attention: q {:?} k {:?} v {:?}, {} texts of {t} rows, {h} heads",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.lens.len()
            );
        }
        let q = f32_slice(s1, l1, self.name())?;
        let k = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        let mut out = vec![0f32; rows * c];
        out.par_chunks_mut(t * c)
            .zip(&self.lens)
            .enumerate()
            .for_each(|(i, (out, &n))| {
                let span = i * t * c..(i + 1) * t * c;
                text_attention(&q[span.clone()], &k[span.clone()], &v[span], out, n, c, h);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// One text: q, k, v and out are its (T, C) rows (row-major, C = heads·D), of which the
/// first n are tokens.
#[allow(unsafe_code)]
fn text_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    n: usize,
    c: usize,
    heads: usize,
) {
    let d = c / heads;
    // The gemm calls below read rows 0..n and columns hd..hd+D of q, k, v (each of
    // length ≥ n·C), read and write all of `scores` (n·n), and write rows 0..n, columns
    // hd..hd+D of `out`; these checks make every such index in bounds.
    assert!(d * heads == c && q.len() >= n * c && k.len() >= n * c && v.len() >= n * c);
    assert!(out.len() >= n * c);
    let mut scores = vec![0f32; n * n];
    let (ci, ni) = (c as isize, n as isize);
    for hd in (0..c).step_by(d) {
        // SAFETY: bounds as checked above; `scores` and `out` are exclusively borrowed and
        // do not overlap the inputs. gemm: dst[i·rs + j·cs] = Σ lhs[i·rs + l·cs]·rhs[l·rs + j·cs].
        unsafe {
            // scores (n, n) = q_h (n, D) · k_hᵀ (D, n)
            gemm::gemm(
                n,
                n,
                d,
                scores.as_mut_ptr(),
                1,
                ni,
                false,
                q.as_ptr().add(hd),
                1,
                ci,
                k.as_ptr().add(hd),
                ci,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(&mut scores, n);
        // SAFETY: as above.
        unsafe {
            // out_h (n, D) = probs (n, n) · v_h (n, D)
            gemm::gemm(
                n,
                d,
                n,
                out.as_mut_ptr().add(hd),
                1,
                ci,
                false,
                scores.as_ptr(),
                1,
                ni,
                v.as_ptr().add(hd),
                1,
                ci,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

wide_fn! {
    /// Softmax of each row of n; `scores` holds whole rows.
    fn softmax_rows(scores: &mut [f32], n: usize) {
        // Plain loops, not `for_each`: its fold stays out of line, outside the wide copies.
        for row in scores.chunks_mut(n) {
            softmax_in_place(row);
        }
    }
}

wide_fn! {
    /// gelu(x + b) on each row of `rows` (whole rows of the bias' width).
    fn bias_gelu_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}

#[inline(always)]
fn softmax_in_place(x: &mut [f32]) {
    let max = lanes_max(x);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / lanes_sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

struct BiasGelu {
    bias: Vec<f32>,
}

impl InplaceOp1 for BiasGelu {
    fn name(&self) -> &'static str {
        "lever-bias-gelu"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self.bias.len();
        if l.dims().last() != Some(&f) {
            candle_core::bail!("bias gelu: {:?} with a bias of {f}", l.dims());
        }
        let x = f32_slice_mut(s, l, self.name())?;
        x.par_chunks_mut(f * ROWS_PER_TASK)
            .for_each(|rows| bias_gelu_rows(rows, &self.bias));
        Ok(())
    }
}

struct AddNorm {
    bias: Vec<f32>,
    weight: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

wide_fn! {
    /// LayerNorm(x + b + r) in place on xs; xs, rs: whole rows of width C.
    fn add_norm_rows(op: &AddNorm, xs: &mut [f32], rs: &[f32]) {
        let c = op.weight.len();
        for (x, r) in xs.chunks_mut(c).zip(rs.chunks(c)) {
            for ((x, r), b) in x.iter_mut().zip(r).zip(&op.bias) {
                *x += b + r;
            }
            let mean = lanes_sum(x) / c as f32;
            for v in x.iter_mut() {
                *v -= mean;
            }
            let inv = 1.0 / (lanes_sum_sq(x) / c as f32 + op.eps).sqrt();
            for ((v, w), b) in x.iter_mut().zip(&op.weight).zip(&op.beta) {
                *v = *v * inv * w + b;
            }
        }
    }
}

impl InplaceOp2 for AddNorm {
    fn name(&self) -> &'static str {
        "lever-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let c = self.weight.len();
        if l1.dims() != l2.dims() || l1.dims().last() != Some(&c) || self.bias.len() != c {
            candle_core::bail!("add-norm: {:?} + {:?}, width {c}", l1.dims(), l2.dims());
        }
        let r = f32_slice(s2, l2, self.name())?;
        let x = f32_slice_mut(s1, l1, self.name())?;
        x.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(r.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(xs, rs)| add_norm_rows(self, xs, rs));
        Ok(())
    }
}

/// e^x in f32 from arithmetic only (so loops over it vectorize): Cephes `expf` — range
/// reduction x = n·ln2 + r, a degree-6 polynomial for e^r, then 2^n in the exponent bits.
/// Relative error < 2e-7 on [-87, 88].
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.0, 88.0);
    let fx = x * LOG2E + 0.5;
    // floor without a library call: truncate, then step down for negatives.
    let t = fx as i32;
    let n = if (t as f32) > fx { t - 1 } else { t };
    let nf = n as f32;
    let r = x - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// erf(x) in f32 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), arithmetic only.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - poly * exp(-a * a);
    e.copysign(x)
}

/// The exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)) (Hendrycks & Gimpel 2016).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

// ---------------------------------------------------------------------------------------------
// The sentence encoder: tokenizer + BERT + pooling

/// Vectors for a list of texts, in input order, and how many texts were cut to
/// `max_tokens()` (never silently: the caller reports it).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub truncated: usize,
}

/// A text's token ids, with special tokens, cut to the encoder's maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

/// A sentence-embedding model loaded from a (sentence-transformers) Hugging Face folder.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub model: BertModel,
    tokenizer: HfTokenizer,
    /// Special tokens the tokenizer puts before and after a text ([CLS] … [SEP]: 1, 1).
    specials: (usize, usize),
    dir: PathBuf,
    batch_size: usize,
    id: OnceLock<String>,
}

/// The default number of texts per forward pass (sentence-transformers' default too).
pub const DEFAULT_BATCH_SIZE: usize = 32;

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct StPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct StConfig {
    max_seq_length: Option<usize>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: "(json)".into(),
        problem: e.to_string(),
    })
}

/// Pooling and normalization as the folder's sentence-transformers files say. A folder
/// without modules.json is a plain transformers model: mean pooling, no normalization, as
/// sentence-transformers builds it.
fn read_pipeline(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, false));
    }
    let modules: Vec<StModule> = read_json(&modules_path)?;
    let mut pooling = None;
    let mut normalize = false;
    for m in &modules {
        let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let path = dir.join(&m.path).join("config.json");
                let p: StPooling = read_json(&path)?;
                let bad = |mode: &str| Error::Config {
                    path: path.clone(),
                    field: mode.into(),
                    problem: "lever pools by mean or cls token only".into(),
                };
                let other = [
                    (p.pooling_mode_max_tokens, "pooling_mode_max_tokens"),
                    (
                        p.pooling_mode_mean_sqrt_len_tokens,
                        "pooling_mode_mean_sqrt_len_tokens",
                    ),
                    (
                        p.pooling_mode_weightedmean_tokens,
                        "pooling_mode_weightedmean_tokens",
                    ),
                    (p.pooling_mode_lasttoken, "pooling_mode_lasttoken"),
                ];
                if let Some((_, mode)) = other.iter().find(|(on, _)| *on) {
                    return Err(bad(mode));
                }
                pooling = Some(
                    match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token) {
                        (true, false) => Pooling::Mean,
                        (false, true) => Pooling::Cls,
                        _ => {
                            return Err(Error::Config {
                                path: path.clone(),
                                field: "pooling_mode_mean_tokens".into(),
                                problem: "exactly one of mean and cls pooling must be on".into(),
                            });
                        }
                    },
                );
            }
            other => {
                return Err(Error::Config {
                    path: modules_path.clone(),
                    field: "type".into(),
                    problem: format!(
                        "module `{other}` is not supported (lever runs Transformer, Pooling, Normalize)"
                    ),
                });
            }
        }
    }
    let pooling = pooling.ok_or_else(|| Error::Config {
        path: modules_path.clone(),
        field: "type".into(),
        problem: "no Pooling module".into(),
    })?;
    Ok((pooling, normalize))
}

impl Encoder {
    /// Load a model folder: config.json, model.safetensors, tokenizer.json, and the
    /// sentence-transformers files (modules.json, 1_Pooling/config.json,
    /// sentence_bert_config.json) when present.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::ModelRef {
                reference: dir.display().to_string(),
                problem: "not a folder".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let hf: BertHfConfig = read_json(&cfg_path)?;
        let (pooling, normalize) = read_pipeline(dir)?;
        let st_path = dir.join("sentence_bert_config.json");
        let max_seq_len = if st_path.is_file() {
            read_json::<StConfig>(&st_path)?.max_seq_length
        } else {
            None
        }
        .unwrap_or(hf.max_position_embeddings);
        let cfg = EncoderConfig::resolve(&hf, &cfg_path, pooling, normalize, max_seq_len)?;
        let model = BertModel::load(&dir.join("model.safetensors"), &cfg)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: "missing".into(),
            });
        }
        let mut tokenizer = HfTokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            problem: e.to_string(),
        })?;
        // tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2's: fixed
        // 128); lever pads per batch and truncates to max_seq_len itself, counting it.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                problem: e.to_string(),
            })?;
        let probe = tokenizer
            .encode_fast("a", true)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                problem: e.to_string(),
            })?;
        let mask = probe.get_special_tokens_mask();
        let front = mask.iter().take_while(|&&s| s == 1).count();
        let back = mask.iter().rev().take_while(|&&s| s == 1).count();
        if front + back >= cfg.max_seq_len {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: format!(
                    "{front}+{back} special tokens leave no room in {} tokens",
                    cfg.max_seq_len
                ),
            });
        }
        if let Some(bad) = probe
            .get_ids()
            .iter()
            .find(|&&id| id as usize >= cfg.vocab_size)
        {
            return Err(Error::Tokenizer {
                path: tok_path,
                problem: format!(
                    "token id {bad} is outside the model's vocabulary of {}",
                    cfg.vocab_size
                ),
            });
        }
        Ok(Self {
            model,
            tokenizer,
            specials: (front, back),
            dir: dir.to_path_buf(),
            batch_size: DEFAULT_BATCH_SIZE,
            id: OnceLock::new(),
        })
    }

    /// Texts per forward pass (at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.model.cfg
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn dim(&self) -> usize {
        self.model.cfg.hidden_size
    }

    /// Tokens per text, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.model.cfg.max_seq_len
    }

    /// Names the model and every setting that changes its vectors:
    /// `<folder>:<sha256 of model.safetensors, 16 hex>:<pooling>[+norm]:<max tokens>`, e.g.
    /// `all-minilm-l6-v2:53aa51172d142c89:mean+norm:256`. Hashes the weights on first call.
    pub fn id(&self) -> Result<String> {
        if let Some(id) = self.id.get() {
            return Ok(id.clone());
        }
        let weights = self.dir.join("model.safetensors");
        let sum = crate::registry::sha256_file(&weights).map_err(io_err(&weights))?;
        let name = self
            .dir
            .file_name()
            .map_or_else(|| "encoder".into(), |n| n.to_string_lossy().into_owned());
        let cfg = &self.model.cfg;
        let id = format!(
            "{name}:{}:{}{}:{}",
            &sum[..16],
            cfg.pooling.name(),
            if cfg.normalize { "+norm" } else { "" },
            cfg.max_seq_len
        );
        Ok(self.id.get_or_init(|| id).clone())
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            problem: e.to_string(),
        }
    }

    /// Token ids with special tokens, cut to `max_tokens()` as transformers does (the text's
    /// tokens are cut; the closing special tokens stay).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|e| self.tok_err(e))?;
        let max = self.max_tokens();
        let (_, back) = self.specials;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let ids = e.get_ids();
                if ids.len() <= max {
                    return Tokens {
                        ids: ids.to_vec(),
                        truncated: false,
                    };
                }
                let mut cut = ids[..max - back].to_vec();
                cut.extend_from_slice(&ids[ids.len() - back..]);
                Tokens {
                    ids: cut,
                    truncated: true,
                }
            })
            .collect())
    }

    /// Byte spans (start, end) in `text` of its WordPiece tokens, without special tokens and
    /// without truncation: what a chunker cuts token windows by.
    pub fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let e = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.tok_err(e))?;
        Ok(e.get_offsets().to_vec())
    }

    /// Embed texts: tokenized, sorted by length, run `batch_size()` at a time (each batch
    /// padded to its longest text), pooled, normalized as the model says.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        let tokens = self.tokenize(texts)?;
        let truncated = tokens.iter().filter(|t| t.truncated).count();
        let ids: Vec<Vec<u32>> = tokens.into_iter().map(|t| t.ids).collect();
        Ok(Embeddings {
            vectors: self.embed_ids(&ids)?,
            truncated,
        })
    }

    /// Embed token-id sequences (each within `max_tokens()`), in input order.
    pub fn embed_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        embed_sorted(&self.model, seqs, self.batch_size)
    }
}

/// Longest first (as sentence-transformers orders them), so each batch pads little.
fn embed_sorted(model: &BertModel, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![Vec::new(); seqs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
        let vectors = embed_batch(model, &batch, None)?;
        for (&i, v) in chunk.iter().zip(vectors) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// One padded batch through the model and the pooling. `kernels`: None picks automatically.
pub fn embed_batch(
    model: &BertModel,
    seqs: &[&[u32]],
    kernels: Option<Kernels>,
) -> Result<Vec<Vec<f32>>> {
    let cfg = &model.cfg;
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let t = lens.iter().copied().max().unwrap_or(0);
    if t == 0 {
        return Ok(vec![vec![0.0; cfg.hidden_size]; seqs.len()]);
    }
    if t > cfg.max_positions {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "a sequence of {t} tokens exceeds the encoder's {} positions",
            cfg.max_positions
        ))));
    }
    if let Some(bad) = seqs
        .iter()
        .flat_map(|s| s.iter())
        .find(|&&id| id as usize >= cfg.vocab_size)
    {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "token id {bad} is outside the vocabulary of {}",
            cfg.vocab_size
        ))));
    }
    let dev = model.word_embeddings.device();
    // Padding id 0 ([PAD] in BERT vocabularies); masked out, so any id would do.
    let ids: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
        .collect();
    let ids = Tensor::from_vec(ids, (seqs.len(), t), dev)?; // (B, T)
    let k = kernels.unwrap_or_else(|| Kernels::auto(&model.word_embeddings));
    let hidden = model.forward(&ids, &lens, k)?; // (B, T, C)
    let pooled = pool(&hidden, &lens, cfg.pooling, cfg.normalize)?; // (B, C)
    Ok(pooled.to_vec2()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// f32 products, whatever the CPU or LEVER_ENCODER_GEMM.
    fn tiny() -> BertModel {
        let mut m = BertModel::random(&EncoderConfig::tiny(50), 7).unwrap();
        m.set_matmul(MatMul::F32).unwrap();
        m
    }

    fn seq(seed: u64, n: usize) -> Vec<u32> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| (rng.next_u64() % 50) as u32).collect()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Padding changes nothing: a text alone equals the same text in a batch with longer
    /// ones (both kernel sets).
    #[test]
    fn padding_does_not_change_an_embedding() {
        let m = tiny();
        let short = seq(1, 5);
        let long = seq(2, 23);
        for k in [Kernels::Elementary, Kernels::Fused] {
            let alone = embed_batch(&m, &[&short], Some(k)).unwrap();
            let batched = embed_batch(&m, &[&long, &short, &seq(3, 11)], Some(k)).unwrap();
            let d = max_diff(&alone, &batched[1..2]);
            assert!(d < 1e-5, "{k:?}: padding changed the embedding by {d}");
            // And the padded text is not just equal to something trivial.
            assert!(max_diff(&alone, &batched[0..1]) > 1e-3);
        }
    }

    #[test]
    fn fused_and_elementary_kernels_agree() {
        let m = tiny();
        let seqs = [seq(4, 17), seq(5, 3), seq(6, 9)];
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let a = embed_batch(&m, &refs, Some(Kernels::Elementary)).unwrap();
        let b = embed_batch(&m, &refs, Some(Kernels::Fused)).unwrap();
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "fused vs elementary: {d}");
    }

    /// Sorting by length for batching gives the vectors back in input order.
    #[test]
    fn sorted_batches_return_input_order() {
        let m = tiny();
        let seqs = vec![seq(7, 4), seq(8, 30), seq(9, 1), seq(10, 12), seq(11, 30)];
        let together = embed_sorted(&m, &seqs, 2).unwrap();
        for (s, v) in seqs.iter().zip(&together) {
            let alone = embed_batch(&m, &[s], None).unwrap();
            assert!(max_diff(&alone, std::slice::from_ref(v)) < 1e-5);
        }
    }

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

    #[test]
    fn fast_exp_and_erf_match_the_library_ones() {
        let mut worst_exp = 0f32;
        let mut worst_erf = 0f64;
        for i in -8000..=1000 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst_exp = worst_exp.max(rel as f32);
        }
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 3e-7, "erf absolute error {worst_erf}");
    }

    #[test]
    fn unsupported_pooling_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.json"),
            r#"[{"path":"","type":"sentence_transformers.models.Transformer"},
                {"path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"pooling_mode_max_tokens": true}"#,
        )
        .unwrap();
        let e = read_pipeline(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("1_Pooling/config.json") && e.contains("pooling_mode_max_tokens"),
            "{e}"
        );
    }
}
