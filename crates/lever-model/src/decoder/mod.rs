//! The one decoder: the llama family (Llama, SmolLM2, Mistral, Qwen2) as a pre-norm transformer
//! with RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP.
//! Touvron et al. 2023, "LLaMA" (arXiv:2302.13971); reference implementations: candle
//! `candle-transformers/src/models/llama.rs`, Hugging Face `modeling_llama.py`, llama.cpp
//! `llm_build_llama`. Serves inference, fine-tuning, LoRA, RAG generation and pretraining alike:
//! every projection is a `Linear` (quantized-frozen or float, with a LoRA slot), and all
//! per-call state (KV cache, position) lives in `Cache`, outside the weights.
//!
//! How a block computes: its attention and its MLP each take one of three paths (`Path`):
//! lever's CPU kernels (inference with llama.cpp's arithmetic), lever's fused differentiable
//! CPU ops (training), or candle's tensor ops (other devices, batches of sequences,
//! transformers' arithmetic). The device and the model's [`Numerics`] fix the choice at load
//! (`Paths`); whether gradients flow picks between inference and training at the call
//! (`Pass`). The KV cache lives in `cache.rs`.
//!
//! Dimensions: B batch, T new tokens, P cached tokens, C hidden, H query heads,
//! K key/value heads, D head size (C = H·D), F MLP width, V vocabulary.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Result, Tensor, Var};
use half::f16;

use crate::config::{DecoderConfig, Numerics};
use crate::formats::weights::{Embedding, Param, WeightSource};
use crate::kernels::{self, AttnDims};
use crate::linear::{Linear, Weight};
use crate::ops::grad::{self, AttnShape};
use crate::ops::host::HostRows;
use crate::ops::sublayer;
use crate::ops::{self, Rope, RopeTables};

mod cache;
pub use cache::Cache;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: (B, V). Generation.
    Last,
    /// Every position: (B, T, V). Scoring, perplexity, training.
    All,
}

/// How one call of a block's attention or MLP computes. What is possible is fixed at load by
/// the device and the numerics ([`Paths`]); whether gradients flow picks among it at the call
/// ([`Pass`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// lever's CPU kernels, for inference: attention over the host f16 cache with llama.cpp's
    /// arithmetic (`kernels::attention`), SwiGLU in one parallel pass (`kernels::silu_mul`).
    HostKernels,
    /// lever's fused CPU ops with their own backward (`ops::grad`), for training: the whole
    /// attention core of a prefix (no cache) as one graph node, SwiGLU as another.
    Differentiable,
    /// candle's tensor ops, differentiable, on any device: other devices, a batch of
    /// sequences, transformers numerics, training with a cache.
    Tensors,
}

/// Whether gradients flow through a call, read from its inputs: training or inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Inference,
    Training,
}

impl Pass {
    fn of(inputs: &[&Tensor]) -> Self {
        if inputs.iter().any(|x| x.track_op()) {
            Pass::Training
        } else {
            Pass::Inference
        }
    }
}

/// The path a layer takes for inference and for training, chosen once at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Paths {
    inference: Path,
    training: Path,
}

impl Paths {
    /// Attention: lever's kernel reproduces llama.cpp's arithmetic only (f16 cache), for heads
    /// up to `kernels::MAX_HEAD_DIM`; the fused training op runs on the CPU.
    fn attention(device: &Device, numerics: Numerics, head_dim: usize) -> Self {
        if !device.is_cpu() {
            return Self::TENSORS;
        }
        let kernels = numerics == Numerics::LlamaCpp && head_dim <= kernels::MAX_HEAD_DIM;
        Self {
            inference: if kernels {
                Path::HostKernels
            } else {
                Path::Tensors
            },
            training: Path::Differentiable,
        }
    }

    /// The MLP: lever's SwiGLU step for inference and its fused op for training, on the CPU.
    fn mlp(device: &Device) -> Self {
        if !device.is_cpu() {
            return Self::TENSORS;
        }
        Self {
            inference: Path::HostKernels,
            training: Path::Differentiable,
        }
    }

    const TENSORS: Self = Self {
        inference: Path::Tensors,
        training: Path::Tensors,
    };
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Gemma 3: RMS norms of each query and key head (D,), before RoPE.
    qk_norms: Option<(Tensor, Tensor)>,
    eps: f32,
    /// Gemma 3: scores are q·k times this; the llama family divides by √D.
    scale: Option<f32>,
    /// Local attention (Gemma 3): keys older than this many positions are not seen.
    window: Option<usize>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    numerics: Numerics,
    paths: Paths,
}

/// What every block of one call shares, per kind of attention: RoPE tables and the additive
/// mask (global layers; local layers, with their window and RoPE base, when the model has them).
struct Shared {
    rope: Arc<RopeTables>,
    mask: Option<Tensor>,
    local: Option<(Arc<RopeTables>, Option<Tensor>)>,
}

