//! Rung 3 from the command line, on the real encoder (all-MiniLM-L6-v2) and generator:
//! `index add/search/rm/stats`, incremental re-adds, refusal of another embedder, a corrupt
//! database, `rag ask` with its budget and citations, and `eval retrieval` on BEIR folders.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;

use serde_json::Value;

use common::lever_in as lever;

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A small folder of real-looking documents in every supported format, plus files that must
/// be skipped.
fn docs(root: &Path) {
    write(
        &root.join("docs/tea.md"),
        "# Tea\n\nAll about tea.\n\n## Brewing\n\nSteep green tea at 80 degrees Celsius for two minutes; \
         boiling water makes it bitter.\n\n## Storage\n\nKeep leaves in an airtight tin away from light.\n",
    );
    write(
        &root.join("docs/rivers.txt"),
        "The Nile flows north through eleven countries into the Mediterranean Sea.\n\n\
         The Amazon carries more water than any other river on Earth.\n",
    );
    write(
        &root.join("docs/owls.html"),
        "<html><head><title>Owls</title><style>p {color: red}</style></head>\n<body>\n\
         <p>Owls hunt at night; their soft feathers make their flight silent.</p>\n</body></html>\n",
    );
    write(
        &root.join("docs/facts.jsonl"),
        "{\"text\": \"Honey never spoils when sealed.\"}\n{\"text\": \"Octopuses have three hearts.\"}\n",
    );
    write(&root.join("docs/empty.txt"), "");
    write(&root.join("docs/latin1.txt"), b"caf\xe9 au lait\n");
    write(&root.join("docs/blob.txt"), b"\x00\x01\x02binary\x00");
}

fn first_path(search: &Value) -> String {
    search["results"][0]["path"].as_str().unwrap().to_string()
}

