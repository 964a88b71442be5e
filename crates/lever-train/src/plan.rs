//! Planning a run before spending it: FLOPs, memory, time and cost of inference, LoRA or full
//! fine-tuning, or pretraining, for a decoder given by its shape or only its parameter count,
//! on this machine (calibrated by measuring it: [`calibrate`]) or on named GPUs with data
//! parallelism.
//!
//! Formulas, and where they come from:
//! - Training FLOPs per token: 6·N for the matrix products (forward 2·N, backward 4·N: the
//!   gradients of inputs and of weights; Kaplan et al. 2020, arXiv:2001.08361 §2.1) plus the
//!   attention scores and their use, 12·L·(H·Q)·T (PaLM, arXiv:2204.02311 appendix B; nanoGPT
//!   `estimate_mfu`). N counts every weight a token is multiplied by: a tied embedding once,
//!   an untied input embedding not at all (it is looked up). LoRA trains no base
//!   weight: 4·N (no weight gradients) + the attention term + 6 per adapter weight. Full
//!   recomputation runs each layer's forward again: + 2·N_layers + 4·L·(H·Q)·T.
//! - Memory, as EleutherAI's cookbook (`calc/calc_transformer_mem.py`, after ZeRO,
//!   arXiv:1910.02054, and Korthikanti et al. 2022, arXiv:2205.05198): weights, gradients and
//!   AdamW state per trainable value (mixed precision: bf16 weights, fp32 gradients, fp32
//!   master copy + two moments = 12 bytes; lever on a CPU: f32 everything, two moments = 8
//!   bytes); activations per layer s·b·h·(34 + 5·a·s/h) bytes at 2 bytes a value
//!   (Korthikanti's Table 2, generalized to p bytes as the cookbook does:
//!   s·b·h·(16p + 2 + (2p + 1)·a·s/h)), s·b·h·(16p + 2) with selective recomputation (the
//!   attention scores recomputed; the cookbook's `--checkpoint-activations`), p·s·b·h with
//!   full recomputation (only each layer's input kept). KV cache: 2 (keys and values) · L ·
//!   kv heads · Q · tokens · bytes (kipp.ly, "Transformer inference arithmetic"; the
//!   cookbook's formula leaves out the factor 2).
//! - Data parallel: a ring all-reduce of the gradients every step sends 2·(n − 1)/n of
//!   their bytes over each device's link (Patarasuk & Yuan 2009; NCCL's "bus bandwidth").
//!   It is added to the compute time, not overlapped: an upper bound.
//!
//! The reference numbers in the tests come from running the cookbook's scripts themselves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lever_model::DecoderConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::recipe::{ModelShape, Recipe};

/// A decoder's sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shape {
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Q, the size of one head (usually width / heads).
    pub head_dim: usize,
    pub mlp_width: usize,
    /// Matrices in each MLP: 3 for SwiGLU/GeGLU (llama), 2 for GPT's.
    pub mlp_linears: usize,
    pub vocab: usize,
    /// The training window, or the KV cache's length for inference.
    pub context: usize,
    /// The output layer is the embedding table.
    pub tied: bool,
}

impl Shape {
    /// A llama-family decoder (SwiGLU MLP), or a GPT-style one with `mlp_linears` = 2.
    /// `mlp_width` defaults to 4·width for 2 matrices and 8/3·width (rounded up to a
    /// multiple of 64) for 3, which keep the MLP at 8·width² weights.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layers: usize,
        width: usize,
        heads: usize,
        kv_heads: Option<usize>,
        mlp_width: Option<usize>,
        mlp_linears: usize,
        vocab: usize,
        context: usize,
    ) -> Shape {
        let default_mlp = if mlp_linears == 2 {
            4 * width
        } else {
            (8 * width).div_ceil(3).div_ceil(64) * 64
        };
        Shape {
            layers,
            width,
            heads,
            kv_heads: kv_heads.unwrap_or(heads),
            head_dim: width / heads.max(1),
            mlp_width: mlp_width.unwrap_or(default_mlp),
            mlp_linears,
            vocab,
            context,
            tied: true,
        }
    }

    /// A model's resolved configuration, at its own context.
    pub fn of_config(cfg: &DecoderConfig) -> Shape {
        Shape {
            layers: cfg.num_layers,
            width: cfg.hidden_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            mlp_width: cfg.intermediate_size,
            mlp_linears: 3,
            vocab: cfg.vocab_size,
            context: cfg.max_seq_len,
            tied: cfg.tie_embeddings,
        }
    }

    /// A pretraining recipe's model at a vocabulary of `vocab`.
    pub fn of_recipe(m: &ModelShape, vocab: usize) -> Shape {
        Shape {
            layers: m.layers,
            width: m.width,
            heads: m.heads,
            kv_heads: m.kv_heads,
            head_dim: m.width / m.heads.max(1),
            mlp_width: m.mlp_width,
            mlp_linears: 3,
            vocab,
            context: m.context,
            tied: m.tie_embeddings,
        }
    }

    /// Every size at least 1, heads dividing the width, key/value heads dividing the heads.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, problem: String| Error::Config {
            what: what.into(),
            problem,
        };
        for (what, v) in [
            ("--layers", self.layers),
            ("--width", self.width),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--mlp-width", self.mlp_width),
            ("--vocab", self.vocab),
            ("--context", self.context),
        ] {
            if v == 0 {
                return Err(bad(what, "must be at least 1".into()));
            }
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(bad(
                "--heads",
                format!(
                    "{} heads do not divide the width {}",
                    self.heads, self.width
                ),
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(bad(
                "--kv-heads",
                format!(
                    "{} key/value heads do not divide the {} heads",
                    self.kv_heads, self.heads
                ),
            ));
        }
        if !(2..=3).contains(&self.mlp_linears) {
            return Err(bad(
                "--mlp-linears",
                format!("{} (2: GPT's MLP, 3: SwiGLU)", self.mlp_linears),
            ));
        }
        Ok(())
    }

    /// H·Q: the width of the attention's queries (usually the model's width).
    fn attn_width(&self) -> f64 {
        (self.heads * self.head_dim) as f64
    }

    /// Weights of one layer: the four attention projections, the MLP, two norms.
    pub fn layer_params(&self) -> f64 {
        let (c, q) = (self.width as f64, self.head_dim as f64);
        let (h, kv) = (self.heads as f64, self.kv_heads as f64);
        let attn = c * h * q + 2.0 * c * kv * q + h * q * c;
        attn + (self.mlp_linears * self.width * self.mlp_width) as f64 + 2.0 * c
    }

    /// The embedding table (twice when the output layer is its own matrix).
    pub fn embedding_params(&self) -> f64 {
        (self.vocab * self.width) as f64 * if self.tied { 1.0 } else { 2.0 }
    }

    /// Every weight, a tied embedding counted once (as `recipe::Size::of`).
    pub fn params(&self) -> f64 {
        self.embedding_params() + self.layers as f64 * self.layer_params() + self.width as f64
    }

    /// The weights a token is multiplied by: all but an untied input embedding, which is
    /// looked up, not multiplied (the output layer is a product, tied or not).
    pub fn matmul_params(&self) -> f64 {
        let lookup = if self.tied {
            0.0
        } else {
            (self.vocab * self.width) as f64
        };
        self.params() - lookup
    }

    /// LoRA's trainable values at rank r on every linear layer of every block (q, k, v, o,
    /// and the MLP's matrices): r·(in + out) each.
    pub fn lora_params(&self, rank: usize) -> f64 {
        let (c, q, f) = (self.width, self.head_dim, self.mlp_width);
        let (h, kv) = (self.heads, self.kv_heads);
        let pairs = [(c, h * q), (c, kv * q), (c, kv * q), (h * q, c)];
        let attn: usize = pairs.iter().map(|(i, o)| i + o).sum();
        let mlp = self.mlp_linears * (c + f);
        (rank * self.layers * (attn + mlp)) as f64
    }

    /// Attention FLOPs per token over a window of `t`, forward only: Q·Kᵀ and the weights
    /// times V, 2·T·(H·Q) each, per layer (the full square, as PaLM and the cookbook count).
    fn attention_forward_flops(&self, t: usize) -> f64 {
        4.0 * self.layers as f64 * self.attn_width() * t as f64
    }

    /// Values written by the element-wise work of one token through one layer, forward and
    /// backward together (norms, residual adds, RoPE, the MLP's gate, the causal softmax):
    /// what the calibration's per-element time multiplies.
    ///
    /// Plus the output layer's logits at the `trained` fraction of positions that reach it:
    /// the cross-entropy's softmax and its gradient, two values per vocabulary entry (at the
    /// default model's 49,152, about a third as much again as its 30 blocks).
    fn elementwise_per_token(&self, t: usize, trained: f64) -> f64 {
        let per_layer = 6 * self.width + self.mlp_linears * self.mlp_width + self.heads * t / 2;
        (self.layers * per_layer) as f64 + 2.0 * self.vocab as f64 * trained
    }

    /// Bytes of keys and values per token of the cache.
    fn kv_per_token(&self, bytes: f64) -> f64 {
        2.0 * (self.layers * self.kv_heads * self.head_dim) as f64 * bytes
    }
}

