//! `lever plan` as a user runs it: the real binary, values read back from --json. Each test
//! has its own LEVER_HOME (a temp dir), so a calibration here never touches the user's; the
//! default model is read from the provisioned GGUF file by path.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tempfile::TempDir;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    /// One stderr line starting with "error:", holding every needle; exit `code`; no panic.
    #[track_caller]
    fn one_line_error(&self, code: i32, needles: &[&str]) {
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert_eq!(self.code, code, "stderr: {}", self.stderr);
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "not one line: {}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        for n in needles {
            assert!(lines[0].contains(n), "{n:?} not in {}", lines[0]);
        }
    }
}

fn plan_in(home: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_lever"))
        .arg("plan")
        .args(args)
        .env("LEVER_HOME", home)
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("LEVER_THREADS")
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn plan(args: &[&str]) -> Out {
    let home = TempDir::new().unwrap();
    plan_in(home.path(), args)
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a / b - 1.0).abs() < 1e-9
}

/// The default model's GGUF, provisioned in the user's LEVER_HOME (as the other CLI tests
/// use it).
fn generator() -> PathBuf {
    let p = lever_model::registry::lever_home()
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{}: provision it with `lever models pull`",
        p.display()
    );
    p
}

#[test]
fn gpt3_on_300b_tokens_is_six_n_d() {
    // The interface, on this (uncalibrated) machine and on GPUs.
    for extra in [&[][..], &["--gpu", "H100", "--gpus", "8"][..]] {
        let mut args = vec!["--params", "175e9", "--tokens", "300e9", "--json"];
        args.extend_from_slice(extra);
        let v = plan(&args).json();
        assert_eq!(f(&v, "/train_flops"), 6.0 * 175e9 * 300e9); // 3.15e23
        assert_eq!(f(&v, "/tokens"), 300e9);
        assert!(v["memory"]["activations"].is_null());
        if extra.is_empty() {
            // f32 on a CPU: 4 bytes of weights, 4 of gradients, 8 of AdamW moments.
            assert_eq!(f(&v, "/memory/weights"), 4.0 * 175e9);
            assert_eq!(f(&v, "/memory/adamw"), 8.0 * 175e9);
            assert_eq!(v["hardware"]["calibrated"], json!(false));
        } else {
            // bf16 mixed precision: 2 + 4 + 12 bytes per parameter.
            assert_eq!(f(&v, "/memory/weights"), 2.0 * 175e9);
            assert_eq!(f(&v, "/memory/gradients"), 4.0 * 175e9);
            assert_eq!(f(&v, "/memory/adamw"), 12.0 * 175e9);
            assert_eq!(f(&v, "/devices"), 8.0);
            // 6ND at 40% of 8 × 989.4 TF/s, plus the ring all-reduce of the fp32 gradients
            // over NVLink 4 (450 GB/s) at every step of 512 × 2048 tokens.
            let compute = 3.15e23 / (8.0 * 0.4 * 989.4e12);
            let steps = (300e9f64 / (512.0 * 2048.0)).ceil();
            let ring = 2.0 * 7.0 / 8.0 * 175e9 * 4.0 / 450e9 * steps;
            assert!(close(f(&v, "/time/compute_s"), compute));
            assert!(close(f(&v, "/time/allreduce_s"), ring));
            assert!(close(f(&v, "/time/total_s"), compute + ring));
        }
    }
}

#[test]
fn a_shape_plans_memory_kv_cache_and_cost() {
    // A llama-style 1B: 16 layers, width 2048, 32 heads, 8 key/value heads, MLP 8192.
    let shape = [
        "--layers",
        "16",
        "--width",
        "2048",
        "--heads",
        "32",
        "--kv-heads",
        "8",
        "--mlp-width",
        "8192",
        "--vocab",
        "128256",
        "--context",
        "2048",
    ];
    let per_layer =
        2048.0 * 2048.0 * 2.0 + 2.0 * 2048.0 * 512.0 + 3.0 * 2048.0 * 8192.0 + 2.0 * 2048.0;
    let n = 128256.0 * 2048.0 + 16.0 * per_layer + 2048.0;
    let mut args = shape.to_vec();
    args.extend([
        "--job", "full", "--tokens", "1e9", "--batch", "16", "--gpu", "a100",
    ]);
    args.extend([
        "--gpus",
        "4",
        "--interconnect",
        "pcie4",
        "--price",
        "2.5",
        "--json",
    ]);
    let v = plan(&args).json();
    assert_eq!(f(&v, "/params"), n);
    let per_token = 6.0 * n + 12.0 * 16.0 * 2048.0 * 2048.0;
    assert!(close(f(&v, "/train_flops"), per_token * 1e9));
    assert!(close(
        f(&v, "/train_flops_full_recompute"),
        (per_token + 2.0 * 16.0 * per_layer + 4.0 * 16.0 * 2048.0 * 2048.0) * 1e9
    ));
    // Korthikanti: s·b·h·L·(34 + 5·a·s/h) bytes, b = 16 / 4 GPUs.
    let sbhl = 2048.0 * 4.0 * 2048.0 * 16.0;
    assert_eq!(
        f(&v, "/memory/activations"),
        sbhl * (34.0 + 5.0 * 32.0 * 2048.0 / 2048.0)
    );
    assert_eq!(
        f(&v, "/memory/activations_selective_recompute"),
        sbhl * 34.0
    );
    assert_eq!(f(&v, "/memory/activations_full_recompute"), sbhl * 2.0);
    // PCIe 4.0: 32 GB/s; the cost is 4 GPU-hours per hour at 2.5.
    let steps = (1e9f64 / (16.0 * 2048.0)).ceil();
    assert!(close(
        f(&v, "/time/allreduce_s"),
        1.5 * n * 4.0 / 32e9 * steps
    ));
    assert!(close(
        f(&v, "/cost"),
        f(&v, "/time/total_s") / 3600.0 * 2.5 * 4.0
    ));

    // Inference: the KV cache at 8 sequences of 2048 tokens, bf16: 2·L·kv·Q·2 bytes a token.
    let mut args = shape.to_vec();
    args.extend(["--job", "infer", "--batch", "8", "--gpu", "H100", "--json"]);
    let v = plan(&args).json();
    assert_eq!(
        f(&v, "/memory/kv_cache"),
        2.0 * 16.0 * 8.0 * 64.0 * 2.0 * 2048.0 * 8.0
    );
    assert!(v["train_flops"].is_null());
    // Decoding reads the weights and the cache every step: memory-bound on an H100.
    let read = 2.0 * n + f(&v, "/memory/kv_cache");
    assert_eq!(v["inference"]["decode_bound"], json!("memory"));
    assert!(close(
        f(&v, "/inference/decode_tokens_per_s"),
        8.0 / (read / 3350e9)
    ));
}

