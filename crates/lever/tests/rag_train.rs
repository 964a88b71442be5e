//! `lever rag train` as a user runs it, on the real encoder (all-MiniLM-L6-v2), the real
//! generator (SmolLM2-135M-Instruct) and squad-open questions from ../shared/data: a short run
//! lowers the held-out loss and writes a sentence-transformers query encoder and a PEFT
//! adapter; bad input is one line; a killed run resumes to the same losses and weights.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::{Out, lever_in as lever, shared_data};

/// In `dir`: q.jsonl, the first 16 training questions on distinct paragraphs; corpus.jsonl,
/// their gold paragraphs and 16 others; and an index of it (`idx`).
fn squad_setup(dir: &Path) {
    let questions = std::fs::read_to_string(shared_data("squad-open/queries-train.jsonl")).unwrap();
    let corpus = std::fs::read_to_string(shared_data("squad-open/corpus.jsonl")).unwrap();
    let (mut picked, mut gold) = (Vec::new(), Vec::new());
    for line in questions.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let g = v["gold_ids"][0].as_str().unwrap().to_string();
        if !gold.contains(&g) {
            gold.push(g);
            picked.push(line.to_string());
        }
        if picked.len() == 16 {
            break;
        }
    }
    let id = |l: &str| {
        serde_json::from_str::<Value>(l).unwrap()["_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut passages: Vec<&str> = corpus.lines().filter(|l| gold.contains(&id(l))).collect();
    passages.extend(
        corpus
            .lines()
            .filter(|l| !gold.contains(&id(l)))
            .step_by(97)
            .take(16),
    );
    std::fs::write(dir.join("q.jsonl"), picked.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("corpus.jsonl"), passages.join("\n") + "\n").unwrap();
    let out = lever(dir, &["index", "add", "corpus.jsonl", "--index", "idx"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn load(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

const SHORT_RUN: [&str; 20] = [
    "-k",
    "2",
    "--batch-size",
    "2",
    "--lr",
    "2e-3",
    "--encoder-lr",
    "1e-4",
    "--warmup",
    "1",
    "--lora-r",
    "4",
    "--lora-targets",
    "q,v,o,down",
    "--seed",
    "5",
    "--data",
    "q.jsonl",
    "--index",
    "idx",
];

/// Three steps of RAG-Sequence: finite losses per step, the loss on four of the questions
/// lower after than before, recall@1/5 reported, and both result folders: the query encoder
/// (every weight trained, changed, loadable by lever; by sentence-transformers too when
/// `LEVER_TEST_PYTHON` has it) and the adapter (PEFT keys, B no longer zero).
#[test]
fn a_short_run_lowers_the_loss_and_writes_both_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    squad_setup(dir);
    let q = std::fs::read_to_string(dir.join("q.jsonl")).unwrap();
    let val: Vec<&str> = q.lines().take(4).collect();
    std::fs::write(dir.join("val.jsonl"), val.join("\n") + "\n").unwrap();
    let mut args = vec![
        "rag",
        "train",
        "--out",
        "run",
        "--steps",
        "3",
        "--val",
        "val.jsonl",
    ];
    args.extend(SHORT_RUN);
    let out = lever(dir, &args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("all weights"), "{}", out.stderr);
    let run = dir.join("run");
    let steps = step_losses(&run);
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        steps.iter().all(|s| s.1.is_finite() && s.1 > 0.0),
        "{steps:?}"
    );
    let val: Vec<Value> = metrics(&run)
        .into_iter()
        .filter(|v| v.get("val_loss").is_some())
        .collect();
    assert_eq!(val.len(), 2);
    let (before, after) = (
        val[0]["val_loss"].as_f64().unwrap(),
        val[1]["val_loss"].as_f64().unwrap(),
    );
    eprintln!(
        "held-out loss {before:.3} -> {after:.3}; recall {} -> {}",
        val[0], val[1]
    );
    assert!(after < before, "loss {before} -> {after}");
    for v in &val {
        let r1 = v["recall@1"].as_f64().unwrap();
        let r5 = v["recall@5"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r1) && r1 <= r5, "{v}");
    }
    assert!(run.join("loss.png").is_file());
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["result"]["tokens_per_s"].as_f64().unwrap() > 0.0);

    // The query encoder: a sentence-transformers folder whose weights moved.
    let qe = run.join("query-encoder");
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "tokenizer.json",
        "config.json",
        "lever_query_encoder.json",
    ] {
        assert!(qe.join(f).is_file(), "{f}");
    }
    let pairing: Value = serde_json::from_str(
        &std::fs::read_to_string(qe.join("lever_query_encoder.json")).unwrap(),
    )
    .unwrap();
    assert!(
        pairing["document_encoder"]
            .as_str()
            .unwrap()
            .starts_with("all-minilm-l6-v2:")
    );
    let home = lever_model::registry::lever_home();
    let base_dir = lever_model::registry::find(lever_model::registry::DEFAULT_EMBEDDER)
        .unwrap()
        .dir(&home);
    let (a, b) = (
        load(&base_dir.join("model.safetensors")),
        load(&qe.join("model.safetensors")),
    );
    for key in [
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.5.output.dense.weight",
    ] {
        let d = max_diff(&a[key], &b[key]);
        assert!(d > 0.0, "{key} did not change");
    }
    let trained = lever_model::Encoder::load(&qe).unwrap();
    let v = trained.embed(&["Who won Super Bowl 50?"]).unwrap().vectors;
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    if let Ok(python) = std::env::var("LEVER_TEST_PYTHON") {
        let script = "import json, sys\nfrom sentence_transformers import SentenceTransformer\n\
                      print(json.dumps(SentenceTransformer(sys.argv[1], device='cpu').encode(['Who won Super Bowl 50?']).tolist()))";
        let o = Command::new(&python)
            .args(["-c", script, qe.to_str().unwrap()])
            .output()
            .unwrap();
        if o.status.success() {
            let st: Vec<Vec<f32>> = serde_json::from_slice(&o.stdout).unwrap();
            let d = v[0]
                .iter()
                .zip(&st[0])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("trained query encoder: lever vs sentence-transformers {d:.2e}");
            assert!(d <= 1e-4, "{d}");
        } else {
            eprintln!("{python} has no sentence-transformers: live check skipped");
        }
    }

    // The adapter: PEFT keys for the four targets of 30 layers, B trained away from zero.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let st = load(&run.join("adapter/adapter_model.safetensors"));
    assert_eq!(st.len(), 30 * 4 * 2);
    let b = &st["base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"];
    assert!(
        b.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

fn one_line_error(out: &Out, needles: &[&str]) {
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "{n:?} not in: {}", out.stderr);
    }
}

