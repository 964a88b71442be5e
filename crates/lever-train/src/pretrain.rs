//! Pretraining: next-token prediction over a stream of tokens, as nanoGPT's `train.py` and
//! llm.c's `train_gpt2.c` do it. Each optimizer step takes `grad_accum` micro-batches of
//! `batch_size` windows of `context + 1` tokens (inputs and the targets one to the right),
//! drawn at random offsets (nanoGPT's `get_batch`) or one after another with a saved cursor
//! (llm.c's loader); the loss is the mean cross-entropy over every position of the step;
//! gradients are clipped by global norm and AdamW steps with weight decay on matrices only and
//! nanoGPT's warmup-then-cosine learning rate ([`Recipe::lr_at`]).
//!
//! The model is lever's one decoder with every weight trainable (`Decoder::make_trainable`,
//! as full fine-tuning), through the same fused training ops; checkpoints are the fine-tuning
//! ones (`trainer::save_state`) plus the batch RNG and cursor, so a resumed run draws the
//! same batches and computes the same losses as one that never stopped.
//!
//! Tokens come as plain slices (`&[u32]`), the training and the validation split; the caller
//! reads them from shards.
//!
//! Data parallel ([`Pretrainer::with_dist`], dist.rs): `batch_size` is per rank. Every rank
//! draws the windows of the whole global batch (world size × `batch_size`) from the same RNG
//! or cursor and takes its own `batch_size` of them (rank r: windows r·B..(r+1)·B, llm.c's
//! offsets rank·B·T for sequential batches), so N ranks × batch B is the same run as one
//! process × batch N·B, and the RNG and cursor (the checkpoint's) are the same on every rank.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use lever_model::Decoder;
use lever_model::rng::SplitMix64;
use serde::Serialize;

use crate::dist::{Dist, GradAverager};
use crate::error::{Error, Result};
use crate::lanes::Lanes;
use crate::optim::{AdamW, AdamWParams};
use crate::recipe::{Batches, Recipe};
use crate::trainer::{accumulate, clip_factor, load_state, save_state, state_u64};

/// One optimizer step's numbers (a line of metrics.jsonl).
#[derive(Debug, Clone, Serialize)]
pub struct PretrainStep {
    pub step: usize,
    /// Mean cross-entropy over the step's tokens (nats).
    pub loss: f64,
    pub lr: f64,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    /// Tokens the step trained on over all ranks (`ranks × batch_size × grad_accum ×
    /// context`).
    pub tokens: usize,
    /// Seconds spent averaging the gradients over the ranks (packing, MPI's all-reduce,
    /// unpacking; it includes waiting for the slowest rank). Absent for one process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
}

/// The training state: the variables, the optimizer, where the batches come from.
pub struct Pretrainer {
    pub recipe: Recipe,
    vars: Vec<Var>,
    opt: AdamW,
    /// Draws the random windows.
    rng: SplitMix64,
    /// The next window's start, for sequential batches.
    cursor: usize,
    /// Optimizer steps done.
    pub step: usize,
    /// The ranks this trainer averages its gradients over (one process by default).
    dist: Arc<Dist>,
    averager: GradAverager,
    /// Batches (one per step, `grad_accum` micro-batches each) drawn so far, those skipped
    /// after a rollback included.
    batches: u64,
    /// The schedule's learning rate is multiplied by this (lowered by rollbacks).
    lr_scale: f64,
    /// A deliberately bad batch, for tests of spike handling.
    pub poison: Option<Poison>,
    /// The threads a micro-batch's windows are spread over.
    lanes: Lanes,
}

/// A deliberately bad batch, for tests of spike handling (`lever pretrain
/// --debug-poison-step`): every target of the `batch`-th batch drawn (1-based) is the
/// vocabulary's last token, and its learning rate is multiplied by `lr_factor`. It is a property of the
/// data, as a bad batch would be: drawn again (after a restart), it is bad again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Poison {
    pub batch: u64,
    pub lr_factor: f64,
}

/// The seed of the batch sampler, apart from the weights' seed.
const BATCH_SALT: u64 = 0xba7c_4e55_0f0f_5eed;