impl Shared {
    /// Layer `i`'s tables and mask.
    fn of(&self, attn: &Attention) -> (&RopeTables, Option<&Tensor>) {
        match (&self.local, attn.window) {
            (Some((rope, mask)), Some(_)) => (rope, mask.as_ref()),
            _ => (&self.rope, self.mask.as_ref()),
        }
    }
}

impl Attention {
    fn load(w: &mut dyn WeightSource, i: usize, cfg: &DecoderConfig) -> crate::Result<Self> {
        let (c, hd) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.qkv_bias();
        let qk_norms = match &cfg.gemma {
            Some(g) => Some((
                norm(w, Param::QNorm(i), hd, g.norm_offset)?,
                norm(w, Param::KNorm(i), hd, g.norm_offset)?,
            )),
            None => None,
        };
        Ok(Self {
            q: w.linear(Param::Q(i), cfg.num_heads * hd, c, bias)?,
            k: w.linear(Param::K(i), cfg.num_kv_heads * hd, c, bias)?,
            v: w.linear(Param::V(i), cfg.num_kv_heads * hd, c, bias)?,
            o: w.linear(Param::O(i), c, cfg.num_heads * hd, false)?,
            qk_norms,
            eps: cfg.rms_norm_eps,
            scale: cfg.gemma.as_ref().map(|g| g.attn_scale),
            window: cfg.window(i),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            numerics: cfg.numerics,
            paths: Paths::attention(w.device(), cfg.numerics, hd),
        })
    }

