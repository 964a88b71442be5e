//! `lever finetune` as a user runs it, on the real default model and GSM8K from ../shared/data.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::step_losses;
use serde_json::Value;

fn lever(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn gsm8k_head(dir: &std::path::Path, n: usize) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/instructions/gsm8k_train_first5000.jsonl");
    let text = std::fs::read_to_string(src).unwrap();
    let head: Vec<&str> = text.lines().take(n).collect();
    let path = dir.join("gsm8k.jsonl");
    std::fs::write(&path, head.join("\n") + "\n").unwrap();
    path
}

const FIELDS: [&str; 4] = [
    "--field",
    "instruction=question",
    "--field",
    "output=answer",
];

/// A short LoRA run: every step logged with a finite loss, validation loss lower after
/// training, and a PEFT-layout adapter with Hugging Face key names and shapes.
#[test]
fn lora_run_logs_steps_lowers_validation_loss_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = gsm8k_head(dir.path(), 80);
    let out = dir.path().join("run");
    let mut args = vec!["finetune", "--data", data.to_str().unwrap()];
    args.extend(FIELDS);
    args.extend([
        "--lora",
        "--lora-r",
        "4",
        "--steps",
        "4",
        "--batch-size",
        "2",
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
        "--lora-dropout",
        "0.05",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (code, _, stderr) = lever(&args);
    assert_eq!(code, 0, "{stderr}");
    // The loss curve, and the best weights by validation loss (evaluated at steps 2 and 4).
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(out.join("best/adapter_model.safetensors").is_file());
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i + 1);
        let loss = s["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0 && loss < 10.0, "{loss}");
        assert!(s["trained_tokens"].as_u64().unwrap() > 0);
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let before = manifest["result"]["val_loss_before"].as_f64().unwrap();
    let after = manifest["result"]["val_loss_after"].as_f64().unwrap();
    assert!(after < before, "validation loss {before} -> {after}");
    let best = manifest["result"]["best_val_loss"].as_f64().unwrap();
    assert!(best <= after, "best {best} vs last {after}");
    assert!([2, 4].contains(&manifest["result"]["best_step"].as_u64().unwrap()));

    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_dropout"], 0.05);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let st = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(st.len(), 30 * 7 * 2);
    let q_a = &st["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let k_b = &st["base_model.model.model.layers.29.self_attn.k_proj.lora_B.weight"];
    let down_a = &st["base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"];
    assert_eq!(q_a.dims(), &[4, 576]);
    assert_eq!(k_b.dims(), &[192, 4]);
    assert_eq!(down_a.dims(), &[4, 1536]);
    // Trained: B moved away from its zero start.
    let moved = k_b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.0);

    // Eval's cache tells the adapter from its base: answers cached for the base are not
    // given for the base with the adapter, whose own are cached in turn.
    let d = dir.path();
    std::fs::write(
        d.join("qa.jsonl"),
        "{\"q\": \"What is 2 + 3?\", \"a\": \"5\"}\n{\"q\": \"What is 4 + 4?\", \"a\": \"8\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("t.toml"),
        "[data]\ntest = \"qa.jsonl\"\n[prompt]\ntemplate = \"{{ q }}\"\ntarget = \"{{ a }}\"\n[metric]\nname = \"contains\"\n[generation]\nmax_tokens = 4\n",
    )
    .unwrap();
    let adapter_dir = out.join("adapter");
    let cached = |name: &str, adapter: bool| -> u64 {
        let (t, c, o) = (d.join("t.toml"), d.join("cache"), d.join(name));
        let mut a = vec![
            "eval",
            t.to_str().unwrap(),
            "--cache",
            c.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
            "--json",
        ];
        if adapter {
            a.extend(["--adapter", adapter_dir.to_str().unwrap()]);
        }
        let (code, stdout, stderr) = lever(&a);
        assert_eq!(code, 0, "{stderr}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        v["settings"][0]["cached"].as_u64().unwrap()
    };
    assert_eq!(cached("e1", false), 0);
    assert_eq!(cached("e2", false), 2);
    assert_eq!(
        cached("e3", true),
        0,
        "the base's answers were given for the adapter"
    );
    assert_eq!(cached("e4", true), 2);

    // The run folder is not reused by accident.
    let (code, _, stderr) = lever(&args);
    assert_eq!(code, 1);
    assert!(stderr.contains("already holds a run"), "{stderr}");
}

#[test]
fn show_mask_marks_the_answer_and_bad_data_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = gsm8k_head(dir.path(), 3);
    let mut args = vec![
        "finetune",
        "--data",
        data.to_str().unwrap(),
        "--show-mask",
        "1",
    ];
    args.extend(FIELDS);
    let (code, stdout, stderr) = lever(&args);
    assert_eq!(code, 0, "{stderr}");
    let trained: Vec<&str> = stdout.lines().filter(|l| l.contains(" + ")).collect();
    assert!(trained.len() > 10, "{stdout}");
    assert!(trained.last().unwrap().contains("\"\\n\""), "{stdout}");
    assert!(stdout.contains("\"<|im_end|>\""));
    assert!(
        stdout.lines().last().unwrap().starts_with("line 2: "),
        "{stdout}"
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"answer\": \"a\"}\n{\"question\": \"q\"\n",
    )
    .unwrap();
    let mut args = vec![
        "finetune",
        "--data",
        bad.to_str().unwrap(),
        "--show-mask",
        "0",
    ];
    args.extend(FIELDS);
    let (code, _, stderr) = lever(&args);
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.jsonl:2: not valid JSON"), "{stderr}");

    // An example longer than --seq-len with --overlong error, and a --seq-len beyond the
    // model's context: named, nothing written.
    let out = dir.path().join("never");
    let mut args = vec!["finetune", "--data", data.to_str().unwrap(), "--lora"];
    args.extend(FIELDS);
    args.extend(["--out", out.to_str().unwrap(), "--overlong", "error"]);
    let (code, _, stderr) = lever(&[args.as_slice(), &["--seq-len", "32"]].concat());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("gsm8k.jsonl: line 1: the example is") && stderr.contains("--seq-len 32"),
        "{stderr}"
    );
    let (code, _, stderr) = lever(&[args.as_slice(), &["--seq-len", "100000"]].concat());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("longer than the model's context of 8192"),
        "{stderr}"
    );
    assert!(!out.join("metrics.jsonl").exists());
}

