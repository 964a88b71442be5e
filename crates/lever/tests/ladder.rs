//! `lever ladder` as a user runs it: the example squad-open task (examples/ladder/squad) on the
//! default model, four rungs on the first 4 test questions, a small corpus of real Wikipedia
//! paragraphs (../shared/data/squad-open) for the RAG rung, and a 4-step LoRA.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{lever_in, shared_data};
use serde_json::Value;

fn example(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/ladder")
        .join(rel)
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A corpus of the gold paragraphs of the first `n` test questions and 16 others; the ladder
/// file of the test, with the given rungs and settings.
fn setup(d: &Path, n: usize) -> PathBuf {
    let test = jsonl(&example("squad/test.jsonl"));
    let gold: Vec<String> = test[..n]
        .iter()
        .map(|q| q["gold"][0].as_str().unwrap().to_string())
        .collect();
    let corpus = std::fs::read_to_string(shared_data("squad-open/corpus.jsonl")).unwrap();
    let mut lines: Vec<&str> = Vec::new();
    for (i, l) in corpus.lines().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        if gold.iter().any(|g| v["_id"] == g.as_str()) || i % 128 == 0 {
            lines.push(l);
        }
    }
    std::fs::write(d.join("corpus.jsonl"), lines.join("\n") + "\n").unwrap();
    let ladder = d.join("ladder.toml");
    std::fs::write(
        &ladder,
        format!(
            r#"task = "{task}"
split = "test"
format = "chat"
price_per_hour = 0.10

[rag]
corpus = ["corpus.jsonl"]
k = 2
mode = "bm25"
query_template = "query"

[finetune]
steps = 4
batch_size = 2
seq_len = 96
lr = 1e-3
lora_r = 4
args = ["--save-every", "1", "--lora-targets", "q,v"]

[[rung]]
name = "zero-shot"

[[rung]]
name = "few-shot"
shots = 2

[[rung]]
name = "rag"
rag = true

[[rung]]
name = "lora"
finetune = "lora"
"#,
            task = example("squad/task.toml").display()
        ),
    )
    .unwrap();
    ladder
}