/// The model: a shape, or only a parameter count (then attention, activations and the KV
/// cache are unknown and left out).
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    Shape(Shape),
    Params(f64),
}

impl Model {
    pub fn params(&self) -> f64 {
        match self {
            Model::Shape(s) => s.params(),
            Model::Params(n) => *n,
        }
    }

    pub fn shape(&self) -> Option<&Shape> {
        match self {
            Model::Shape(s) => Some(s),
            Model::Params(_) => None,
        }
    }
}

/// What is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Generation: prompt processing and token-by-token decoding with a KV cache.
    Infer,
    /// LoRA adapters on a frozen base.
    Lora,
    /// Every weight trained on given data.
    Full,
    /// Every weight trained from scratch.
    Pretrain,
}

/// The job's sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub kind: JobKind,
    /// Training tokens (every position of every window, padding included), or for inference
    /// the tokens to generate (optional).
    pub tokens: Option<f64>,
    /// Sequences per optimizer step (all devices together), or concurrent sequences for
    /// inference.
    pub batch: usize,
    /// Micro-batches per optimizer step: a device holds the activations of batch /
    /// (devices · grad_accum) sequences at a time.
    pub grad_accum: usize,
    /// The window (training) or the cache length (inference).
    pub context: usize,
    pub lora_rank: usize,
    /// The fraction of positions whose next token is trained: fine-tuning sends only those
    /// through the output layer (lever's trainer does; 1 for pretraining).
    pub trained_fraction: f64,
    /// Optimizer steps, when known (else tokens / (batch × context)).
    pub steps: Option<f64>,
}

/// What a fine-tuning run will process, from its data: `lever plan --data`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataTokens {
    /// Positions computed, padding included: each micro-batch is padded to its longest
    /// example.
    pub tokens: f64,
    /// Positions whose next token is trained.
    pub trained: f64,
    /// The mean padded length of a micro-batch.
    pub mean_window: f64,
    pub micro_batches: usize,
}

/// Count what `steps` steps of [`crate::Trainer`] with `config` will process, drawing the
/// same micro-batches ([`crate::trainer::planned_batches`]) from examples of these (length,
/// trained tokens).
pub fn data_tokens(examples: &[(usize, usize)], config: &crate::TrainConfig) -> DataTokens {
    let batches = crate::trainer::planned_batches(config, examples.len());
    let (mut tokens, mut trained) = (0f64, 0f64);
    for b in &batches {
        let longest = b.iter().map(|&i| examples[i].0).max().unwrap_or(0);
        tokens += (longest * b.len()) as f64;
        trained += b.iter().map(|&i| examples[i].1 as f64).sum::<f64>();
    }
    let sequences = (batches.len() * config.batch_size).max(1) as f64;
    DataTokens {
        tokens,
        trained,
        mean_window: tokens / sequences,
        micro_batches: batches.len(),
    }
}

/// Chinchilla's compute-optimal data: about 20 tokens per parameter (Hoffmann et al. 2022,
/// arXiv:2203.15556, Table 3).
pub const CHINCHILLA_TOKENS_PER_PARAM: f64 = 20.0;

/// Bytes per value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Precision {
    pub name: &'static str,
    /// Weights as computed with.
    pub weight: f64,
    /// Gradients.
    pub grad: f64,
    /// AdamW's state per trainable value (fp32 master copy when the weights are lower
    /// precision, and the two moments).
    pub adamw: f64,
    /// Activations kept for the backward pass.
    pub activation: f64,
    /// The KV cache.
    pub kv: f64,
}

impl Precision {
    /// Mixed precision on GPUs: bf16 weights and activations, fp32 gradients, fp32 master
    /// weights and moments (the cookbook's defaults).
    pub const BF16_MIXED: Precision = Precision {
        name: "bf16-mixed",
        weight: 2.0,
        grad: 4.0,
        adamw: 12.0,
        activation: 2.0,
        kv: 2.0,
    };
    /// lever on a CPU: f32 weights, gradients, moments and activations.
    pub const F32: Precision = Precision {
        name: "f32",
        weight: 4.0,
        grad: 4.0,
        adamw: 8.0,
        activation: 4.0,
        kv: 4.0,
    };
}

/// A GPU's datasheet numbers (dense, no sparsity).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    /// Peak dense bf16 tensor FLOP/s (fp16 for the V100, which has no bf16).
    pub flops: f64,
    /// Memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Memory, bytes.
    pub memory: f64,
    /// The interconnect between the GPUs of one server, by default.
    pub link: &'static str,
}

const GB: f64 = 1e9;
const T: f64 = 1e12;

