//! The training loop: seeded batches of tokenized examples, a cross-entropy loss over the
//! trained tokens only, gradient accumulation, clipping by global norm, AdamW, and a
//! learning rate with linear warmup then cosine decay to 10% (the schedule of
//! transformers' `get_cosine_schedule_with_warmup`, floored as nanoGPT does).
//!
//! Data parallel ([`Trainer::with_dist`], dist.rs): `batch_size` is per rank. Every rank
//! draws the whole global micro-batch (world size × `batch_size` examples) from the same
//! order and takes its own `batch_size`; each divides its loss sum by the global step's
//! trained-token count, so the gradients' sum over the ranks is one process's gradient with
//! the global batch.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lever_data::Tokenized;
use lever_model::Decoder;
use lever_model::rng::SplitMix64;
use serde::Serialize;

use crate::dist::{Dist, GradAverager};
use crate::error::{Error, Result};
use crate::lanes::Lanes;
use crate::optim::{AdamW, AdamWParams};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Recompute each block in the backward instead of keeping its activations
    /// (`Decoder::backward_checkpointed`): less memory, one more forward pass. The math is
    /// the same, so a run may resume with it switched.
    #[serde(skip)]
    pub checkpoint: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            warmup_steps: 10,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 0,
            checkpoint: false,
        }
    }
}

impl TrainConfig {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let min = 0.1 * self.lr;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One optimizer step's numbers (a line of metrics.jsonl).
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens the loss covered in this step.
    pub trained_tokens: usize,
    /// All tokens processed in this step (padding excluded).
    pub tokens: usize,
    /// Seconds spent summing the gradients over the ranks (absent for one process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
}

pub struct Trainer {
    pub config: TrainConfig,
    vars: Vec<Var>,
    opt: AdamW,
    order: Vec<usize>,
    cursor: usize,
    rng: SplitMix64,
    pub step: usize,
    /// LoRA dropout's key, set for each micro-batch from (seed, step, micro-batch, rank).
    dropout_key: Option<Arc<AtomicU64>>,
    /// The ranks the gradients are summed over (one process by default).
    dist: Arc<Dist>,
    averager: GradAverager,
    /// The threads a micro-batch's examples are spread over.
    lanes: Lanes,
}

impl Trainer {
    pub fn new(config: TrainConfig, vars: Vec<Var>) -> Result<Trainer> {
        if config.batch_size == 0 || config.grad_accum == 0 || config.steps == 0 {
            return Err(Error::Config {
                what: "--batch-size/--grad-accum/--steps".into(),
                problem: "must be at least 1".into(),
            });
        }
        let opt = AdamW::new(
            vars.clone(),
            AdamWParams {
                lr: config.lr_at(0),
                weight_decay: config.weight_decay,
                ..Default::default()
            },
        )?;
        let rng = order_rng(config.seed);
        Ok(Trainer {
            config,
            vars,
            opt,
            order: Vec::new(),
            cursor: 0,
            rng,
            step: 0,
            dropout_key: None,
            dist: Arc::new(Dist::single()),
            averager: GradAverager::default(),
            lanes: Lanes::default(),
        })
    }

    /// Per-variable learning rates as multiples of the schedule's, one per variable in the
    /// order given to [`Trainer::new`] (`AdamW::lr_scales`).
    pub fn with_lr_scales(mut self, scales: Vec<f64>) -> Result<Self> {
        self.opt = self.opt.lr_scales(scales)?;
        Ok(self)
    }

    /// Train data-parallel over `dist`'s ranks (see the module doc).
    pub fn with_dist(mut self, dist: Arc<Dist>) -> Self {
        self.dist = dist;
        self
    }

    /// A digest of the trained values, to check that every rank holds the same ones.
    pub fn weights_digest(&self) -> Result<u64> {
        crate::dist::digest(&self.vars)
    }