impl Pretrainer {
    /// Train `vars` (named as `Decoder::make_trainable` names them): weight decay goes to
    /// those of two or more dimensions, nanoGPT's `configure_optimizers` grouping.
    pub fn new(recipe: Recipe, vars: Vec<(String, Var)>) -> Result<Pretrainer> {
        recipe.validate()?;
        let decays = vars.iter().map(|(_, v)| v.rank() >= 2).collect();
        let vars: Vec<Var> = vars.into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(
            vars.clone(),
            AdamWParams {
                lr: recipe.lr_at(0),
                beta1: recipe.beta1,
                beta2: recipe.beta2,
                eps: recipe.eps,
                weight_decay: recipe.weight_decay,
            },
        )?
        .decay_only(decays)?;
        let rng = SplitMix64(recipe.seed ^ BATCH_SALT);
        Ok(Pretrainer {
            recipe,
            vars,
            opt,
            rng,
            cursor: 0,
            step: 0,
            batches: 0,
            lr_scale: 1.0,
            poison: None,
            dist: Arc::new(Dist::single()),
            averager: GradAverager::default(),
            lanes: Lanes::default(),
        })
    }

    /// Train data-parallel over `dist`'s ranks (see the module doc).
    pub fn with_dist(mut self, dist: Arc<Dist>) -> Pretrainer {
        self.dist = dist;
        self
    }

    /// A digest of the weights, to check that every rank holds the same ones.
    pub fn weights_digest(&self) -> Result<u64> {
        crate::dist::digest(&self.vars)
    }