/// Datasheet figures: NVIDIA H100 (SXM5 and PCIe), H200, A100 (SXM 80 GB and 40 GB), L40S,
/// V100 SXM2 datasheets; AMD Instinct MI300X datasheet.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "H100",
        flops: 989.4 * T,
        memory_bandwidth: 3350.0 * GB,
        memory: 80.0 * GB,
        link: "nvlink4",
    },
    Gpu {
        name: "H100-PCIe",
        flops: 756.0 * T,
        memory_bandwidth: 2000.0 * GB,
        memory: 80.0 * GB,
        link: "pcie5",
    },
    Gpu {
        name: "H200",
        flops: 989.4 * T,
        memory_bandwidth: 4800.0 * GB,
        memory: 141.0 * GB,
        link: "nvlink4",
    },
    Gpu {
        name: "A100",
        flops: 312.0 * T,
        memory_bandwidth: 2039.0 * GB,
        memory: 80.0 * GB,
        link: "nvlink3",
    },
    Gpu {
        name: "A100-40GB",
        flops: 312.0 * T,
        memory_bandwidth: 1555.0 * GB,
        memory: 40.0 * GB,
        link: "nvlink3",
    },
    Gpu {
        name: "L40S",
        flops: 362.05 * T,
        memory_bandwidth: 864.0 * GB,
        memory: 48.0 * GB,
        link: "pcie4",
    },
    Gpu {
        name: "V100",
        flops: 125.0 * T,
        memory_bandwidth: 900.0 * GB,
        memory: 32.0 * GB,
        link: "nvlink2",
    },
    Gpu {
        name: "MI300X",
        flops: 1307.4 * T,
        memory_bandwidth: 5300.0 * GB,
        memory: 192.0 * GB,
        link: "infinity-fabric",
    },
];

/// A GPU by name, ignoring case.
pub fn gpu(name: &str) -> Option<&'static Gpu> {
    GPUS.iter().find(|g| g.name.eq_ignore_ascii_case(name))
}

/// Links, in bytes/s each way per device: NVLink 2/3/4 (300, 600, 900 GB/s both ways per
/// GPU), PCIe 4.0/5.0 x16, InfiniBand HDR (200 Gb/s) and NDR (400 Gb/s), Ethernet, and AMD's
/// Infinity Fabric (MI300X: 7 links of 64 GB/s each way).
pub const INTERCONNECTS: &[(&str, f64)] = &[
    ("nvlink2", 150.0 * GB),
    ("nvlink3", 300.0 * GB),
    ("nvlink4", 450.0 * GB),
    ("pcie4", 32.0 * GB),
    ("pcie5", 64.0 * GB),
    ("ib-hdr", 25.0 * GB),
    ("ib-ndr", 50.0 * GB),
    ("100gbe", 12.5 * GB),
    ("25gbe", 3.125 * GB),
    ("infinity-fabric", 448.0 * GB),
];

/// An interconnect by name, or a number of GB/s.
pub fn interconnect(s: &str) -> Option<(String, f64)> {
    if let Some((name, bw)) = INTERCONNECTS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
    {
        return Some(((*name).to_string(), *bw));
    }
    let gbs = s
        .trim_end_matches("GB/s")
        .trim_end_matches("gb/s")
        .trim()
        .parse::<f64>()
        .ok()?;
    (gbs.is_finite() && gbs > 0.0).then(|| (format!("{gbs} GB/s"), gbs * GB))
}

/// What this machine measured: `lever plan --calibrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The CPU's model name (/proc/cpuinfo), for the record.
    pub cpu: String,
    /// Threads the kernels ran on.
    pub threads: usize,
    /// When, in seconds since 1970.
    pub created_unix: u64,
    pub lever_version: String,
    /// The fastest f32 1024³ product through the training matmul (`peak::measure`).
    pub matmul_flops_per_s: f64,
    /// A parallel copy of 128 MB: bytes read plus bytes written, per second.
    pub memory_bytes_per_s: f64,
    /// Training steps of lever's own trainer on small decoders.
    pub probes: Vec<Probe>,
    /// Fitted: the rate of the matrix work in a training step (FLOP/s)...
    pub train_flops_per_s: f64,
    /// ... and the time of the element-wise work, seconds per value
    /// ([`Shape::elementwise_per_token`]).
    pub elementwise_s: f64,
    /// A LoRA step on a frozen base, measured ([`LORA_PROBE`]): it goes through the
    /// adapters' elementary graph (about twenty operations a block), not the fused ops that
    /// pretraining and full fine-tuning use, so the rates above under-predict it. Absent in
    /// calibrations made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_probe: Option<Probe>,
    /// The LoRA probe's time over what the rates above predict for it: LoRA plans multiply
    /// their compute time by it (1 when there is no LoRA probe).
    #[serde(default = "one")]
    pub lora_factor: f64,
}

fn one() -> f64 {
    1.0
}

/// One probe: a small decoder trained from scratch with [`crate::Pretrainer`] on random
/// tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    /// Key/value heads, when fewer than `heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    pub mlp_width: usize,
    pub vocab: usize,
    pub context: usize,
    pub batch: usize,
    pub steps: usize,
    /// Seconds per optimizer step: the first quartile of the timed steps ([`probe_step_s`]).
    pub step_s: f64,
    pub tokens_per_s: f64,
}

/// The probes' shapes: one where the element-wise work is a large part (small width), one
/// where the matrix products are nearly all of it (width 1024): their ratios of FLOPs to
/// element-wise values differ eightfold, which separates the two rates. Neither is a
/// preset's shape.
const PROBES: [(usize, usize, usize, usize, usize, usize, usize); 2] = [
    // layers, width, heads, mlp, vocab, context, batch
    (3, 192, 6, 512, 96, 96, 8),
    (1, 1024, 16, 2752, 256, 128, 8),
];

/// The LoRA probe: two blocks of the default model's shape (width 576, 9 heads, 3 key/value
/// heads, MLP 1536), rank 8 on every linear layer, batch 4 of 224 tokens (what `lever
/// finetune` draws from GSM8K), a 4,096-token vocabulary.
/// (layers, width, heads, kv heads, mlp, vocab, context, batch, rank)
pub const LORA_PROBE: (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
) = (2, 576, 9, 3, 1536, 4096, 224, 4, 8);

impl Calibration {
    /// Where `--calibrate` stores it.
    pub fn path(home: &Path) -> PathBuf {
        home.join("plan").join("calibration.json")
    }

    /// The stored calibration, if any.
    pub fn load(home: &Path) -> Result<Option<Calibration>> {
        let path = Self::path(home);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Config {
                what: path.display().to_string(),
                problem: format!("{e} (run `lever plan --calibrate` again)"),
            })
    }

    /// Write it atomically (a reader sees the old file or the new one).
    pub fn save(&self, home: &Path) -> Result<PathBuf> {
        let path = Self::path(home);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Config {
            what: path.display().to_string(),
            problem: e.to_string(),
        })?;
        lever_model::fsutil::write_atomic(&path, |tmp| -> Result<()> {
            std::fs::write(tmp, &text).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })?;
        Ok(path)
    }

    /// Seconds of one training step of `flops` FLOPs and `elements` element-wise values.
    fn step_s(&self, flops: f64, elements: f64) -> f64 {
        flops / self.train_flops_per_s + elements * self.elementwise_s
    }

    /// [`Calibration::step_s`] for a job of `kind`: LoRA's scaled by the LoRA probe's factor.
    fn job_step_s(&self, kind: JobKind, flops: f64, elements: f64) -> f64 {
        let factor = if kind == JobKind::Lora {
            self.lora_factor
        } else {
            1.0
        };
        factor * self.step_s(flops, elements)
    }
}

/// Seconds per step of the probe's shape predicted from a rate and a per-element time.
fn probe_terms(p: &Probe) -> (f64, f64, f64) {
    let shape = probe_shape(p);
    let tokens = (p.batch * p.context) as f64;
    let flops = tokens * train_flops_per_token(&shape, JobKind::Pretrain, 0, 1.0);
    let elements = tokens * shape.elementwise_per_token(p.context, 1.0);
    // AdamW reads the weight, gradient and both moments and writes three of them.
    let optimizer_bytes = 28.0 * shape.params();
    (flops, elements, optimizer_bytes)
}