    /// Give every rank rank 0's state (trained values, optimizer, data order and position,
    /// RNG): a resumed run loads its checkpoint on rank 0 alone.
    pub fn broadcast_state(&mut self) -> Result<()> {
        if self.dist.size() == 1 {
            return Ok(());
        }
        let mut scalars = [
            self.step as u64,
            self.cursor as u64,
            self.rng.0,
            self.order.len() as u64,
        ];
        crate::dist::broadcast_state(&self.dist, &self.vars, &mut self.opt, &mut scalars)?;
        [self.step, self.cursor] = [scalars[0] as usize, scalars[1] as usize];
        self.rng = SplitMix64(scalars[2]);
        let mut order: Vec<u64> = self.order.iter().map(|&i| i as u64).collect();
        order.resize(scalars[3] as usize, 0);
        self.dist.broadcast_u64(&mut order);
        self.order = order.into_iter().map(|i| i as usize).collect();
        Ok(())
    }

    /// Drive adapter dropout (`LoraSet::dropout_key`): masks depend only on the seed, the
    /// step and the micro-batch, so a resumed run draws the same ones.
    pub fn with_dropout_key(mut self, key: Arc<AtomicU64>) -> Self {
        self.dropout_key = Some(key);
        self
    }

    /// The next `n` example indices: a seeded permutation of the training set, renewed each
    /// epoch.
    fn next_batch(&mut self, n_examples: usize, n: usize) -> Vec<usize> {
        draw(
            &mut self.order,
            &mut self.cursor,
            &mut self.rng,
            n_examples,
            n,
        )
    }

    /// One optimizer step over `batch_size × grad_accum` examples of `train`.
    ///
    /// A micro-batch's examples are spread over the threads (lanes.rs), unless adapter
    /// dropout is on: its masks are drawn by position in the batch, which a split would
    /// repeat from one part to the next.
    pub fn step(&mut self, decoder: &Decoder, train: &[Tokenized]) -> Result<StepMetrics> {
        let checkpoint = self.config.checkpoint;
        let mut lanes = std::mem::take(&mut self.lanes);
        let vars = self.vars.clone();
        if self.dropout_key.is_none() {
            lanes.ensure(self.config.batch_size.min(rayon::current_num_threads()))?;
        }
        let result = self.step_with(
            train.len(),
            |i| train[i].trained.iter().skip(1).filter(|t| **t).count(),
            |idx, divisor| {
                let batch: Vec<&Tokenized> = idx.iter().map(|&i| &train[i]).collect();
                let parts = lanes.run(&batch, |part| {
                    forward_backward(decoder, part, divisor, checkpoint)
                });
                let mut micro: Option<MicroStep> = None;
                // Summed in lane order, so that a run is the same from one time to the next.
                for part in parts {
                    let (loss_sum, trained, grads) = part?;
                    micro = Some(match micro {
                        None => MicroStep {
                            loss_sum,
                            count: trained,
                            trained_tokens: trained,
                            tokens: 0,
                            grads,
                        },
                        Some(m) => MicroStep {
                            loss_sum: m.loss_sum + loss_sum,
                            count: m.count + trained,
                            trained_tokens: m.trained_tokens + trained,
                            tokens: 0,
                            grads: accumulate(Some(m.grads), grads, &vars)?,
                        },
                    });
                }
                let mut m = micro.ok_or_else(|| Error::Config {
                    what: "--batch-size".into(),
                    problem: "must be at least 1".into(),
                })?;
                m.tokens = batch.iter().map(|t| t.ids.len()).sum();
                Ok(m)
            },
        );
        self.lanes = lanes;
        result
    }