    /// x: (B, T, C) -> (B, T, C)
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let pos = cache.len;
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let pass = Pass::of(&[&q, &k, &v]);
        let (q, k) = self.norm_qk(q, k)?;
        // The fused training op covers a whole prefix (no cache), the host kernel one
        // sequence; a batch, or gradients with a cache, take the tensor path.
        let path = match pass {
            Pass::Training if pos == 0 => self.paths.training,
            Pass::Inference if b == 1 => self.paths.inference,
            _ => Path::Tensors,
        };
        let y = match path {
            Path::Differentiable => self.fused(&q, &k, &v, rope)?,
            Path::HostKernels => self.host(&q, &k, &v, layer, rope, cache)?,
            Path::Tensors => self.tensors(q, k, v, layer, rope, mask, cache)?,
        }; // (B, T, H·D)
        self.o.forward(&y)
    }

    /// Gemma 3's per-head RMS norms of the queries and keys (B, T, H·D), before RoPE.
    fn norm_qk(&self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        let Some((qn, kn)) = &self.qk_norms else {
            return Ok((q, k));
        };
        let d = self.head_dim;
        let per_head = |x: Tensor, w: &Tensor, heads: usize| -> Result<Tensor> {
            let (b, t, _) = x.dims3()?;
            ops::rms_norm(&x.reshape((b, t, heads, d))?, w, self.eps)?.reshape((b, t, heads * d))
        };
        Ok((
            per_head(q, qn, self.num_heads)?,
            per_head(k, kn, self.num_kv_heads)?,
        ))
    }

    /// The factor of the scores in lever's kernel.
    fn kernel_scale(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// [`Path::Differentiable`]: the attention core as one graph node with its own backward.
    /// The cache counts the tokens but keeps no keys. q: (B, T, H·D), k, v: (B, T, K·D).
    fn fused(&self, q: &Tensor, k: &Tensor, v: &Tensor, rope: &RopeTables) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let shape = AttnShape {
            scale: self.kernel_scale(),
            window: self.window,
            ..AttnShape::causal(b, t, self.num_heads, self.num_kv_heads, self.head_dim)
        };
        grad::causal_attention(q, k, v, shape, rope, self.numerics.f16_kv()) // (B, T, H·D)
    }

    /// [`Path::HostKernels`]: lever's attention kernel over the host f16 cache, which the new
    /// keys and values are appended to in place. q: (1, T, H·D), k, v: (1, T, K·D).
    fn host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        rope: &RopeTables,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let (_, t, _) = q.dims3()?;
        let (h, k_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let pos = cache.len;
        let mut qh = q.flatten_all()?.to_vec1::<f32>()?;
        let mut kh = k.flatten_all()?.to_vec1::<f32>()?;
        let vh = v.flatten_all()?.to_vec1::<f32>()?;
        rope.apply_host(&mut qh, h, pos);
        rope.apply_host(&mut kh, k_heads, pos);
        let (ck, cv) = cache.host(layer)?;
        ck.extend(kh.iter().map(|&x| f16::from_f32(x)));
        cv.extend(vh.iter().map(|&x| f16::from_f32(x)));
        let dims = AttnDims {
            heads: h,
            kv_heads: k_heads,
            head_dim: d,
        };
        let y = kernels::attention(&qh, ck, cv, t, pos, dims, self.kernel_scale(), self.window);
        Tensor::from_vec(y, (1, t, h * d), q.device()) // (1, T, H·D)
    }

    /// [`Path::Tensors`]: the same computation in candle ops, the cache held as tensors.
    /// q: (B, T, H·D), k, v: (B, T, K·D).
    #[allow(clippy::too_many_arguments)]
    fn tensors(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layer: usize,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, k_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let pos = cache.len;
        let q = q.reshape((b, t, h, d))?.transpose(1, 2)?; // (B, H, T, D)
        let k = k.reshape((b, t, k_heads, d))?.transpose(1, 2)?; // (B, K, T, D)
        let v = v.reshape((b, t, k_heads, d))?.transpose(1, 2)?; // (B, K, T, D)
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;
        // llama.cpp keeps K and V in f16 by default (`llama_context_params` type_k/type_v);
        // rounding them the same way brings greedy output much closer to it (6 of 12 golden
        // prompts identical instead of 2).
        let (k, v) = if self.numerics.f16_kv() {
            (
                k.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
                v.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
            )
        } else {
            (k, v.contiguous()?)
        };
        let (k, v) = cache.append(layer, k, v)?; // (B, K, P+T, D)
        let k = ops::repeat_kv(k, h / k_heads)?.contiguous()?; // (B, H, P+T, D)
        let v = ops::repeat_kv(v, h / k_heads)?.contiguous()?; // (B, H, P+T, D)
        let att = q.matmul(&k.t()?)?; // (B, H, T, P+T)
        // candle's fused softmax has no backward: lever's fused causal one when the scores
        // carry gradients (scale and mask inside, two tensors kept instead of six).
        let att = if att.track_op() {
            grad::causal_softmax(&att, self.kernel_scale() as f64, pos, self.window)?
        } else {
            let att = match self.scale {
                // transformers' Gemma 3: `matmul(q, kᵀ) * scaling`.
                Some(s) => (att * s as f64)?,
                None => (att / (d as f64).sqrt())?,
            };
            let att = match mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v)?; // (B, H, T, D)
        y.transpose(1, 2)?.reshape((b, t, h * d)) // (B, T, H·D)
    }

    /// One new token for each of several sequences: x (1, B, C), row r belonging to the
    /// sequence whose cache is `caches[r]`. The projections run once over all B rows; RoPE
    /// and attention run per row at its own position, against its own cache, in lever's
    /// kernel (callers check that `paths.inference` is [`Path::HostKernels`]).
    fn forward_rows(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &RopeTables,
        caches: &mut [&mut Cache],
    ) -> Result<Tensor> {
        let (_, b, _) = x.dims3()?;
        let (h, k_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k) = self.norm_qk(self.q.forward(x)?, self.k.forward(x)?)?;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = self.v.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let dims = AttnDims {
            heads: h,
            kv_heads: k_heads,
            head_dim: d,
        };
        let scale = self.kernel_scale();
        let mut qs = Vec::with_capacity(b * h * d);
        for (r, cache) in caches.iter_mut().enumerate() {
            let pos = cache.len;
            let mut qr = q[r * h * d..(r + 1) * h * d].to_vec();
            let mut kr = k[r * k_heads * d..(r + 1) * k_heads * d].to_vec();
            let vr = &v[r * k_heads * d..(r + 1) * k_heads * d];
            rope.apply_host(&mut qr, h, pos);
            rope.apply_host(&mut kr, k_heads, pos);
            let (ck, cv) = cache.host(layer)?;
            ck.extend(kr.iter().map(|&x| f16::from_f32(x)));
            cv.extend(vr.iter().map(|&x| f16::from_f32(x)));
            qs.extend(qr);
        }
        // Every row's heads in one parallel pass (rows alone are too small to split).
        // A local layer's row sees the last `window` keys of its cache.
        let row = k_heads * d;
        let views: Vec<(&[f16], &[f16])> = caches
            .iter()
            .map(|c| {
                let (ck, cv) = c.host_rows(layer);
                let start = self
                    .window
                    .map_or(0, |w| (ck.len() / row).saturating_sub(w));
                (&ck[start * row..], &cv[start * row..])
            })
            .collect();
        let y = kernels::attention_rows(&qs, &views, dims, scale);
        self.o
            .forward(&Tensor::from_vec(y, (1, b, h * d), x.device())?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma 3's GeGLU (tanh GELU) instead of SwiGLU.
    gelu: bool,
    numerics: Numerics,
    paths: Paths,
}

impl Mlp {
    fn load(w: &mut dyn WeightSource, i: usize, cfg: &DecoderConfig) -> crate::Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: w.linear(Param::Gate(i), f, c, false)?,
            up: w.linear(Param::Up(i), f, c, false)?,
            down: w.linear(Param::Down(i), c, f, false)?,
            gelu: cfg.gemma.is_some(),
            numerics: cfg.numerics,
            paths: Paths::mlp(w.device()),
        })
    }

    /// SwiGLU: down(silu(gate(x)) * up(x)); x: (B, T, C) -> (B, T, C) via (B, T, F).
    /// GeGLU (Gemma 3): gelu_tanh in place of silu.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?); // (B, T, F) each
        if self.gelu {
            return self.down.forward(&self.geglu(&g, &u)?);
        }
        let path = match Pass::of(&[&g, &u]) {
            Pass::Training => self.paths.training,
            Pass::Inference => self.paths.inference,
        };
        let h = match path {
            Path::Differentiable => grad::silu_mul(&g, &u)?,
            Path::HostKernels => {
                // The same values as the two tensor ops, in one parallel pass.
                let (hg, hu) = (HostRows::new(&g)?, HostRows::new(&u)?);
                let y = hg.with("swiglu", |gs| {
                    hu.with("swiglu", |us| Ok(kernels::silu_mul(gs, us)))
                })?;
                Tensor::from_vec(y, g.shape(), g.device())?
            }
            Path::Tensors => (candle_nn::ops::silu(&g)? * u)?,
        }; // (B, T, F)
        self.down.forward(&h)
    }
}