fn probe_shape(p: &Probe) -> Shape {
    Shape::new(
        p.layers,
        p.width,
        p.heads,
        None,
        Some(p.mlp_width),
        3,
        p.vocab,
        p.context,
    )
}

/// Measure this machine: the matmul peak (about a second), the memory bandwidth, and
/// lever's real training step (forward, backward, AdamW) on two small decoders for about
/// `budget` each; then fit the matrix rate and the per-element time to the two.
pub fn calibrate(budget: Duration) -> Result<Calibration> {
    let peak = crate::peak::measure(Duration::from_secs(1))?;
    let memory_bytes_per_s = memory_bandwidth();
    let mut probes = Vec::new();
    for &(layers, width, heads, mlp_width, vocab, context, batch) in &PROBES {
        probes.push(run_probe(
            layers, width, heads, mlp_width, vocab, context, batch, budget,
        )?);
    }
    let (train_flops_per_s, elementwise_s) = fit(&probes, memory_bytes_per_s);
    let lora_probe = run_lora_probe(budget)?;
    let lora_factor = {
        let (l, c, h, kv, f, v, t, b, r) = LORA_PROBE;
        let shape = Shape::new(l, c, h, Some(kv), Some(f), 3, v, t);
        let tokens = (b * t) as f64;
        let flops = tokens * train_flops_per_token(&shape, JobKind::Lora, r, 1.0);
        let elements = tokens * shape.elementwise_per_token(t, 1.0);
        let optimizer = 28.0 * shape.lora_params(r) / memory_bytes_per_s;
        let predicted = flops / train_flops_per_s + elements * elementwise_s;
        ((lora_probe.step_s - optimizer) / predicted).max(0.1)
    };
    Ok(Calibration {
        cpu: cpu_name(),
        threads: rayon::current_num_threads(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        lever_version: env!("CARGO_PKG_VERSION").into(),
        matmul_flops_per_s: peak.flops_per_s,
        memory_bytes_per_s,
        probes,
        train_flops_per_s,
        elementwise_s,
        lora_probe: Some(lora_probe),
        lora_factor,
    })
}

/// A probe's steps: [`WARMUP_STEPS`] untimed (they allocate, each lane's allocator arena
/// too, and warm caches), then timed for about `budget` (3 to 200 of them); how many were
/// timed and [`probe_step_s`] of their times.
fn time_steps(budget: Duration, mut step: impl FnMut() -> Result<()>) -> Result<(usize, f64)> {
    for _ in 0..WARMUP_STEPS {
        step()?;
    }
    let started = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || (started.elapsed() < budget && times.len() < 200) {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((times.len(), probe_step_s(times)))
}

/// Untimed steps before a probe's timed ones.
const WARMUP_STEPS: usize = 3;

/// A probe's step time from its timed steps: the first quartile. On a shared machine other
/// work only ever adds time, in bursts that a few seconds of probing see more of than a long
/// run's average does (with the median, the calibrated plans came out 18–28% slow on both
/// benchmark runs, bench/plan-accuracy.sh, 2026-12-07).
fn probe_step_s(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 4]
}

/// A LoRA step ([`LORA_PROBE`]) through `Trainer::step`, as `lever finetune --lora` takes it,
/// on a frozen f32 base (a quantized base's dequantization is the plan's memory term).
fn run_lora_probe(budget: Duration) -> Result<Probe> {
    let (layers, width, heads, kv_heads, mlp_width, vocab, context, batch, rank) = LORA_PROBE;
    let mut recipe = Recipe::preset("smollm2-135m").ok_or_else(|| Error::Config {
        what: "calibration".into(),
        problem: "the smollm2-135m preset is missing".into(),
    })?;
    recipe.model.layers = layers;
    recipe.model.width = width;
    recipe.model.heads = heads;
    recipe.model.kv_heads = kv_heads;
    recipe.model.mlp_width = mlp_width;
    recipe.model.context = context;
    let cfg = recipe.decoder_config(vocab);
    let mut decoder = crate::init::new_decoder(&cfg, 7, &candle_core::Device::Cpu)?;
    let lora = crate::lora::LoraConfig {
        r: rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: crate::lora::LoraConfig::parse_targets("all-linear")?,
    };
    let set = crate::lora::LoraSet::attach(&mut decoder, &lora, 11)?;
    let config = crate::trainer::TrainConfig {
        steps: 1000,
        batch_size: batch,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut trainer = crate::trainer::Trainer::new(config, set.vars())?;
    let mut rng = lever_model::rng::SplitMix64(0x10a4);
    let examples: Vec<lever_data::Tokenized> = (0..4 * batch)
        .map(|line| lever_data::Tokenized {
            line,
            ids: (0..context).map(|_| rng.below(vocab) as u32).collect(),
            trained: vec![true; context],
        })
        .collect();
    let (steps, step_s) = time_steps(budget, || trainer.step(&decoder, &examples).map(drop))?;
    Ok(Probe {
        layers,
        width,
        heads,
        kv_heads: Some(kv_heads),
        mlp_width,
        vocab,
        context,
        batch,
        steps,
        step_s,
        tokens_per_s: (batch * context) as f64 / step_s,
    })
}

/// Solve step_s = flops·x + elements·k + optimizer_bytes/bandwidth for x = 1/rate and k on
/// the two probes. When the two do not separate (noise: a negative solution), the wide
/// probe's time is taken as all matrix work and k takes the rest of the small probe's.
fn fit(probes: &[Probe], bandwidth: f64) -> (f64, f64) {
    let rows: Vec<(f64, f64, f64)> = probes
        .iter()
        .map(|p| {
            let (f, e, o) = probe_terms(p);
            (f, e, (p.step_s - o / bandwidth).max(0.0))
        })
        .collect();
    let [(f1, e1, t1), (f2, e2, t2)] = [rows[0], rows[1]];
    let det = f1 * e2 - f2 * e1;
    if det.abs() > 0.0 {
        let x = (t1 * e2 - t2 * e1) / det;
        let k = (f1 * t2 - f2 * t1) / det;
        if x > 0.0 && k >= 0.0 {
            return (1.0 / x, k);
        }
    }
    let rate = f2 / t2.max(f64::MIN_POSITIVE);
    let k = ((t1 - f1 / rate) / e1).max(0.0);
    (rate, k)
}

#[allow(clippy::too_many_arguments)]
fn run_probe(
    layers: usize,
    width: usize,
    heads: usize,
    mlp_width: usize,
    vocab: usize,
    context: usize,
    batch: usize,
    budget: Duration,
) -> Result<Probe> {
    let mut recipe = Recipe::preset("shakespeare-char").ok_or_else(|| Error::Config {
        what: "calibration".into(),
        problem: "the shakespeare-char preset is missing".into(),
    })?;
    recipe.name = "calibration probe".into();
    recipe.model.layers = layers;
    recipe.model.width = width;
    recipe.model.heads = heads;
    recipe.model.kv_heads = heads;
    recipe.model.mlp_width = mlp_width;
    recipe.model.context = context;
    recipe.batch_size = batch;
    recipe.grad_accum = 1;
    recipe.warmup_steps = 0;
    let cfg = recipe.decoder_config(vocab);
    let device = candle_core::Device::Cpu;
    let mut decoder = crate::init::new_decoder(&cfg, 7, &device)?;
    let vars = decoder.make_trainable()?;
    let mut trainer = crate::Pretrainer::new(recipe, vars)?;
    let mut rng = lever_model::rng::SplitMix64(0x9ca1);
    let tokens: Vec<u32> = (0..64 * context + 1)
        .map(|_| rng.below(vocab) as u32)
        .collect();
    let (steps, step_s) = time_steps(budget, || trainer.step(&decoder, &tokens).map(drop))?;
    Ok(Probe {
        layers,
        width,
        heads,
        kv_heads: None,
        mlp_width,
        vocab,
        context,
        batch,
        steps,
        step_s,
        tokens_per_s: (batch * context) as f64 / step_s,
    })
}

/// Bytes read and written per second by a parallel copy of 128 MB, the fastest of a few.
pub fn memory_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 16 << 20; // f64 values: 128 MB
    let src = vec![1.0f64; n];
    let mut dst = vec![0.0f64; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 8) as f64 / best
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Where it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Hardware {
    /// This machine, with its calibration, or (uncalibrated) a matmul peak and memory
    /// bandwidth probed now and a stated MFU.
    Cpu {
        calibration: Calibration,
        calibrated: bool,
        /// With no calibration, or to override it: the fraction of the matmul peak.
        mfu: Option<f64>,
    },
    /// `count` GPUs in data parallel at `mfu` of their peak, linked at `link` bytes/s.
    Gpu {
        gpu: Gpu,
        count: usize,
        mfu: f64,
        link: (String, f64),
    },
}

impl Hardware {
    /// An uncalibrated CPU: the matmul peak and memory bandwidth measured now (about a
    /// quarter of a second) and `mfu` of the peak assumed.
    pub fn uncalibrated_cpu(mfu: f64) -> Result<Hardware> {
        let peak = crate::peak::measure(Duration::from_millis(200))?;
        Ok(Hardware::Cpu {
            calibration: Calibration {
                cpu: cpu_name(),
                threads: rayon::current_num_threads(),
                created_unix: 0,
                lever_version: env!("CARGO_PKG_VERSION").into(),
                matmul_flops_per_s: peak.flops_per_s,
                memory_bytes_per_s: memory_bandwidth(),
                probes: Vec::new(),
                train_flops_per_s: peak.flops_per_s * mfu,
                elementwise_s: 0.0,
                lora_probe: None,
                lora_factor: 1.0,
            },
            calibrated: false,
            mfu: Some(mfu),
        })
    }

    fn devices(&self) -> usize {
        match self {
            Hardware::Cpu { .. } => 1,
            Hardware::Gpu { count, .. } => *count,
        }
    }
}

/// Training FLOPs per token of `kind` over windows of the shape's context (without
/// recomputation), `trained` of the positions going through the output layer.
fn train_flops_per_token(shape: &Shape, kind: JobKind, lora_rank: usize, trained: f64) -> f64 {
    let head = (shape.vocab * shape.width) as f64;
    let n = shape.matmul_params() - head * (1.0 - trained);
    let attn = 3.0 * shape.attention_forward_flops(shape.context);
    match kind {
        JobKind::Lora => 4.0 * n + attn + 6.0 * shape.lora_params(lora_rank),
        _ => 6.0 * n + attn,
    }
}

/// Memory of one device, bytes. `None` where the shape is unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub gradients: f64,
    /// AdamW's state (and the fp32 master copy in mixed precision).
    pub adamw: f64,
    /// Kept for the backward pass, no recomputation (Korthikanti et al.).
    pub activations: Option<f64>,
    /// With selective recomputation of the attention scores.
    pub activations_selective_recompute: Option<f64>,
    /// With full recomputation (each layer's input kept).
    pub activations_full_recompute: Option<f64>,
    pub kv_cache: Option<f64>,
    /// Everything, without recomputation (training) or with the cache (inference).
    pub total: f64,
    /// Everything, with full recomputation.
    pub total_full_recompute: f64,
}

/// Seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Time {
    /// The FLOPs (and, on a calibrated CPU, the element-wise and optimizer work).
    pub compute_s: f64,
    /// Data parallel: every step's gradient all-reduce, not overlapped.
    pub allreduce_s: f64,
    pub total_s: f64,
    pub per_step_s: Option<f64>,
}