    /// Check that `tokens` hold at least one window (context + 1 tokens).
    pub fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        check_window(tokens.len(), self.recipe.model.context, what)
    }

    /// The start of each window of this rank's part of the next micro-batch.
    fn next_starts(&mut self, len: usize) -> Vec<usize> {
        let t = self.recipe.model.context;
        let b = self.recipe.batch_size;
        let global: Vec<usize> = (0..b * self.dist.size())
            .map(|_| match self.recipe.batches {
                // nanoGPT: torch.randint(len(data) - block_size, ...).
                Batches::Random => self.rng.below(len - t),
                Batches::Sequential => {
                    if self.cursor + t + 1 > len {
                        self.cursor = 0;
                    }
                    let s = self.cursor;
                    self.cursor += t;
                    s
                }
            })
            .collect();
        let r = self.dist.rank();
        global[r * b..(r + 1) * b].to_vec()
    }

    /// Batches drawn so far (one per step, skipped ones included).
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The factor on the schedule's learning rate.
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// Multiply the learning rate from now on by `factor` (after a rollback).
    pub fn scale_lr(&mut self, factor: f64) {
        self.lr_scale *= factor;
    }

    /// Draw the next `n` batches and throw them away: the run never trains on them.
    pub fn skip_batches(&mut self, n: u64, train: &[u32]) -> Result<()> {
        self.check_tokens(train, "the training tokens")?;
        for _ in 0..n {
            for _ in 0..self.recipe.grad_accum {
                self.next_starts(train.len());
            }
            self.batches += 1;
        }
        Ok(())
    }

    /// One optimizer step on the training tokens.
    pub fn step(&mut self, decoder: &Decoder, train: &[u32]) -> Result<PretrainStep> {
        Ok(self.step_with(decoder, train, |_| true)?.0)
    }

    /// One optimizer step, where `apply` sees the step's loss and gradient norm before the
    /// update and says whether to make it. A step whose update is not applied still counts:
    /// its batch is used up and the schedule moves on (llm.c's skipped updates). Returns the
    /// step's numbers and whether the update was applied.
    pub fn step_with(
        &mut self,
        decoder: &Decoder,
        train: &[u32],
        apply: impl FnOnce(&PretrainStep) -> bool,
    ) -> Result<(PretrainStep, bool)> {
        self.check_tokens(train, "the training tokens")?;
        self.batches += 1;
        let poison = self.poison.filter(|p| p.batch == self.batches);
        let lr = self.recipe.lr_at(self.step) * self.lr_scale * poison.map_or(1.0, |p| p.lr_factor);
        self.opt.set_lr(lr);
        let t = self.recipe.model.context;
        let all = self.recipe.batch_size * self.recipe.grad_accum * t;
        let mut total: Option<GradStore> = None;
        let mut loss_sum = 0f64;
        let poisoned = poison.is_some();
        for _ in 0..self.recipe.grad_accum {
            let starts = self.next_starts(train.len());
            self.lanes
                .ensure(starts.len().min(rayon::current_num_threads()))?;
            let parts = self.lanes.run(&starts, |part| -> Result<(f64, GradStore)> {
                let (ids, mut targets) = windows(train, part, t)?;
                if poisoned {
                    // One token everywhere, the vocabulary's last (lever's end-of-text): a
                    // batch the model finds very unlikely, as a degenerate document would be.
                    targets.fill(decoder.config().vocab_size.saturating_sub(1) as u32);
                }
                // The mean over the whole step, however it is split into micro-batches and
                // lanes.
                let sum = loss_sum_of(decoder, ids, targets)?;
                let value = sum.to_scalar::<f32>()? as f64;
                Ok((value, decoder.backward(&(sum / all as f64)?)?))
            });
            // Summed in lane order, so that a run is the same from one time to the next.
            for part in parts {
                let (value, grads) = part?;
                loss_sum += value;
                total = Some(accumulate(total, grads, &self.vars)?);
            }
        }
        let Some(mut grads) = total else {
            return Err(Error::Config {
                what: "grad_accum".into(),
                problem: "must be at least 1".into(),
            });
        };
        let mut allreduce_s = None;
        if self.dist.size() > 1 {
            // Each rank's gradient is of its own mean loss; over ranks with the same token
            // count, their mean is the gradient of the global mean.
            let t0 = Instant::now();
            self.averager.average(&self.dist, &mut grads, &self.vars)?;
            allreduce_s = Some(t0.elapsed().as_secs_f64());
            let mut sum = [loss_sum];
            self.dist.all_reduce_sum_f64(&mut sum)?;
            loss_sum = sum[0] / self.dist.size() as f64;
        }
        let (grad_norm, scale) = clip_factor(&grads, &self.vars, self.recipe.grad_clip)?;
        let m = PretrainStep {
            step: self.step + 1,
            loss: loss_sum / all as f64,
            lr,
            grad_norm,
            tokens: all * self.dist.size(),
            allreduce_s,
        };
        let applied = apply(&m);
        if applied {
            self.opt.step_scaled(&grads, scale)?;
        }
        self.step += 1;
        Ok((m, applied))
    }

    /// Save everything a resumed run needs to continue exactly (atomically, see
    /// `trainer::save_state`).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let state = serde_json::json!({
            "step": self.step, "cursor": self.cursor, "rng": self.rng.0,
            "batches": self.batches, "lr_scale": self.lr_scale,
        });
        save_state(dir, &self.vars, &self.opt, state)
    }

    /// Give every rank rank 0's state (weights, optimizer moments and step, batch RNG and
    /// cursor): a run resumed over MPI loads its checkpoint on rank 0 alone, so the other
    /// ranks need no copy of the run folder.
    pub fn broadcast_state(&mut self) -> Result<()> {
        let mut scalars = [
            self.step as u64,
            self.cursor as u64,
            self.rng.0,
            self.batches,
            self.lr_scale.to_bits(),
        ];
        crate::dist::broadcast_state(&self.dist, &self.vars, &mut self.opt, &mut scalars)?;
        [self.step, self.cursor] = [scalars[0] as usize, scalars[1] as usize];
        self.rng = SplitMix64(scalars[2]);
        self.batches = scalars[3];
        self.lr_scale = f64::from_bits(scalars[4]);
        Ok(())
    }

    /// Restore a checkpoint written by `save_checkpoint`.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = load_state(dir, &self.vars, &mut self.opt)?;
        self.step = state_u64(dir, &state, "step")? as usize;
        self.cursor = state_u64(dir, &state, "cursor")? as usize;
        self.rng = SplitMix64(state_u64(dir, &state, "rng")?);
        // Checkpoints from before rollbacks existed: one batch per step, the schedule's rate.
        self.batches = state["batches"].as_u64().unwrap_or(self.step as u64);
        self.lr_scale = state["lr_scale"].as_f64().unwrap_or(1.0);
        Ok(())
    }
}

/// A window is `context` inputs and the `context` targets one token to the right.
fn check_window(len: usize, context: usize, what: &str) -> Result<()> {
    if len <= context {
        return Err(Error::Config {
            what: what.into(),
            problem: format!(
                "{len} tokens, fewer than one window of the context ({context}) plus one; \
                 use a shorter context or more data"
            ),
        });
    }
    Ok(())
}

