//! `lever eval mc` from the command line, on the real default model: `--json` output on the
//! reference items (same accuracy as the library test's transformers reference), `--limit`,
//! `--no-prefix-cache` giving the same result, and one-line `FILE:LINE` errors for bad data.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::PathBuf;

use serde_json::Value;

use common::lever_in as lever;

fn items() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lever-eval/tests/fixtures/mc_items.jsonl")
}

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lever-eval/tests/fixtures/mc_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn eval_mc_json_reports_acc_acc_norm_and_n() {
    let dir = tempfile::tempdir().unwrap();
    let data = items();
    let data = data.to_str().unwrap();
    let out = lever(dir.path(), &["eval", "mc", data, "--json"]).ok();
    let v = out.json();
    let r = reference();
    assert_eq!(v["n"], 32);
    // lever's picks agree with transformers' on every item (crates/lever-eval/tests/mc_reference.rs).
    assert_eq!(v["acc"].as_f64().unwrap(), r["acc"].as_f64().unwrap());
    assert_eq!(
        v["acc_norm"].as_f64().unwrap(),
        r["acc_norm"].as_f64().unwrap()
    );
    assert!(v["acc_stderr"].as_f64().unwrap() > 0.0);
    assert!(v["examples_per_s"].as_f64().unwrap() > 0.0);
    assert!(out.stderr.contains("examples/s"), "{}", out.stderr);

    let scratch = lever(
        dir.path(),
        &[
            "eval",
            "mc",
            data,
            "--json",
            "--limit",
            "5",
            "--no-prefix-cache",
        ],
    )
    .ok();
    let reuse = lever(dir.path(), &["eval", "mc", data, "--json", "--limit", "5"]).ok();
    let (a, b) = (scratch.json(), reuse.json());
    assert_eq!(a["n"], 5);
    assert_eq!(a["acc"], b["acc"]);
    assert_eq!(a["acc_norm"], b["acc_norm"]);
    let want: f64 = r["items"].as_array().unwrap()[..5]
        .iter()
        .map(|i| f64::from(u8::from(i["pred"] == i["gold"])))
        .sum::<f64>()
        / 5.0;
    assert_eq!(b["acc"].as_f64().unwrap(), want);

    let text = lever(dir.path(), &["eval", "mc", data, "--limit", "2"]).ok();
    assert!(text.stdout.starts_with("acc "), "{}", text.stdout);
    assert!(text.stdout.contains("\nn         2\n"), "{}", text.stdout);
}

#[test]
fn eval_mc_bad_data_is_one_line_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"query": "The sky is", "choices": [" blue", " green"], "gold": 0}"#;
    let cases: [(&str, &str); 9] = [
        (
            "{\"query\": \"q\", \"choices\": [\"a\"",
            "bad.jsonl:2: not JSON",
        ),
        (
            r#"{"choices": [" a"], "gold": 0}"#,
            "bad.jsonl:2: missing field `query`",
        ),
        (
            r#"{"query": "q", "gold": 0}"#,
            "bad.jsonl:2: missing field `choices`",
        ),
        (
            r#"{"query": "q", "choices": [" a"]}"#,
            "bad.jsonl:2: missing field `gold`",
        ),
        (
            r#"{"query": "q", "choices": [" a", " b"], "gold": 2}"#,
            "bad.jsonl:2: `gold` is 2, out of range for 2 choices (0-based)",
        ),
        (
            r#"{"query": "q", "choices": [], "gold": 0}"#,
            "bad.jsonl:2: `choices` is empty",
        ),
        (
            r#"{"query": "q", "choices": [" a", ""], "gold": 0}"#,
            "bad.jsonl:2: `choices[1]` is empty",
        ),
        (
            r#"{"query": "q", "choices": " a", "gold": 0}"#,
            "bad.jsonl:2: `choices` must be an array",
        ),
        (r#"["q", [" a"], 0]"#, "bad.jsonl:2: expected a JSON object"),
    ];
    for (line, want) in cases {
        std::fs::write(
            dir.path().join("bad.jsonl"),
            format!("{good}\n{line}\n{good}\n"),
        )
        .unwrap();
        let out = lever(dir.path(), &["eval", "mc", "bad.jsonl"]);
        let err = out.failed_alone();
        assert!(err.starts_with(&format!("error: {want}")), "{line}: {err}");
    }
    std::fs::write(dir.path().join("empty.jsonl"), "\n\n").unwrap();
    let err = lever(dir.path(), &["eval", "mc", "empty.jsonl"]).failed_alone();
    assert_eq!(
        err,
        "error: empty.jsonl: no items (expected JSON lines {\"query\", \"choices\", \"gold\"})"
    );
    let err = lever(dir.path(), &["eval", "mc", "missing.jsonl"]).failed_alone();
    assert!(
        err.starts_with("error: missing.jsonl: No such file"),
        "{err}"
    );
    // Too long for the model's context (8192 tokens): refused, naming the line, not cut.
    let long = format!(
        "{good}\n{}\n",
        serde_json::json!({"query": "word ".repeat(9000), "choices": [" a"], "gold": 0})
    );
    std::fs::write(dir.path().join("long.jsonl"), long).unwrap();
    let err = lever(dir.path(), &["eval", "mc", "long.jsonl"]).failed_alone();
    assert!(
        err.starts_with("error: long.jsonl:2: query + choice 0 is"),
        "{err}"
    );
    // Bad usage (clap): exit 2.
    assert_eq!(
        lever(dir.path(), &["eval", "mc", "x.jsonl", "--limit", "0"]).code,
        2
    );
}