/// Inference speeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inference {
    /// Forward FLOPs per token at the full context.
    pub flops_per_token: f64,
    /// Prompt processing, tokens/s (compute-bound).
    pub prefill_tokens_per_s: f64,
    /// Token-by-token decoding of `batch` sequences at the full context: all of them
    /// together, tokens/s (the slower of reading the weights and cache from memory and the
    /// FLOPs).
    pub decode_tokens_per_s: f64,
    /// Which bound decides decoding: "memory" or "compute".
    pub decode_bound: &'static str,
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub params: f64,
    pub trainable_params: f64,
    pub shape: Option<Shape>,
    pub job: Job,
    pub precision: Precision,
    /// Training tokens (every position, padding included).
    pub tokens: Option<f64>,
    /// Where the tokens came from: "given", "steps" or "chinchilla".
    pub tokens_from: Option<&'static str>,
    pub tokens_per_step: Option<f64>,
    pub steps: Option<f64>,
    /// Training FLOPs (forward and backward), no recomputation.
    pub train_flops: Option<f64>,
    /// The same with full activation recomputation (one more forward of each layer).
    pub train_flops_full_recompute: Option<f64>,
    pub flops_per_token: Option<f64>,
    pub memory: Memory,
    pub time: Option<Time>,
    pub inference: Option<Inference>,
    pub devices: usize,
    /// Price per hour per device (GPU) or for this machine.
    pub price_per_hour: Option<f64>,
    pub cost: Option<f64>,
    /// How the hardware was reckoned, e.g. "calibrated" or "uncalibrated".
    pub hardware: HardwareSummary,
    /// Assumptions the numbers rest on.
    pub notes: Vec<String>,
}

/// The hardware as planned with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareSummary {
    /// "cpu" or the GPU's name.
    pub kind: String,
    pub devices: usize,
    /// This machine: whether a stored calibration was used.
    pub calibrated: bool,
    /// Peak FLOP/s of one device (measured matmul peak on a CPU).
    pub peak_flops_per_s: f64,
    /// The training FLOP/s assumed of one device (peak × MFU, or the calibration's fit).
    pub effective_flops_per_s: f64,
    pub mfu: Option<f64>,
    pub memory_bytes_per_s: f64,
    /// Interconnect name and bytes/s each way.
    pub link: Option<(String, f64)>,
    pub calibration: Option<Calibration>,
}

/// What a plan needs besides the model, job and hardware.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub precision: Precision,
    /// Bytes per weight of a frozen LoRA base (a quantized file's), else the precision's.
    pub base_weight_bytes: Option<f64>,
    pub price_per_hour: Option<f64>,
}