    /// One optimizer step over `batch_size × grad_accum` of `n_examples` examples, for any
    /// loss: the order, micro-batches, dropout keys, ranks, clipping, schedule and optimizer
    /// of [`Trainer::step`], with `micro` computing a micro-batch. `weight(i)` is what example
    /// `i` counts in the step's loss (its trained tokens for a token-mean loss, 1 for a mean
    /// over examples); `micro(indices, divisor)` returns the micro-batch's loss sum and the
    /// gradients of that sum divided by `divisor` (the whole step's weight, so that the
    /// gradients of the micro-batches add up to the step's mean).
    pub fn step_with(
        &mut self,
        n_examples: usize,
        weight: impl Fn(usize) -> usize,
        mut micro: impl FnMut(&[usize], usize) -> Result<MicroStep>,
    ) -> Result<StepMetrics> {
        let lr = self.config.lr_at(self.step);
        self.opt.set_lr(lr);
        let mut total: Option<GradStore> = None;
        let (mut loss_sum, mut count, mut trained, mut tokens) = (0f64, 0usize, 0usize, 0usize);
        // The global micro-batches; this rank trains its share of each.
        let (b, ranks, rank) = (self.config.batch_size, self.dist.size(), self.dist.rank());
        let global: Vec<Vec<usize>> = (0..self.config.grad_accum)
            .map(|_| self.next_batch(n_examples, b * ranks))
            .collect();
        let divisor: usize = global.iter().flatten().map(|&i| weight(i)).sum();
        let parts = global.iter().map(|g| g[rank * b..(rank + 1) * b].to_vec());
        for (k, idx) in parts.enumerate() {
            if let Some(key) = &self.dropout_key {
                let mut mix = SplitMix64(
                    self.config.seed
                        ^ ((self.step as u64) << 20)
                        ^ (k as u64)
                        ^ ((rank as u64) << 40)
                        ^ 0xd20b_0a7e,
                );
                key.store(mix.next_u64() >> 1, Ordering::Relaxed);
            }
            // Mean over the whole step, however it is split. Dropout's key stays set through
            // the backward: checkpointing draws the masks again there.
            let r = micro(&idx, divisor.max(1));
            if let Some(key) = &self.dropout_key {
                key.store(lever_model::DROPOUT_OFF, Ordering::Relaxed);
            }
            let m = r?;
            tokens += m.tokens;
            trained += m.trained_tokens;
            count += m.count;
            loss_sum += m.loss_sum;
            total = Some(accumulate(total, m.grads, &self.vars)?);
        }
        let Some(mut grads) = total else {
            return Err(Error::Config {
                what: "--grad-accum".into(),
                problem: "must be at least 1".into(),
            });
        };
        let mut allreduce_s = None;
        if ranks > 1 {
            let t0 = Instant::now();
            self.averager.sum(&self.dist, &mut grads, &self.vars)?;
            allreduce_s = Some(t0.elapsed().as_secs_f64());
            let mut sums = [loss_sum, count as f64, trained as f64, tokens as f64];
            self.dist.all_reduce_sum_f64(&mut sums)?;
            loss_sum = sums[0];
            [count, trained, tokens] = [sums[1] as usize, sums[2] as usize, sums[3] as usize];
        }
        let (grad_norm, scale) = clip_factor(&grads, &self.vars, self.config.grad_clip)?;
        self.opt.step_scaled(&grads, scale)?;
        let m = StepMetrics {
            step: self.step + 1,
            loss: loss_sum / count.max(1) as f64,
            lr,
            grad_norm,
            trained_tokens: trained,
            tokens,
            allreduce_s,
        };
        self.step += 1;
        Ok(m)
    }
}

/// What one micro-batch of [`Trainer::step_with`] computed.
pub struct MicroStep {
    /// The sum of the loss over the micro-batch (what `count` counts).
    pub loss_sum: f64,
    /// What the loss is a mean over: trained tokens, or examples.
    pub count: usize,
    /// Tokens the loss covered.
    pub trained_tokens: usize,
    /// All tokens processed (padding excluded).
    pub tokens: usize,
    /// Gradients of `loss_sum / divisor`.
    pub grads: GradStore,
}

/// The generator of the example order for `seed`.
fn order_rng(seed: u64) -> SplitMix64 {
    SplitMix64(seed ^ 0x5eed_da7a)
}

