//! RAG-Sequence and RAG-Token from the command line on the real encoder and generator:
//! `rag ask --formulation seq|token` (passage probabilities, posteriors, beams, fast decoding),
//! `rag eval` (EM, F1, recall@k with intervals, predictions), `--query-encoder` accepted or
//! refused by name, and bad requests as one-line errors.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;

use serde_json::Value;

use common::lever_in as lever;

/// Six facts with `_id`s (one without) in one JSONL corpus, indexed.
fn indexed(root: &Path) {
    let facts = [
        (
            "tea",
            "Green tea should be steeped at 80 degrees Celsius for two minutes.",
        ),
        (
            "nile",
            "The Nile flows north through eleven countries into the Mediterranean Sea.",
        ),
        ("octopus", "An octopus has three hearts and blue blood."),
        ("honey", "Honey never spoils when it is sealed in a jar."),
        (
            "owl",
            "Owls hunt at night; their soft feathers make their flight silent.",
        ),
    ];
    let mut text = String::new();
    for (id, t) in facts {
        text.push_str(&format!("{{\"_id\": \"{id}\", \"text\": \"{t}\"}}\n"));
    }
    text.push_str("{\"text\": \"The Amazon carries more water than any other river.\"}\n");
    std::fs::write(root.join("facts.jsonl"), text).unwrap();
    lever(root, &["index", "add", "facts.jsonl"]).ok();
}