/// Plan `job` for `model` on `hw`.
pub fn plan(model: &Model, job: &Job, hw: &Hardware, opts: &Options) -> Result<Plan> {
    if let Some(s) = model.shape() {
        s.validate()?;
    }
    let n = model.params();
    if !(n.is_finite() && n > 0.0) {
        return Err(Error::Config {
            what: "--params".into(),
            problem: format!("{n} is not a positive number of parameters"),
        });
    }
    // The job's window decides the attention term and the activations.
    let shape = model.shape().map(|s| Shape {
        context: job.context,
        ..s.clone()
    });
    let p = opts.precision;
    let devices = hw.devices();
    let mut notes = Vec::new();
    let training = job.kind != JobKind::Infer;

    let trainable = match (job.kind, &shape) {
        (JobKind::Infer, _) => 0.0,
        (JobKind::Lora, Some(s)) => s.lora_params(job.lora_rank),
        (JobKind::Lora, None) => {
            return Err(Error::Config {
                what: "--job lora".into(),
                problem: "needs the model's shape (--model, or --layers --width --heads --vocab --context), not only --params".into(),
            });
        }
        _ => n,
    };

    // Tokens and steps.
    let (tokens, tokens_from) = match (job.kind, job.tokens) {
        (JobKind::Pretrain, None) => {
            notes.push(format!(
                "tokens: Chinchilla's {CHINCHILLA_TOKENS_PER_PARAM} per parameter"
            ));
            (Some(CHINCHILLA_TOKENS_PER_PARAM * n), Some("chinchilla"))
        }
        (_, Some(d)) => (Some(d), Some("given")),
        (JobKind::Infer, None) => (None, None),
        (kind, None) => {
            return Err(Error::Config {
                what: format!("--job {}", kind_name(kind)),
                problem: "needs --tokens D or --steps N".into(),
            });
        }
    };
    let tokens_per_step = (job.batch * job.context) as f64;
    let steps = training
        .then(|| job.steps.or(tokens.map(|d| (d / tokens_per_step).ceil())))
        .flatten();

    // FLOPs.
    let fwd_layers = shape.as_ref().map_or(0.0, |s| {
        2.0 * s.layers as f64 * s.layer_params() + s.attention_forward_flops(job.context)
    });
    let (flops_per_token, train_flops, train_flops_rc) = if training {
        let per_token = match &shape {
            Some(s) => train_flops_per_token(s, job.kind, job.lora_rank, job.trained_fraction),
            None => {
                notes.push("attention FLOPs left out: only --params was given".into());
                6.0 * n
            }
        };
        let d = tokens.unwrap_or(0.0);
        (
            Some(per_token),
            Some(per_token * d),
            Some((per_token + fwd_layers) * d),
        )
    } else {
        (None, None, None)
    };

    // Memory of one device.
    let micro = job.batch.div_ceil(devices * job.grad_accum.max(1)).max(1);
    let weights = match job.kind {
        JobKind::Lora => {
            n * opts.base_weight_bytes.unwrap_or(p.weight) + trainable * p.weight.max(4.0)
        }
        JobKind::Infer => n * opts.base_weight_bytes.unwrap_or(p.weight),
        _ => n * p.weight,
    };
    let gradients = trainable * p.grad;
    let adamw = trainable * p.adamw;
    let (act, act_sel, act_full) = match (&shape, training) {
        (Some(s), true) => {
            let sbh = (job.context * micro * s.width) as f64 * s.layers as f64;
            let a = s.heads as f64;
            let ratio = a * job.context as f64 / s.width as f64;
            let base = 16.0 * p.activation + 2.0;
            (
                Some(sbh * (base + (2.0 * p.activation + 1.0) * ratio)),
                Some(sbh * base),
                Some(sbh * p.activation),
            )
        }
        _ => (None, None, None),
    };
    let kv = match (&shape, job.kind) {
        (Some(s), JobKind::Infer) => {
            Some(s.kv_per_token(p.kv) * (job.context * job.batch.div_ceil(devices)) as f64)
        }
        _ => None,
    };
    let fixed = weights + gradients + adamw;
    let memory = Memory {
        weights,
        gradients,
        adamw,
        activations: act,
        activations_selective_recompute: act_sel,
        activations_full_recompute: act_full,
        kv_cache: kv,
        total: fixed + act.unwrap_or(0.0) + kv.unwrap_or(0.0),
        total_full_recompute: fixed + act_full.unwrap_or(0.0) + kv.unwrap_or(0.0),
    };
    if shape.is_none() {
        notes.push("activations and KV cache unknown: give a shape or --model".into());
    }

    // Hardware.
    let summary = summarize(hw);
    let (effective, bandwidth) = (summary.effective_flops_per_s, summary.memory_bytes_per_s);

    // Time.
    let mut time = None;
    if let (Some(flops), Some(d), Some(steps)) = (train_flops, tokens, steps) {
        let mut compute_s = flops / (effective * devices as f64);
        if let Hardware::Cpu {
            calibration,
            mfu: None,
            ..
        } = hw
        {
            // The calibrated model: matrix work at the fitted rate, element-wise work per
            // value, and the memory-bound passes (AdamW over the trainable values; a frozen
            // quantized base dequantized twice a step, as lever's LoRA does).
            let elements = shape.as_ref().map_or(0.0, |s| {
                d * s.elementwise_per_token(job.context, job.trained_fraction)
            });
            let mut bytes = 28.0 * trainable * steps;
            if let (JobKind::Lora, Some(b)) = (job.kind, opts.base_weight_bytes) {
                bytes += 2.0 * n * (b + 4.0) * steps;
            }
            compute_s = calibration.job_step_s(job.kind, flops, elements) + bytes / bandwidth;
        }
        let allreduce_step = match hw {
            Hardware::Gpu { count, link, .. } if *count > 1 => {
                let k = *count as f64;
                2.0 * (k - 1.0) / k * trainable * p.grad / link.1
            }
            _ => 0.0,
        };
        let allreduce_s = allreduce_step * steps;
        if allreduce_s > 0.0 {
            notes.push(
                "all-reduce: ring, 2(n-1)/n of the gradient bytes per step, not overlapped with compute".into(),
            );
        }
        time = Some(Time {
            compute_s,
            allreduce_s,
            total_s: compute_s + allreduce_s,
            per_step_s: Some((compute_s + allreduce_s) / steps.max(1.0)),
        });
    }

    // Inference.
    let inference = (!training).then(|| {
        let fwd = 2.0 * shape.as_ref().map_or(n, Shape::matmul_params)
            + shape
                .as_ref()
                .map_or(0.0, |s| s.attention_forward_flops(job.context));
        let per_device = job.batch.div_ceil(devices).max(1) as f64;
        let read = weights + kv.unwrap_or(0.0);
        let t_mem = read / bandwidth;
        let t_flops = fwd * per_device / effective;
        let (t, bound) = if t_mem >= t_flops {
            (t_mem, "memory")
        } else {
            (t_flops, "compute")
        };
        Inference {
            flops_per_token: fwd,
            prefill_tokens_per_s: effective * devices as f64 / fwd,
            decode_tokens_per_s: per_device * devices as f64 / t,
            decode_bound: bound,
        }
    });
    if let (Some(inf), Some(d)) = (&inference, tokens) {
        let s = d / inf.decode_tokens_per_s;
        time = Some(Time {
            compute_s: s,
            allreduce_s: 0.0,
            total_s: s,
            per_step_s: None,
        });
    }
    if job.kind == JobKind::Infer && matches!(hw, Hardware::Cpu { .. }) {
        notes.push("decoding: a bound from memory bandwidth and FLOPs, not measured".into());
    }
    if let Some(peak_mem) = match hw {
        Hardware::Gpu { gpu, .. } => Some(gpu.memory),
        Hardware::Cpu { .. } => None,
    } && memory.total_full_recompute > peak_mem
    {
        notes.push(format!(
            "does not fit: {:.1} GB per device even with full recomputation, {} has {:.0} GB (shard with ZeRO/FSDP or tensor parallelism)",
            memory.total_full_recompute / GB,
            summary.kind,
            peak_mem / GB
        ));
    }

    let cost = match (opts.price_per_hour, &time) {
        (Some(price), Some(t)) => Some(t.total_s / 3600.0 * price * devices as f64),
        _ => None,
    };
    Ok(Plan {
        params: n,
        trainable_params: trainable,
        shape,
        job: job.clone(),
        precision: p,
        tokens,
        tokens_from,
        tokens_per_step: training.then_some(tokens_per_step),
        steps,
        train_flops,
        train_flops_full_recompute: train_flops_rc,
        flops_per_token,
        memory,
        time,
        inference,
        devices,
        price_per_hour: opts.price_per_hour,
        cost,
        hardware: summary,
        notes,
    })
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Infer => "infer",
        JobKind::Lora => "lora",
        JobKind::Full => "full",
        JobKind::Pretrain => "pretrain",
    }
}

