//! Loss spikes: each step's loss and gradient norm are judged against a rolling window of the
//! steps before it, and a policy says what to do with a step that stands out.
//!
//! Detection is a z-score, (x − mean) / std over the window, of the loss and of the gradient
//! norm, upward only (a sudden drop is not a problem); either above its threshold, or a loss
//! that is not finite, makes a spike. What this learned from:
//! - llm.c's `llmc/outlier_detector.h` and `-sl`/`-sg` flags: the z-score of a new value
//!   against a window, one-sided, used to skip the update; a spike is kept out of the window
//!   (so that it does not make the detector more lenient), except the third in a row, so that
//!   a lasting change of level is accepted rather than skipped forever.
//! - OLMo-core's `SkipStepOptimizer`: both the loss and the gradient norm, a window of 128
//!   steps and 6 standard deviations (lever's defaults), the new value judged against the
//!   values before it, and no judgement until the window is half full.
//! - PaLM (Chowdhery et al. 2022, arXiv:2204.02311, §5.1): about 20 spikes, each handled by
//!   restarting from a checkpoint about 100 steps before it and skipping 200–500 batches —
//!   `Policy::Rollback`; OPT-175B's logbook (Zhang et al. 2022, arXiv:2205.01068): restarts
//!   with a lower learning rate — the rollback's learning-rate factor.
//!
//! The detector's state is a function of the steps it has seen, so a resumed run or a rolled
//! back one rebuilds it by replaying metrics.jsonl up to its checkpoint ([`Detector::replay`]).

use std::collections::VecDeque;

use serde::Serialize;

use crate::error::{Error, Result};

/// What to do about a spike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// No detection.
    Off,
    /// Record it (RUN/events.jsonl, loss.png) and apply the update anyway.
    Log,
    /// Do not apply that update (llm.c); the batch is used up and the step counts.
    Skip,
    /// Go back to the newest checkpoint before it, skip the batches from there through the
    /// spike and K more, optionally lower the learning rate (PaLM, OPT).
    Rollback,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Policy, String> {
        match s {
            "off" => Ok(Policy::Off),
            "log" => Ok(Policy::Log),
            "skip" => Ok(Policy::Skip),
            "rollback" => Ok(Policy::Rollback),
            _ => Err(format!("`{s}`: expected off, log, skip or rollback")),
        }
    }
}

/// Detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Steps in the rolling window; judging starts once half of it is filled.
    pub window: usize,
    /// A loss this many standard deviations above the window's mean is a spike (0: not
    /// judged).
    pub loss_z: f64,
    /// The same for the gradient norm (before clipping).
    pub grad_z: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            window: 128,
            loss_z: 6.0,
            grad_z: 6.0,
        }
    }
}

impl Thresholds {
    pub fn validate(&self) -> Result<()> {
        if self.window < 4 {
            return Err(Error::Config {
                what: "--spike-window".into(),
                problem: format!("{}: at least 4 steps", self.window),
            });
        }
        for (what, z) in [
            ("--spike-loss-z", self.loss_z),
            ("--spike-grad-z", self.grad_z),
        ] {
            if !(z >= 0.0 && z.is_finite()) {
                return Err(Error::Config {
                    what: what.into(),
                    problem: format!("{z}: a number of standard deviations, 0 or more"),
                });
            }
        }
        Ok(())
    }
}

/// The judgement of one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    /// z-score of the loss (None while the window is less than half full).
    pub loss_z: Option<f64>,
    pub grad_z: Option<f64>,
    pub spike: bool,
}

/// Spikes in a row that stay out of the window; the next one goes in.
const KEPT_OUT_IN_A_ROW: usize = 2;

/// The rolling window of recent losses and gradient norms.
#[derive(Debug, Clone)]
pub struct Detector {
    t: Thresholds,
    loss: VecDeque<f64>,
    grad: VecDeque<f64>,
    kept_out: usize,
}

/// Mean and (population) standard deviation.
fn mean_std(v: &VecDeque<f64>) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// How far above the window's mean `x` is, in standard deviations; 0 for a window without
/// spread.
fn z_score(v: &VecDeque<f64>, x: f64) -> f64 {
    let (mean, std) = mean_std(v);
    if std > 0.0 { (x - mean) / std } else { 0.0 }
}

impl Detector {
    pub fn new(t: Thresholds) -> Detector {
        Detector {
            t,
            loss: VecDeque::with_capacity(t.window),
            grad: VecDeque::with_capacity(t.window),
            kept_out: 0,
        }
    }