/// Every rung scored on the same items, with an interval, a paired comparison with the rung
/// below and its costs; the RAG rung's prompts hold the retrieved gold paragraphs; the LoRA
/// rung trained (its tokens and seconds are counted); a
/// verdict names a rung. The ladder is killed in the middle of its training rung, and the
/// same command goes on: finished rungs are kept, the training resumes from its checkpoint.
#[test]
#[allow(unsafe_code)]
fn a_ladder_scores_every_rung_on_the_same_items_and_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = 4;
    let ladder = setup(d, n);
    let args = [
        "ladder",
        ladder.to_str().unwrap(),
        "--out",
        "out",
        "--limit",
        "4",
        "--no-cache",
    ];
    // Killed (SIGKILL, with its rung and training processes) once the LoRA training has
    // written a checkpoint.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .current_dir(d)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = d.join("out/train/lora/run/checkpoints/last/complete.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !ckpt.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the ladder ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The rung and its training die with the ladder.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!d.join("out/train/lora/run/adapter").exists());
    for r in ["zero-shot", "few-shot", "rag"] {
        assert!(
            d.join("out/rungs").join(r).join("result.json").is_file(),
            "{r}"
        );
    }

    let out = lever_in(d, &args).ok();
    for r in ["zero-shot", "few-shot", "rag"] {
        assert!(
            out.stderr.contains(&format!("{r}: done before, kept")),
            "{}",
            out.stderr
        );
    }
    assert!(out.stderr.contains("resuming at step"), "{}", out.stderr);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/ladder.json")).unwrap()).unwrap();
    let rungs = report["rungs"].as_array().unwrap();
    assert_eq!(
        rungs
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["zero-shot", "few-shot", "rag", "lora"]
    );
    for r in rungs {
        assert_eq!(r["n"], n, "{r}");
        let s = r["score"].as_f64().unwrap();
        let ci = r["ci"].as_array().unwrap();
        assert!(
            ci[0].as_f64().unwrap() <= s && s <= ci[1].as_f64().unwrap(),
            "{r}"
        );
        let c = &r["cost"];
        assert!(c["eval_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(c["peak_rss_mb"].as_f64().unwrap() > 50.0, "{r}");
        assert!(c["prompt_tokens_per_query"].as_f64().unwrap() > 10.0, "{r}");
        assert!(r["cost"]["money"].as_f64().unwrap() > 0.0, "{r}");
    }
    for (i, r) in rungs.iter().enumerate().skip(1) {
        assert_eq!(r["vs_below"]["rung"], rungs[i - 1]["name"], "{r}");
        assert!(r["vs_below"]["significant"].is_boolean(), "{r}");
    }
    // Few-shot prompts are longer; RAG prompts longer still (two paragraphs).
    let tokens = |i: usize| {
        rungs[i]["cost"]["prompt_tokens_per_query"]
            .as_f64()
            .unwrap()
    };
    assert!(tokens(1) > tokens(0) && tokens(2) > tokens(1) + 100.0);
    // RAG: BM25 over the small corpus finds the gold paragraphs.
    let test = jsonl(&example("squad/test.jsonl"));
    let corpus = jsonl(&d.join("corpus.jsonl"));
    let records = jsonl(&d.join("out/rungs/rag/records.jsonl"));
    assert_eq!(records.len(), n);
    let mut found = 0;
    for (q, rec) in test.iter().zip(&records) {
        let gold = corpus.iter().find(|p| p["_id"] == q["gold"][0]).unwrap()["text"]
            .as_str()
            .unwrap();
        // A passage is a chunk: the gold paragraph or a part of it.
        let passages = rec["passages"].as_array().unwrap();
        if passages
            .iter()
            .any(|p| gold.contains(p.as_str().unwrap().trim()))
        {
            found += 1;
        }
        assert!(rec["prompt"].as_str().unwrap().contains("Passages:\n[1] "));
    }
    assert!(
        found >= n - 1,
        "gold paragraphs retrieved for {found} of {n}"
    );
    let lora = &rungs[3]["cost"];
    assert!(lora["train_tokens"].as_u64().unwrap() > 0, "{lora}");
    assert!(lora["train_s"].as_f64().unwrap() > 0.0, "{lora}");
    assert!(
        d.join("out/train/lora/run/adapter/adapter_model.safetensors")
            .is_file()
    );
    // The rung above: full fine-tuning, planned by `lever plan` on the same data and steps.
    let next = &report["verdict"]["next"];
    assert_eq!(next["method"], "full", "{next}");
    assert!(next["planned_s"].as_f64().unwrap() > 0.0, "{next}");
    assert!(
        out.stdout
            .contains("next rung: full fine-tuning (4 steps), planned "),
        "{}",
        out.stdout
    );
    // What the report page shows: the training's loss per step (logged again after the
    // resume: each step once), every item with each rung's answer; the page names each rung.
    let steps: Vec<f64> = rungs[3]["loss_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_f64().unwrap())
        .collect();
    assert_eq!(steps, [1.0, 2.0, 3.0, 4.0], "{}", rungs[3]);
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), n);
    for (q, item) in test.iter().zip(items) {
        assert!(
            item["question"]
                .as_str()
                .unwrap()
                .contains(q["question"].as_str().unwrap()),
            "{item}"
        );
        assert_eq!(item["gold"], q["answer"], "{item}");
        for r in rungs {
            let a = &item["answers"][r["name"].as_str().unwrap()];
            assert!(a["output"].is_string() && a["right"].is_boolean(), "{item}");
        }
    }
    let page = std::fs::read_to_string(d.join("out/report.html")).unwrap();
    for r in ["zero-shot", "few-shot", "rag", "lora"] {
        assert!(page.contains(&format!(">{r}</text>")), "{r}");
    }
    let verdict = report["verdict"]["use"].as_str().unwrap();
    assert!(rungs.iter().any(|r| r["name"] == verdict), "{verdict}");
    assert!(out.stdout.contains("verdict: use `"), "{}", out.stdout);
    eprintln!("{}", out.stdout);

    // A subset of the rungs (kept from the run above): the rung above is judged from those
    // run, not from the whole file.
    let mut sub = args.to_vec();
    sub.extend(["--rungs", "zero-shot,rag"]);
    let out = lever_in(d, &sub).ok();
    assert!(
        out.stderr.contains("rag: done before, kept"),
        "{}",
        out.stderr
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/ladder.json")).unwrap()).unwrap();
    assert_eq!(report["rungs"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["verdict"]["next"]["method"], "lora", "{report}");
}

/// `lever eval` on a task file with a `[rag]` section compares closed-book, concat, RAG-Sequence
/// and RAG-Token on the same items (the ladder's code, shared), each record with its passages;
/// a `--rag` the task cannot serve is one line naming the file.
#[test]
fn eval_compares_closed_concat_seq_and_token_from_a_task_files_rag_section() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, 2);
    lever_in(d, &["index", "add", "corpus.jsonl", "--index", "idx"]).ok();
    let task = std::fs::read_to_string(example("squad/task.toml")).unwrap();
    let squad = example("squad");
    let task = task
        .replace(
            "\"train.jsonl\"",
            &format!("{:?}", squad.join("train.jsonl")),
        )
        .replace("\"dev.jsonl\"", &format!("{:?}", squad.join("dev.jsonl")))
        .replace("\"test.jsonl\"", &format!("{:?}", squad.join("test.jsonl")));
    std::fs::write(d.join("closed.toml"), &task).unwrap();
    std::fs::write(
        d.join("task.toml"),
        format!("{task}\n[rag]\nindex = \"idx\"\nk = 2\nquery_template = \"query\"\n"),
    )
    .unwrap();
    let out = lever_in(
        d,
        &[
            "eval",
            "task.toml",
            "--rag",
            "closed,concat,seq,token",
            "--limit",
            "2",
            "--no-cache",
            "--out",
            "out",
            "--json",
        ],
    )
    .ok();
    let report: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let settings = report["settings"].as_array().unwrap();
    let labels: Vec<&str> = settings
        .iter()
        .map(|s| s["setting"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "closed 0-shot chat",
            "concat k2 0-shot chat",
            "seq k2 0-shot chat",
            "token k2 0-shot chat"
        ]
    );
    for s in settings {
        assert_eq!(s["n"], 2, "{s}");
    }
    let closed = jsonl(&d.join("out/test-closed-0-shot_chat.jsonl"));
    let concat = jsonl(&d.join("out/test-concat-0-shot_chat.jsonl"));
    assert!(closed.iter().all(|r| r.get("passages").is_none()));
    for (c, k) in closed.iter().zip(&concat) {
        let p = k["prompt"].as_str().unwrap();
        assert!(p.contains("Passages:\n[1] ") && p.contains("\n[2] "), "{p}");
        assert!(!c["prompt"].as_str().unwrap().contains("Passages:"));
        assert_eq!(k["passages"].as_array().unwrap().len(), 2, "{k}");
    }
    // RAG-Sequence and RAG-Token read the same two passages, one prompt each: the same
    // prompt tokens, far more than the closed-book prompt's.
    let seq = jsonl(&d.join("out/test-seq-0-shot_chat.jsonl"));
    let token = jsonl(&d.join("out/test-token-0-shot_chat.jsonl"));
    for ((s, t), c) in seq.iter().zip(&token).zip(&closed) {
        assert_eq!(s["passages"], t["passages"]);
        assert_eq!(s["prompt_tokens"], t["prompt_tokens"]);
        let (st, ct) = (
            s["prompt_tokens"].as_u64().unwrap(),
            c["prompt_tokens"].as_u64().unwrap(),
        );
        assert!(st > ct + 100, "{st} vs {ct}");
        assert!(s["completion_tokens"].as_u64().unwrap() >= 1, "{s}");
    }

    // What the task cannot serve: one line, naming the file.
    let e = lever_in(d, &["eval", "closed.toml", "--rag", "seq", "--limit", "1"]).failed_alone();
    assert!(
        e.contains("closed.toml") && e.contains("--rag seq needs a [rag] section"),
        "{e}"
    );
    std::fs::write(
        d.join("noindex.toml"),
        format!("{task}\n[rag]\nindex = \"nowhere\"\n"),
    )
    .unwrap();
    let e = lever_in(d, &["eval", "noindex.toml", "--limit", "1"]).failed_alone();
    assert!(e.contains("nowhere") && e.contains("no index here"), "{e}");
    std::fs::write(
        d.join("bad.toml"),
        format!("{task}\n[rag]\nindex = \"idx\"\nformulation = \"sequence\"\n"),
    )
    .unwrap();
    let e = lever_in(d, &["eval", "bad.toml", "--limit", "1"]).failed_alone();
    assert!(
        e.contains("bad.toml") && e.contains("[rag] formulation = \"sequence\""),
        "{e}"
    );
}

