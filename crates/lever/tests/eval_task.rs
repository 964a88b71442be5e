//! `lever eval TASK.toml` and `lever fewshot search` on the real default model and embedder:
//! several settings in one command with per-example records and bootstrap intervals, the
//! result cache, chat and block formats, knn/mmr selection, the token budget, multiple choice
//! through a task file agreeing with the transformers reference, perplexity, and one-line
//! errors for bad tasks and data.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};

use serde_json::Value;

use common::lever_in as lever;

const TRAIN: &str = r#"{"q": "What is the capital of France?", "a": "Paris"}
{"q": "What is the capital of Japan?", "a": "Tokyo"}
{"q": "Which planet is known as the red planet?", "a": "Mars"}
{"q": "What gas do plants absorb from the air?", "a": "carbon dioxide"}
{"q": "What is the largest ocean on Earth?", "a": "Pacific"}
"#;
const DEV: &str = r#"{"q": "What is the capital of Spain?", "a": "Madrid"}
{"q": "Which planet is the largest?", "a": "Jupiter"}
"#;
const TEST: &str = r#"{"q": "What is the capital of Italy?", "a": "Rome"}
{"q": "What is the capital of Germany?", "a": "Berlin"}
{"q": "Which planet is closest to the sun?", "a": "Mercury"}
"#;

const QA_TASK: &str = r#"
name = "capitals"
[data]
train = "train.jsonl"
dev = "dev.jsonl"
test = "test.jsonl"
[prompt]
template = "Question: {{ q }}\nAnswer:"
target = "{{ a }}"
[prompt.variants]
terse = "{{ q }}"
[metric]
name = "contains"
[generation]
max_tokens = 8
stop = ["\n"]
"#;

fn qa_dir(task: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("train.jsonl"), TRAIN).unwrap();
    std::fs::write(d.path().join("dev.jsonl"), DEV).unwrap();
    std::fs::write(d.path().join("test.jsonl"), TEST).unwrap();
    std::fs::write(d.path().join("task.toml"), task).unwrap();
    d
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn settings_side_by_side_with_records_intervals_and_cache() {
    let d = qa_dir(QA_TASK);
    let args = [
        "eval",
        "task.toml",
        "--shots",
        "0,1",
        "--select",
        "fixed,random",
        "--out",
        "out",
        "--cache",
        "cache",
        "--json",
    ];
    let first = lever(d.path(), &args).ok().json();
    let settings = first["settings"].as_array().unwrap();
    let labels: Vec<&str> = settings
        .iter()
        .map(|s| s["setting"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["0-shot", "1-shot fixed", "1-shot random"]);
    // (A random 1-shot prompt may equal a fixed one: the cache serves it.)
    assert_eq!(settings[0]["cached"], 0);
    assert_eq!(settings[1]["cached"], 0);
    for s in settings {
        assert_eq!(s["n"], 3);
        assert_eq!(s["metric"], "contains");
        let (score, ci) = (f(&s["score"]), s["ci95"].as_array().unwrap());
        assert!(f(&ci[0]) <= score && score <= f(&ci[1]), "{s}");
        assert!(f(&s["mean_latency_ms"]) > 0.0);
        assert!(f(&s["mean_prompt_tokens"]) > 5.0);
    }
    // Per-example records: the 1-shot fixed prompt is the first training example, answered,
    // then the question, in block format.
    let recs = records(&d.path().join("out/test-1-shot_fixed.jsonl"));
    assert_eq!(recs.len(), 3);
    assert_eq!(
        recs[0]["prompt"],
        "Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: What is the capital of Italy?\nAnswer:"
    );
    for r in &recs {
        assert_eq!(r["shots"], serde_json::json!([0]));
        let (out, target) = (r["output"].as_str().unwrap(), r["target"].as_str().unwrap());
        let contains = format!(" {} ", out.to_lowercase().replace(['.', ','], " "))
            .contains(&format!(" {} ", target.to_lowercase()));
        assert_eq!(f(&r["score"]), f64::from(u8::from(contains)), "{r}");
        assert!(r["completion_tokens"].as_u64().unwrap() <= 8);
        assert!(r["prompt_tokens"].as_u64().unwrap() > 10);
    }
    // The mean of the records is the summary's score.
    let mean = recs.iter().map(|r| f(&r["score"])).sum::<f64>() / 3.0;
    assert!((mean - f(&settings[1]["score"])).abs() < 1e-12);
    let random = records(&d.path().join("out/test-1-shot_random.jsonl"));
    assert!(random.iter().all(|r| r["shots"][0].as_u64().unwrap() < 5));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["settings"], first["settings"]);

    // Again into the same folder: refused without --force (the first run's records stay)...
    let line = lever(d.path(), &args).failed_alone();
    assert!(
        line.contains("out: already exists") && line.contains("--force"),
        "{line}"
    );
    assert!(d.path().join("out/summary.json").exists());
    // ...and with it, every result from the cache, the same scores and outputs.
    let again_args = [&args[..], &["--force"]].concat();
    let again = lever(d.path(), &again_args).ok().json();
    for (a, b) in settings.iter().zip(again["settings"].as_array().unwrap()) {
        assert_eq!(b["cached"], 3);
        assert_eq!(a["score"], b["score"]);
        assert_eq!(a["ci95"], b["ci95"]);
    }
    let outputs = |p: &str| -> Vec<Value> {
        records(&d.path().join(p))
            .iter()
            .map(|r| r["output"].clone())
            .collect()
    };
    assert_eq!(
        outputs("out/test-1-shot_fixed.jsonl"),
        recs.iter().map(|r| r["output"].clone()).collect::<Vec<_>>()
    );

    // A table without --json, and a prompt variant.
    let table = lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--template",
            "default,terse",
            "--shots",
            "0",
            "--limit",
            "1",
            "--no-cache",
        ],
    )
    .ok();
    assert!(table.stdout.contains("0-shot [terse]"), "{}", table.stdout);
    assert!(table.stdout.contains("95% CI"), "{}", table.stdout);
}