impl Mlp {
    /// gelu_tanh(g) · u, (B, T, F). On the CPU for inference, llama.cpp numerics take its
    /// f16 GELU table (`ggml_vec_geglu_f32`: GELU of the input rounded to f16, rounded to
    /// f16); transformers numerics the f32 formula (`gelu_pytorch_tanh`).
    fn geglu(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        let host =
            self.paths.inference == Path::HostKernels && Pass::of(&[g, u]) == Pass::Inference;
        if !host {
            return g.gelu()? * u;
        }
        let (hg, hu) = (HostRows::new(g)?, HostRows::new(u)?);
        let table = self.numerics == Numerics::LlamaCpp;
        let y = hg.with("geglu", |gs| {
            hu.with("geglu", |us| Ok(ops::gelu_mul(gs, us, table)))
        })?;
        Tensor::from_vec(y, g.shape(), g.device())
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    /// Before the MLP (Gemma 3: `pre_feedforward_layernorm`).
    ffn_norm: Tensor,
    mlp: Mlp,
    /// Gemma 3's norms of the attention's and the MLP's outputs, before each residual add.
    post_norms: Option<(Tensor, Tensor)>,
}

impl Block {
    /// The rest of the block once attention has given `h` for input `x`: (Gemma 3: norm of
    /// h,) residual, pre-norm MLP, (norm of its output,) residual.
    fn finish(&self, x: &Tensor, h: Tensor, eps: f32) -> Result<Tensor> {
        let h = match &self.post_norms {
            Some((n, _)) => ops::rms_norm(&h, n, eps)?,
            None => h,
        };
        let x = (x + h)?;
        let h = self.mlp.forward(&ops::rms_norm(&x, &self.ffn_norm, eps)?)?;
        let h = match &self.post_norms {
            Some((_, n)) => ops::rms_norm(&h, n, eps)?,
            None => h,
        };
        &x + h
    }

