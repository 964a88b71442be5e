//! The one decoder: the llama family (Llama, SmolLM2, Mistral, Qwen2) as a pre-norm transformer
//! with RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU MLP.
//! Touvron et al. 2023, "LLaMA" (arXiv:2302.13971); reference implementations: candle
//! `candle-transformers/src/models/llama.rs`, Hugging Face `modeling_llama.py`, llama.cpp
//! `llm_build_llama`. Serves inference, fine-tuning, LoRA, RAG generation and pretraining alike:
//! every projection is a `Linear` (quantized-frozen or float, with a LoRA slot), and all
//! per-call state (KV cache, position) lives in `Cache`, outside the weights.
//!
//! Dimensions: B batch, T new tokens, P cached tokens, C hidden, H query heads,
//! K key/value heads, D head size (C = H·D), F MLP width, V vocabulary.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, IndexOp, Result, Tensor, Var};
use half::f16;

use crate::config::{DecoderConfig, KvPrecision};
use crate::formats::weights::{Embedding, Param, WeightSource};
use crate::kernels::{self, AttnDims};
use crate::linear::{Linear, Weight};
use crate::ops::grad::{self, AttnShape};
use crate::ops::host::HostRows;
use crate::ops::{self, Rope, RopeTables};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: (B, V). Generation.
    Last,
    /// Every position: (B, T, V). Scoring, perplexity, training.
    All,
}

/// One layer's keys and values.
#[derive(Debug, Clone)]
enum LayerKv {
    Empty,
    /// (B, K, P, D) tensors: the differentiable path and other devices.
    Tensors(Tensor, Tensor),
    /// Host rows (P, K, D) in f16 as llama.cpp's cache stores them: the CPU inference path,
    /// appended in place without copying what is there.
    Host(Vec<f16>, Vec<f16>),
}

/// Per-sequence state: keys and values of every layer for the tokens seen so far.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerKv>,
    len: usize,
    /// K·D: floats per token per layer.
    row: usize,
}

impl Cache {
    pub fn new(cfg: &DecoderConfig) -> Self {
        Self {
            layers: vec![LayerKv::Empty; cfg.num_layers],
            len: 0,
            row: cfg.num_kv_heads * cfg.head_dim,
        }
    }

