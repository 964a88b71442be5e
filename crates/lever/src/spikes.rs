//! `lever pretrain --on-spike`: the training loop's hook for loss spikes. Each step is judged
//! before its update (lever_train::spike), a spike is written to RUN/events.jsonl (and marked
//! on loss.png), and the policy acts: `log` applies the update anyway, `skip` does not apply
//! it, `rollback` does not apply it and goes back to the newest intact checkpoint before the
//! spike, skips the batches from there through the spike's and `--rollback-skip` more, and
//! multiplies the learning rate by `--rollback-lr-factor`.
//!
//! Under MPI every rank judges the same numbers (the loss and gradient norm are over all
//! ranks) with the same detector (rank 0's history, broadcast at start and after a rollback),
//! so all take the same decision; rank 0 alone reads and writes the run folder, picks the
//! checkpoint and loads it, and the others receive its state.

use anyhow::Result;
use lever_train::checkpoint;
use lever_train::spike::{Detector, Policy, Thresholds, Verdict};
use lever_train::{Dist, PretrainStep, Pretrainer, RunDir};
use serde_json::json;

use crate::cli::SpikeArgs;

/// The detector and the policy, between steps.
pub struct Guard {
    policy: Policy,
    thresholds: Thresholds,
    detector: Detector,
    rollback_skip: u64,
    rollback_lr_factor: f64,
    /// The verdict on the step in flight, when it was a spike.
    spike: Option<Verdict>,
}

/// What became of a spike.
pub enum Handled {
    /// The step stands (logged, or its update skipped): write its metrics line.
    Kept,
    /// The run went back to an earlier checkpoint: metrics.jsonl was cut back to its step.
    RolledBack,
}

impl Guard {
    /// The guard of a run whose metrics.jsonl holds the steps done so far (a resumed run
    /// judges the next step as an uninterrupted one would).
    pub fn new(a: &SpikeArgs, run: Option<&RunDir>, dist: &Dist) -> Result<Guard> {
        let thresholds = Thresholds {
            window: a.spike_window,
            loss_z: a.spike_loss_z,
            grad_z: a.spike_grad_z,
        };
        thresholds.validate()?;
        Ok(Guard {
            policy: a.on_spike,
            thresholds,
            detector: Detector::replay(thresholds, history(run, dist)),
            rollback_skip: a.rollback_skip,
            rollback_lr_factor: a.rollback_lr_factor,
            spike: None,
        })
    }

    /// The settings, for the manifest.
    pub fn settings(&self) -> serde_json::Value {
        json!({
            "policy": self.policy, "window": self.thresholds.window,
            "loss_z": self.thresholds.loss_z, "grad_z": self.thresholds.grad_z,
            "rollback_skip": self.rollback_skip, "rollback_lr_factor": self.rollback_lr_factor,
        })
    }

    /// Judge a step before its update; whether to apply it.
    pub fn allows(&mut self, m: &PretrainStep) -> bool {
        if self.policy == Policy::Off {
            return true;
        }
        let v = self.detector.observe(m.loss, m.grad_norm);
        self.spike = v.spike.then_some(v);
        !(v.spike && matches!(self.policy, Policy::Skip | Policy::Rollback))
    }