    /// [`Path::Differentiable`] for the whole block, when it trains on a prefix (no cache)
    /// and every projection is a plain trainable f32 weight (pretraining, full fine-tuning):
    /// each residual half as one fused op with its own backward (`ops::sublayer`), the same
    /// arithmetic as the separate ops. None when the block takes its halves' own paths.
    fn fused_training(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: &Cache,
        eps: f32,
    ) -> Result<Option<Tensor>> {
        let (a, m) = (&self.attn, &self.mlp);
        if cache.len != 0
            || self.post_norms.is_some()
            || a.paths.training != Path::Differentiable
            || m.paths.training != Path::Differentiable
            || x.dtype() != DType::F32
            || x.rank() != 3
        {
            return Ok(None);
        }
        let (Some(q), Some(k), Some(v), Some(o)) = (
            a.q.trained_weight(),
            a.k.trained_weight(),
            a.v.trained_weight(),
            a.o.trained_weight(),
        ) else {
            return Ok(None);
        };
        let (Some(gate), Some(up), Some(down)) = (
            m.gate.trained_weight(),
            m.up.trained_weight(),
            m.down.trained_weight(),
        ) else {
            return Ok(None);
        };
        let (b, t, _) = x.dims3()?;
        let shape = AttnShape::causal(b, t, a.num_heads, a.num_kv_heads, a.head_dim);
        let core = grad::CausalAttention::new(shape, rope, a.numerics.f16_kv())?;
        let x = sublayer::attention_half(x, &self.attn_norm, eps, core, [q, k, v, o])?;
        Ok(Some(sublayer::mlp_half(
            &x,
            &self.ffn_norm,
            eps,
            [gate, up, down],
        )?))
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    /// The output layer is the embedding table (no separate `output` weight).
    tied: bool,
    rope: Rope,
    /// Gemma 3's local layers' RoPE (their own base).
    rope_local: Option<Rope>,
    device: Device,
}

/// A weight of the decoder as `params` lists it.
#[derive(Debug, Clone, Copy)]
pub enum ParamRef<'a> {
    Embedding(&'a Embedding),
    /// A norm weight (C,).
    Vector(&'a Tensor),
    Linear(&'a Linear),
}

impl Decoder {
    /// Build from any weight source (GGUF, safetensors, random); missing or mis-shaped tensors
    /// are errors naming the tensor.
    pub fn load(w: &mut dyn WeightSource, cfg: &DecoderConfig) -> crate::Result<Self> {
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = w.embedding(Param::Embed, v, c)?;
        let offset = cfg.gemma.as_ref().map_or(0.0, |g| g.norm_offset);
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let gemma = cfg.gemma.is_some();
            let ffn_norm = if gemma {
                Param::PreFfnNorm(i)
            } else {
                Param::FfnNorm(i)
            };
            blocks.push(Block {
                attn_norm: norm(w, Param::AttnNorm(i), c, offset)?,
                attn: Attention::load(w, i, cfg)?,
                ffn_norm: norm(w, ffn_norm, c, offset)?,
                mlp: Mlp::load(w, i, cfg)?,
                post_norms: match gemma {
                    true => Some((
                        norm(w, Param::PostAttnNorm(i), c, offset)?,
                        norm(w, Param::PostFfnNorm(i), c, offset)?,
                    )),
                    false => None,
                },
            });
        }
        let norm = norm(w, Param::OutputNorm, c, offset)?;
        let tied = cfg.tie_embeddings || !w.has(Param::Output);
        let lm_head = if tied {
            embed.as_linear()?
        } else {
            w.linear(Param::Output, v, c, false)?
        };
        let device = w.device().clone();
        // llama.cpp numerics (GGUF models) take its rotation angles too.
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.max_seq_len,
            cfg.rope_style,
            cfg.numerics == Numerics::LlamaCpp,
            &device,
        )?;
        let rope_local = match &cfg.gemma {
            Some(g) => Some(Rope::new(
                cfg.head_dim,
                g.rope_local_theta,
                cfg.max_seq_len,
                cfg.rope_style,
                cfg.numerics == Numerics::LlamaCpp,
                &device,
            )?),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            tied,
            rope,
            rope_local,
            device,
        })
    }

    /// Every weight, once, in llama.cpp's order (the output layer only when it is not the
    /// embedding table): what export and full fine-tuning walk.
    pub fn params(&self) -> Vec<(Param, ParamRef<'_>)> {
        let mut out = vec![(Param::Embed, ParamRef::Embedding(&self.embed))];
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((Param::AttnNorm(i), ParamRef::Vector(&b.attn_norm)));
            for (p, l) in [
                (Param::Q(i), &b.attn.q),
                (Param::K(i), &b.attn.k),
                (Param::V(i), &b.attn.v),
                (Param::O(i), &b.attn.o),
            ] {
                out.push((p, ParamRef::Linear(l)));
            }
            if let Some((qn, kn)) = &b.attn.qk_norms {
                out.push((Param::QNorm(i), ParamRef::Vector(qn)));
                out.push((Param::KNorm(i), ParamRef::Vector(kn)));
            }
            match &b.post_norms {
                Some((attn_out, ffn_out)) => {
                    out.push((Param::PostAttnNorm(i), ParamRef::Vector(attn_out)));
                    out.push((Param::PreFfnNorm(i), ParamRef::Vector(&b.ffn_norm)));
                    out.push((Param::PostFfnNorm(i), ParamRef::Vector(ffn_out)));
                }
                None => out.push((Param::FfnNorm(i), ParamRef::Vector(&b.ffn_norm))),
            }
            for (p, l) in [
                (Param::Gate(i), &b.mlp.gate),
                (Param::Up(i), &b.mlp.up),
                (Param::Down(i), &b.mlp.down),
            ] {
                out.push((p, ParamRef::Linear(l)));
            }
        }
        out.push((Param::OutputNorm, ParamRef::Vector(&self.norm)));
        if !self.tied {
            out.push((Param::Output, ParamRef::Linear(&self.lm_head)));
        }
        out
    }

    /// Whether the output layer shares the embedding table.
    pub fn tied(&self) -> bool {
        self.tied
    }