#[test]
fn pretraining_without_tokens_takes_chinchillas_twenty_per_parameter() {
    let v = plan(&["--params", "1e9", "--gpu", "H200", "--json"]).json();
    assert_eq!(f(&v, "/tokens"), 20e9);
    assert_eq!(v["tokens_from"], json!("chinchilla"));
    assert_eq!(f(&v, "/train_flops"), 6.0 * 1e9 * 20e9);
}

#[test]
fn a_model_file_gives_its_shape_and_lora_trains_the_adapters() {
    let model = generator();
    let v = plan(&[
        "--model",
        model.to_str().unwrap(),
        "--job",
        "lora",
        "--steps",
        "200",
        "--batch",
        "4",
        "--context",
        "256",
        "--gpu",
        "H100",
        "--json",
    ])
    .json();
    // SmolLM2-135M: 30 layers, width 576, 9 heads (3 key/value), MLP 1536, vocabulary 49152.
    assert_eq!(f(&v, "/params"), 134_515_008.0);
    assert_eq!(f(&v, "/shape/kv_heads"), 3.0);
    // Rank 8 on q, k, v, o, gate, up, down of 30 layers.
    let adapters = 8.0 * 30.0 * (1152.0 + 768.0 + 768.0 + 1152.0 + 3.0 * 2112.0);
    assert_eq!(f(&v, "/trainable_params"), adapters);
    assert_eq!(f(&v, "/memory/gradients"), 4.0 * adapters);
    assert_eq!(f(&v, "/tokens"), 200.0 * 4.0 * 256.0);
    assert_eq!(f(&v, "/steps"), 200.0);

    // On this machine the frozen base is the file's Q4_1/Q8_0 blocks: under a byte a weight.
    let v = plan(&[
        "--model",
        model.to_str().unwrap(),
        "--job",
        "infer",
        "--context",
        "1024",
        "--json",
    ])
    .json();
    let bytes_per_weight = f(&v, "/memory/weights") / 134_515_008.0;
    assert!(
        bytes_per_weight > 0.6 && bytes_per_weight < 1.0,
        "{bytes_per_weight}"
    );
    // llama.cpp's f16 cache: 2·30·3·64·2 bytes a token.
    assert_eq!(
        f(&v, "/memory/kv_cache"),
        2.0 * 30.0 * 3.0 * 64.0 * 2.0 * 1024.0
    );
}