/// The next `n` indices of a seeded permutation of `n_examples`, renewed each epoch.
fn draw(
    order: &mut Vec<usize>,
    cursor: &mut usize,
    rng: &mut SplitMix64,
    n_examples: usize,
    n: usize,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if *cursor >= order.len() {
            *order = (0..n_examples).collect();
            rng.shuffle(order);
            *cursor = 0;
        }
        out.push(order[*cursor]);
        *cursor += 1;
    }
    out
}

/// The micro-batches (example indices) a run of `steps` steps with `config`'s seed, batch
/// size and accumulation draws from `n_examples` examples, in order: what [`Trainer::step`]
/// will train on, for planning (`lever plan --data`).
pub fn planned_batches(config: &TrainConfig, n_examples: usize) -> Vec<Vec<usize>> {
    let (mut order, mut cursor, mut rng) = (Vec::new(), 0, order_rng(config.seed));
    (0..config.steps * config.grad_accum)
        .map(|_| {
            draw(
                &mut order,
                &mut cursor,
                &mut rng,
                n_examples,
                config.batch_size,
            )
        })
        .collect()
}

impl Trainer {
    /// Save everything a resumed run needs to continue exactly: trainable values, optimizer
    /// moments and step count, the data order, its cursor and the RNG. Files are fsynced in a
    /// temporary folder that is then renamed over `dir`, so a kill at any moment leaves either
    /// the previous checkpoint or this one.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let state = serde_json::json!({
            "step": self.step, "cursor": self.cursor, "order": self.order, "rng": self.rng.0,
        });
        save_state(dir, &self.vars, &self.opt, state)
    }

    /// Restore a checkpoint written by `save_checkpoint` into this trainer and its variables.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = load_state(dir, &self.vars, &mut self.opt)?;
        let bad = |problem: String| Error::Config {
            what: dir.join("trainer.json").display().to_string(),
            problem,
        };
        self.step = state_u64(dir, &state, "step")? as usize;
        self.cursor = state_u64(dir, &state, "cursor")? as usize;
        self.rng = SplitMix64(state_u64(dir, &state, "rng")?);
        self.order = state
            .get("order")
            .and_then(|o| o.as_array())
            .ok_or_else(|| bad("`order` missing".into()))?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`order` is not a list of indices".into()))?;
        Ok(())
    }
}

