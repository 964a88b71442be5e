//! Data parallel over MPI: `mpirun -np N lever pretrain|finetune --batch-size B` is the same
//! run as one process with batch N·B, for the tiny recipe of pretrain.rs on shakespeare shards
//! and for LoRA on the default model with GSM8K (as finetune.rs). The
//! `mpi` module needs `--features mpi` and the system MPI (`openmpi-bin libopenmpi-dev`); the
//! default build runs only the refusal of a build without the feature.
#![allow(clippy::unwrap_used)]

use crate::common;

/// A build without the feature, started as one of several ranks (the variables mpirun
/// sets), refuses to train alone into a shared run folder.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_several_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let e = common::lever_in_env(
        dir.path(),
        &[
            "pretrain",
            "--config",
            "shakespeare-char",
            "--data",
            "shards",
            "--out",
            "r",
        ],
        &[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")],
    )
    .failed_alone();
    assert!(
        e.contains("started as one of 2 ranks by an MPI launcher, but this lever was built without the `mpi` feature"),
        "{e}"
    );
    assert!(!dir.path().join("r").exists());
}

#[cfg(feature = "mpi")]
mod mpi {
    use std::collections::HashMap;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use super::common::{Out, children_of, lever_in, metrics, pretrain_shards, series};
    use candle_core::{Device, Tensor};
    use serde_json::Value;

    const TINY: &str = include_str!("fixtures/pretrain/tiny.toml");