/// Bad ladder files: one line naming the file and the problem, exit 1, nothing written.
/// The RAG rungs of one ladder in the four settings of `formulation` (closed-book, concat,
/// RAG-Sequence, RAG-Token) on the same two items: each scored, the latent rungs with each
/// passage read on its own (their prompts hold the K passages' prompts).
#[test]
fn rag_rungs_compare_closed_concat_seq_and_token_on_the_same_items() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, 2);
    std::fs::write(
        d.join("rag.toml"),
        format!(
            "task = \"{}\"\nsplit = \"test\"\nformat = \"chat\"\n[rag]\ncorpus = [\"corpus.jsonl\"]\nk = 2\nquery_template = \"query\"\n\
             [[rung]]\nname = \"closed\"\n[[rung]]\nname = \"concat\"\nrag = true\n\
             [[rung]]\nname = \"seq\"\nrag = true\nformulation = \"seq\"\n\
             [[rung]]\nname = \"token\"\nrag = true\nformulation = \"token\"\n",
            example("squad/task.toml").display()
        ),
    )
    .unwrap();
    lever_in(
        d,
        &[
            "ladder",
            "rag.toml",
            "--out",
            "out",
            "--limit",
            "2",
            "--no-cache",
        ],
    )
    .ok();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/ladder.json")).unwrap()).unwrap();
    let rungs = report["rungs"].as_array().unwrap();
    let names: Vec<&str> = rungs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["closed", "concat", "seq", "token"]);
    for r in rungs {
        assert_eq!(r["n"], 2, "{r}");
        assert!(r["score"].as_f64().is_some(), "{r}");
    }
    let tokens = |i: usize| {
        rungs[i]["cost"]["prompt_tokens_per_query"]
            .as_f64()
            .unwrap()
    };
    // Two prompts of one passage each (dense search's, where concat's are hybrid's).
    assert!(
        tokens(2) > tokens(0) + 100.0,
        "{} vs {}",
        tokens(2),
        tokens(0)
    );
    assert_eq!(tokens(2), tokens(3));
    for rung in ["seq", "token"] {
        let records = jsonl(&d.join(format!("out/rungs/{rung}/records.jsonl")));
        assert_eq!(records.len(), 2);
        for rec in &records {
            assert_eq!(rec["passages"].as_array().unwrap().len(), 2, "{rec}");
            assert!(rec["completion_tokens"].as_u64().unwrap() >= 1, "{rec}");
        }
    }
}