    /// A detector that has seen these (loss, gradient norm) steps, in order.
    pub fn replay(t: Thresholds, steps: impl IntoIterator<Item = (f64, f64)>) -> Detector {
        let mut d = Detector::new(t);
        for (loss, grad) in steps {
            d.observe(loss, grad);
        }
        d
    }

    /// Judge a step against the window of the steps before it, then add it to the window
    /// (a spike only when it is the third in a row).
    pub fn observe(&mut self, loss: f64, grad_norm: f64) -> Verdict {
        let ready = self.loss.len() >= (self.t.window / 2).max(2);
        let judge = |v: &VecDeque<f64>, x: f64| ready.then(|| z_score(v, x));
        let loss_z = judge(&self.loss, loss);
        let grad_z = judge(&self.grad, grad_norm);
        let over = |z: Option<f64>, limit: f64| limit > 0.0 && z.is_some_and(|z| z > limit);
        let spike = !loss.is_finite()
            || !grad_norm.is_finite()
            || over(loss_z, self.t.loss_z)
            || over(grad_z, self.t.grad_z);
        if spike && self.kept_out < KEPT_OUT_IN_A_ROW {
            self.kept_out += 1;
        } else if loss.is_finite() && grad_norm.is_finite() {
            self.kept_out = 0;
            for (v, x) in [(&mut self.loss, loss), (&mut self.grad, grad_norm)] {
                if v.len() == self.t.window {
                    v.pop_front();
                }
                v.push_back(x);
            }
        }
        Verdict {
            loss_z,
            grad_z,
            spike,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lever_model::rng::SplitMix64;

    fn noisy(n: usize, seed: u64) -> Vec<(f64, f64)> {
        let mut r = SplitMix64(seed);
        (0..n)
            .map(|i| {
                let u = (r.next_u64() % 1000) as f64 / 1000.0;
                (3.0 - 0.001 * i as f64 + 0.05 * u, 1.0 + 0.1 * u)
            })
            .collect()
    }

    #[test]
    fn a_jump_is_a_spike_and_ordinary_noise_is_not() {
        let t = Thresholds {
            window: 16,
            ..Default::default()
        };
        let mut d = Detector::new(t);
        for (l, g) in noisy(40, 1) {
            assert!(!d.observe(l, g).spike);
        }
        // Not judged before the window is half full.
        assert_eq!(Detector::new(t).observe(100.0, 1.0).loss_z, None);
        let v = d.observe(5.0, 1.05);
        assert!(v.spike && v.loss_z.unwrap() > 6.0, "{v:?}");
        assert!(d.observe(2.97, 30.0).spike); // the gradient norm alone
        assert!(d.observe(f64::NAN, 1.0).spike);
        // Downward is not a spike.
        assert!(!d.observe(1.0, 0.5).spike);
        // A threshold of 0 is not judged.
        let mut d = Detector::replay(Thresholds { loss_z: 0.0, ..t }, noisy(40, 1));
        assert!(!d.observe(5.0, 1.05).spike);
    }

    #[test]
    fn spikes_stay_out_of_the_window_but_the_third_in_a_row_goes_in() {
        let t = Thresholds {
            window: 8,
            ..Default::default()
        };
        let base = noisy(20, 2);
        let mut d = Detector::replay(t, base.clone());
        let before = d.loss.clone();
        assert!(d.observe(9.0, 1.0).spike);
        assert!(d.observe(9.0, 1.0).spike);
        assert_eq!(d.loss, before);
        // The third is still judged a spike, and enters the window: a new level is learned.
        assert!(d.observe(9.0, 1.0).spike);
        assert_eq!(d.loss.back(), Some(&9.0));
        // Replaying the same steps gives the same state.
        let mut steps = base;
        steps.extend([(9.0, 1.0); 3]);
        let r = Detector::replay(t, steps);
        assert_eq!((r.loss, r.kept_out), (d.loss, d.kept_out));
    }

    #[test]
    fn policies_parse_and_bad_settings_are_named() {
        assert_eq!("rollback".parse::<Policy>(), Ok(Policy::Rollback));
        assert!("undo".parse::<Policy>().unwrap_err().contains("rollback"));
        let e = Thresholds {
            window: 2,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--spike-window"), "{e}");
        let e = Thresholds {
            grad_z: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--spike-grad-z"), "{e}");
    }
}