/// `grads` added into `total` (the gradients of the micro-batches so far), for every variable.
pub(crate) fn accumulate(
    total: Option<GradStore>,
    grads: GradStore,
    vars: &[Var],
) -> Result<GradStore> {
    let Some(mut acc) = total else {
        return Ok(grads);
    };
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

/// A checkpoint, the one format fine-tuning and pretraining share: the trained values and
/// the optimizer's moments in `state.safetensors`, the optimizer's step count and the
/// caller's `state` (data position, RNG, step) in `trainer.json`, and last the completion
/// marker with their sha256 (checkpoint.rs). Files are fsynced in a temporary folder that is
/// then renamed over `dir`, so a kill at any moment leaves either the previous checkpoint or
/// this one.
pub(crate) fn save_state(
    dir: &Path,
    vars: &[Var],
    opt: &AdamW,
    mut state: serde_json::Value,
) -> Result<()> {
    let (m, v) = opt.moments()?;
    let mut tensors = std::collections::HashMap::new();
    for (i, var) in vars.iter().enumerate() {
        tensors.insert(format!("param.{i}"), var.as_tensor().clone());
        tensors.insert(format!("m.{i}"), m[i].clone());
        tensors.insert(format!("v.{i}"), v[i].clone());
    }
    state["optimizer_t"] = serde_json::json!(opt.t);
    state["vars"] = serde_json::json!(vars.len());
    let io = |name: &str| {
        let path = dir.join(name);
        move |source| Error::Io { path, source }
    };
    let step = state_u64(dir, &state, "step")?;
    lever_model::fsutil::write_atomic(dir, |tmp| {
        std::fs::create_dir(tmp).map_err(io(""))?;
        candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
        std::fs::write(tmp.join("trainer.json"), state.to_string()).map_err(io("trainer.json"))?;
        crate::checkpoint::seal(tmp, dir, step)
    })
}

/// Restore what `save_state` wrote into `vars` and `opt`; returns trainer.json.
pub(crate) fn load_state(dir: &Path, vars: &[Var], opt: &mut AdamW) -> Result<serde_json::Value> {
    let js = dir.join("trainer.json");
    let text = std::fs::read_to_string(&js).map_err(|source| Error::Io {
        path: js.clone(),
        source,
    })?;
    let bad = |problem: String| Error::Config {
        what: js.display().to_string(),
        problem,
    };
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let n = state_u64(dir, &state, "vars")? as usize;
    if n != vars.len() {
        return Err(bad(format!(
            "{n} trainable tensors, this run has {}",
            vars.len()
        )));
    }
    let tensors =
        candle_core::safetensors::load(dir.join("state.safetensors"), &candle_core::Device::Cpu)?;
    let get = |k: String| {
        tensors
            .get(&k)
            .cloned()
            .ok_or_else(|| bad(format!("state.safetensors has no `{k}`")))
    };
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (i, var) in vars.iter().enumerate() {
        let p = get(format!("param.{i}"))?;
        if p.shape() != var.shape() {
            return Err(bad(format!(
                "param.{i} has shape {:?}, this run {:?}",
                p.dims(),
                var.dims()
            )));
        }
        var.set(&p)?;
        m.push(get(format!("m.{i}"))?);
        v.push(get(format!("v.{i}"))?);
    }
    opt.restore(m, v, state_u64(dir, &state, "optimizer_t")? as usize)?;
    Ok(state)
}

/// A number of a checkpoint's trainer.json.
pub(crate) fn state_u64(dir: &Path, state: &serde_json::Value, key: &str) -> Result<u64> {
    state
        .get(key)
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Config {
            what: dir.join("trainer.json").display().to_string(),
            problem: format!("`{key}` missing"),
        })
}

/// The gradients' global L2 norm, and the factor that brings it down to `max` (1 when it is
/// at most `max`, or `max` is 0): the optimizer folds the factor into its update rather than
/// rescaling every gradient first.
pub(crate) fn clip_factor(grads: &GradStore, vars: &[Var], max: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += crate::optim::sum_of_squares(g)?;
        }
    }
    let norm = sq.sqrt();
    let k = if max > 0.0 && norm > max {
        max / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, k))
}

/// Σ loss over the batch's trained tokens, their count, and the gradients of Σ loss /
/// `divisor`, with or without activation checkpointing (the same numbers either way).
pub fn forward_backward(
    decoder: &Decoder,
    batch: &[&Tokenized],
    divisor: usize,
    checkpoint: bool,
) -> Result<(f64, usize, GradStore)> {
    let Some(prepared) = Prepared::new(batch)? else {
        // Nothing trained: an empty set of gradients.
        let zero = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
        return Ok((0.0, 0, zero.backward()?));
    };
    let n = prepared.wanted.len();
    if !checkpoint {
        let sum = prepared.loss_sum(
            decoder,
            &decoder.hidden(&prepared.ids, &mut decoder.new_cache())?,
        )?;
        let value = sum.to_scalar::<f32>()? as f64;
        let grads = decoder.backward(&(sum / divisor as f64)?)?;
        return Ok((value, n, grads));
    }
    let mut value = 0f64;
    let (_, grads) = decoder.backward_checkpointed(&prepared.ids, |hidden| {
        let sum = prepared
            .loss_sum(decoder, hidden)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        value = sum.to_scalar::<f32>()? as f64;
        sum / divisor as f64
    })?;
    Ok((value, n, grads))
}