/// Full fine-tuning: every weight trained in f32. Four examples in one batch, so every step
/// sees the same set and its loss must fall; the result is a Hugging Face folder that lever
/// loads back, and that exports to a GGUF file.
#[test]
fn full_fine_tuning_lowers_the_loss_and_writes_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = gsm8k_head(dir.path(), 4);
    let out = dir.path().join("full");
    let mut args = vec!["finetune", "--data", data.to_str().unwrap()];
    args.extend(FIELDS);
    args.extend([
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "256",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--val-fraction",
        "0",
        "--save-every",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (code, _, stderr) = lever(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("full fine-tuning: 272 tensors"), "{stderr}");
    let losses: Vec<f64> = step_losses(&out).into_iter().map(|(_, l)| l).collect();
    assert_eq!(losses.len(), 3);
    assert!(losses[2] < losses[0] - 0.05, "losses {losses:?}");

    let model = out.join("model");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_hidden_layers"], 30);
    assert_eq!(cfg["tie_word_embeddings"], true);
    let m = lever_model::Model::load_hf(&model, &candle_core::Device::Cpu).unwrap();
    let base = lever_model::Model::load(
        &lever_model::model::resolve(
            "smollm2-135m-instruct",
            &lever_model::registry::lever_home(),
            &mut |_| {},
        )
        .unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let text = "Natalia sold clips to 48 of her friends in April. <|im_end|>";
    assert_eq!(
        m.tokenizer.encode(text, true).unwrap(),
        base.tokenizer.encode(text, true).unwrap()
    );
    let gguf = dir.path().join("full.q8_0.gguf");
    let (code, _, stderr) = lever(&[
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        gguf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let q = lever_model::Model::load_gguf(&gguf, &candle_core::Device::Cpu).unwrap();
    assert_eq!(q.decoder.config().num_layers, 30);
}

/// A run killed with SIGKILL mid-way and resumed gives the same per-step losses and the same
/// adapter as a run that was never interrupted.
#[test]
fn a_killed_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = gsm8k_head(dir.path(), 40);
    let (full, killed) = (dir.path().join("full"), dir.path().join("killed"));
    let args = |out: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = ["finetune", "--data", data.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(FIELDS.iter().map(|s| s.to_string()));
        v.extend(
            [
                "--lora",
                "--lora-r",
                "2",
                "--lora-targets",
                "q,v",
                "--steps",
                "6",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--overlong",
                "truncate",
                "--lr",
                "3e-3",
                "--warmup",
                "2",
                "--val-fraction",
                "0",
                "--save-every",
                "1",
                "--seed",
                "11",
                "--out",
                out.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v
    };
    let (code, _, stderr) = lever(&args(&full).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    let want = step_losses(&full);
    assert_eq!(want.len(), 6);

    let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let done = std::fs::read_to_string(killed.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0);
        if done >= 3 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = step_losses(&killed);
    assert!(
        partial.len() >= 3 && partial.len() < 6,
        "killed after {} steps",
        partial.len()
    );

    let mut resume = args(&killed);
    resume.push("--resume".into());
    let (code, _, stderr) = lever(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resuming at step"), "{stderr}");
    let got = step_losses(&killed);
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "step {s}: resumed {a} vs uninterrupted {b}"
        );
    }
    let load = |run: &std::path::Path| {
        candle_core::safetensors::load(
            run.join("adapter/adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (load(&full), load(&killed));
    for (k, t) in &a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-6, "{k}: {d}");
    }

    // Other settings are refused by name.
    let mut other = args(&killed);
    other.extend(["--resume".to_string()]);
    let i = other.iter().position(|s| s == "3e-3").unwrap();
    other[i] = "1e-3".into();
    let (code, _, stderr) = lever(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert!(stderr.contains("--resume: `train` was"), "{stderr}");

    // Supervised (`--supervise`): the training, a child of the supervisor, killed with
    // SIGKILL at step 3 or later, is restarted from its checkpoint and ends as the
    // uninterrupted run did.
    let chaos = dir.path().join("chaos");
    let mut sup_args = args(&chaos);
    sup_args.extend(["--supervise", "--restart-delay", "0"].map(String::from));
    let mut sup = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(&sup_args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        assert!(std::time::Instant::now() < deadline, "waiting for step 3");
        let done = std::fs::read_to_string(chaos.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0);
        if let (Some(&pid), true) = (common::children_of(sup.id()).first(), done >= 3) {
            // SAFETY: kill(2) on a child of a process this test started; no memory involved.
            #[allow(unsafe_code)]
            let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert_eq!(r, 0);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(sup.wait().unwrap().success());
    let restarts = std::fs::read_to_string(chaos.join("restarts.jsonl")).unwrap();
    assert_eq!(restarts.lines().count(), 1, "{restarts}");
    assert!(restarts.contains("SIGKILL"), "{restarts}");
    let got = step_losses(&chaos);
    assert_eq!(got.len(), 6);
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "step {s}: supervised {a} vs uninterrupted {b}"
        );
    }
    // A supervised run needs a named folder to resume.
    let mut unnamed = args(&chaos);
    let i = unnamed.iter().position(|s| s == "--out").unwrap();
    unnamed.drain(i..i + 2);
    unnamed.push("--supervise".into());
    let (code, _, stderr) = lever(&unnamed.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: --supervise needs --out: the run folder each restart resumes"
    );
}