#[test]
fn bad_input_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    squad_setup(dir);
    let base = |extra: &[&str]| {
        let mut a = vec!["rag", "train", "--out", "run", "--steps", "1"];
        a.extend(SHORT_RUN);
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| lever(dir, &args.iter().map(String::as_str).collect::<Vec<_>>());

    // More passages than the index holds.
    let mut args = base(&[]);
    let i = args.iter().position(|a| a == "-k").unwrap();
    args[i + 1] = "500".into();
    one_line_error(&run(args), &["-k 500", "idx", "holds only"]);

    // A question without answers, named by its line.
    let q = std::fs::read_to_string(dir.join("q.jsonl")).unwrap();
    let mut lines: Vec<String> = q.lines().map(str::to_string).collect();
    let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
    v["answers"] = Value::Array(vec![]);
    lines[1] = v.to_string();
    std::fs::write(dir.join("bad.jsonl"), lines.join("\n") + "\n").unwrap();
    let mut args = base(&[]);
    let i = args.iter().position(|a| a == "q.jsonl").unwrap();
    args[i] = "bad.jsonl".into();
    one_line_error(&run(args), &["bad.jsonl:2", "`answers`"]);

    // An index built by another encoder (the same weights in a folder of another name) is
    // refused by name.
    let home = lever_model::registry::lever_home();
    let minilm = lever_model::registry::find(lever_model::registry::DEFAULT_EMBEDDER)
        .unwrap()
        .dir(&home);
    let other = dir.join("other-encoder");
    copy_tree(&minilm, &other);
    let out = lever(
        dir,
        &[
            "index",
            "add",
            "corpus.jsonl",
            "--index",
            "idx-other",
            "--embedder",
            "other-encoder",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut args = base(&[]);
    let i = args.iter().position(|a| a == "idx").unwrap();
    args[i] = "idx-other".into();
    one_line_error(
        &run(args),
        &["other-encoder:", "all-minilm-l6-v2:", "refusing"],
    );

    // Bad usage is exit code 2.
    let out = run(base(&["--formulation", "bag"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!dir.join("run/metrics.jsonl").exists());
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// A run killed with SIGKILL after a checkpoint and resumed gives the same per-step losses
/// (within 1e-6) and the same query encoder and adapter (within 1e-6) as a run never
/// interrupted; RAG-Token, the top two encoder layers trained.
#[test]
fn a_killed_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    squad_setup(dir);
    let args = |out: &str| -> Vec<String> {
        let mut a = vec![
            "rag",
            "train",
            "--out",
            out,
            "--steps",
            "3",
            "--save-every",
            "1",
            "--encoder-layers",
            "2",
            "--formulation",
            "token",
        ];
        a.extend(SHORT_RUN);
        a.iter().map(|s| s.to_string()).collect()
    };
    let full_args = args("full");
    let full = lever(
        dir,
        &full_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(full.code, 0, "{}", full.stderr);
    let want = step_losses(&dir.join("full"));
    assert_eq!(want.len(), 3);

    let killed = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args("killed"))
        .current_dir(dir)
        .env_remove("LEVER_MODEL")
        .env_remove("LEVER_EMBEDDER")
        .env_remove("LEVER_INDEX")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let done = std::fs::read_to_string(killed.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
            .unwrap_or(0);
        if done >= 1 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = step_losses(&killed);
    assert!(
        (1..3).contains(&partial.len()),
        "killed after {} steps",
        partial.len()
    );

    let mut resume = args("killed");
    resume.push("--resume".into());
    let out = lever(dir, &resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("resuming at step"), "{}", out.stderr);
    let got = step_losses(&killed);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3]);
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        eprintln!("step {s}: resumed {a} vs uninterrupted {b}");
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "step {s}: resumed {a} vs uninterrupted {b}"
        );
    }
    for file in [
        "adapter/adapter_model.safetensors",
        "query-encoder/model.safetensors",
    ] {
        let (a, b) = (load(&dir.join("full").join(file)), load(&killed.join(file)));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            if t.dtype() != candle_core::DType::F32 {
                continue;
            }
            let d = max_diff(t, &b[k]);
            assert!(d <= 1e-6, "{file} {k}: {d}");
        }
    }

    // Other settings are refused by name.
    let mut other = args("killed");
    other.push("--resume".into());
    let i = other.iter().position(|a| a == "token").unwrap();
    other[i] = "seq".into();
    let out = lever(dir, &other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("`formulation` was"), "{}", out.stderr);
}