    /// Full fine-tuning: every weight (quantized ones dequantized) becomes an f32 variable,
    /// biases included; a tied output layer shares the embedding's variable, so its gradient
    /// is the sum of both uses. Attached adapters stay attached. Returns the variables under
    /// their GGUF tensor names, in `params` order. The linear layers then keep their weight
    /// gradients until collected: take gradients with `backward` or `backward_checkpointed`,
    /// not `Tensor::backward`.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let dev = self.device.clone();
        let mut vars: Vec<(String, Var)> = Vec::new();
        let mut var = |name: String, t: Tensor| -> Result<Tensor> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            let t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(t)
        };
        let emb = match &self.embed {
            Embedding::Quantized(q) => q.dequantize(&dev)?,
            Embedding::Float(t) => t.clone(),
        };
        let emb = var(format!("{}.weight", Param::Embed.gguf_name()), emb)?;
        self.embed = Embedding::Float(emb.clone());
        let trainable = |l: &mut Linear,
                         name: String,
                         var: &mut dyn FnMut(String, Tensor) -> Result<Tensor>|
         -> Result<()> {
            let w = match l.weight() {
                Weight::Quantized(q) => q.dequantize(&dev)?,
                Weight::Float(t) => t.clone(),
            };
            let w = var(format!("{name}.weight"), w)?;
            let b = match l.bias() {
                Some(b) => Some(var(format!("{name}.bias"), b.clone())?),
                None => None,
            };
            let lora = l.lora.take();
            *l = Linear::new(Weight::Float(w), b)?;
            l.lora = lora;
            l.collect_weight_grad();
            Ok(())
        };
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.attn_norm = var(
                format!("{}.weight", Param::AttnNorm(i).gguf_name()),
                b.attn_norm.clone(),
            )?;
            for (p, l) in [
                (Param::Q(i), &mut b.attn.q),
                (Param::K(i), &mut b.attn.k),
                (Param::V(i), &mut b.attn.v),
                (Param::O(i), &mut b.attn.o),
            ] {
                trainable(l, p.gguf_name(), &mut var)?;
            }
            // Gemma 3's extra norms train too, under their own names (as `params` gives them).
            if let Some((qn, kn)) = &mut b.attn.qk_norms {
                *qn = var(
                    format!("{}.weight", Param::QNorm(i).gguf_name()),
                    qn.clone(),
                )?;
                *kn = var(
                    format!("{}.weight", Param::KNorm(i).gguf_name()),
                    kn.clone(),
                )?;
            }
            let ffn_norm = match &mut b.post_norms {
                Some((attn_out, _)) => {
                    *attn_out = var(
                        format!("{}.weight", Param::PostAttnNorm(i).gguf_name()),
                        attn_out.clone(),
                    )?;
                    Param::PreFfnNorm(i)
                }
                None => Param::FfnNorm(i),
            };
            b.ffn_norm = var(
                format!("{}.weight", ffn_norm.gguf_name()),
                b.ffn_norm.clone(),
            )?;
            if let Some((_, ffn_out)) = &mut b.post_norms {
                *ffn_out = var(
                    format!("{}.weight", Param::PostFfnNorm(i).gguf_name()),
                    ffn_out.clone(),
                )?;
            }
            for (p, l) in [
                (Param::Gate(i), &mut b.mlp.gate),
                (Param::Up(i), &mut b.mlp.up),
                (Param::Down(i), &mut b.mlp.down),
            ] {
                trainable(l, p.gguf_name(), &mut var)?;
            }
        }
        self.norm = var(
            format!("{}.weight", Param::OutputNorm.gguf_name()),
            self.norm.clone(),
        )?;
        if self.tied {
            self.lm_head = Linear::new(Weight::Float(emb), None)?;
            self.lm_head.collect_weight_grad();
        } else {
            trainable(&mut self.lm_head, Param::Output.gguf_name(), &mut var)?;
        }
        Ok(vars)
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.cfg)
    }

    /// All linear layers with a name, for LoRA, export and bandwidth accounting.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let a = &b.attn;
            let m = &b.mlp;
            for (p, l) in [
                (Param::Q(i), &a.q),
                (Param::K(i), &a.k),
                (Param::V(i), &a.v),
                (Param::O(i), &a.o),
                (Param::Gate(i), &m.gate),
                (Param::Up(i), &m.up),
                (Param::Down(i), &m.down),
            ] {
                out.push((p.gguf_name(), l));
            }
        }
        out.push((Param::Output.gguf_name(), &self.lm_head));
        out
    }

    /// The same linear layers, mutable: where adapters are attached.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let a = &mut b.attn;
            let m = &mut b.mlp;
            for (p, l) in [
                (Param::Q(i), &mut a.q),
                (Param::K(i), &mut a.k),
                (Param::V(i), &mut a.v),
                (Param::O(i), &mut a.o),
                (Param::Gate(i), &mut m.gate),
                (Param::Up(i), &mut m.up),
                (Param::Down(i), &mut m.down),
            ] {
                out.push((p.gguf_name(), l));
            }
        }
        out
    }

    /// ids: (B, T) u32 tokens at positions cache.len().. ; appends them to the cache.
    /// Returns logits (B, V) for `Logits::Last` or (B, T, V) for `Logits::All`.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache, which: Logits) -> Result<Tensor> {
        let x = self.blocks_forward(ids, cache)?;
        let t = x.dim(1)?;
        let x = match which {
            Logits::Last => x.narrow(1, t - 1, 1)?, // (B, 1, C)
            Logits::All => x,
        };
        let x = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        let logits = self.lm_head.forward(&x)?; // (B, T|1, V)
        match which {
            Logits::Last => logits.squeeze(1),
            Logits::All => Ok(logits),
        }
    }

    /// One decoding step for several independent sequences (continuous batching): `ids[r]`
    /// is the next token of the sequence whose keys and values `caches[r]` holds, each at its
    /// own position. The matrix products run once over all rows, so the weights are read once
    /// per step for every sequence; attention runs per sequence. Returns logits (B, V), row r
    /// equal to what `forward` gives for that sequence alone.
    pub fn step_batch(&self, ids: &[u32], caches: &mut [&mut Cache]) -> Result<Tensor> {
        if ids.len() != caches.len() || ids.is_empty() {
            candle_core::bail!(
                "step_batch: {} tokens for {} caches",
                ids.len(),
                caches.len()
            );
        }
        if let Some(c) = caches.iter().find(|c| c.len + 1 > self.cfg.max_seq_len) {
            candle_core::bail!(
                "sequence of {} tokens exceeds the context of {}",
                c.len + 1,
                self.cfg.max_seq_len
            );
        }
        if !self
            .blocks
            .iter()
            .all(|b| b.attn.paths.inference == Path::HostKernels)
        {
            // Without lever's attention kernel: one sequence at a time.
            let mut rows = Vec::with_capacity(ids.len());
            for (id, cache) in ids.iter().zip(caches.iter_mut()) {
                let input = Tensor::new(&[*id], &self.device)?.unsqueeze(0)?;
                rows.push(self.forward(&input, cache, Logits::Last)?);
            }
            return Tensor::cat(&rows, 0);
        }
        let longest = caches.iter().map(|c| c.len + 1).max().unwrap_or(1);
        let rope = self.rope.upto(longest)?;
        let rope_local = match &self.rope_local {
            Some(r) => Some(r.upto(longest)?),
            None => None,
        };
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?; // (1, B)
        let mut x = self.embed_forward(&input)?; // (1, B, C)
        let eps = self.cfg.rms_norm_eps;
        for (i, block) in self.blocks.iter().enumerate() {
            let rope = match (&rope_local, block.attn.window) {
                (Some(local), Some(_)) => local,
                _ => &rope,
            };
            let h = ops::rms_norm(&x, &block.attn_norm, eps)?;
            let h = block.attn.forward_rows(&h, i, rope, caches)?;
            x = block.finish(&x, h, eps)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let x = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        self.lm_head.forward(&x)?.squeeze(0) // (B, V)
    }

    /// The final hidden states (after the last norm), (B, T, C): for losses that send only
    /// some positions through the output layer (`head`).
    pub fn hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let x = self.blocks_forward(ids, cache)?;
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits for final hidden states: (..., C) -> (..., V).
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(x)
    }

    /// Embedding and every block: (B, T) ids -> (B, T, C) before the final norm.
    fn blocks_forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let past = cache.len;
        if past + t > self.cfg.max_seq_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the context of {}",
                past + t,
                self.cfg.max_seq_len
            );
        }
        let shared = self.shared(t, past)?;
        let mut x = self.embed_forward(ids)?; // (B, T, C)
        for i in 0..self.blocks.len() {
            x = self.block_forward(i, &x, &shared, cache)?;
        }
        cache.len = past + t;
        Ok(x)
    }

    /// The embedding rows of `ids`, (B, T) -> (B, T, C); Gemma 3 scales them by √C (in f32,
    /// as transformers' `Gemma3TextScaledWordEmbedding` and llama.cpp's `ggml_scale` do).
    fn embed_forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.forward(ids)?;
        match self.cfg.gemma {
            Some(_) => x * (self.cfg.hidden_size as f32).sqrt() as f64,
            None => Ok(x),
        }
    }

    /// RoPE tables and masks for T new tokens after `past`: the causal mask when T > 1, and
    /// for local layers the windowed one whenever a query would otherwise see too far back.
    fn shared(&self, t: usize, past: usize) -> Result<Shared> {
        let mask = if t > 1 {
            Some(ops::causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        let local = match (&self.rope_local, &self.cfg.gemma) {
            (Some(r), Some(g)) => {
                let w = g.sliding_window;
                let mask = if past + t > w {
                    Some(ops::causal_mask_window(t, past, w, &self.device)?)
                } else {
                    mask.clone()
                };
                Some((r.upto(past + t)?, mask))
            }
            _ => None,
        };
        Ok(Shared {
            rope: self.rope.upto(past + t)?,
            mask,
            local,
        })
    }

    /// Block `i`: (B, T, C) -> (B, T, C), pre-norm attention then pre-norm MLP, each residual.
    fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        shared: &Shared,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let block = &self.blocks[i];
        let (rope, mask) = shared.of(&block.attn);
        if let Some(y) = block.fused_training(x, rope, cache, self.cfg.rms_norm_eps)? {
            return Ok(y);
        }
        let h = ops::rms_norm(x, &block.attn_norm, self.cfg.rms_norm_eps)?;
        let h = block.attn.forward(&h, i, rope, mask, cache)?;
        block.finish(x, h, self.cfg.rms_norm_eps)
    }

    /// The gradients of `loss` (`Tensor::backward`), with the weight gradients the linear
    /// layers collected (`make_trainable`) moved in.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.take_weight_grads(&mut grads)?;
        Ok(grads)
    }

    /// Move the weight gradients the linear layers collected into `grads`.
    fn take_weight_grads(&self, grads: &mut GradStore) -> Result<()> {
        for (_, l) in self.linears() {
            l.take_weight_grad(grads)?;
        }
        Ok(())
    }

    /// Training forward and backward with activation checkpointing per block (Chen et al.
    /// 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174; PyTorch's
    /// `torch.utils.checkpoint`). The forward keeps only each block's input, (B, T, C), and
    /// drops the block's graph; the backward recomputes one block at a time from its input and
    /// chains the gradient through it. Peak activation memory is one block's graph plus L
    /// block inputs instead of every block's graph, for one extra forward pass.
    ///
    /// `loss_of` maps the final hidden states (after the last norm) to the scalar to
    /// differentiate. Returns that scalar (detached) and the gradients of every variable it
    /// depends on, summed over the segments. Whatever drives LoRA dropout must stay set until
    /// this returns: the recomputation draws the same masks again.
    pub fn backward_checkpointed(
        &self,
        ids: &Tensor,
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let (_b, t) = ids.dims2()?;
        if t > self.cfg.max_seq_len {
            candle_core::bail!(
                "sequence of {t} tokens exceeds the context of {}",
                self.cfg.max_seq_len
            );
        }
        let shared = self.shared(t, 0)?;
        let embedded = self.embed_forward(ids)?; // (B, T, C), with its graph if trainable
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = embedded.detach();
        for i in 0..self.blocks.len() {
            let out = self.block_forward(i, &x, &shared, &mut self.new_cache())?;
            inputs.push(x);
            x = out.detach();
        }
        // The head segment: last norm, output layer, loss.
        let top = Var::from_tensor(&x)?;
        drop(x);
        let loss = loss_of(&ops::rms_norm(
            top.as_tensor(),
            &self.norm,
            self.cfg.rms_norm_eps,
        )?)?;
        let mut grads = detached(loss.backward()?);
        let mut upstream = grads
            .remove(top.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reaches the last block".into()))?;
        drop(top);
        // Blocks, last to first: recompute, then backpropagate Σ out ⊙ upstream.
        while let Some(input) = inputs.pop() {
            let i = inputs.len();
            let x = Var::from_tensor(&input)?;
            drop(input);
            let out = self.block_forward(i, x.as_tensor(), &shared, &mut self.new_cache())?;
            let mut g = detached((out * &upstream)?.sum_all()?.backward()?);
            upstream = g
                .remove(x.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg(format!("no gradient reaches block {i}")))?;
            grads.extend(g)?;
        }
        // The embedding, when it is trained.
        if embedded.track_op() {
            grads.extend(detached((embedded * upstream)?.sum_all()?.backward()?))?;
        }
        self.take_weight_grads(&mut grads)?;
        Ok((loss.detach(), grads))
    }

    /// Bytes of weights read to produce one token (every linear layer, the norms and one
    /// embedding row), for bandwidth figures.
    pub fn weight_bytes_per_token(&self) -> usize {
        let linear: usize = self.linears().iter().map(|(_, l)| l.storage_bytes()).sum();
        linear + self.embed.row_bytes()
    }
}

/// A norm weight (n,), with `offset` added (Gemma 3 from Hugging Face: 1 + w, in f32 as
/// `Gemma3RMSNorm` computes it).
fn norm(w: &mut dyn WeightSource, p: Param, n: usize, offset: f32) -> crate::Result<Tensor> {
    let t = w.vector(p, n)?;
    Ok(if offset != 0.0 {
        (t + offset as f64)?
    } else {
        t
    })
}

/// The same gradients, cut from the graph. candle's backward leaves a variable's gradient
/// holding the forward tensors it was computed from (`grad · rhs` keeps `rhs`'s graph), so a
/// kept gradient keeps the whole forward pass alive; detaching frees it.
fn detached(mut grads: GradStore) -> GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
    grads
}

/// Convenience: the index of the largest value of a 1-D logits vector.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests;