fn floats(v: &Value, key: &str) -> Vec<f64> {
    v["passages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[key].as_f64().unwrap())
        .collect()
}

#[test]
fn rag_ask_seq_and_token_marginalize_over_passages_read_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    indexed(root);
    let q = "How many hearts does an octopus have?";
    let search = lever(root, &["index", "search", q, "--mode", "dense", "--json"])
        .ok()
        .json();
    assert_eq!(search["results"][0]["doc_id"], "octopus", "{search}");
    for args in [
        &["--formulation", "token"][..],
        &["--formulation", "seq"],
        &["--formulation", "seq", "--decoding", "fast", "--beam", "2"],
        &["--formulation", "token", "--beam", "2"],
    ] {
        let mut all = vec!["rag", "ask", q, "-k", "3", "-n", "12", "--temperature", "0"];
        all.extend_from_slice(args);
        all.push("--json");
        let v = lever(root, &all).ok().json();
        let passages = v["passages"].as_array().unwrap();
        assert_eq!(passages.len(), 3, "{args:?}: {v}");
        assert_eq!(passages[0]["doc_id"], "octopus", "{v}");
        assert_eq!(passages[0]["source"], "facts.jsonl:3", "{v}");
        // p(z|x): a distribution, in the order of the scores; the posterior too.
        let p = floats(&v, "p");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{v}");
        assert!(p.windows(2).all(|w| w[0] >= w[1]), "{v}");
        let post = floats(&v, "posterior");
        assert!((post.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{v}");
        assert!(v["log_likelihood"].as_f64().unwrap() < 0.0);
        let n = v["completion_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&n), "{v}");
        assert!(!v["answer"].as_str().unwrap().trim().is_empty(), "{v}");
        assert_eq!(v["formulation"], args[1]);
        // RAG-Token steps the K contexts together: K rows for every generated token.
        if args == ["--formulation", "token"] {
            assert_eq!(v["decode_rows"].as_u64().unwrap(), 3 * (n - 1), "{v}");
        }
    }
    // The text form: the answer, then each passage with both probabilities.
    let out = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "-k",
            "2",
            "-n",
            "6",
            "--formulation",
            "token",
        ],
    )
    .ok();
    assert!(
        out.stdout.contains("RAG-Token log p(y|x) = "),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("  [1] p "), "{}", out.stdout);
}

#[test]
fn rag_eval_reports_em_f1_and_recall_with_intervals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    indexed(root);
    std::fs::write(
        root.join("q.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"How many hearts does an octopus have?\", \"answers\": [\"three\", \"3\"], \"gold_ids\": [\"octopus\"]}\n\
         {\"_id\": \"q2\", \"text\": \"At what temperature should green tea be steeped?\", \"answers\": [\"80 degrees Celsius\"], \"gold_ids\": [\"tea\"]}\n\
         {\"_id\": \"q3\", \"text\": \"Which way does the Nile flow?\", \"answers\": [\"north\"], \"gold_ids\": [\"nile\"]}\n\
         {\"_id\": \"q4\", \"text\": \"What never spoils?\", \"answers\": [\"honey\"]}\n",
    )
    .unwrap();
    for (f, k) in [
        ("closed", "2"),
        ("concat", "2"),
        ("seq", "2"),
        ("token", "3"),
    ] {
        let v = lever(
            root,
            &[
                "rag",
                "eval",
                "q.jsonl",
                "--formulation",
                f,
                "-k",
                k,
                "-n",
                "8",
                "--json",
                "--predictions",
                "p.jsonl",
            ],
        )
        .ok()
        .json();
        assert_eq!(
            (v["n"].as_u64(), v["judged"].as_u64()),
            (Some(4), Some(3)),
            "{v}"
        );
        assert_eq!(v["formulation"], f);
        // Six passages: the first 20 hold every gold document.
        assert_eq!(v["recall@20"], 1.0, "{v}");
        assert_eq!(v["recall@5"], 1.0, "{v}");
        assert!(v["recall@1"].as_f64().unwrap() >= 2.0 / 3.0, "{v}");
        for key in ["em", "f1", "recall@1"] {
            let m = v[key].as_f64().unwrap();
            let ci = v[format!("{key}_ci95")].as_array().unwrap();
            let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
            assert!((0.0..=1.0).contains(&m) && lo <= m && m <= hi, "{key}: {v}");
        }
        // Every question's answer, scores and retrieved ids; the means are theirs.
        let lines: Vec<Value> = std::fs::read_to_string(root.join("p.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["retrieved"][0], "octopus", "{}", lines[0]);
        assert_eq!(lines[3]["hits"], Value::Null);
        let f1: f64 = lines.iter().map(|l| l["f1"].as_f64().unwrap()).sum::<f64>() / 4.0;
        assert!((f1 - v["f1"].as_f64().unwrap()).abs() < 1e-12);
        let latent = f == "seq" || f == "token";
        assert_eq!(lines[0]["doc_probs"].is_array(), latent, "{}", lines[0]);
    }
    // --limit, and the table.
    let out = lever(
        root,
        &[
            "rag",
            "eval",
            "q.jsonl",
            "--formulation",
            "closed",
            "-k",
            "1",
            "-n",
            "4",
            "--limit",
            "2",
        ],
    )
    .ok();
    assert!(
        out.stdout
            .contains("(2 questions, closed, k 1; 95% intervals)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("| EM | F1 | recall@1 | recall@5 | recall@20 |")
    );
}

#[test]
fn a_query_encoder_folder_is_used_for_queries_or_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    indexed(root);
    // The index's own encoder under another folder name: another id, the same vectors.
    let base = lever_model::registry::lever_home().join("models/all-minilm-l6-v2");
    let qenc = root.join("qenc");
    std::fs::create_dir(&qenc).unwrap();
    for e in std::fs::read_dir(&base).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), qenc.join(e.file_name())).unwrap();
    }
    let q = "Which river carries the most water?";
    let plain = lever(root, &["index", "search", q, "--mode", "dense", "--json"])
        .ok()
        .json();
    let with = lever(
        root,
        &[
            "index",
            "search",
            q,
            "--mode",
            "dense",
            "--json",
            "--query-encoder",
            "qenc",
        ],
    )
    .ok()
    .json();
    let ids = |v: &Value| -> Vec<i64> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["chunk_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(&with), ids(&plain));
    let v = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "-k",
            "2",
            "-n",
            "4",
            "--formulation",
            "seq",
            "--query-encoder",
            "qenc",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(v["passages"].as_array().unwrap().len(), 2);

    // Paired (by `lever rag train`'s note) with another index's encoder: refused by name.
    std::fs::write(
        qenc.join("lever_query_encoder.json"),
        "{\"document_encoder\": \"bge-small:0123456789abcdef:cls+norm:512\"}",
    )
    .unwrap();
    let e = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "--formulation",
            "token",
            "--query-encoder",
            "qenc",
        ],
    )
    .failed_alone();
    assert!(
        e.contains("index was built with embedder `all-minilm-l6-v2:")
            && e.contains("refusing query encoder `qenc:")
            && e.ends_with(
                "it was trained for an index built with `bge-small:0123456789abcdef:cls+norm:512`"
            ),
        "{e}"
    );
    std::fs::write(
        root.join("q.jsonl"),
        "{\"_id\": \"a\", \"text\": \"x?\", \"answers\": [\"y\"]}\n",
    )
    .unwrap();
    let e = lever(
        root,
        &[
            "rag",
            "eval",
            "q.jsonl",
            "-k",
            "2",
            "--query-encoder",
            "facts.jsonl",
        ],
    )
    .failed_alone();
    assert!(
        e.contains("--query-encoder facts.jsonl: not a sentence-transformers folder"),
        "{e}"
    );
}