    /// `mpirun -np N lever ARGS` in `dir` (extra mpirun options first), one thread per rank.
    fn mpirun(dir: &Path, mpi_opts: &[&str], args: &[&str]) -> Out {
        let out = Command::new("mpirun")
            .args(mpi_opts)
            .args(["-x", "RAYON_NUM_THREADS=1"])
            .arg(env!("CARGO_BIN_EXE_lever"))
            .args(args)
            .current_dir(dir)
            // Open MPI refuses root without these (CI containers run as root).
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdin(Stdio::null())
            .output()
            .expect("mpirun (install openmpi-bin libopenmpi-dev)");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn weights(file: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(file, &Device::Cpu).unwrap()
    }

    /// Losses within `tol` relative, step by step; returns the largest relative difference.
    fn same_losses(a: &[(u64, f64)], b: &[(u64, f64)], tol: f64, what: &str) -> f64 {
        assert_eq!(
            a.iter().map(|x| x.0).collect::<Vec<_>>(),
            b.iter().map(|x| x.0).collect::<Vec<_>>(),
            "{what}: steps"
        );
        let mut worst = 0f64;
        for (x, y) in a.iter().zip(b) {
            let rel = (x.1 - y.1).abs() / x.1.abs();
            assert!(
                rel <= tol,
                "{what} at step {}: {} vs {} ({rel:.2e})",
                x.0,
                x.1,
                y.1
            );
            worst = worst.max(rel);
        }
        worst
    }

    /// The runs' model folders' tensors within `tol` (see [`same_tensors`]).
    fn same_weights(a: &Path, b: &Path, tol: f32) -> f32 {
        same_tensors(
            &a.join("model/model.safetensors"),
            &b.join("model/model.safetensors"),
            tol,
        )
    }

    /// Every tensor of two safetensors files within `tol` of the other relative to its
    /// largest value; returns the largest such difference.
    fn same_tensors(a: &Path, b: &Path, tol: f32) -> f32 {
        let (a, b) = (weights(a), weights(b));
        assert_eq!(a.len(), b.len());
        let mut worst = 0f32;
        for (k, t) in &a {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            let rel = diff / scale;
            assert!(
                rel <= tol,
                "{k}: max difference {diff} of {scale} ({rel:.2e})"
            );
            worst = worst.max(rel);
        }
        worst
    }

    /// 2 ranks × batch 4 and 4 ranks × batch 2 (oversubscribed on 2 cores) give the per-step
    /// losses, validation losses and final weights of one process × batch 8 within 1e-5 (random
    /// windows; 2 ranks for sequential ones too); metrics count every rank's tokens and time the
    /// all-reduce; rank 0 alone writes; a checkpoint of 2 ranks resumes in one process with the
    /// same global batch exactly where the 2 ranks would have gone, and one process's on 2
    /// ranks.
    #[test]
    fn ranks_times_batch_is_one_process_with_the_global_batch() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pretrain_shards(d, 100_000, "char");
        for batches in ["random", "sequential"] {
            let config = format!("{batches}.toml");
            let recipe = TINY
                .replace("steps = 30", "steps = 6")
                .replace("eval_every = 10", "eval_every = 3");
            std::fs::write(
                d.join(&config),
                format!("batches = \"{batches}\"\n{recipe}"),
            )
            .unwrap();
            let args = |out: &str, batch: &str| -> Vec<String> {
                [
                    "pretrain",
                    "--config",
                    &config,
                    "--data",
                    "shards",
                    "--out",
                    out,
                    "--batch-size",
                    batch,
                    "--save-every",
                    "4",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            let one = format!("{batches}-one");
            let a1 = args(&one, "8");
            lever_in(d, &a1.iter().map(String::as_str).collect::<Vec<_>>()).ok();
            let want = series(&d.join(&one), "loss");
            let want_val = series(&d.join(&one), "val_loss");
            assert_eq!(want.len(), 6);
            assert_eq!(want_val.iter().map(|v| v.0).collect::<Vec<_>>(), [0, 3, 6]);

            // 4 ranks for random windows only (who takes which sequential window is a unit
            // test of lever-train's), to keep this test to a few seconds.
            let mut worlds = vec![(2, "4", vec![])];
            if batches == "random" {
                worlds.push((4, "2", vec!["--oversubscribe"]));
            }
            for (ranks, batch, opts) in worlds {
                let out = format!("{batches}-{ranks}");
                let np = ranks.to_string();
                let mut mpi_opts = vec!["-np", np.as_str()];
                mpi_opts.extend(opts);
                let a = args(&out, batch);
                let run = mpirun(
                    d,
                    &mpi_opts,
                    &a.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                assert_eq!(run.code, 0, "{ranks} ranks:\n{}", run.stderr);
                // Rank 0 alone prints.
                assert_eq!(run.stderr.matches("step 6: validation loss").count(), 1);
                assert!(
                    run.stderr
                        .contains(&format!("({ranks} ranks × batch {batch})")),
                    "{}",
                    run.stderr
                );
                let r = d.join(&out);
                let loss = same_losses(&want, &series(&r, "loss"), 1e-5, "loss");
                let val = same_losses(&want_val, &series(&r, "val_loss"), 1e-5, "val_loss");
                let w = same_weights(&d.join(&one), &r, 1e-5);
                eprintln!(
                    "{batches}, {ranks} ranks × {batch} vs 1 × 8: largest relative difference \
                 loss {loss:.1e}, validation loss {val:.1e}, weights {w:.1e}"
                );
                for l in metrics(&r).iter().filter(|l| l.get("loss").is_some()) {
                    assert_eq!(l["tokens"], 8 * 32, "{l}");
                    assert!(l["allreduce_s"].as_f64().unwrap() > 0.0, "{l}");
                    assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0, "{l}");
                    assert!(l["mfu"].as_f64().unwrap() > 0.0, "{l}");
                }
                let m: Value = serde_json::from_str(
                    &std::fs::read_to_string(r.join("manifest.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(m["ranks"]["world_size"], ranks);
                assert_eq!(m["settings"]["batch_size"], 8, "the global batch");
                assert!(r.join("checkpoints/last/trainer.json").is_file());
            }
            // One process has no allreduce_s.
            assert!(
                metrics(&d.join(&one))
                    .iter()
                    .all(|l| l.get("allreduce_s").is_none())
            );

            // The 2 ranks' checkpoint (step 4) resumed by one process with batch 8: steps 5
            // and 6 as the ranks computed them.
            let two = d.join(format!("{batches}-2"));
            let ranks_losses = series(&two, "loss");
            let mut a = args(&format!("{batches}-2"), "8");
            a.push("--resume".into());
            let out = lever_in(d, &a.iter().map(String::as_str).collect::<Vec<_>>()).ok();
            assert!(out.stderr.contains("resuming at step 4"), "{}", out.stderr);
            same_losses(&ranks_losses, &series(&two, "loss"), 1e-6, "resumed loss");
            // And one process's checkpoint resumed by 2 ranks (rank 0 reads it and
            // broadcasts the weights, moments, RNG and cursor).
            if batches == "random" {
                let one = d.join(&one);
                let mut a = args(one.to_str().unwrap(), "4");
                a.push("--resume".into());
                let run = mpirun(
                    d,
                    &["-np", "2"],
                    &a.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                assert_eq!(run.code, 0, "{}", run.stderr);
                assert!(run.stderr.contains("resuming at step 4"), "{}", run.stderr);
                same_losses(
                    &want,
                    &series(&one, "loss"),
                    1e-5,
                    "loss resumed by 2 ranks",
                );
            }
        }
    }

    /// LoRA fine-tuning of the default model: 2 ranks × 2 examples give the per-step losses,
    /// validation losses and adapter of one process × 4 within 1e-5 (the loss is the mean
    /// over the step's trained tokens, which differ between ranks: each rank divides by the
    /// global count and the gradients are summed); one process's checkpoint resumes on 2
    /// ranks.
    #[test]
    fn lora_ranks_times_batch_is_one_process_with_the_global_batch() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let text = std::fs::read_to_string(super::common::shared_data(
            "instructions/gsm8k_train_first5000.jsonl",
        ))
        .unwrap();
        let head: Vec<&str> = text.lines().take(40).collect();
        std::fs::write(d.join("gsm8k.jsonl"), head.join("\n") + "\n").unwrap();
        let args = |out: &str, batch: &str| -> Vec<String> {
            [
                "finetune",
                "--data",
                "gsm8k.jsonl",
                "--field",
                "instruction=question",
                "--field",
                "output=answer",
                "--lora",
                "--lora-r",
                "4",
                "--lora-dropout",
                "0",
                "--steps",
                "4",
                "--batch-size",
                batch,
                "--seq-len",
                "160",
                "--lr",
                "2e-3",
                "--warmup",
                "1",
                "--val-fraction",
                "0.1",
                "--eval-every",
                "2",
                "--save-every",
                "2",
                "--seed",
                "3",
                "--out",
                out,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let one = args("one", "4");
        lever_in(d, &one.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        let two = args("two", "2");
        let run = mpirun(
            d,
            &["-np", "2"],
            &two.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(run.stderr.matches("step 4: validation loss").count(), 1);
        let (a, b) = (d.join("one"), d.join("two"));
        let want = series(&a, "loss");
        assert_eq!(want.len(), 4);
        let loss = same_losses(&want, &series(&b, "loss"), 1e-5, "loss");
        let val = same_losses(
            &series(&a, "val_loss"),
            &series(&b, "val_loss"),
            1e-5,
            "val_loss",
        );
        let w = same_tensors(
            &a.join("adapter/adapter_model.safetensors"),
            &b.join("adapter/adapter_model.safetensors"),
            1e-5,
        );
        eprintln!(
            "LoRA, 2 ranks × 2 vs 1 × 4: largest relative difference loss {loss:.1e}, \
             validation loss {val:.1e}, adapter {w:.1e}"
        );
        let steps = |r: &Path| -> Vec<Value> {
            metrics(r)
                .into_iter()
                .filter(|l| l.get("loss").is_some())
                .collect()
        };
        for (x, y) in steps(&a).iter().zip(steps(&b)) {
            assert_eq!(x["trained_tokens"], y["trained_tokens"], "{y}");
            assert_eq!(x["tokens"], y["tokens"], "{y}");
            assert!(y["allreduce_s"].as_f64().unwrap() > 0.0, "{y}");
        }
        assert!(b.join("checkpoints/last/trainer.json").is_file());
        assert!(b.join("best/adapter_model.safetensors").is_file());

        // One process's checkpoint (step 2) resumed by 2 ranks: rank 0 reads it and
        // broadcasts the adapter, the moments and the data order.
        let mut resume = args("one", "2");
        resume.push("--resume".into());
        let run = mpirun(
            d,
            &["-np", "2"],
            &resume.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.stderr.contains("resuming at step 2"), "{}", run.stderr);
        same_losses(&want, &series(&a, "loss"), 1e-5, "loss resumed by 2 ranks");
    }

    /// The tiny recipe at `steps` steps in DIR/tiny.toml, and `lever pretrain` on it with
    /// `--batch-size batch`, a checkpoint every step, and `extra`.
    fn tiny_args(d: &Path, steps: usize, out: &str, batch: &str, extra: &[&str]) -> Vec<String> {
        std::fs::write(
            d.join("tiny.toml"),
            TINY.replace("steps = 30", &format!("steps = {steps}")),
        )
        .unwrap();
        let mut a: Vec<String> = [
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--out",
            out,
            "--batch-size",
            batch,
            "--save-every",
            "1",
            "--eval-every",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn strs(a: &[String]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }

    /// A loss spike under MPI (a poisoned global batch, `--on-spike rollback`): every rank
    /// judges the same all-reduced loss and gradient norm, rank 0 picks the checkpoint and
    /// the others receive its state, and the 2 ranks × 4 end where one process × 8 that never
    /// drew that batch ends (`--debug-drop-batch`), within 1e-5.
    #[test]
    fn a_spike_is_rolled_back_on_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pretrain_shards(d, 100_000, "char");
        let never = tiny_args(d, 20, "never", "8", &["--debug-drop-batch", "16"]);
        lever_in(d, &strs(&never)).ok();
        let spiked = tiny_args(
            d,
            20,
            "rolled",
            "4",
            &[
                "--debug-poison-step",
                "16",
                "--on-spike",
                "rollback",
                "--spike-window",
                "8",
            ],
        );
        let run = mpirun(d, &["-np", "2"], &strs(&spiked));
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(
            run.stderr
                .matches("rolled back to step 15 (checkpoints/last), 1 batch skipped")
                .count(),
            1,
            "{}",
            run.stderr
        );
        let events = std::fs::read_to_string(d.join("rolled/events.jsonl")).unwrap();
        let events: Vec<Value> = events
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["action"], "rollback");
        let (a, b) = (d.join("never"), d.join("rolled"));
        let loss = same_losses(&series(&a, "loss"), &series(&b, "loss"), 1e-5, "loss");
        let w = same_weights(&a, &b, 1e-5);
        eprintln!(
            "rollback on 2 ranks × 4 vs never drawn on 1 × 8: largest relative difference \
             loss {loss:.1e}, weights {w:.1e}"
        );
    }

    /// The processes below `pid`, at any depth.
    fn descendants(pid: u32) -> Vec<u32> {
        let mut all = Vec::new();
        let mut next = vec![pid];
        while let Some(p) = next.pop() {
            for c in children_of(p) {
                all.push(c);
                next.push(c);
            }
        }
        all
    }

    /// The MPI rank of a process (Open MPI's variable in its environment).
    fn rank_of(pid: u32) -> Option<u32> {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        env.split(|&b| b == 0)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK=")?.parse().ok())
    }

    /// Chaos under MPI: `--supervise --launcher "mpirun -np 2 ..."`, and rank 1 killed with
    /// SIGKILL in the middle of the run, as a lost node would be: mpirun ends the world, the
    /// supervisor starts it again from rank 0's newest checkpoint, and the run ends with the
    /// per-step losses and weights of an uninterrupted 2-rank run; restarts.jsonl has the
    /// restart.
    #[test]
    #[allow(unsafe_code)]
    fn a_supervised_world_survives_a_killed_rank() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pretrain_shards(d, 100_000, "char");
        let plain = tiny_args(d, 16, "plain", "4", &[]);
        let run = mpirun(d, &["-np", "2"], &strs(&plain));
        assert_eq!(run.code, 0, "{}", run.stderr);
        let mut chaos = tiny_args(d, 16, "chaos", "4", &[]);
        chaos.extend(
            [
                "--supervise",
                "--restart-delay",
                "0",
                "--max-restarts",
                "3",
                "--launcher",
                "mpirun -np 2 -x RAYON_NUM_THREADS=1",
            ]
            .map(String::from),
        );
        let log = std::fs::File::create(d.join("supervisor.log")).unwrap();
        let mut sup = Command::new(env!("CARGO_BIN_EXE_lever"))
            .args(&chaos)
            .current_dir(d)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let metrics_path = d.join("chaos/metrics.jsonl");
        let done = || {
            std::fs::read_to_string(&metrics_path)
                .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let killed_at = loop {
            assert!(std::time::Instant::now() < deadline, "waiting for step 6");
            let rank1 = descendants(sup.id())
                .into_iter()
                .find(|&p| rank_of(p) == Some(1));
            if let (Some(pid), true) = (rank1, done() >= 6) {
                // SAFETY: kill(2) on a process this test started (through the supervisor
                // and mpirun); no memory is involved.
                assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
                break done();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let status = sup.wait().unwrap();
        let log = std::fs::read_to_string(d.join("supervisor.log")).unwrap();
        assert!(status.success(), "{log}");
        let restarts: Vec<Value> = std::fs::read_to_string(d.join("chaos/restarts.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(restarts.len(), 1, "{restarts:?}\n{log}");
        let r = &restarts[0];
        assert!(r["step"].as_u64().unwrap() >= killed_at as u64, "{r}");
        assert!(r["steps_lost"].as_u64().unwrap() <= 1, "{r}");
        eprintln!("rank 1 killed at step {killed_at}; restart: {r}");
        let (a, b) = (d.join("plain"), d.join("chaos"));
        same_losses(&series(&a, "loss"), &series(&b, "loss"), 1e-6, "loss");
        same_weights(&a, &b, 1e-6);
    }

    /// Ranks started with different settings are refused by name before anything is written;
    /// so is a build without the feature under mpirun (not testable here: this file needs it).
    #[test]
    fn ranks_with_different_settings_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pretrain_shards(d, 20_000, "char");
        std::fs::write(d.join("tiny.toml"), TINY).unwrap();
        let base = [
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--out",
            "r",
        ];
        let lever = env!("CARGO_BIN_EXE_lever");
        // MPMD: rank 0 with the recipe's learning rate, rank 1 with another.
        let mut opts: Vec<&str> = vec!["-np", "1", lever];
        opts.extend(base);
        opts.extend([":", "-np", "1", "-x", "RAYON_NUM_THREADS=1", lever]);
        opts.extend(base);
        opts.extend(["--lr", "1e-3"]);
        let out = Command::new("mpirun")
            .args(&opts)
            .current_dir(d)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let want =
            "error: MPI ranks disagree on settings: rank 1 has `lr` = 0.001, rank 0 has 0.003";
        assert_eq!(stderr.matches(want).count(), 1, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!d.join("r").exists());
    }
}