fn summarize(hw: &Hardware) -> HardwareSummary {
    match hw {
        Hardware::Cpu {
            calibration,
            calibrated,
            mfu,
        } => HardwareSummary {
            kind: "cpu".into(),
            devices: 1,
            calibrated: *calibrated && mfu.is_none(),
            peak_flops_per_s: calibration.matmul_flops_per_s,
            effective_flops_per_s: match mfu {
                Some(m) => calibration.matmul_flops_per_s * m,
                None => calibration.train_flops_per_s,
            },
            mfu: *mfu,
            memory_bytes_per_s: calibration.memory_bytes_per_s,
            link: None,
            calibration: (*calibrated).then(|| calibration.clone()),
        },
        Hardware::Gpu {
            gpu,
            count,
            mfu,
            link,
        } => HardwareSummary {
            kind: gpu.name.into(),
            devices: *count,
            calibrated: false,
            peak_flops_per_s: gpu.flops,
            effective_flops_per_s: gpu.flops * mfu,
            mfu: Some(*mfu),
            memory_bytes_per_s: gpu.memory_bandwidth,
            link: (*count > 1).then(|| link.clone()),
            calibration: None,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gpu_hw(name: &str, count: usize) -> Hardware {
        let g = *gpu(name).unwrap();
        Hardware::Gpu {
            gpu: g,
            count,
            mfu: 0.4,
            link: interconnect(g.link).unwrap(),
        }
    }

    fn job(kind: JobKind, tokens: f64, batch: usize, context: usize) -> Job {
        Job {
            kind,
            tokens: Some(tokens),
            batch,
            grad_accum: 1,
            context,
            lora_rank: 8,
            trained_fraction: 1.0,
            steps: None,
        }
    }

    fn mixed() -> Options {
        Options {
            precision: Precision::BF16_MIXED,
            base_weight_bytes: None,
            price_per_hour: None,
        }
    }

    /// A GPT-style shape as the cookbook describes one: 2-matrix MLP of 4·width, untied.
    fn gpt(layers: usize, width: usize, heads: usize, vocab: usize) -> Shape {
        Shape {
            tied: false,
            ..Shape::new(layers, width, heads, None, None, 2, vocab, 2048)
        }
    }

    fn close(ours: f64, theirs: f64, tol: f64) -> bool {
        (ours / theirs - 1.0).abs() < tol
    }

    /// EleutherAI's cookbook (github.com/EleutherAI/cookbook, commit 827ee3b2), run on three
    /// published configurations, the numbers printed in full:
    ///
    /// ```sh
    /// cd cookbook/calc && python3 -c "import sys, calc_transformer_flops as c; \
    ///   c.convert_flops = lambda x: '%r' % x; \
    ///   c.calc_flops(c.config_parser().parse_args(sys.argv[1:]))" \
    ///   -l 96 -hs 12288 -v 50257 -s 2048 --tokens 300e9 [-ca]
    /// ```
    /// (`-ca` turns its default activation recomputation off); likewise Chinchilla's shape
    /// `-l 80 -hs 8192 -v 32000 --tokens 1.4e12` and Pythia-6.9B's `-l 32 -hs 4096 -v 50432
    /// --tokens 300e9`. The counts differ in one term: the cookbook counts the output layer
    /// forward only (2·V·h per token), we count its backward too (6·V·h, as 6·N does), so
    /// ours = theirs + 4·V·h·D, to 0.1% (the rest: norms).
    #[test]
    fn flops_agree_with_the_cookbook_on_three_published_models() {
        let cases = [
            // (shape, tokens, cookbook no recompute, cookbook with recompute)
            (
                gpt(96, 12288, 96, 50257),
                300e9,
                3.22170974208e+23,
                4.294377824256e+23,
            ),
            (
                gpt(80, 8192, 64, 32000),
                1.4e12,
                5.644485066752e+23,
                7.523533258752e+23,
            ),
            (
                gpt(32, 4096, 32, 50432),
                300e9,
                1.26867259392e+22,
                1.68743190528e+22,
            ),
        ];
        let hw = gpu_hw("H100", 1);
        for (shape, d, theirs, theirs_rc) in cases {
            let p = plan(
                &Model::Shape(shape.clone()),
                &job(JobKind::Pretrain, d, 1, 2048),
                &hw,
                &mixed(),
            )
            .unwrap();
            let ours = p.train_flops.unwrap();
            let ours_rc = p.train_flops_full_recompute.unwrap();
            let head_backward = 4.0 * (shape.vocab * shape.width) as f64 * d;
            assert!(
                close(ours, theirs + head_backward, 0.001),
                "{shape:?}: {ours:e} vs {theirs:e}"
            );
            assert!(
                close(ours_rc, theirs_rc + head_backward, 0.001),
                "{shape:?}: {ours_rc:e} vs {theirs_rc:e}"
            );
            // Within 2% of theirs either way (GPT-3: 0.6%).
            assert!(
                close(ours, theirs, 0.02),
                "{shape:?}: {ours:e} vs {theirs:e}"
            );
        }
        // And the rule of thumb: GPT-3 175B on 300B tokens ≈ 6·N·D = 3.14e23.
        let p = plan(
            &Model::Params(175e9),
            &job(JobKind::Pretrain, 300e9, 1, 2048),
            &hw,
            &mixed(),
        )
        .unwrap();
        assert_eq!(p.train_flops.unwrap(), 6.0 * 175e9 * 300e9);
        assert!(close(p.train_flops.unwrap(), 3.15e23, 0.001));
    }

    /// The cookbook's memory script, `python3 calc_transformer_mem.py --num-layers 96
    /// --hidden-size 12288 --num-attention-heads 96 --vocab-size 50257 --sequence-length 2048
    /// --batch-size-per-gpu 1 [--checkpoint-activations | --infer]` (and Chinchilla's shape,
    /// 80 × 8192, 64 heads, vocabulary 32000; Pythia-6.9B's, 32 × 4096, 32 heads, vocabulary
    /// 50432, batch 8), "Total ... for a Single Model Replica", GiB to two decimals. Its
    /// parameter count adds learned positions and LayerNorm biases (under 0.1%).
    #[test]
    fn memory_agrees_with_the_cookbook_on_three_published_models() {
        let gib = |x: f64| x / (1u64 << 30) as f64;
        let cases = [
            // shape, batch, model, gradients, optimizer, activations, selective, kv (infer)
            (
                gpt(96, 12288, 96, 50257),
                1,
                [326.37, 652.73, 1958.19, 256.50, 76.50, 4.50],
            ),
            (
                gpt(80, 8192, 64, 32000),
                1,
                [121.02, 242.04, 726.11, 142.50, 42.50, 2.50],
            ),
            (
                gpt(32, 4096, 32, 50432),
                8,
                [12.79, 25.57, 76.72, 228.00, 68.00, 4.00],
            ),
        ];
        let hw = gpu_hw("H100", 1);
        for (shape, batch, want) in cases {
            let model = Model::Shape(shape.clone());
            let p = plan(
                &model,
                &job(JobKind::Pretrain, 1e9, batch, 2048),
                &hw,
                &mixed(),
            )
            .unwrap();
            let m = &p.memory;
            assert!(close(gib(m.weights), want[0], 0.002), "{shape:?} {m:?}");
            assert!(close(gib(m.gradients), want[1], 0.002), "{shape:?} {m:?}");
            assert!(close(gib(m.adamw), want[2], 0.002), "{shape:?} {m:?}");
            // Korthikanti's formula exactly: to the printed two decimals.
            assert!((gib(m.activations.unwrap()) - want[3]).abs() < 0.006);
            assert!((gib(m.activations_selective_recompute.unwrap()) - want[4]).abs() < 0.006);
            // Full recomputation keeps 2·s·b·h per layer (Korthikanti's Table 2).
            let sbhl = (2048 * batch * shape.width * shape.layers) as f64;
            assert_eq!(m.activations_full_recompute.unwrap(), 2.0 * sbhl);
            // The KV cache: keys and values, 2·2·L·h bytes per token; the cookbook's
            // `--infer` counts one of the two (at 2048 + 1 tokens).
            let mut inf = job(JobKind::Infer, 1.0, batch, 2049);
            inf.tokens = None;
            let p = plan(&model, &inf, &hw, &mixed()).unwrap();
            let kv = gib(p.memory.kv_cache.unwrap());
            assert!((kv / 2.0 - want[5]).abs() < 0.006, "{kv}");
        }
    }

    #[test]
    fn lora_trains_the_adapters_only() {
        // SmolLM2-135M's shape.
        let s = Shape {
            head_dim: 64,
            ..Shape::new(30, 576, 9, Some(3), Some(1536), 3, 49152, 256)
        };
        assert_eq!(s.params(), 134_515_008.0);
        // r·(in + out) on q, k, v, o, gate, up, down: 8·((576+576) + 2·(576+192) + (576+576)
        // + 3·(576+1536)) per layer.
        assert_eq!(s.lora_params(8), 8.0 * 30.0 * (2304.0 + 1536.0 + 6336.0));
        let p = plan(
            &Model::Shape(s.clone()),
            &job(JobKind::Lora, 1e6, 4, 256),
            &gpu_hw("A100", 1),
            &mixed(),
        )
        .unwrap();
        assert_eq!(p.trainable_params, s.lora_params(8));
        assert_eq!(p.memory.gradients, 4.0 * s.lora_params(8));
        let per_token = 4.0 * s.params() + 12.0 * 30.0 * 576.0 * 256.0 + 6.0 * s.lora_params(8);
        assert_eq!(p.train_flops.unwrap(), per_token * 1e6);
        assert_eq!(p.steps, Some((1e6f64 / 1024.0).ceil()));
    }

    #[test]
    fn data_parallel_adds_a_ring_all_reduce_per_step() {
        let model = Model::Params(7e9);
        let j = job(JobKind::Full, 1e9, 512, 2048);
        let one = plan(&model, &j, &gpu_hw("H100", 1), &mixed()).unwrap();
        let eight = plan(&model, &j, &gpu_hw("H100", 8), &mixed()).unwrap();
        let t1 = one.time.unwrap();
        let t8 = eight.time.unwrap();
        assert_eq!(t1.allreduce_s, 0.0);
        assert!(close(t8.compute_s, t1.compute_s / 8.0, 1e-12));
        // 2·7/8 · 7e9 · 4 bytes / 450 GB/s per step, 954 steps.
        let steps = (1e9f64 / (512.0 * 2048.0)).ceil();
        let want = 2.0 * 7.0 / 8.0 * 7e9 * 4.0 / 450e9 * steps;
        assert!(close(t8.allreduce_s, want, 1e-12), "{}", t8.allreduce_s);
        // 6·N·D at 40% of 989.4 TF/s.
        assert!(close(
            t1.compute_s,
            6.0 * 7e9 * 1e9 / (0.4 * 989.4e12),
            1e-12
        ));
    }

    #[test]
    fn bad_shapes_and_missing_tokens_are_named() {
        let s = Shape::new(2, 100, 3, None, None, 3, 10, 16);
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("--heads") && e.contains("3 heads do not divide the width 100"),
            "{e}"
        );
        let mut j = job(JobKind::Full, 1.0, 1, 16);
        j.tokens = None;
        let e = plan(&Model::Params(1e6), &j, &gpu_hw("H100", 1), &mixed())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--job full") && e.contains("--tokens"), "{e}");
    }

    /// The fit recovers a rate and a per-element time from two probes made with them.
    #[test]
    fn the_fit_recovers_what_made_the_probes() {
        let (rate, k, bw) = (120e9, 3e-9, 20e9);
        let probes: Vec<Probe> = PROBES
            .iter()
            .map(
                |&(layers, width, heads, mlp_width, vocab, context, batch)| {
                    let mut p = Probe {
                        layers,
                        width,
                        heads,
                        kv_heads: None,
                        mlp_width,
                        vocab,
                        context,
                        batch,
                        steps: 3,
                        step_s: 0.0,
                        tokens_per_s: 0.0,
                    };
                    let (f, e, o) = probe_terms(&p);
                    p.step_s = f / rate + e * k + o / bw;
                    p
                },
            )
            .collect();
        let (r, kk) = fit(&probes, bw);
        assert!(close(r, rate, 1e-9) && close(kk, k, 1e-9), "{r} {kk}");
    }

    /// A probe's time is the first quartile of its steps: bursts of other work on the
    /// machine (the slow tail) do not move it.
    #[test]
    fn a_probe_takes_the_first_quartile_of_its_steps() {
        let mut times = vec![1.0, 1.1, 1.2, 1.3, 5.0, 9.0, 1.05, 1.15];
        assert_eq!(probe_step_s(times.clone()), 1.1);
        times.extend([20.0; 4]);
        assert_eq!(probe_step_s(times), 1.15);
        assert_eq!(probe_step_s(vec![2.0, 3.0, 4.0]), 2.0);
    }
}