#[test]
fn bad_ladders_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let task = example("squad/task.toml");
    let cases = [
        (
            format!(
                "task = \"{}\"\n[[rung]]\nname = \"a\"\nshots = 1\ncolour = 2\n",
                task.display()
            ),
            "unknown field `colour`",
        ),
        (
            format!(
                "task = \"{}\"\n[rag]\ncorpus = [\"missing.jsonl\"]\n[[rung]]\nname = \"a\"\nrag = true\n",
                task.display()
            ),
            "[rag] corpus",
        ),
        (
            format!(
                "task = \"{}\"\n[[rung]]\nname = \"a\"\nrag = true\n",
                task.display()
            ),
            "rung `a`: rag = true needs a [rag] section",
        ),
        (
            format!(
                "task = \"{}\"\n[[rung]]\nname = \"a\"\nfinetune = \"qlora\"\n",
                task.display()
            ),
            "finetune = \"qlora\": expected \"lora\" or \"full\"",
        ),
        (
            format!(
                "task = \"{}\"\n[[rung]]\nname = \"a\"\nformulation = \"seq\"\n",
                task.display()
            ),
            "rung `a`: formulation needs rag = true",
        ),
        (
            format!(
                "task = \"{}\"\n[rag]\ncorpus = [\"l.toml\"]\n[[rung]]\nname = \"a\"\nrag = true\nformulation = \"sequence\"\n",
                task.display()
            ),
            "formulation = \"sequence\": expected \"concat\", \"seq\" or \"token\"",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(d.join("l.toml"), &text).unwrap();
        let out = lever_in(d, &["ladder", "l.toml", "--out", "out"]);
        let e = out.failed_alone();
        assert!(e.contains("l.toml") && e.contains(want), "{e}");
        assert!(!d.join("out").exists());
    }
    // Leakage: a task whose test split is its training split, with a few-shot rung.
    let leaky = d.join("leaky.toml");
    let data = example("squad");
    std::fs::write(
        &leaky,
        std::fs::read_to_string(&task)
            .unwrap()
            .replace("test = \"test.jsonl\"", "test = \"train.jsonl\"")
            .replace(
                "train = \"train.jsonl\"",
                &format!("train = \"{}/train.jsonl\"", data.display()),
            )
            .replace(
                "dev = \"dev.jsonl\"",
                &format!("dev = \"{}/dev.jsonl\"", data.display()),
            )
            .replace(
                "test = \"train.jsonl\"",
                &format!("test = \"{}/train.jsonl\"", data.display()),
            ),
    )
    .unwrap();
    std::fs::write(
        d.join("l.toml"),
        format!(
            "task = \"{}\"\n[[rung]]\nname = \"few\"\nshots = 2\n",
            leaky.display()
        ),
    )
    .unwrap();
    let e = lever_in(d, &["ladder", "l.toml", "--out", "out"]).failed_alone();
    assert!(
        e.contains("leakage: 400 test item(s) are also training examples")
            && e.contains("train.jsonl:1 = "),
        "{e}"
    );
    // A training rung over the budget, by the plan, before anything runs.
    std::fs::write(
        d.join("l.toml"),
        format!(
            "task = \"{}\"\nbudget_minutes = 0.01\n[finetune]\nsteps = 500\n[[rung]]\nname = \"a\"\n[[rung]]\nname = \"lora\"\nfinetune = \"lora\"\n",
            task.display()
        ),
    )
    .unwrap();
    let e = lever_in(d, &["ladder", "l.toml", "--out", "budget"]).failed_alone();
    assert!(
        e.contains("rung `lora`: 500 steps of lora fine-tuning are planned at ")
            && e.contains("over budget_minutes = 0.01"),
        "{e}"
    );
    assert!(
        !d.join("budget/rungs/a/result.json").exists(),
        "nothing ran"
    );
    // A folder that holds other files.
    std::fs::create_dir(d.join("busy")).unwrap();
    std::fs::write(d.join("busy/notes.txt"), "mine").unwrap();
    std::fs::write(
        d.join("l.toml"),
        format!("task = \"{}\"\n[[rung]]\nname = \"a\"\n", task.display()),
    )
    .unwrap();
    let e = lever_in(d, &["ladder", "l.toml", "--out", "busy"]).failed_alone();
    assert!(e.contains("busy"), "{e}");
    assert_eq!(
        std::fs::read_to_string(d.join("busy/notes.txt")).unwrap(),
        "mine"
    );
}