    /// Tokens held (P).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::Empty);
        self.len = 0;
    }

    /// Keep only the first `len` tokens (to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for kv in self.layers.iter_mut() {
            match kv {
                LayerKv::Empty => {}
                LayerKv::Tensors(k, v) => {
                    *kv = LayerKv::Tensors(k.narrow(2, 0, len)?, v.narrow(2, 0, len)?)
                }
                LayerKv::Host(k, v) => {
                    k.truncate(len * self.row);
                    v.truncate(len * self.row);
                }
            }
        }
        self.len = len;
        Ok(())
    }

    /// A training pass (the fused attention of `ops::grad`) counts its tokens but keeps no
    /// keys: continuing from such a cache is an error, not a silently wrong answer.
    fn check_kept(&self, layer: usize) -> Result<()> {
        if self.len > 0 && matches!(self.layers[layer], LayerKv::Empty) {
            candle_core::bail!("this cache holds no keys (a training pass); start a new one");
        }
        Ok(())
    }

    /// Append this layer's new (B, K, T, D) keys/values; returns all (B, K, P+T, D).
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        self.check_kept(layer)?;
        let kv = match std::mem::replace(&mut self.layers[layer], LayerKv::Empty) {
            LayerKv::Empty => (k, v),
            LayerKv::Tensors(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            LayerKv::Host(hk, hv) => {
                let (_, kh, _, d) = k.dims4()?;
                let p = hk.len() / (kh * d);
                let dev = k.device();
                let to_t = |x: Vec<f16>| {
                    let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                    Tensor::from_vec(x, (1, p, kh, d), dev)?.transpose(1, 2)
                };
                (
                    Tensor::cat(&[&to_t(hk)?, &k], 2)?,
                    Tensor::cat(&[&to_t(hv)?, &v], 2)?,
                )
            }
        };
        self.layers[layer] = LayerKv::Tensors(kv.0.clone(), kv.1.clone());
        Ok(kv)
    }

    /// This layer's host rows, converted from tensors if an earlier call left them there.
    fn host(&mut self, layer: usize) -> Result<(&mut Vec<f16>, &mut Vec<f16>)> {
        self.check_kept(layer)?;
        let kv = &mut self.layers[layer];
        match std::mem::replace(kv, LayerKv::Empty) {
            LayerKv::Empty => *kv = LayerKv::Host(Vec::new(), Vec::new()),
            LayerKv::Tensors(k, v) => {
                let rows = |t: Tensor| {
                    let x = t.i(0)?.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?;
                    Ok::<_, candle_core::Error>(x.iter().map(|&v| f16::from_f32(v)).collect())
                };
                *kv = LayerKv::Host(rows(k)?, rows(v)?);
            }
            host => *kv = host,
        }
        match kv {
            LayerKv::Host(k, v) => Ok((k, v)),
            _ => unreachable!("set to Host above"),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    kv_precision: KvPrecision,
}

impl Attention {
    fn load(w: &mut dyn WeightSource, i: usize, cfg: &DecoderConfig) -> crate::Result<Self> {
        let (c, hd) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.qkv_bias();
        Ok(Self {
            q: w.linear(Param::Q(i), cfg.num_heads * hd, c, bias)?,
            k: w.linear(Param::K(i), cfg.num_kv_heads * hd, c, bias)?,
            v: w.linear(Param::V(i), cfg.num_kv_heads * hd, c, bias)?,
            o: w.linear(Param::O(i), c, cfg.num_heads * hd, false)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            kv_precision: cfg.kv_precision,
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
        let (b, t, _) = x.dims3()?;
        let (h, k_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let pos = cache.len;
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        // Training (gradients flowing) over a whole prefix on CPU: the fused attention core,
        // one graph node with its own backward. The cache counts the tokens but keeps no keys.
        if (q.track_op() || k.track_op() || v.track_op())
            && pos == 0
            && x.device().is_cpu()
            && q.dtype() == DType::F32
        {
            let shape = AttnShape {
                batch: b,
                len: t,
                heads: h,
                kv_heads: k_heads,
                head_dim: d,
            };
            let round = self.kv_precision == KvPrecision::F16;
            let y = grad::causal_attention(&q, &k, &v, shape, rope, round)?; // (B, T, C)
            return self.o.forward(&y);
        }
        // Inference on CPU with llama.cpp's f16 cache: lever's fused attention kernel over the
        // host cache. A batch, another device, or gradients with a cache take the
        // tensor path below, which is the same computation in candle ops.
        if self.kv_precision == KvPrecision::F16
            && x.device().is_cpu()
            && b == 1
            && d <= kernels::MAX_HEAD_DIM
            && !(q.track_op() || k.track_op() || v.track_op())
        {
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
            let scale = 1.0 / (d as f32).sqrt();
            let y = kernels::attention(&qh, ck, cv, t, pos, dims, scale);
            return self
                .o
                .forward(&Tensor::from_vec(y, (1, t, h * d), x.device())?);
        }
        let q = q.reshape((b, t, h, d))?.transpose(1, 2)?; // (B, H, T, D)
        let k = k.reshape((b, t, k_heads, d))?.transpose(1, 2)?; // (B, K, T, D)
        let v = v.reshape((b, t, k_heads, d))?.transpose(1, 2)?; // (B, K, T, D)
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;
        // llama.cpp keeps K and V in f16 by default (`llama_context_params` type_k/type_v);
        // rounding them the same way brings greedy output much closer to it (6 of 12 golden
        // prompts identical instead of 2).
        let (k, v) = match self.kv_precision {
            KvPrecision::F16 => (
                k.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
                v.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
            ),
            KvPrecision::F32 => (k, v.contiguous()?),
        };
        let (k, v) = cache.append(layer, k, v)?; // (B, K, P+T, D)
        let k = ops::repeat_kv(k, h / k_heads)?.contiguous()?; // (B, H, P+T, D)
        let v = ops::repeat_kv(v, h / k_heads)?.contiguous()?; // (B, H, P+T, D)
        let att = q.matmul(&k.t()?)?; // (B, H, T, P+T)
        // candle's fused softmax has no backward: lever's fused causal one when gradients
        // flow (scale and mask inside, two tensors kept instead of six).
        let att = if att.track_op() {
            grad::causal_softmax(&att, 1.0 / (d as f64).sqrt(), pos)?
        } else {
            let att = (att / (d as f64).sqrt())?;
            let att = match mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?; // (B, T, C)
        self.o.forward(&y)
    }

    /// Whether `forward_rows` can run (lever's host attention kernel).
    fn rows_supported(&self, dev: &Device) -> bool {
        self.kv_precision == KvPrecision::F16
            && dev.is_cpu()
            && self.head_dim <= kernels::MAX_HEAD_DIM
    }

    /// One new token for each of several sequences: x (1, B, C), row r belonging to the
    /// sequence whose cache is `caches[r]`. The projections run once over all B rows; RoPE
    /// and attention run per row at its own position, against its own cache.
    fn forward_rows(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &RopeTables,
        caches: &mut [&mut Cache],
    ) -> Result<Tensor> {
        let (_, b, _) = x.dims3()?;
        let (h, k_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let k = self.k.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let v = self.v.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let dims = AttnDims {
            heads: h,
            kv_heads: k_heads,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
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
        let views: Vec<(&[f16], &[f16])> = caches
            .iter()
            .map(|c| match &c.layers[layer] {
                LayerKv::Host(k, v) => (k.as_slice(), v.as_slice()),
                _ => unreachable!("host() made this layer's cache a host cache"),
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
}

impl Mlp {
    fn load(w: &mut dyn WeightSource, i: usize, cfg: &DecoderConfig) -> crate::Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: w.linear(Param::Gate(i), f, c, false)?,
            up: w.linear(Param::Up(i), f, c, false)?,
            down: w.linear(Param::Down(i), c, f, false)?,
        })
    }

    /// SwiGLU: down(silu(gate(x)) * up(x)); x: (B, T, C) -> (B, T, C) via (B, T, F).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        let h = if g.track_op() || u.track_op() {
            grad::silu_mul(&g, &u)?
        } else if g.device().is_cpu() && g.dtype() == DType::F32 && g.shape() == u.shape() {
            // Inference: the same values as the two tensor ops, in one parallel pass.
            let (hg, hu) = (HostRows::new(&g)?, HostRows::new(&u)?);
            let y = hg.with("swiglu", |gs| {
                hu.with("swiglu", |us| Ok(kernels::silu_mul(gs, us)))
            })?;
            Tensor::from_vec(y, g.shape(), g.device())?
        } else {
            (candle_nn::ops::silu(&g)? * u)?
        };
        self.down.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    mlp: Mlp,
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
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            blocks.push(Block {
                attn_norm: w.vector(Param::AttnNorm(i), c)?,
                attn: Attention::load(w, i, cfg)?,
                ffn_norm: w.vector(Param::FfnNorm(i), c)?,
                mlp: Mlp::load(w, i, cfg)?,
            });
        }
        let norm = w.vector(Param::OutputNorm, c)?;
        let tied = cfg.tie_embeddings || !w.has(Param::Output);
        let lm_head = if tied {
            embed.as_linear()?
        } else {
            w.linear(Param::Output, v, c, false)?
        };
        let device = w.device().clone();
        // GGUF models (f16 cache) take llama.cpp's rotation angles too.
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.max_seq_len,
            cfg.rope_style,
            cfg.kv_precision == KvPrecision::F16,
            &device,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            tied,
            rope,
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
            out.push((Param::FfnNorm(i), ParamRef::Vector(&b.ffn_norm)));
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
            b.ffn_norm = var(
                format!("{}.weight", Param::FfnNorm(i).gguf_name()),
                b.ffn_norm.clone(),
            )?;
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
            .all(|b| b.attn.rows_supported(&self.device))
        {
            // The tensor path: one sequence at a time.
            let mut rows = Vec::with_capacity(ids.len());
            for (id, cache) in ids.iter().zip(caches.iter_mut()) {
                let input = Tensor::new(&[*id], &self.device)?.unsqueeze(0)?;
                rows.push(self.forward(&input, cache, Logits::Last)?);
            }
            return Tensor::cat(&rows, 0);
        }
        let longest = caches.iter().map(|c| c.len + 1).max().unwrap_or(1);
        let rope = self.rope.upto(longest)?;
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?; // (1, B)
        let mut x = self.embed.forward(&input)?; // (1, B, C)
        for (i, block) in self.blocks.iter().enumerate() {
            let h = ops::rms_norm(&x, &block.attn_norm, self.cfg.rms_norm_eps)?;
            let h = block.attn.forward_rows(&h, i, &rope, caches)?;
            x = (x + h)?;
            let h = ops::rms_norm(&x, &block.ffn_norm, self.cfg.rms_norm_eps)?;
            x = (&x + block.mlp.forward(&h)?)?;
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
        let mask = if t > 1 {
            Some(ops::causal_mask(t, past, &self.device)?)
        } else {
            None
        };
        let rope = self.rope.upto(past + t)?;
        let mut x = self.embed.forward(ids)?; // (B, T, C)
        for i in 0..self.blocks.len() {
            x = self.block_forward(i, &x, &rope, mask.as_ref(), cache)?;
        }
        cache.len = past + t;
        Ok(x)
    }

    /// Block `i`: (B, T, C) -> (B, T, C), pre-norm attention then pre-norm MLP, each residual.
    fn block_forward(
        &self,
        i: usize,
        x: &Tensor,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let block = &self.blocks[i];
        let h = ops::rms_norm(x, &block.attn_norm, self.cfg.rms_norm_eps)?;
        let h = block.attn.forward(&h, i, rope, mask, cache)?;
        let x = (x + h)?;
        let h = ops::rms_norm(&x, &block.ffn_norm, self.cfg.rms_norm_eps)?;
        &x + block.mlp.forward(&h)?
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
        let mask = if t > 1 {
            Some(ops::causal_mask(t, 0, &self.device)?)
        } else {
            None
        };
        let rope = self.rope.upto(t)?;
        let embedded = self.embed.forward(ids)?; // (B, T, C), with its graph if trainable
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = embedded.detach();
        for i in 0..self.blocks.len() {
            let out = self.block_forward(i, &x, &rope, mask.as_ref(), &mut self.new_cache())?;
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
            let out = self.block_forward(
                i,
                x.as_tensor(),
                &rope,
                mask.as_ref(),
                &mut self.new_cache(),
            )?;
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{Arch, DecoderConfig};
    use crate::formats::weights::RandomWeights;

    fn tiny(arch: Arch) -> Decoder {
        let cfg = DecoderConfig::tiny(arch, 50);
        Decoder::load(&mut RandomWeights::new(3, &Device::Cpu), &cfg).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// One pass over 9 tokens, then the same tokens as single cached steps, then the cache cut
    /// back to 4 and refilled with the rest: every logit within 1e-5 of the full pass.
    fn assert_cache_exact(m: &Decoder, label: &str) -> (Tensor, Tensor) {
        let ids: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 49, 0, 23];
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let full = m
            .forward(&x, &mut m.new_cache(), Logits::All)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut cache = m.new_cache();
        for (t, id) in ids.iter().enumerate() {
            let xi = Tensor::new(&[*id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let step = m
                .forward(&xi, &mut cache, Logits::Last)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let d = max_diff(&step, &full.get(t).unwrap());
            assert!(d < 1e-5, "{label} position {t}: {d}");
        }
        assert_eq!(cache.len(), ids.len());
        cache.truncate(4).unwrap();
        let rest = m
            .forward(&x.narrow(1, 4, 5).unwrap(), &mut cache, Logits::All)
            .unwrap();
        let d = max_diff(&rest.squeeze(0).unwrap(), &full.narrow(0, 4, 5).unwrap());
        assert!(d < 1e-5, "{label} truncated and refilled: {d}");
        (x, full)
    }

    /// The KV cache is exact: one pass over T tokens gives the logits of T single steps,
    /// and a prompt split in two chunks gives the same as one chunk.
    #[test]
    fn cached_steps_equal_one_full_pass() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let m = tiny(arch);
            let (x, full) = assert_cache_exact(&m, &format!("{arch:?}"));
            let mut cache = m.new_cache();
            m.forward(&x.narrow(1, 0, 4).unwrap(), &mut cache, Logits::Last)
                .unwrap();
            let rest = m
                .forward(&x.narrow(1, 4, 5).unwrap(), &mut cache, Logits::All)
                .unwrap();
            let d = max_diff(&rest.squeeze(0).unwrap(), &full.narrow(0, 4, 5).unwrap());
            assert!(d < 1e-5, "{arch:?} chunked prefill: {d}");
        }
    }

    /// GGUF-style models (f16 cache) run lever's attention kernel on CPU: cached steps and
    /// chunked prefill still equal one pass, and a batch of two (which takes the tensor path,
    /// f32 attention) gives nearly the same logits.
    #[test]
    fn attention_kernel_path_agrees_with_the_tensor_path() {
        for arch in [Arch::Llama, Arch::Qwen2] {
            let mut cfg = DecoderConfig::tiny(arch, 50);
            cfg.kv_precision = KvPrecision::F16;
            let m = Decoder::load(&mut RandomWeights::new(3, &Device::Cpu), &cfg).unwrap();
            let (x, full) = assert_cache_exact(&m, &format!("{arch:?} f16 cache"));
            let batch = Tensor::cat(&[&x, &x], 0).unwrap();
            let tensors = m.forward(&batch, &mut m.new_cache(), Logits::All).unwrap();
            let d = max_diff(&tensors.get(0).unwrap(), &full);
            let scale = full
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d > 0.0 && d < 1e-2 * scale,
                "{arch:?} kernel vs tensor path: {d} (scale {scale})"
            );
        }
    }

    #[test]
    fn truncated_cache_recomputes_the_same_logits() {
        let m = tiny(Arch::Llama);
        let x = Tensor::new(&[5u32, 6, 7, 8], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache = m.new_cache();
        let a = m.forward(&x, &mut cache, Logits::Last).unwrap();
        cache.truncate(2).unwrap();
        let b = m
            .forward(&x.narrow(1, 2, 2).unwrap(), &mut cache, Logits::Last)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn a_zero_lora_changes_nothing_and_a_nonzero_one_does() {
        let mut m = tiny(Arch::Llama);
        let x = Tensor::new(&[1u32, 2, 3], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let base = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
        let q = &mut m.blocks[0].attn.q;
        let (out, inp) = q.dims();
        q.lora = Some(crate::linear::Lora {
            a: Tensor::ones((4, inp), candle_core::DType::F32, &Device::Cpu).unwrap(),
            b: Tensor::zeros((out, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
            scale: 2.0,
            dropout: None,
        });
        let same = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
        assert_eq!(max_diff(&base, &same), 0.0);
        let q = &mut m.blocks[0].attn.q;
        if let Some(l) = q.lora.as_mut() {
            l.b = Tensor::ones((out, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        }
        let changed = m.forward(&x, &mut m.new_cache(), Logits::All).unwrap();
        assert!(max_diff(&base, &changed) > 1e-3);
    }
}