/// Inputs and targets of windows starting at `starts`: (B·T) ids each.
fn windows(tokens: &[u32], starts: &[usize], t: usize) -> Result<(Tensor, Vec<u32>)> {
    let mut ids = Vec::with_capacity(starts.len() * t);
    let mut targets = Vec::with_capacity(starts.len() * t);
    for &s in starts {
        ids.extend_from_slice(&tokens[s..s + t]);
        targets.extend_from_slice(&tokens[s + 1..s + 1 + t]);
    }
    let ids = Tensor::from_vec(ids, (starts.len(), t), &Device::Cpu)?;
    Ok((ids, targets))
}

/// Σ cross-entropy over every position of a (B, T) batch against its targets.
fn loss_sum_of(decoder: &Decoder, ids: Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let hidden = decoder.hidden(&ids, &mut decoder.new_cache())?; // (B, T, C)
    let c = hidden.dim(2)?;
    let logits = decoder.head(&hidden.reshape((b * t, c))?)?; // (B·T, V)
    Ok(crate::loss::cross_entropy(&logits, targets)?.sum_all()?)
}

/// The validation windows: non-overlapping windows through the tokens, or when there are
/// more than `max_windows`, that many spread evenly over them — the same ones every time, so
/// that evaluations are comparable.
pub fn eval_starts(len: usize, context: usize, max_windows: usize) -> Vec<usize> {
    if len <= context {
        return Vec::new();
    }
    let n = (len - 1) / context;
    if n <= max_windows {
        return (0..n).map(|i| i * context).collect();
    }
    (0..max_windows)
        .map(|i| (i * n / max_windows) * context)
        .collect()
}

/// How much of the validation split an evaluation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// `recipe.eval_batches` batches of windows spread over it (nanoGPT's `eval_iters`),
    /// the same ones every time.
    Sample,
    /// Every window (the final evaluation).
    Whole,
}

/// Mean cross-entropy per token over validation windows, without gradients.
pub fn evaluate(
    decoder: &Decoder,
    recipe: &Recipe,
    tokens: &[u32],
    cover: Coverage,
) -> Result<f64> {
    evaluate_split(decoder, recipe, tokens, cover, &Dist::single())
}

/// [`evaluate`] over `dist`'s ranks: the windows of the global batch size (ranks ×
/// `batch_size`, as one process with that batch would take), each rank a contiguous share of
/// them, the sums all-reduced; every rank returns the same loss.
pub fn evaluate_split(
    decoder: &Decoder,
    recipe: &Recipe,
    tokens: &[u32],
    cover: Coverage,
    dist: &Dist,
) -> Result<f64> {
    let t = recipe.model.context;
    check_window(tokens.len(), t, "the validation tokens")?;
    let most = match cover {
        Coverage::Sample => recipe.eval_batches.max(1) * recipe.batch_size * dist.size(),
        Coverage::Whole => usize::MAX,
    };
    let starts = eval_starts(tokens.len(), t, most);
    let share = starts.len().div_ceil(dist.size());
    let mine = starts
        .chunks(share.max(1))
        .nth(dist.rank())
        .unwrap_or_default();
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in mine.chunks(recipe.batch_size) {
        let (ids, targets) = windows(tokens, chunk, t)?;
        n += targets.len();
        sum += loss_sum_of(decoder, ids, targets)?
            .detach()
            .to_scalar::<f32>()? as f64;
    }
    let mut both = [sum, n as f64];
    dist.all_reduce_sum_f64(&mut both)?;
    Ok(both[0] / both[1].max(1.0))
}