#[test]
fn index_add_search_update_remove_with_the_real_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    docs(root);
    let add = lever(root, &["index", "add", "docs", "--json"]).ok().json();
    assert_eq!(add["added"], 4, "{add}");
    assert_eq!(add["index"]["sources"], 4);
    // Empty, not UTF-8 and binary files are counted, not indexed.
    let skipped: u64 = add["skipped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(skipped, 3, "{add}");

    for mode in ["dense", "bm25", "hybrid"] {
        let s = lever(
            root,
            &[
                "index",
                "search",
                "how hot should the water be for green tea",
                "--mode",
                mode,
                "-k",
                "3",
                "--json",
            ],
        )
        .ok()
        .json();
        assert_eq!(first_path(&s), "docs/tea.md", "{mode}: {s}");
        let top = &s["results"][0];
        // The "Brewing" section: its heading path and its line span in the file.
        assert_eq!(
            top["headings"],
            serde_json::json!(["Tea", "Brewing"]),
            "{mode}: {s}"
        );
        assert_eq!(
            (top["line_start"].as_u64(), top["line_end"].as_u64()),
            (Some(5), Some(7)),
            "{s}"
        );
        let s = lever(
            root,
            &[
                "index",
                "search",
                "silent flight at night",
                "--mode",
                mode,
                "--json",
            ],
        )
        .ok()
        .json();
        assert_eq!(first_path(&s), "docs/owls.html", "{mode}: {s}");
    }

    // Re-adding changes nothing; editing one file re-embeds only it.
    let again = lever(root, &["index", "add", "docs", "--json"]).ok().json();
    assert_eq!(
        (again["added"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(4)),
        "{again}"
    );
    assert_eq!(again["chunks_written"], 0);
    write(
        &root.join("docs/rivers.txt"),
        "The Danube passes through four capital cities: Vienna, Bratislava, Budapest, Belgrade.\n",
    );
    let edited = lever(root, &["index", "add", "docs", "--json"]).ok().json();
    assert_eq!(
        (edited["updated"].as_u64(), edited["unchanged"].as_u64()),
        (Some(1), Some(3)),
        "{edited}"
    );
    let s = lever(
        root,
        &["index", "search", "Budapest", "--mode", "bm25", "--json"],
    )
    .ok()
    .json();
    assert_eq!(first_path(&s), "docs/rivers.txt");
    let s = lever(
        root,
        &[
            "index",
            "search",
            "Amazon river",
            "--mode",
            "bm25",
            "--json",
        ],
    )
    .ok()
    .json();
    assert!(
        s["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| !r["text"].as_str().unwrap().contains("Amazon"))
    );

    // Removing a source removes it from every mode's answers.
    lever(root, &["index", "rm", "docs/tea.md"]).ok();
    for mode in ["dense", "bm25", "hybrid"] {
        let s = lever(
            root,
            &["index", "search", "green tea", "--mode", mode, "--json"],
        )
        .ok()
        .json();
        assert!(
            s["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["path"] != "docs/tea.md"),
            "{mode}: {s}"
        );
    }
    let stats = lever(root, &["index", "stats", "--json"]).ok().json();
    assert_eq!(stats["sources"], 3);
    assert_eq!(stats["dim"], 384);
    assert!(
        stats["embedder"]
            .as_str()
            .unwrap()
            .starts_with("all-minilm-l6-v2:")
    );
}

/// Issue 16: what a user gets wrong with `index` and `rag ask` is refused by name, and
/// nothing is created or changed by a command that fails.
#[test]
fn index_and_rag_refuse_bad_requests_by_name_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    docs(root);
    // A path that does not exist: an error naming it, and no index folder.
    let e = lever(root, &["index", "add", "docs", "nowhere"]).failed_alone();
    assert!(e.contains("nowhere") && e.contains("cannot be read"), "{e}");
    assert!(!root.join("lever-index").exists());

    // Skipped files are listed with their reasons (text and --json).
    let add = lever(
        root,
        &[
            "index",
            "add",
            "docs/empty.txt",
            "docs/facts.jsonl",
            "--json",
        ],
    )
    .ok()
    .json();
    let skipped = add["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{add}");
    assert_eq!(skipped[0]["path"], "docs/empty.txt");
    assert_eq!(skipped[0]["kind"], "empty");
    let text = lever(root, &["index", "add", "docs"]).ok();
    assert!(
        text.stdout.contains("skipped docs/latin1.txt: ")
            && text.stdout.contains("skipped docs/blob.txt: "),
        "{}",
        text.stdout
    );

    // Settings fixed at creation are refused by name when they differ.
    let e = lever(root, &["index", "add", "docs", "--chunking", "tokens"]).failed_alone();
    assert!(
        e.contains("--chunking tokens") && e.contains("structure"),
        "{e}"
    );
    let e = lever(root, &["index", "add", "docs", "--chunk-size", "100"]).failed_alone();
    assert!(e.contains("--chunk-size 100"), "{e}");
    lever(root, &["index", "add", "docs", "--chunking", "structure"]).ok();

    // Removing what is not there, and searching for nothing.
    let e = lever(root, &["index", "rm", "docs/none.md"]).failed_alone();
    assert!(
        e.contains("docs/none.md") && e.contains("not in the index"),
        "{e}"
    );
    let e = lever(root, &["index", "search", "  "]).failed_alone();
    assert!(e.contains("empty"), "{e}");

    // An index with no passages cannot answer.
    std::fs::create_dir(root.join("only-empty")).unwrap();
    write(&root.join("only-empty/empty.txt"), "");
    lever(
        root,
        &["index", "add", "only-empty", "--index", "empty-index"],
    )
    .ok();
    let e = lever(
        root,
        &["rag", "ask", "What is tea?", "--index", "empty-index"],
    )
    .failed_alone();
    assert!(
        e.contains("empty-index") && e.contains("no passages"),
        "{e}"
    );
}

#[test]
fn an_index_refuses_another_embedder_and_a_corrupt_database_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    docs(root);
    lever(root, &["index", "add", "docs/tea.md"]).ok();
    let before = lever(root, &["index", "stats", "--json"]).ok().json();

    // The same weights pooled by [CLS] instead of the mean: other vectors, another embedder.
    let home = lever_model::registry::lever_home();
    let src = home
        .join("models")
        .join(lever_model::registry::DEFAULT_EMBEDDER);
    let other = root.join("minilm-cls");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        write(&other.join(f), std::fs::read(src.join(f)).unwrap());
    }
    let pooling = std::fs::read_to_string(src.join("1_Pooling/config.json")).unwrap();
    let pooling: Value = serde_json::from_str(&pooling).unwrap();
    let mut cls = pooling.clone();
    cls["pooling_mode_mean_tokens"] = Value::Bool(false);
    cls["pooling_mode_cls_token"] = Value::Bool(true);
    write(&other.join("1_Pooling/config.json"), cls.to_string());
    let out = lever(
        root,
        &[
            "index",
            "add",
            "docs/rivers.txt",
            "--embedder",
            other.to_str().unwrap(),
        ],
    );
    let line = out.failed();
    assert!(
        line.contains("all-minilm-l6-v2:") && line.contains("minilm-cls:"),
        "{line}"
    );
    assert_eq!(
        lever(root, &["index", "stats", "--json"]).ok().json(),
        before
    );

    // Garbage over the database: a one-line error naming it, and the file is left as it was.
    let db = root.join("lever-index/index.db");
    let garbage = vec![0x5a_u8; 8192];
    std::fs::write(&db, &garbage).unwrap();
    for args in [
        &["index", "search", "tea"][..],
        &["index", "stats"][..],
        &["index", "add", "docs/tea.md"][..],
    ] {
        let out = lever(root, args);
        assert!(
            out.failed().contains("index.db"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(std::fs::read(&db).unwrap(), garbage);

    // No index at all: say how to make one.
    let out = lever(root, &["index", "search", "tea", "--index", "nowhere"]);
    assert!(out.failed().contains("lever index add"), "{}", out.stderr);
}

#[test]
fn rag_ask_answers_from_the_passages_cites_them_and_drops_what_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    docs(root);
    lever(root, &["index", "add", "docs"]).ok();
    let q = "At what temperature should green tea be steeped?";
    let out = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "-k",
            "3",
            "-n",
            "24",
            "--json",
            "--show-context",
        ],
    )
    .ok();
    let v = out.json();
    let passages = v["passages"].as_array().unwrap();
    assert_eq!(passages.len(), 3, "{v}");
    assert_eq!(passages[0]["source"], "docs/tea.md:5-7", "{v}");
    assert!(v["dropped"].as_array().unwrap().is_empty());
    assert!(!v["answer"].as_str().unwrap().trim().is_empty());
    assert!(v["completion_tokens"].as_u64().unwrap() <= 24);
    // What the model saw: the numbered passages under the chat template, then the question.
    assert!(
        out.stderr.contains(
            "[1] docs/tea.md:5-7 (Tea > Brewing)\n## Brewing\n\nSteep green tea at 80 degrees"
        ),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("<|im_start|>user"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("Question: {q}")));
    for c in v["citations"].as_array().unwrap() {
        let n = c["n"].as_u64().unwrap() as usize;
        assert!((1..=3).contains(&n));
        assert_eq!(c["source"], passages[n - 1]["source"]);
    }

    // A budget the best passage fits and the other two do not: they are dropped and reported,
    // never cut.
    let v = lever(
        root,
        &[
            "rag",
            "ask",
            q,
            "-k",
            "3",
            "-n",
            "8",
            "--json",
            "--context-tokens",
            "55",
        ],
    )
    .ok()
    .json();
    assert_eq!(v["passages"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["passages"][0]["source"], "docs/tea.md:5-7");
    assert_eq!(v["dropped"].as_array().unwrap().len(), 2, "{v}");
}

/// A small BEIR folder: CRLF qrels with a header, graded judgments, a query id with no
/// judgment in the split.
fn beir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("beir");
    let docs = [
        ("d1", "Tea", "Green tea is steeped at 80 degrees Celsius."),
        ("d2", "Rivers", "The Nile is the longest river in Africa."),
        ("d3", "Owls", "Owls fly silently thanks to soft feathers."),
        ("d4", "Honey", "Sealed honey keeps for thousands of years."),
        (
            "d5",
            "Hearts",
            "An octopus has three hearts and blue blood.",
        ),
    ];
    let corpus: String = docs
        .iter()
        .map(|(id, t, x)| {
            format!(
                "{}\n",
                serde_json::json!({"_id": id, "title": t, "text": x})
            )
        })
        .collect();
    write(&dir.join("corpus.jsonl"), corpus);
    let queries = [
        ("q1", "how many hearts does an octopus have"),
        ("q2", "which river is the longest in Africa"),
        ("q3", "why are owls silent when they fly"),
        ("q4", "unjudged question"),
    ];
    let qs: String = queries
        .iter()
        .map(|(id, t)| format!("{}\n", serde_json::json!({"_id": id, "text": t})))
        .collect();
    write(&dir.join("queries.jsonl"), qs);
    write(
        &dir.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\r\nq1\td5\t1\r\nq2\td2\t2\r\nq3\td3\t1\r\n",
    );
    dir
}