/// Σ −log p(token) over the trained tokens of a right-padded batch, and how many there are.
/// Padding sits after each sequence's last token, so causal attention never lets a real
/// token see it.
pub fn masked_loss_sum(decoder: &Decoder, batch: &[&Tokenized]) -> Result<(Tensor, usize)> {
    match Prepared::new(batch)? {
        None => Ok((Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?, 0)),
        Some(p) => {
            let hidden = decoder.hidden(&p.ids, &mut decoder.new_cache())?; // (B, T, C)
            Ok((p.loss_sum(decoder, &hidden)?, p.wanted.len()))
        }
    }
}

/// A right-padded batch: its token ids, and which positions are trained on what target.
struct Prepared {
    /// (B, T)
    ids: Tensor,
    /// (N,) rows of the flattened (B·T, C) hidden states whose next token is trained.
    rows: Tensor,
    /// The N targets.
    wanted: Vec<u32>,
}

impl Prepared {
    /// None when nothing in the batch is trained.
    fn new(batch: &[&Tokenized]) -> Result<Option<Prepared>> {
        let t = batch.iter().map(|x| x.ids.len()).max().unwrap_or(0);
        if t < 2 {
            return Err(Error::Config {
                what: "batch".into(),
                problem: "examples need at least 2 tokens".into(),
            });
        }
        let b = batch.len();
        let mut ids = vec![0u32; b * t];
        let (mut rows, mut wanted) = (Vec::new(), Vec::new());
        for (row, ex) in batch.iter().enumerate() {
            ids[row * t..row * t + ex.ids.len()].copy_from_slice(&ex.ids);
            for i in 1..ex.ids.len() {
                if ex.trained[i] {
                    rows.push((row * t + i - 1) as u32);
                    wanted.push(ex.ids[i]);
                }
            }
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let dev = Device::Cpu;
        Ok(Some(Prepared {
            ids: Tensor::from_vec(ids, (b, t), &dev)?,
            rows: Tensor::from_vec(rows, wanted.len(), &dev)?,
            wanted,
        }))
    }

    /// Σ cross-entropy of the trained positions, from final hidden states (B, T, C). Only
    /// those rows go through the output layer: at a 49k vocabulary that is a fifth of the
    /// model's work.
    fn loss_sum(&self, decoder: &Decoder, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, c) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, c))?.index_select(&self.rows, 0)?; // (N, C)
        let logits = decoder.head(&picked)?; // (N, V)
        Ok(crate::loss::cross_entropy(&logits, self.wanted.clone())?.sum_all()?)
    }
}

/// Mean loss per trained token over a whole set (validation), without gradients.
pub fn evaluate(decoder: &Decoder, set: &[Tokenized], batch_size: usize) -> Result<f64> {
    evaluate_split(decoder, set, batch_size, &Dist::single())
}

/// [`evaluate`] over `dist`'s ranks: each takes a contiguous share of the examples, the sums
/// and counts are all-reduced, and every rank returns the same loss.
pub fn evaluate_split(
    decoder: &Decoder,
    set: &[Tokenized],
    batch_size: usize,
    dist: &Dist,
) -> Result<f64> {
    let share = set.len().div_ceil(dist.size()).max(1);
    let mine = set.chunks(share).nth(dist.rank()).unwrap_or_default();
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in mine.chunks(batch_size.max(1)) {
        let batch: Vec<&Tokenized> = chunk.iter().collect();
        let (s, k) = masked_loss_sum(decoder, &batch)?;
        sum += s.detach().to_scalar::<f32>()? as f64;
        n += k;
    }
    let mut both = [sum, n as f64];
    dist.all_reduce_sum_f64(&mut both)?;
    Ok(both[0] / both[1].max(1.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let c = TrainConfig {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            ..Default::default()
        };
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(110) - 0.1).abs() < 1e-12);
        assert!(c.lr_at(30) > c.lr_at(31));
    }
}
