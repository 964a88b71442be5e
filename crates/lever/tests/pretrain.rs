//! `lever pretrain` as a user runs it: a character tokenizer and shards of tinyshakespeare
//! (../shared/data) made with `lever tokenizer train` and `lever data shard`, a tiny recipe,
//! a few dozen steps. Fixtures: scripts/make-pretrain-fixtures.sh (transformers' logits of
//! the model these commands train; llama.cpp's perplexity of its GGUF).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{
    children_of, fixture, jsonl, lever_in, metrics, pretrain_shards as shards, step_losses,
};
use serde_json::{Value, json};

/// The tiny recipe (shared with scripts/make-pretrain-fixtures.sh).
const TINY: &str = include_str!("fixtures/pretrain/tiny.toml");

/// A short run: every step logged (loss, tokens/s, MFU), validation at 0, 10, 20 and 30 and
/// falling, a sample printed at each, the sizes and the measured peak in the manifest, and
/// RUN/model a Hugging Face folder lever loads with the trained tokenizer byte for byte.
#[test]
fn pretraining_logs_steps_lowers_validation_loss_and_writes_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 200_000, "char");
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let out = lever_in(
        d,
        &[
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--out",
            "run",
        ],
    )
    .ok();
    let run = d.join("run");
    let lines = metrics(&run);
    let steps = step_losses(&run);
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    for l in lines.iter().filter(|l| l.get("loss").is_some()) {
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["mfu"].as_f64().unwrap() > 0.0, "{l}");
        assert_eq!(l["tokens"], 8 * 32);
    }
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    // The characters of these 200 KB and the end-of-text token.
    let vocab = m["settings"]["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(vocab, 63);
    let val: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l.get("val_loss")?.as_f64()?)))
        .collect();
    assert_eq!(val.iter().map(|v| v.0).collect::<Vec<_>>(), [0, 10, 20, 30]);
    // Untrained: about ln 63 = 4.14; 30 steps bring it down at each evaluation (measured:
    // 4.14, 3.71, 3.49, 3.38).
    assert!((val[0].1 - (vocab as f64).ln()).abs() < 0.2, "{val:?}");
    assert!(val.windows(2).all(|w| w[1].1 < w[0].1), "{val:?}");
    assert!(val[3].1 < val[0].1 - 0.5, "{val:?}");
    assert_eq!(out.stderr.matches("sample: ").count(), 4, "{}", out.stderr);
    assert!(out.stderr.contains("FLOPs per token"), "{}", out.stderr);
    assert!(run.join("loss.png").is_file());

    // V·32 (tied embedding) + 2·(4·32² + 3·32·64 + 2·32) + 32; 6·N + 12·L·C·T.
    let params = vocab * 32 + 2 * (4096 + 6144 + 64) + 32;
    assert_eq!(m["model"]["params"], params);
    assert_eq!(m["model"]["flops_per_token"], 6 * params + 12 * 2 * 32 * 32);
    assert!(m["peak"]["flops_per_s"].as_f64().unwrap() > 1e9);
    assert_eq!(m["result"]["val_loss"].as_f64().unwrap(), val[3].1);

    let model = lever_model::Model::load_hf(&run.join("model"), &candle_core::Device::Cpu)
        .expect("RUN/model loads");
    assert_eq!(model.decoder.config().num_layers, 2);
    assert_eq!(
        std::fs::read(run.join("model/tokenizer.json")).unwrap(),
        std::fs::read(d.join("tok/tokenizer.json")).unwrap()
    );
    let ids = model.tokenizer.encode("ROMEO:", false).unwrap();
    assert_eq!(model.tokenizer.decode(&ids), "ROMEO:");
}