#[test]
fn latent_rag_refuses_bad_requests_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    indexed(root);
    let q = "What never spoils?";
    // k above the passages the index holds.
    let e = lever(
        root,
        &["rag", "ask", q, "-k", "7", "--formulation", "token"],
    )
    .failed_alone();
    assert!(
        e.contains("-k 7: the index ") && e.ends_with("holds only 6 passages"),
        "{e}"
    );
    std::fs::write(
        root.join("q.jsonl"),
        "{\"_id\": \"a\", \"text\": \"What never spoils?\", \"answers\": [\"honey\"]}\n{\"_id\": \"b\", \"text\": \"\", \"answers\": [\"x\"]}\n",
    )
    .unwrap();
    let e = lever(root, &["rag", "eval", "q.jsonl", "-k", "7"]).failed_alone();
    assert!(
        e.ends_with("q.jsonl:2: field `text` (the question) is missing or empty"),
        "{e}"
    );
    std::fs::write(
        root.join("q.jsonl"),
        "{\"_id\": \"a\", \"text\": \"What never spoils?\", \"answers\": [\"honey\"]}\n",
    )
    .unwrap();
    let e = lever(root, &["rag", "eval", "q.jsonl", "-k", "7"]).failed_alone();
    assert!(e.ends_with("holds only 6 passages"), "{e}");
    // An empty question; an index with nothing to retrieve.
    let e = lever(root, &["rag", "ask", "  ", "--formulation", "seq"]).failed_alone();
    assert!(e.ends_with("the question is empty"), "{e}");
    std::fs::write(root.join("empty.txt"), "").unwrap();
    lever(root, &["index", "add", "empty.txt", "--index", "nothing"]).ok();
    let e = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "--index",
            "nothing",
            "--formulation",
            "token",
        ],
    )
    .failed_alone();
    assert!(
        e.contains("nothing") && e.contains("holds no passages"),
        "{e}"
    );
    // Bad usage: exit 2.
    for args in [
        &["rag", "ask", q, "--formulation", "seq", "--mode", "bm25"][..],
        &["rag", "ask", q, "--beam", "2"],
        &[
            "rag",
            "ask",
            q,
            "--formulation",
            "token",
            "--decoding",
            "fast",
        ],
        &[
            "rag",
            "ask",
            q,
            "--formulation",
            "seq",
            "--backend",
            "http://127.0.0.1:9",
        ],
    ] {
        let out = lever(root, args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
}