    /// After the step: nothing when it was no spike; else the event is recorded (returned as
    /// a line to print) and, for a rollback, the trainer goes back.
    pub fn handle(
        &mut self,
        m: &PretrainStep,
        trainer: &mut Pretrainer,
        run: Option<&RunDir>,
        dist: &Dist,
        train: &[u32],
    ) -> Result<Option<(Handled, String)>> {
        let Some(v) = self.spike.take() else {
            return Ok(None);
        };
        let mut event = json!({
            "time": unix_now(), "step": m.step, "batch": trainer.batches(),
            "loss": m.loss, "grad_norm": m.grad_norm, "lr": m.lr,
            "loss_z": v.loss_z, "grad_z": v.grad_z,
            "loss_z_limit": self.thresholds.loss_z, "grad_z_limit": self.thresholds.grad_z,
        });
        let z = |z: Option<f64>| z.map_or("-".to_string(), |z| format!("{z:.1}"));
        let mut said = format!(
            "spike at step {}: loss {:.4} (z {}), gradient norm {:.4} (z {}): ",
            m.step,
            m.loss,
            z(v.loss_z),
            m.grad_norm,
            z(v.grad_z)
        );
        let handled = match self.policy {
            Policy::Off => unreachable!("no verdicts without detection"),
            Policy::Log => {
                event["action"] = json!("log");
                said += "logged, update applied";
                Handled::Kept
            }
            Policy::Skip => {
                event["action"] = json!("skip");
                said += "update skipped";
                Handled::Kept
            }
            Policy::Rollback => {
                let spike_batch = trainer.batches();
                // Rank 0 picks the checkpoint and tells the others whether there is one.
                let mut good = None;
                if let Some(run) = run {
                    let (g, passed) =
                        checkpoint::newest_good(&run.checkpoints(), Some(m.step as u64));
                    for p in &passed {
                        said += &format!(
                            "checkpoint {} passed over ({}); ",
                            lever_train::run::name_in(run.dir(), &p.dir),
                            p.problem
                        );
                    }
                    good = g;
                }
                let mut found = [u64::from(good.is_some())];
                dist.broadcast_u64(&mut found);
                if found[0] == 0 {
                    event["action"] = json!("skip");
                    event["note"] = json!("no checkpoint before the spike to roll back to");
                    said += "no checkpoint before it to roll back to; update skipped";
                    Handled::Kept
                } else {
                    let mut to = [0u64];
                    if let (Some(run), Some(good)) = (run, &good) {
                        trainer.load_checkpoint(&good.dir)?;
                        run.truncate_metrics(trainer.step)?;
                        to[0] = good.step;
                        event["checkpoint"] =
                            json!(lever_train::run::name_in(run.dir(), &good.dir));
                    }
                    trainer.broadcast_state()?;
                    dist.broadcast_u64(&mut to);
                    // The batches seen since the checkpoint, the spike's among them (PaLM),
                    // and K more.
                    let skip = spike_batch - trainer.batches() + self.rollback_skip;
                    trainer.skip_batches(skip, train)?;
                    trainer.scale_lr(self.rollback_lr_factor);
                    self.detector = Detector::replay(self.thresholds, history(run, dist));
                    event["action"] = json!("rollback");
                    event["to_step"] = json!(to[0]);
                    event["skipped_batches"] = json!(skip);
                    event["lr_scale"] = json!(trainer.lr_scale());
                    said += &format!(
                        "rolled back to step {} ({}), {skip} batch{} skipped, learning rate ×{}",
                        to[0],
                        event["checkpoint"].as_str().unwrap_or("?"),
                        if skip == 1 { "" } else { "es" },
                        trainer.lr_scale()
                    );
                    Handled::RolledBack
                }
            }
        };
        if let Some(run) = run {
            run.append_event(&event)?;
        }
        Ok(Some((handled, said)))
    }
}

/// The (loss, gradient norm) of each step so far: rank 0's metrics.jsonl, on every rank.
fn history(run: Option<&RunDir>, dist: &Dist) -> Vec<(f64, f64)> {
    let mine = run.map(|r| r.losses_and_grad_norms()).unwrap_or_default();
    if dist.size() == 1 {
        return mine;
    }
    let mut len = [mine.len() as u64];
    dist.broadcast_u64(&mut len);
    let mut bits: Vec<u64> = if dist.is_root() {
        mine.iter()
            .flat_map(|&(l, g)| [l.to_bits(), g.to_bits()])
            .collect()
    } else {
        vec![0; 2 * len[0] as usize]
    };
    dist.broadcast_u64(&mut bits);
    bits.chunks_exact(2)
        .map(|p| (f64::from_bits(p[0]), f64::from_bits(p[1])))
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
