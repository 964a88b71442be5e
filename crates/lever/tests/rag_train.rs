//! `lever rag train` as a user runs it, on the real encoder (all-MiniLM-L6-v2), the real
//! generator (SmolLM2-135M-Instruct) and squad-open questions from ../shared/data: a short run
//! lowers the held-out loss and writes a query encoder that sentence-transformers loads and
//! embeds with as lever does, and a PEFT adapter; bad input is one line; a killed run resumes
//! to the same losses and weights. The live sentence-transformers check runs where a python has it
//! (`LEVER_REF_PYTHON` or `LEVER_TEST_PYTHON`).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::{Out, lever_in as lever, metrics, shared_data, step_losses};

/// Words kept of each passage: short prompts keep the runs to seconds on two cores.
const PASSAGE_WORDS: usize = 40;

/// In `dir`: q.jsonl, the first 16 training questions on distinct paragraphs; corpus.jsonl,
/// their gold paragraphs and 16 others, each cut to its first `PASSAGE_WORDS` words; and an
/// index of it (`idx`).
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
    let records: Vec<Value> = corpus
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let is_gold = |v: &Value| gold.iter().any(|g| v["_id"] == g.as_str());
    let mut passages: Vec<&Value> = records.iter().filter(|v| is_gold(v)).collect();
    passages.extend(records.iter().filter(|v| !is_gold(v)).step_by(97).take(16));
    let lines: Vec<String> = passages
        .into_iter()
        .map(|v| {
            let mut v = v.clone();
            let text = v["text"].as_str().unwrap();
            let short: Vec<&str> = text.split_whitespace().take(PASSAGE_WORDS).collect();
            v["text"] = Value::String(short.join(" "));
            v.to_string()
        })
        .collect();
    std::fs::write(dir.join("q.jsonl"), picked.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("corpus.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = lever(dir, &["index", "add", "corpus.jsonl", "--index", "idx"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
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
/// (`--val`) lower after than before, recall@1/5/20 reported, and both result folders: the
/// query encoder (every weight trained, changed; lever and sentence-transformers load it and
/// embed alike) and the adapter (PEFT keys, B no longer zero).
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
        let r: Vec<f64> = ["recall@1", "recall@5", "recall@20"]
            .iter()
            .map(|k| v[k].as_f64().unwrap())
            .collect();
        assert!(
            (0.0..=1.0).contains(&r[0]) && r[0] <= r[1] && r[1] <= r[2],
            "{v}"
        );
        // The gold passages are in the index and the questions are about them.
        assert!(r[2] > 0.5, "{v}");
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
    // sentence-transformers loads the folder and embeds as lever does: live here when a python
    // with sentence-transformers is at hand (LEVER_REF_PYTHON, else LEVER_TEST_PYTHON; CI's has
    // no PyTorch, which PyPI ships only with CUDA, gigabytes); the folder writer is checked
    // against sentence-transformers' committed embeddings in lever-model's encoder_train.rs
    // (`a_written_query_encoder_is_a_sentence_transformers_folder`) on every run.
    let texts = ["Who won Super Bowl 50?", "What is the capital of Normandy?"];
    let lever_vectors = trained.embed(&texts).unwrap().vectors;
    let script = "import json, sys\nfrom sentence_transformers import SentenceTransformer\n\
                  m = SentenceTransformer(sys.argv[1], device='cpu')\n\
                  print(json.dumps(m.encode(json.loads(sys.argv[2])).tolist()))";
    let has_st = |python: &str| {
        Command::new(python)
            .args(["-c", "import sentence_transformers"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let python = ["LEVER_REF_PYTHON", "LEVER_TEST_PYTHON"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|p| has_st(p));
    match python {
        None => eprintln!(
            "sentence-transformers live check not run: no LEVER_REF_PYTHON/LEVER_TEST_PYTHON with it (encoder_train.rs's fixture covers the folder)"
        ),
        Some(python) => {
            let o = Command::new(&python)
                .args(["-c", script, qe.to_str().unwrap()])
                .arg(serde_json::to_string(&texts).unwrap())
                .output()
                .unwrap_or_else(|e| panic!("{python}: {e}"));
            assert!(
                o.status.success(),
                "{python} could not embed with sentence-transformers: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let st: Vec<Vec<f32>> = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(st.len(), texts.len());
            let d = lever_vectors
                .iter()
                .flatten()
                .zip(st.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("trained query encoder: lever vs sentence-transformers, max diff {d:.2e}");
            assert!(d <= 1e-4, "{d}");
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
        // Step 2's line comes after step 1's checkpoint is complete.
        if done >= 2 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = step_losses(&killed);
    assert!(partial.len() == 2, "killed after {} steps", partial.len());

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
