//! A training run's folder, shared by fine-tuning and pretraining: where it is, whether it may
//! be started, resumed or started over, and what it holds.
//!
//! ```text
//! RUN/
//!   manifest.json      command, settings, versions; `result` once finished
//!   metrics.jsonl      one line per step ({"step", "loss", ...}) and per evaluation ({"step", "val_loss"})
//!   loss.png           training and validation loss
//!   checkpoints/last/  everything a resumed run needs (trainer.rs `save_checkpoint`), sealed
//!                      with complete.json (checkpoint.rs); step-N/ snapshots beside it
//!   events.jsonl       loss spikes and what was done about them (spike.rs)
//!   restarts.jsonl     one line per restart of a supervised run
//!   best/              the weights with the lowest validation loss so far
//!   adapter/ | model/  the result (and model.gguf when pretraining asks for one); `rag train`
//!   query-encoder/     writes adapter/ and the trained query encoder
//! ```
//!
//! A run is never written over by accident: a folder that holds a run is refused unless the
//! run is resumed (same settings, checked against the manifest) or started over on purpose,
//! and a folder that holds anything else is refused too. Files are written atomically
//! (`lever_model::fsutil::write_atomic`); metrics are appended and, on resume, cut back to the
//! checkpoint's step.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// What a run writes into its folder: starting over removes these and nothing else.
pub const RUN_FILES: [&str; 11] = [
    "manifest.json",
    "metrics.jsonl",
    "events.jsonl",
    "restarts.jsonl",
    "loss.png",
    "checkpoints",
    "best",
    "adapter",
    "model",
    "model.gguf",
    "query-encoder",
];

/// How a run begins in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: the folder must be missing or empty.
    New,
    /// Continue from the newest complete checkpoint with the settings in `manifest.json`.
    Resume,
    /// Start over: what an earlier run wrote is removed (other files stay).
    Over,
}

/// The folder of one training run.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