/// A run killed with SIGKILL mid-way and resumed gives the same per-step losses and the same
/// weights as one that was never interrupted; other settings are refused by name.
#[test]
fn a_killed_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "char");
    std::fs::write(
        d.join("tiny.toml"),
        TINY.replace("steps = 30", "steps = 12"),
    )
    .unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--save-every",
            "1",
            "--eval-every",
            "5",
            "--keep",
            "2",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full: Vec<String> = args("full");
    lever_in(d, &full.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    let want = step_losses(&d.join("full"));
    assert_eq!(want.len(), 12);
    // --keep 2: the two newest step checkpoints besides last.
    let mut kept: Vec<String> = std::fs::read_dir(d.join("full/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["last", "step-000010", "step-000011"]);

    let killed = d.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .current_dir(d)
        .args(args("killed"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let done = std::fs::read_to_string(killed.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0);
        if done >= 4 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = step_losses(&killed);
    assert!(
        partial.len() >= 4 && partial.len() < 12,
        "killed after {} steps",
        partial.len()
    );
    let mut resume = args("killed");
    resume.push("--resume".into());
    let out = lever_in(d, &resume.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    assert!(out.stderr.contains("resuming at step"), "{}", out.stderr);
    let got = step_losses(&killed);
    assert_eq!(got, want, "resumed vs uninterrupted per-step losses");
    let load = |run: &str| {
        candle_core::safetensors::load(
            d.join(run).join("model/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load("full"), load("killed"));
    for (k, t) in &a {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }

    // Other settings are refused by name, before anything is written.
    let before = std::fs::read(killed.join("metrics.jsonl")).unwrap();
    let mut other = resume.clone();
    other.extend(["--lr".into(), "1e-3".into()]);
    let e = lever_in(d, &other.iter().map(String::as_str).collect::<Vec<_>>()).failed_alone();
    assert!(e.contains("--resume: `lr` was 0.003, now 0.001"), "{e}");
    assert_eq!(std::fs::read(killed.join("metrics.jsonl")).unwrap(), before);
}

/// The tiny recipe at `steps` in d/tiny.toml, and `lever pretrain` arguments for it into
/// `out` with `extra`.
fn tiny_run(d: &Path, steps: usize, out: &str, extra: &[&str]) -> Vec<String> {
    std::fs::write(
        d.join("tiny.toml"),
        TINY.replace("steps = 30", &format!("steps = {steps}")),
    )
    .unwrap();
    let mut args: Vec<String> = [
        "pretrain",
        "--config",
        "tiny.toml",
        "--data",
        "shards",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn lever_args(d: &Path, args: &[String]) -> common::Out {
    lever_in(d, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// RUN/model's weights, by name.
fn weights(run: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(
        run.join("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
    .collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// Checkpoints carry a completion marker with the sha256 of their files. With the newest
/// ones damaged — a flipped byte in `last` (which its newest snapshot shares through hard
/// links) and a snapshot without its marker (torn) — --resume warns about each, naming it,
/// starts from the newest intact one, and still ends with the per-step losses and weights of
/// the run that was never damaged. --keep 2 --keep-every 4 kept the two newest snapshots and
/// every fourth step.
#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_one_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "char");
    let args = tiny_run(
        d,
        12,
        "run",
        &[
            "--save-every",
            "1",
            "--eval-every",
            "0",
            "--keep",
            "2",
            "--keep-every",
            "4",
        ],
    );
    lever_args(d, &args).ok();
    let run = d.join("run");
    let want = step_losses(&run);
    let want_weights = weights(&run);
    assert_eq!(want.len(), 12);
    let ck = run.join("checkpoints");
    assert_eq!(
        names_in(&ck),
        [
            "last",
            "step-000004",
            "step-000008",
            "step-000010",
            "step-000011"
        ]
    );
    assert_eq!(
        names_in(&ck.join("last")),
        ["complete.json", "state.safetensors", "trainer.json"]
    );

    let state = ck.join("last/state.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&state, bytes).unwrap(); // in place: step-000011 shares the file
    std::fs::remove_file(ck.join("step-000010/complete.json")).unwrap();

    let mut resume = args.clone();
    resume.push("--resume".into());
    let out = lever_args(d, &resume).ok();
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipping checkpoint"))
        .collect();
    assert_eq!(warnings.len(), 3, "{}", out.stderr);
    assert!(
        warnings[0].contains("checkpoints/last: state.safetensors has sha256")
            && warnings[0].contains("(corrupt); resuming from checkpoints/step-000008 (step 8)"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].contains("step-000011: state.safetensors"),
        "{}",
        warnings[1]
    );
    assert!(
        warnings[2].contains("step-000010: no complete.json: never completed (torn)"),
        "{}",
        warnings[2]
    );
    assert!(
        out.stderr
            .contains("resuming at step 8 (checkpoints/step-000008)"),
        "{}",
        out.stderr
    );
    assert_eq!(
        step_losses(&run),
        want,
        "resumed vs undamaged per-step losses"
    );
    assert_eq!(weights(&run), want_weights);

    // Nothing intact at all: refused, naming each problem.
    for name in names_in(&ck) {
        std::fs::remove_file(ck.join(name).join("complete.json")).ok();
    }
    let e = lever_args(d, &resume).failed_alone();
    assert!(
        e.contains("no complete checkpoint to resume from (checkpoints/last: no complete.json"),
        "{e}"
    );
}

/// Chaos: a supervised run whose training process is killed with SIGKILL at three random
/// steps (the test finds the child's pid and kills it) restarts each time from its newest
/// checkpoint and ends with exactly the per-step losses and weights of an uninterrupted run;
/// RUN/restarts.jsonl has a line per kill (cause, step reached, step resumed from, steps and
/// seconds lost).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
#[test]
fn a_supervised_run_survives_sigkills_and_ends_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "char");
    let steps = 30;
    let common = ["--save-every", "1", "--eval-every", "10"];
    lever_args(d, &tiny_run(d, steps, "full", &common)).ok();
    let want = step_losses(&d.join("full"));
    assert_eq!(want.len(), steps);

    // Three distinct kill steps in 3..=26, at least 4 apart, from a seed printed on failure.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = lever_model::rng::SplitMix64(seed);
    let targets = loop {
        let mut t: Vec<usize> = (0..3).map(|_| 3 + rng.below(24)).collect();
        t.sort();
        if t.windows(2).all(|w| w[1] >= w[0] + 4) {
            break t;
        }
    };
    let mut args = tiny_run(d, steps, "chaos", &common);
    args.extend(["--supervise", "--max-restarts", "5", "--restart-delay", "0"].map(String::from));
    let log = std::fs::File::create(d.join("supervisor.log")).unwrap();
    let mut sup = Command::new(env!("CARGO_BIN_EXE_lever"))
        .current_dir(d)
        .args(&args)
        .stderr(log)
        .spawn()
        .unwrap();
    let run = d.join("chaos");
    let done = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut killed: Vec<(u32, usize)> = Vec::new();
    for &t in &targets {
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: waiting for step {t}"
            );
            let kids = children_of(sup.id());
            let fresh = kids.iter().find(|k| !killed.iter().any(|(p, _)| p == *k));
            if let (Some(&pid), true) = (fresh, done() >= t) {
                // SIGKILL, as the OOM killer or a lost node would.
                // SAFETY: kill(2) on a child of our own child; no memory is involved.
                let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                assert_eq!(r, 0);
                killed.push((pid, done()));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let status = sup.wait().unwrap();
    let log = std::fs::read_to_string(d.join("supervisor.log")).unwrap();
    assert!(status.success(), "seed {seed}, kills {killed:?}:\n{log}");
    let restarts: Vec<Value> = std::fs::read_to_string(run.join("restarts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(restarts.len(), 3, "seed {seed}: {restarts:?}\n{log}");
    for (r, (pid, _)) in restarts.iter().zip(&killed) {
        assert_eq!(r["pid"], *pid);
        assert_eq!(r["signal"], 9, "{r}");
        assert!(r["cause"].as_str().unwrap().contains("SIGKILL"), "{r}");
        // --save-every 1: at most the step in flight is lost.
        assert!(r["steps_lost"].as_u64().unwrap() <= 1, "{r}");
        assert!(r["seconds_lost"].as_f64().unwrap() >= 0.0, "{r}");
    }
    eprintln!(
        "seed {seed}: killed at steps {:?}; restarts: {}",
        killed.iter().map(|k| k.1).collect::<Vec<_>>(),
        restarts
            .iter()
            .map(|r| format!(
                "step {} → resumed from {} ({} lost, {:.2} s)",
                r["step"],
                r["resume_step"],
                r["steps_lost"],
                r["seconds_lost"].as_f64().unwrap()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert_eq!(step_losses(&run), want, "seed {seed}: per-step losses");
    assert_eq!(weights(&run), weights(&d.join("full")), "seed {seed}");
}

/// --supervise on a command that fails before its first step: three starts, then one line
/// with the cause; with --max-restarts 1, one restart. Bad usage is not restarted at all.
#[test]
fn a_supervised_command_that_fails_at_once_stops_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 20_000, "char");
    let mut args = tiny_run(d, 5, "run", &["--supervise", "--restart-delay", "0"]);
    args[4] = "missing".into(); // --data
    let out = lever_args(d, &args);
    let e = out.failed();
    assert!(
        e.starts_with("error: --supervise: 3 starts in a row failed before their first step, not restarted again: the training exited with code 1 (error: missing"),
        "{e}"
    );
    assert_eq!(
        out.stderr.matches("supervise: the training (pid").count(),
        2,
        "{}",
        out.stderr
    );
    args.extend(["--max-restarts", "1"].map(String::from));
    let e = lever_args(d, &args).failed();
    assert!(
        e.starts_with("error: --supervise: gave up after 1 restart (--max-restarts 1): the training exited with code 1 (error: missing"),
        "{e}"
    );
    // Refused by the argument parser before anything starts.
    let out = lever_in(
        d,
        &[
            "pretrain",
            "--data",
            "shards",
            "--out",
            "r",
            "--max-restarts",
            "2",
        ],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--supervise"), "{}", out.stderr);
}

/// A poisoned batch (`--debug-poison-step 20`: one target everywhere, 300× the learning rate)
/// is a loss spike. `--on-spike rollback` goes back to the checkpoint before it, skips that batch,
/// and ends with exactly the per-step losses and weights of a run that never drew the batch
/// (`--debug-drop-batch 20`); `skip` does not apply the update and ends near that run;
/// `log` applies it and ends worse. Each spike is a line of RUN/events.jsonl. A rollback to
/// an older checkpoint skips every batch since it and `--rollback-skip` more, and lowers the
/// learning rate by `--rollback-lr-factor`.
#[test]
fn a_loss_spike_is_rolled_back_to_where_a_run_that_never_saw_its_batch_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "char");
    let run = |out: &str, extra: &[&str]| {
        let mut e = vec!["--eval-every", "0", "--spike-window", "8"];
        if !extra.contains(&"--save-every") {
            e.extend(["--save-every", "1"]);
        }
        e.extend(extra);
        lever_args(d, &tiny_run(d, 24, out, &e)).ok()
    };
    let val = |out: &str| {
        jsonl(&d.join(out).join("metrics.jsonl"))
            .iter()
            .find(|v| v["step"] == 24 && v.get("val_loss").is_some())
            .unwrap()["val_loss"]
            .as_f64()
            .unwrap()
    };
    run("never", &["--debug-drop-batch", "20"]);
    assert!(jsonl(&d.join("never/events.jsonl")).is_empty());

    let out = run(
        "rollback",
        &["--debug-poison-step", "20", "--on-spike", "rollback"],
    );
    assert!(
        out.stderr.contains("spike at step 20: loss ")
            && out
                .stderr
                .contains("rolled back to step 19 (checkpoints/last), 1 batch skipped"),
        "{}",
        out.stderr
    );
    let events = jsonl(&d.join("rollback/events.jsonl"));
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (
            &e["step"],
            &e["batch"],
            &e["action"],
            &e["to_step"],
            &e["skipped_batches"]
        ),
        (
            &json!(20),
            &json!(20),
            &json!("rollback"),
            &json!(19),
            &json!(1)
        )
    );
    assert!(e["loss_z"].as_f64().unwrap() > 6.0, "{e}");
    let rolled = d.join("rollback");
    assert_eq!(step_losses(&rolled), step_losses(&d.join("never")));
    assert_eq!(weights(&rolled), weights(&d.join("never")));
    assert!(rolled.join("loss.png").is_file());

    run("skip", &["--debug-poison-step", "20", "--on-spike", "skip"]);
    let lines = jsonl(&d.join("skip/metrics.jsonl"));
    let at20 = lines.iter().find(|v| v["step"] == 20).unwrap();
    assert_eq!(
        (&at20["spike"], &at20["skipped"]),
        (&json!(true), &json!(true)),
        "{at20}"
    );
    assert_eq!(jsonl(&d.join("skip/events.jsonl"))[0]["action"], "skip");

    run("log", &["--debug-poison-step", "20"]);
    assert_eq!(jsonl(&d.join("log/events.jsonl"))[0]["action"], "log");
    let (never, skip, log) = (val("never"), val("skip"), val("log"));
    eprintln!(
        "validation loss at step 24: never saw the batch {never:.4}, skipped its update {skip:.4}, applied it {log:.4}"
    );
    assert!((skip - never).abs() < 0.05, "{skip} vs {never}");
    assert!(log > never + 0.1, "{log} vs {never}");

    // Checkpoints every 4 steps: back to step 16, batches 17-20 and 2 more skipped, half the
    // learning rate from then on.
    let out = run(
        "older",
        &[
            "--debug-poison-step",
            "20",
            "--on-spike",
            "rollback",
            "--save-every",
            "4",
            "--rollback-skip",
            "2",
            "--rollback-lr-factor",
            "0.5",
        ],
    );
    assert!(
        out.stderr.contains(
            "rolled back to step 16 (checkpoints/last), 6 batches skipped, learning rate ×0.5"
        ),
        "{}",
        out.stderr
    );
    let e = &jsonl(&d.join("older/events.jsonl"))[0];
    assert_eq!(
        (&e["to_step"], &e["skipped_batches"], &e["lr_scale"]),
        (&json!(16), &json!(6), &json!(0.5))
    );
    let lr = |out: &str, step: u64| {
        jsonl(&d.join(out).join("metrics.jsonl"))
            .iter()
            .find(|v| v["step"] == step && v.get("lr").is_some())
            .unwrap()["lr"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(lr("older", 16), lr("never", 16));
    assert!((lr("older", 17) - 0.5 * lr("never", 17)).abs() < 1e-12);
    assert_eq!(step_losses(&d.join("older")).len(), 24);

    // The debugging flags are not in --help.
    let help = lever_in(d, &["pretrain", "--help"]).ok().stdout;
    assert!(
        help.contains("--on-spike") && !help.contains("debug"),
        "{help}"
    );
}

/// Bad input is one line, exit 1 or 2, and leaves no run folder behind.
#[test]
fn bad_input_is_refused_in_one_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 20_000, "char");
    let refuse = |config: &str, data: &str, out: &str, extra: &[&str], want: &str| {
        std::fs::write(d.join("c.toml"), config).unwrap();
        let mut args = vec![
            "pretrain", "--config", "c.toml", "--data", data, "--out", out,
        ];
        args.extend(extra);
        let e = lever_in(d, &args).failed_alone();
        assert!(e.contains(want), "{args:?}: {e}");
        e
    };
    // Heads that do not divide the width.
    refuse(
        &TINY.replace("heads = 2", "heads = 3"),
        "shards",
        "r1",
        &[],
        "3 heads do not divide the width 32",
    );
    // A context longer than the validation split (10% of 20 KB).
    refuse(
        &TINY.replace("context = 32", "context = 4096"),
        "shards",
        "r2",
        &[],
        "fewer than one window of the context (4096) plus one",
    );
    // Empty shards: an llm.c shard of zero tokens.
    std::fs::create_dir(d.join("empty")).unwrap();
    let mut header = vec![0u8; 1024];
    header[..4].copy_from_slice(&20240520i32.to_le_bytes());
    header[4..8].copy_from_slice(&1i32.to_le_bytes());
    std::fs::write(d.join("empty/data_train_000000.bin"), &header).unwrap();
    std::fs::write(d.join("empty/data_val_000000.bin"), &header).unwrap();
    refuse(
        TINY,
        "empty",
        "r3",
        &["--tokenizer", "tok/tokenizer.json"],
        "no training tokens (empty shards)",
    );
    // --gguf with a character vocabulary, refused before training.
    refuse(TINY, "shards", "r4", &["--gguf"], "--gguf: ");
    // A tokenizer without the end-of-text token, for nanoGPT's headerless files.
    let mut tk: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tok/tokenizer.json")).unwrap())
            .unwrap();
    tk["added_tokens"] = serde_json::json!([]);
    tk["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .remove("<|endoftext|>");
    std::fs::write(d.join("noeot.json"), tk.to_string()).unwrap();
    std::fs::create_dir(d.join("nanogpt")).unwrap();
    let u16s = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| ((i % 50) as u16).to_le_bytes())
            .collect()
    };
    std::fs::write(d.join("nanogpt/train.bin"), u16s(5000)).unwrap();
    std::fs::write(d.join("nanogpt/val.bin"), u16s(1000)).unwrap();
    refuse(
        TINY,
        "nanogpt",
        "r5",
        &["--tokenizer", "noeot.json"],
        "no end-of-text token `<|endoftext|>`",
    );
    for r in ["r1", "r2", "r3", "r4", "r5"] {
        assert!(!d.join(r).exists(), "{r} was written");
    }
    // An unwritable run folder: under a file.
    std::fs::write(d.join("file"), "x").unwrap();
    refuse(TINY, "shards", "file/run", &[], "file/run");
}

/// RUN/model in transformers: the logits of the model these commands train, computed by
/// transformers (fixture), equal lever's within 1e-4, and transformers' tokenizer gave the
/// ids lever gives.
#[test]
fn the_model_folder_gives_transformers_logits() {
    let fx = fixture("pretrain/transformers.json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "char");
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    lever_in(
        d,
        &[
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--out",
            "run",
        ],
    )
    .ok();
    let model = lever_model::Model::load_hf(&d.join("run/model"), &candle_core::Device::Cpu)
        .expect("RUN/model loads");
    let text = fx["text"].as_str().unwrap();
    let ids = model.tokenizer.encode(text, false).unwrap();
    assert_eq!(ids, common::ids(&fx["ids"]), "transformers' tokenizer ids");
    let x = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .decoder
        .forward(&x, &mut model.decoder.new_cache(), lever_model::Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want: Vec<Vec<f64>> = serde_json::from_value(fx["logits"].clone()).unwrap();
    let mut max = 0f64;
    for (a, b) in logits.iter().zip(&want) {
        for (x, y) in a.iter().zip(b) {
            max = max.max((*x as f64 - y).abs());
        }
    }
    eprintln!("max |lever − transformers| logit = {max:.2e}");
    assert_eq!(logits.len(), want.len());
    assert!(max < 1e-4, "{max}");
}

/// `--gguf` with a byte-level BPE tokenizer: llama.cpp loads RUN/model.gguf (fixture: its
/// llama-perplexity on the held-out tenth of the text), and lever's perplexity of the same
/// file, computed as llama-perplexity does, is within 1% of it.
#[test]
fn the_gguf_scores_as_in_llama_cpp() {
    let fx = fixture("pretrain/llama-cpp.json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 100_000, "bpe");
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    lever_in(
        d,
        &[
            "pretrain",
            "--config",
            "tiny.toml",
            "--data",
            "shards",
            "--out",
            "run",
            "--gguf",
        ],
    )
    .ok();
    let model = lever_model::Model::load_gguf(&d.join("run/model.gguf"), &candle_core::Device::Cpu)
        .expect("RUN/model.gguf loads");
    let corpus = std::fs::read_to_string(d.join("corpus.txt")).unwrap();
    let heldout = &corpus[corpus.len() - 10_000..];
    let tokens = model.tokenizer.encode(heldout, true).unwrap();
    let ctx = fx["ctx"].as_u64().unwrap() as usize;
    let got = lever_generate::perplexity(&model, &tokens, ctx, None, &mut |_, _| {})
        .unwrap()
        .ppl;
    let want = fx["ppl"].as_f64().unwrap();
    eprintln!("perplexity of RUN/model.gguf: lever {got:.4}, llama.cpp {want:.4}");
    assert!(
        (got - want).abs() / want < 0.01,
        "lever {got} vs llama.cpp {want}"
    );
}

/// Continued pretraining: shards made with the default model's own tokenizer (`--tokenizer`
/// naming the model), `--init` starts from the model's weights (its validation loss before
/// the first step is a trained model's, far below a random one's ln(49152) ≈ 10.8), a few
/// steps on Shakespeare lower it, and RUN/model is the model trained further with its own
/// tokenizer. Shards made with another tokenizer are refused, naming the model.
#[test]
fn continued_pretraining_starts_from_the_model_and_refuses_other_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    shards(d, 20_000, "char");
    let model = lever_model::registry::DEFAULT_GENERATOR;
    lever_in(
        d,
        &[
            "data",
            "shard",
            "corpus.txt",
            "--tokenizer",
            model,
            "--val-fraction",
            "0.1",
            "--out",
            "own",
        ],
    )
    .ok();
    let run = d.join("run");
    lever_in(
        d,
        &[
            "pretrain",
            "--init",
            model,
            "--data",
            "own",
            "--out",
            "run",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--context",
            "64",
            "--lr",
            "3e-4",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ],
    )
    .ok();
    let m = metrics(&run);
    let val = |step: u64| {
        m.iter()
            .find(|v| v["step"] == step && v.get("val_loss").is_some())
            .unwrap()["val_loss"]
            .as_f64()
            .unwrap()
    };
    let (before, after) = (val(0), val(3));
    assert!(before < 5.0, "validation loss before training {before}");
    assert!(after < before - 0.05, "{before} → {after}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["settings"]["init"], model);
    assert_eq!(manifest["settings"]["model.layers"], 30);
    assert_eq!(manifest["settings"]["model.context"], 64);
    // The model folder: the model's tokenizer (SmolLM2's 49,152 tokens), its chat template.
    let trained = lever_model::Model::load(
        &lever_model::ModelSource::HfFolder(run.join("model")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(trained.tokenizer.vocab_size(), 49152);
    assert!(trained.chat_template.is_some());

    // Shards made with the character tokenizer: refused before anything is written.
    let e = lever_in(
        d,
        &[
            "pretrain", "--init", model, "--data", "shards", "--out", "r2",
        ],
    )
    .failed_alone();
    assert!(e.contains(&format!("not with {model}'s")), "{e}");
    assert!(!d.join("r2").exists());
}