#[test]
fn chat_format_puts_examples_in_turns() {
    let d = qa_dir(QA_TASK);
    let out = lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--shots",
            "1",
            "--format",
            "chat",
            "--limit",
            "1",
            "--no-cache",
            "--out",
            "o",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(out["settings"][0]["setting"], "1-shot fixed chat");
    let r = &records(&d.path().join("o/test-1-shot_fixed_chat.jsonl"))[0];
    let p = r["prompt"].as_str().unwrap();
    assert!(
        p.contains("<|im_start|>user\nQuestion: What is the capital of France?\nAnswer:<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nQuestion: What is the capital of Italy?\nAnswer:<|im_end|>\n"),
        "{p}"
    );
    assert!(p.ends_with("<|im_start|>assistant\n"), "{p}");
}

#[test]
fn knn_and_mmr_pick_related_examples_and_the_budget_drops_examples() {
    let d = qa_dir(&(QA_TASK.to_string() + "[fewshot]\nmmr_lambda = 0.3\n"));
    lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--shots",
            "1,2",
            "--select",
            "knn,mmr",
            "--out",
            "o",
            "--no-cache",
            "--json",
        ],
    )
    .ok();
    let knn = records(&d.path().join("o/test-1-shot_knn.jsonl"));
    // The capitals go with a capital question, the planet with a planet question.
    assert!(
        [0, 1].contains(&knn[0]["shots"][0].as_u64().unwrap()),
        "{}",
        knn[0]
    );
    assert!(
        [0, 1].contains(&knn[1]["shots"][0].as_u64().unwrap()),
        "{}",
        knn[1]
    );
    assert_eq!(knn[2]["shots"], serde_json::json!([2]));
    let knn2 = records(&d.path().join("o/test-2-shot_knn.jsonl"));
    let mmr2 = records(&d.path().join("o/test-2-shot_mmr.jsonl"));
    for (k, m) in knn2.iter().zip(&mmr2) {
        // The nearest example goes last, next to the question; mmr starts from it too.
        assert_eq!(k["shots"][1], m["shots"][1], "{k} {m}");
        assert_ne!(m["shots"][0], m["shots"][1]);
    }
    // Italy: knn takes both capitals; mmr takes one capital and something else.
    let capitals = |r: &Value| {
        r["shots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s.as_u64().unwrap() <= 1)
            .count()
    };
    assert_eq!(capitals(&knn2[0]), 2);
    assert_eq!(capitals(&mmr2[0]), 1);

    // A 40-token budget cannot hold four worked examples: the last ones are dropped, counted.
    let budget = QA_TASK.to_string() + "[fewshot]\nbudget = 40\n";
    let d = qa_dir(&budget);
    let s = lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--shots",
            "4",
            "--out",
            "o",
            "--no-cache",
            "--json",
        ],
    )
    .ok()
    .json();
    let s = &s["settings"][0];
    assert!(s["examples_dropped"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["prompts_with_drops"], 3);
    for r in records(&d.path().join("o/test-4-shot_fixed.jsonl")) {
        assert!(r["prompt_tokens"].as_u64().unwrap() <= 40, "{r}");
        let kept = r["shots"].as_array().unwrap().len() as u64;
        assert_eq!(kept + r["dropped"].as_u64().unwrap(), 4);
        // Dropped from the end: what is kept is the first ones.
        let want: Vec<u64> = (0..kept).collect();
        assert_eq!(r["shots"], serde_json::json!(want));
    }
}