fn run_err(path: &Path, problem: impl Into<String>) -> Error {
    Error::Run {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl RunDir {
    /// Where a run goes: `out` when given; else `runs/NAME`, or with `numbered`, the first of
    /// `runs/NAME`, `runs/NAME-2`, ... that holds no run yet (a new folder per run), or when
    /// resuming, the newest that does.
    pub fn locate(
        out: Option<&Path>,
        runs: &Path,
        name: &str,
        numbered: bool,
        start: Start,
    ) -> PathBuf {
        if let Some(out) = out {
            return out.to_path_buf();
        }
        let taken = |p: &Path| p.join("metrics.jsonl").exists();
        let nth = |n: usize| {
            if n == 1 {
                runs.join(name)
            } else {
                runs.join(format!("{name}-{n}"))
            }
        };
        if !numbered {
            return nth(1);
        }
        let mut n = 1;
        if start == Start::Resume {
            // The newest run.
            while taken(&nth(n + 1)) {
                n += 1;
            }
        } else {
            while taken(&nth(n)) {
                n += 1;
            }
        }
        nth(n)
    }

    /// Check that a run may `start` in `dir` (and for `Start::Over`, remove the old run's
    /// files); the folder is created.
    pub fn open(dir: &Path, start: Start) -> Result<RunDir> {
        let run = RunDir {
            dir: dir.to_path_buf(),
        };
        match start {
            Start::Resume => {
                if !crate::checkpoint::any(&run.checkpoints()) {
                    return Err(run_err(&run.checkpoint(), "no checkpoint to resume from"));
                }
            }
            Start::Over => {
                for name in RUN_FILES {
                    let p = dir.join(name);
                    let removed = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else if p.exists() {
                        std::fs::remove_file(&p)
                    } else {
                        Ok(())
                    };
                    removed.map_err(io(&p))?;
                }
            }
            Start::New => {
                if run.metrics_path().exists() {
                    return Err(run_err(
                        dir,
                        "already holds a run (metrics.jsonl); choose another --out, --resume it, or --force to start over",
                    ));
                }
                let busy = std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_some());
                if busy || dir.is_file() {
                    return Err(run_err(
                        dir,
                        "holds other files; choose another --out, or --force to write the run into it",
                    ));
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(run)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the newest checkpoint is written.
    pub fn checkpoint(&self) -> PathBuf {
        self.checkpoints().join("last")
    }

    /// The folder of `last` and the step-N snapshots.
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// The checkpoint to resume from: the newest that is complete and intact (`last` or a
    /// snapshot, see `checkpoint::newest_good`), and the newer ones passed over, for the
    /// caller to warn about. None complete is an error naming each problem.
    pub fn resume_checkpoint(
        &self,
    ) -> Result<(crate::checkpoint::Good, Vec<crate::checkpoint::Skipped>)> {
        match crate::checkpoint::newest_good(&self.checkpoints(), None) {
            (Some(good), skipped) => Ok((good, skipped)),
            (None, skipped) => Err(run_err(
                &self.checkpoints(),
                if skipped.is_empty() {
                    "no checkpoint to resume from".to_string()
                } else {
                    let why: Vec<String> = skipped
                        .iter()
                        .map(|s| format!("{}: {}", name_in(&self.dir, &s.dir), s.problem))
                        .collect();
                    format!("no complete checkpoint to resume from ({})", why.join("; "))
                },
            )),
        }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    /// Append a line to events.jsonl (loss spikes and what was done), synced: a log of what
    /// happened, never cut back, so it keeps the events of a start that later died.
    pub fn append_event(&self, event: &Value) -> Result<()> {
        use std::io::Write;
        let path = self.events_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        writeln!(f, "{event}").map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }

    /// The (loss, gradient norm) of each training step in metrics.jsonl, in order; a loss
    /// that was not finite (written as null) is NaN.
    pub fn losses_and_grad_norms(&self) -> Vec<(f64, f64)> {
        let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        self.metric_lines()
            .iter()
            .filter(|v| v.get("loss").is_some())
            .map(|v| (num(&v["loss"]), num(&v["grad_norm"])))
            .collect()
    }

    /// A resumed run continues only with exactly the settings it started with: each key of
    /// `settings` must equal the manifest's, or the error names it.
    pub fn check_resume(&self, settings: &Value) -> Result<()> {
        let path = self.manifest_path();
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let old: Value =
            serde_json::from_str(&text).map_err(|e| run_err(&path, format!("not JSON: {e}")))?;
        if let Some(map) = settings.as_object() {
            for (k, v) in map {
                let was = old["settings"].get(k).unwrap_or(&Value::Null);
                if was != v {
                    return Err(run_err(
                        &path,
                        format!(
                            "--resume: `{k}` was {was}, now {v}; resume with the same settings"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn write_manifest(&self, manifest: &Value) -> Result<()> {
        let path = self.manifest_path();
        let text = serde_json::to_string_pretty(manifest).unwrap_or_default() + "\n";
        lever_model::fsutil::write_atomic(&path, |tmp| std::fs::write(tmp, text).map_err(io(&path)))
    }

    /// metrics.jsonl, opened for appending.
    pub fn metrics(&self) -> Result<std::fs::File> {
        let path = self.metrics_path();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))
    }

    fn metric_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.metrics_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Keep the metrics of steps up to `step` (what the checkpoint holds); a resumed run
    /// computes the later lines again.
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let path = self.metrics_path();
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        lever_model::fsutil::write_atomic(&path, |tmp| std::fs::write(tmp, body).map_err(io(&path)))
    }

    /// The lowest validation loss after step 0 up to `step`, and its step.
    pub fn best_val_loss(&self, step: usize) -> Option<(usize, f64)> {
        self.metric_lines()
            .iter()
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v.get("val_loss")?.as_f64()?)))
            .filter(|(s, _)| *s > 0 && *s <= step)
            .fold(None, |best: Option<(usize, f64)>, (s, v)| match best {
                Some((_, b)) if b <= v => best,
                _ => Some((s, v)),
            })
    }

    /// The validation loss recorded at `step`.
    pub fn val_loss_at(&self, step: usize) -> Option<f64> {
        self.metric_lines()
            .iter()
            .find(|v| v["step"].as_u64() == Some(step as u64) && v.get("val_loss").is_some())
            .and_then(|v| v["val_loss"].as_f64())
    }

    /// loss.png from metrics.jsonl: training loss per step and validation loss, and the loss
    /// spikes of events.jsonl as dots.
    pub fn plot(&self) -> Result<()> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for v in self.metric_lines() {
            let Some(step) = v["step"].as_f64() else {
                continue;
            };
            if let Some(l) = v.get("loss").and_then(Value::as_f64) {
                train.push((step, l));
            }
            if let Some(l) = v.get("val_loss").and_then(Value::as_f64) {
                val.push((step, l));
            }
        }
        let spikes: Vec<(f64, f64)> = std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?)))
            .collect();
        crate::plot::write_loss_curve(&self.dir.join("loss.png"), &train, &val, &spikes)
    }
}

/// `path` relative to the run folder when it is inside it (`checkpoints/last`), for messages.
pub fn name_in(run: &Path, path: &Path) -> String {
    path.strip_prefix(run).unwrap_or(path).display().to_string()
}

/// The best validation loss so far, for keeping the best weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct Best(pub Option<(usize, f64)>);

impl Best {
    /// Whether `val` at `step` is the new best (step 0, the untrained model, never is); if so
    /// it is recorded.
    pub fn improves(&mut self, step: usize, val: f64) -> bool {
        if step == 0 || self.0.is_some_and(|(_, b)| b <= val) {
            return false;
        }
        self.0 = Some((step, val));
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_started_resumed_or_started_over_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("r");
        let run = RunDir::open(&dir, Start::New).unwrap();
        std::fs::write(run.metrics_path(), "{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"val_loss\": 1.5}\n{\"step\": 4, \"val_loss\": 1.2}\n{\"step\": 6, \"val_loss\": 1.3}\n").unwrap();
        let e = RunDir::open(&dir, Start::New).unwrap_err().to_string();
        assert!(
            e.contains("already holds a run") && e.contains("--force"),
            "{e}"
        );
        let e = RunDir::open(&dir, Start::Resume).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
        assert_eq!(run.best_val_loss(6), Some((4, 1.2)));
        assert_eq!(run.best_val_loss(3), Some((2, 1.5)));
        assert_eq!(run.val_loss_at(6), Some(1.3));
        run.truncate_metrics(2).unwrap();
        assert_eq!(run.best_val_loss(6), Some((2, 1.5)));
        // Starting over removes the run's files, not the user's.
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        RunDir::open(&dir, Start::Over).unwrap();
        assert!(!run.metrics_path().exists());
        assert!(dir.join("notes.txt").exists());
        let e = RunDir::open(&dir, Start::New).unwrap_err().to_string();
        assert!(e.contains("holds other files"), "{e}");
    }

    #[test]
    fn resume_refuses_other_settings_by_name() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::open(&d.path().join("r"), Start::New).unwrap();
        run.write_manifest(&serde_json::json!({"settings": {"lr": 0.001, "seq_len": 64}}))
            .unwrap();
        run.check_resume(&serde_json::json!({"lr": 0.001, "seq_len": 64}))
            .unwrap();
        let e = run
            .check_resume(&serde_json::json!({"lr": 0.01, "seq_len": 64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`lr` was 0.001, now 0.01"), "{e}");
    }

    #[test]
    fn numbered_folders_give_each_run_its_own_and_resume_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let runs = d.path();
        let at = |start| RunDir::locate(None, runs, "gsm", true, start);
        assert_eq!(at(Start::New), runs.join("gsm"));
        for n in ["gsm", "gsm-2"] {
            std::fs::create_dir_all(runs.join(n)).unwrap();
            std::fs::write(runs.join(n).join("metrics.jsonl"), "").unwrap();
        }
        assert_eq!(at(Start::New), runs.join("gsm-3"));
        assert_eq!(at(Start::Resume), runs.join("gsm-2"));
        assert_eq!(
            RunDir::locate(None, runs, "gsm", false, Start::New),
            runs.join("gsm")
        );
    }

    #[test]
    fn the_best_is_the_lowest_after_step_zero() {
        let mut b = Best::default();
        assert!(!b.improves(0, 0.5));
        assert!(b.improves(10, 2.0));
        assert!(!b.improves(20, 2.0));
        assert!(b.improves(30, 1.0));
        assert_eq!(b.0, Some((30, 1.0)));
    }
}