/// A stored calibration is used and said so; its numbers decide the time.
#[test]
fn a_calibration_is_used_and_named() {
    let home = TempDir::new().unwrap();
    let cal = json!({
        "cpu": "test CPU", "threads": 2, "created_unix": 1_700_000_000u64, "lever_version": "0",
        "matmul_flops_per_s": 100e9, "memory_bytes_per_s": 1e30, "probes": [],
        "train_flops_per_s": 50e9, "elementwise_s": 0.0,
    });
    std::fs::create_dir_all(home.path().join("plan")).unwrap();
    std::fs::write(home.path().join("plan/calibration.json"), cal.to_string()).unwrap();
    let args = [
        "--layers",
        "4",
        "--width",
        "128",
        "--heads",
        "4",
        "--mlp-width",
        "344",
        "--vocab",
        "66",
        "--context",
        "64",
        "--steps",
        "2000",
        "--batch",
        "12",
    ];
    let mut j = args.to_vec();
    j.push("--json");
    let v = plan_in(home.path(), &j).json();
    assert_eq!(v["hardware"]["calibrated"], json!(true));
    // With no element-wise time and an endless bandwidth: the FLOPs at the fitted rate.
    assert_eq!(f(&v, "/params"), 800_128.0);
    assert!(close(f(&v, "/time/total_s"), f(&v, "/train_flops") / 50e9));
    // A LoRA plan scales its compute by the LoRA probe's factor (1 in a calibration from
    // before the LoRA probe, as this one).
    let mut lora = j.clone();
    lora.extend(["--job", "lora"]);
    let plain = plan_in(home.path(), &lora).json();
    assert!(close(
        f(&plain, "/time/total_s"),
        f(&plain, "/train_flops") / 50e9
    ));
    let mut scaled = cal.clone();
    scaled["lora_factor"] = json!(2.0);
    std::fs::write(
        home.path().join("plan/calibration.json"),
        scaled.to_string(),
    )
    .unwrap();
    let twice = plan_in(home.path(), &lora).json();
    assert!(close(
        f(&twice, "/time/total_s"),
        2.0 * f(&plain, "/time/total_s")
    ));
    let pre = plan_in(home.path(), &j).json();
    assert!(
        close(f(&pre, "/time/total_s"), f(&v, "/time/total_s")),
        "pretraining unscaled"
    );
    let text = plan_in(home.path(), &args);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("calibrated (test CPU, 2 threads"),
        "{}",
        text.stdout
    );

    // Without one: said too.
    let empty = TempDir::new().unwrap();
    let text = plan_in(empty.path(), &args);
    assert!(text.stdout.contains("UNCALIBRATED"), "{}", text.stdout);

    // A damaged one is named, not ignored.
    std::fs::write(home.path().join("plan/calibration.json"), "{").unwrap();
    plan_in(home.path(), &args).one_line_error(1, &["calibration.json", "--calibrate"]);
}

/// `--calibrate` measures and stores (atomically: nothing else left in the folder); the next
/// plan is calibrated.
#[test]
fn calibrate_stores_what_it_measured() {
    let home = TempDir::new().unwrap();
    let out = plan_in(home.path(), &["--calibrate", "--json"]);
    let cal = out.json();
    assert!(out.stderr.contains("calibrated:"), "{}", out.stderr);
    let names: Vec<_> = std::fs::read_dir(home.path().join("plan"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["calibration.json"]);
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(home.path().join("plan/calibration.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored, cal);
    assert_eq!(cal["probes"].as_array().unwrap().len(), 2);
    assert_eq!(cal["lora_probe"]["width"], json!(576));
    assert!(f(&cal, "/lora_probe/step_s") > 0.0 && f(&cal, "/lora_factor") >= 0.1);
    assert!(out.stderr.contains("LoRA probe"), "{}", out.stderr);
    assert!(f(&cal, "/train_flops_per_s") > 1e9 && f(&cal, "/memory_bytes_per_s") > 1e8);
    let v = plan_in(
        home.path(),
        &["--params", "1e6", "--tokens", "1e6", "--json"],
    )
    .json();
    assert_eq!(v["hardware"]["calibrated"], json!(true));
}

#[test]
fn bad_input_is_one_line() {
    // A shape whose heads do not divide the width: a bad value, exit 1.
    plan(&[
        "--layers",
        "2",
        "--width",
        "100",
        "--heads",
        "3",
        "--vocab",
        "10",
        "--context",
        "16",
        "--gpu",
        "H100",
    ])
    .one_line_error(1, &["--heads", "3 heads do not divide the width 100"]);
    // LoRA needs to know the layers it adapts.
    plan(&[
        "--params", "1e9", "--job", "lora", "--tokens", "1e6", "--gpu", "H100",
    ])
    .one_line_error(1, &["--job lora", "needs the model's shape"]);
    // Missing job arguments, an incomplete shape, no model, an unknown GPU: usage, exit 2.
    plan(&["--params", "1e9", "--job", "lora", "--gpu", "H100"])
        .one_line_error(2, &["--job lora", "--tokens", "--steps"]);
    plan(&["--params", "1e9", "--job", "full", "--gpu", "H100"])
        .one_line_error(2, &["--job full", "--tokens", "--steps"]);
    plan(&["--layers", "2", "--width", "64", "--gpu", "H100"])
        .one_line_error(2, &["--heads", "--vocab", "--context"]);
    plan(&["--job", "infer"]).one_line_error(2, &["no model"]);
    plan(&["--params", "1e9", "--gpu", "B300"])
        .one_line_error(2, &["--gpu B300", "unknown GPU", "H100"]);
    plan(&[
        "--params",
        "1e9",
        "--gpu",
        "H100",
        "--interconnect",
        "carrier-pigeon",
    ])
    .one_line_error(2, &["--interconnect carrier-pigeon", "nvlink4"]);
    // clap's own: exit 2.
    for args in [
        &["--params", "-5"][..],
        &["--params", "1e9", "--gpus", "8"][..],
        &["--params", "1e9", "--mfu", "1.5", "--gpu", "H100"][..],
    ] {
        let out = plan(args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("error:") && !out.stderr.contains("panicked"));
    }
}