#[test]
fn eval_retrieval_reports_each_mode_on_a_beir_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = beir(tmp.path());
    let d = dir.to_str().unwrap();
    let v = lever(tmp.path(), &["eval", "retrieval", d, "--json"])
        .ok()
        .json();
    let mut modes: Vec<&String> = v.as_object().unwrap().keys().collect();
    modes.sort();
    assert_eq!(modes, ["bm25", "dense", "hybrid"], "{v}");
    for mode in ["dense", "bm25", "hybrid"] {
        // Every judged document is the obvious first answer.
        for metric in ["ndcg@10", "recall@100", "mrr@10"] {
            assert_eq!(v[mode][metric].as_f64(), Some(1.0), "{mode} {metric}: {v}");
        }
    }
    let v = lever(
        tmp.path(),
        &["eval", "retrieval", d, "--mode", "bm25", "--json"],
    )
    .ok()
    .json();
    assert_eq!(v.as_object().unwrap().len(), 1);

    let out = lever(tmp.path(), &["eval", "retrieval", d, "--split", "dev"]);
    assert!(out.failed().contains("dev.tsv"), "{}", out.stderr);
    write(
        &dir.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"x\"}\n{\"_id\": \"q2\"\n",
    );
    let out = lever(tmp.path(), &["eval", "retrieval", d, "--mode", "bm25"]);
    assert!(out.failed().contains("queries.jsonl:2"), "{}", out.stderr);
}