/// The next token's logits after `ids` (its last `context` tokens), for sampling text.
pub fn next_token_logits(decoder: &Decoder, ids: &[u32]) -> Result<Vec<f32>> {
    let ctx = decoder.config().max_seq_len;
    let tail = &ids[ids.len().saturating_sub(ctx)..];
    let x = Tensor::new(tail, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    // The whole window again for each token: a trainable decoder's fused attention keeps no
    // keys in the cache, and at a pretraining context this is cheap.
    let logits = decoder.forward(&x, &mut decoder.new_cache(), lever_model::Logits::Last)?;
    Ok(logits.detach().squeeze(0)?.to_vec1::<f32>()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::init::new_decoder;

    fn tiny_recipe() -> Recipe {
        let mut r = Recipe::preset("shakespeare-char").unwrap();
        r.model.layers = 2;
        r.model.heads = 2;
        r.model.kv_heads = 1;
        r.model.width = 16;
        r.model.mlp_width = 32;
        r.model.context = 8;
        r.batch_size = 3;
        r.grad_accum = 2;
        r.steps = 6;
        r.decay_steps = 6;
        r.warmup_steps = 1;
        r.lr = 1e-2;
        r
    }

    /// A repeating pattern with noise a model learns fast.
    fn tokens(n: usize, vocab: u32) -> Vec<u32> {
        let mut rng = SplitMix64(3);
        (0..n)
            .map(|i| {
                if rng.below(10) == 0 {
                    rng.below(vocab as usize) as u32
                } else {
                    (i % 7) as u32
                }
            })
            .collect()
    }

    fn trainer(r: &Recipe, vocab: usize) -> (Decoder, Pretrainer) {
        let mut d = new_decoder(&r.decoder_config(vocab), r.seed, &Device::Cpu).unwrap();
        let vars = d.make_trainable().unwrap();
        (d, Pretrainer::new(r.clone(), vars).unwrap())
    }

    /// The loss falls; the untrained loss is near ln V; a step counts its tokens.
    #[test]
    fn training_lowers_the_loss() {
        let r = tiny_recipe();
        let data = tokens(500, 11);
        let (d, mut p) = trainer(&r, 11);
        let before = evaluate(&d, &r, &data, Coverage::Whole).unwrap();
        assert!((before - (11f64).ln()).abs() < 0.1, "{before}");
        let mut last = 0.0;
        for _ in 0..r.steps {
            let m = p.step(&d, &data).unwrap();
            assert_eq!(m.tokens, 3 * 2 * 8);
            last = m.loss;
        }
        let after = evaluate(&d, &r, &data, Coverage::Whole).unwrap();
        assert!(
            after < before - 0.3,
            "{before} → {after} (last step {last})"
        );
    }

    /// Sequential windows walk the tokens in order and wrap; random ones stay in range.
    #[test]
    fn batches_cover_the_tokens() {
        let mut r = tiny_recipe();
        r.batches = Batches::Sequential;
        let (_, mut p) = trainer(&r, 11);
        assert_eq!(p.next_starts(30), [0, 8, 16]);
        assert_eq!(p.next_starts(30), [0, 8, 16]); // 24 + 9 > 30: wrap
        r.batches = Batches::Random;
        let (_, mut p) = trainer(&r, 11);
        for _ in 0..100 {
            assert!(p.next_starts(30).iter().all(|&s| s + 8 < 30));
        }
        assert_eq!(eval_starts(30, 8, 100), [0, 8, 16]);
        assert_eq!(eval_starts(1000, 8, 4), [0, 248, 496, 744]);
        assert!(eval_starts(8, 8, 4).is_empty());
    }

    /// Rank r of N takes windows r·B..(r+1)·B of the global batch one process with batch
    /// N·B would take, for random and sequential batches, and its RNG and cursor move as
    /// that process's.
    #[test]
    fn each_rank_takes_its_slice_of_the_global_batch() {
        for batches in [Batches::Random, Batches::Sequential] {
            let mut r = tiny_recipe();
            r.batches = batches;
            r.batch_size = 6;
            let (_, mut one) = trainer(&r, 11);
            r.batch_size = 2;
            let mut ranks: Vec<Pretrainer> = (0..3)
                .map(|k| {
                    let (_, p) = trainer(&r, 11);
                    p.with_dist(Arc::new(Dist::pretend(k, 3)))
                })
                .collect();
            for _ in 0..5 {
                let want = one.next_starts(100);
                let got: Vec<usize> = ranks.iter_mut().flat_map(|p| p.next_starts(100)).collect();
                assert_eq!(got, want, "{batches:?}");
                for p in &ranks {
                    assert_eq!((p.rng.0, p.cursor), (one.rng.0, one.cursor));
                }
            }
        }
    }

    /// A run saved and restored midway gives the same losses as one that never stopped.
    #[test]
    fn a_restored_checkpoint_continues_exactly() {
        let d0 = tempfile::tempdir().unwrap();
        let ck = d0.path().join("ck");
        for batches in [Batches::Random, Batches::Sequential] {
            let mut r = tiny_recipe();
            r.batches = batches;
            let data = tokens(300, 11);
            let (d, mut p) = trainer(&r, 11);
            let mut straight = Vec::new();
            for i in 0..r.steps {
                straight.push(p.step(&d, &data).unwrap().loss);
                if i == 2 {
                    p.save_checkpoint(&ck).unwrap();
                }
            }
            let (d, mut q) = trainer(&r, 11);
            q.load_checkpoint(&ck).unwrap();
            assert_eq!(q.step, 3);
            let resumed: Vec<f64> = (3..r.steps)
                .map(|_| q.step(&d, &data).unwrap().loss)
                .collect();
            assert_eq!(resumed, straight[3..], "{batches:?}");
        }
    }

    fn values(p: &Pretrainer) -> Vec<Vec<f32>> {
        p.vars
            .iter()
            .map(|v| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    /// Windows spread over threads (lanes.rs: batch 3 as 2 + 1 on two threads, 1 + 1 + 1
    /// on three) train as one thread does, within rounding, and give the same numbers each
    /// time.
    #[test]
    fn lanes_train_as_one_thread_does_and_the_same_every_time() {
        let r = tiny_recipe();
        let data = tokens(300, 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (d, mut p) = trainer(&r, 11);
                let losses: Vec<f64> = (0..r.steps)
                    .map(|_| p.step(&d, &data).unwrap().loss)
                    .collect();
                (losses, values(&p))
            })
        };
        let (one, one_w) = run(1);
        for threads in [2, 3] {
            let (lanes, lanes_w) = run(threads);
            assert_eq!(
                run(threads),
                (lanes.clone(), lanes_w.clone()),
                "{threads} threads"
            );
            for (a, b) in one.iter().zip(&lanes) {
                assert!((a - b).abs() < 1e-5, "{threads} threads: loss {a} vs {b}");
            }
            let worst = one_w
                .iter()
                .flatten()
                .zip(lanes_w.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{threads} threads: weights differ by {worst}");
            assert!(lanes.last() < lanes.first(), "{lanes:?}");
        }
    }

    /// A poisoned batch whose update is not applied, rolled back to the checkpoint before
    /// it and skipped, leaves the run exactly where a run that never drew that batch is.
    #[test]
    fn a_rollback_past_a_poisoned_batch_equals_never_seeing_it() {
        let d0 = tempfile::tempdir().unwrap();
        let ck = d0.path().join("ck");
        let r = tiny_recipe();
        let data = tokens(300, 11);
        // Never saw batch 4.
        let (d, mut a) = trainer(&r, 11);
        let mut want = Vec::new();
        for s in 1..=r.steps {
            if s == 4 {
                a.skip_batches(1, &data).unwrap();
            }
            want.push(a.step(&d, &data).unwrap().loss);
        }
        assert_eq!(a.batches(), r.steps as u64 + 1);

        let (d, mut b) = trainer(&r, 11);
        b.poison = Some(Poison {
            batch: 4,
            lr_factor: 30.0,
        });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(b.step(&d, &data).unwrap().loss);
        }
        b.save_checkpoint(&ck).unwrap();
        let before = values(&b);
        let (m, applied) = b.step_with(&d, &data, |_| false).unwrap();
        assert!(!applied);
        assert!(
            m.loss > got[2] + 0.1,
            "poisoned loss {} after {}",
            m.loss,
            got[2]
        );
        assert_eq!(values(&b), before, "an update not applied changes nothing");
        let spike_batch = b.batches();
        b.load_checkpoint(&ck).unwrap();
        assert_eq!((b.step, b.batches()), (3, 3));
        b.skip_batches(spike_batch - b.batches(), &data).unwrap();
        while b.step < r.steps {
            got.push(b.step(&d, &data).unwrap().loss);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn too_few_tokens_for_a_window_is_an_error() {
        let r = tiny_recipe();
        let (d, mut p) = trainer(&r, 11);
        let e = p
            .step(&d, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8 tokens, fewer than one window of the context (8)"),
            "{e}"
        );
    }
}