#[test]
fn multiple_choice_task_matches_the_transformers_reference() {
    let d = tempfile::tempdir().unwrap();
    let items = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lever-eval/tests/fixtures/mc_items.jsonl");
    std::fs::write(
        d.path().join("mc.toml"),
        format!(
            "[data]\ntest = {:?}\n[prompt]\ntemplate = \"{{{{ query }}}}\"\nchoices = \"choices\"\nchoice = \"{{{{ choice }}}}\"\ngold = \"{{{{ gold }}}}\"\n[metric]\nname = \"acc_norm\"\n",
            items.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = lever(
        d.path(),
        &["eval", "mc.toml", "--json", "--no-cache", "--out", "o"],
    )
    .ok()
    .json();
    let s = &out["settings"][0];
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../lever-eval/tests/fixtures/mc_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(s["n"], 32);
    assert_eq!(s["acc"], reference["acc"]);
    assert_eq!(s["acc_norm"], reference["acc_norm"]);
    assert_eq!(s["score"], reference["acc_norm"]);
}

#[test]
fn perplexity_is_the_corpus_token_perplexity() {
    let task = QA_TASK
        .replace("name = \"contains\"", "name = \"perplexity\"")
        .replace("target = \"{{ a }}\"", "target = \" {{ a }}\"");
    let d = qa_dir(&task);
    let s = lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--shots",
            "0",
            "--out",
            "o",
            "--no-cache",
            "--json",
        ],
    )
    .ok()
    .json();
    let s = &s["settings"][0];
    let recs = records(&d.path().join("o/test-0-shot.jsonl"));
    let (mut nll, mut tok) = (0.0, 0.0);
    for r in &recs {
        let (n, t) = (
            f(&r["nll"]),
            r["completion_tokens"].as_u64().unwrap() as f64,
        );
        assert!(n > 0.0 && t >= 1.0, "{r}");
        assert!((f(&r["score"]) - (n / t).exp()).abs() < 1e-9);
        nll += n;
        tok += t;
    }
    assert!((f(&s["score"]) - (nll / tok).exp()).abs() < 1e-9, "{s}");
    assert!(f(&s["score"]) > 1.0);
}

#[test]
fn fewshot_search_keeps_the_best_dev_set() {
    let d = qa_dir(QA_TASK);
    let out = lever(
        d.path(),
        &[
            "fewshot",
            "search",
            "task.toml",
            "-k",
            "1",
            "--trials",
            "3",
            "--cache",
            "c",
            "--out",
            "o",
            "--json",
        ],
    )
    .ok()
    .json();
    let trials = out["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3);
    let scores: Vec<f64> = trials.iter().map(|t| f(&t["dev"]["score"])).collect();
    let best = out["best_trial"].as_u64().unwrap() as usize;
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(scores[best], max);
    assert_eq!(scores.iter().position(|&s| s == max), Some(best));
    for t in trials {
        assert_eq!(t["dev"]["n"], 2);
        assert_eq!(t["shots"].as_array().unwrap().len(), 1);
    }
    assert_eq!(out["test"]["n"], 3);
    assert_eq!(out["best_shots"], trials[best]["shots"]);
    let recs = records(&d.path().join("o/search-k1-best-test.jsonl"));
    assert!(recs.iter().all(|r| r["shots"] == out["best_shots"]));
}

#[test]
fn bad_tasks_and_data_are_one_line_errors() {
    let d = qa_dir(QA_TASK);
    let run = |args: &[&str]| lever(d.path(), args).failed_alone();
    // k larger than the train split.
    let e = run(&["eval", "task.toml", "--shots", "9"]);
    assert!(
        e.contains("task.toml: 9 examples asked but the train split has 5"),
        "{e}"
    );
    // A data line without the template's field: the file, line, template, line and column.
    std::fs::write(
        d.path().join("dev.jsonl"),
        "{\"q\": \"x\", \"a\": \"y\"}\n{\"q\": \"z\"}\n",
    )
    .unwrap();
    let e = run(&["eval", "task.toml"]);
    assert!(
        e.contains("dev.jsonl:2: [prompt] target: line 1, column 4: undefined value"),
        "{e}"
    );
    // An empty split.
    std::fs::write(d.path().join("dev.jsonl"), "\n").unwrap();
    let e = run(&["eval", "task.toml", "--split", "dev"]);
    assert!(e.contains("the dev split has no examples"), "{e}");
    // A template syntax error in the task file.
    std::fs::write(
        d.path().join("task.toml"),
        QA_TASK.replace("{{ q }}\\nAnswer:", "{{ q \\nAnswer:"),
    )
    .unwrap();
    let e = run(&["eval", "task.toml"]);
    assert!(e.contains("task.toml: [prompt] template: line"), "{e}");
    // A bad line in the task file itself.
    std::fs::write(d.path().join("task.toml"), "[data]\ntest = 3\n").unwrap();
    let e = run(&["eval", "task.toml"]);
    assert!(e.contains("task.toml:2: column 8"), "{e}");
    // knn needs an embedder that exists.
    let d = qa_dir(QA_TASK);
    let e = lever(
        d.path(),
        &[
            "eval",
            "task.toml",
            "--shots",
            "1",
            "--select",
            "knn",
            "--embedder",
            "/no/such/model",
        ],
    )
    .failed();
    assert!(e.contains("/no/such/model"), "{e}");
}
