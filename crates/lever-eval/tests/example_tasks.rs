//! The benchmark task files under examples/tasks format items exactly as
//! lm-evaluation-harness's `arc_easy`, `piqa` and `hellaswag` tasks do (their `doc_to_text`,
//! `doc_to_choice`, `process_docs`/`preprocess`, target delimiter " "). The expected strings
//! below were worked out by hand from lm-eval's task definitions for lines in the Hugging
//! Face datasets' JSONL export layout.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn load(task: &str, data_name: &str, lines: &str) -> lever_eval::Task {
    let d = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/tasks")
        .join(task);
    std::fs::copy(&src, d.path().join(task)).unwrap();
    std::fs::create_dir(d.path().join("data")).unwrap();
    std::fs::write(d.path().join("data").join(data_name), lines).unwrap();
    let t = lever_eval::task::load(&d.path().join(task)).unwrap();
    // (The tempdir can go: everything was read and rendered.)
    drop(d);
    t
}

fn gsm8k() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/gsm8k.toml")
}

#[test]
fn arc_easy_as_lm_eval() {
    let t = load(
        "arc-easy.toml",
        "arc_easy_test.jsonl",
        r#"{"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?", "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.", "Planetary gravity will become stronger."], "label": ["A", "B", "C", "D"]}, "answerKey": "C"}"#,
    );
    let e = &t.test[0];
    assert_eq!(
        e.prompt("default"),
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:"
    );
    assert_eq!(e.choices[2], " Planetary days will become shorter.");
    assert_eq!(e.gold, 2);
    assert_eq!(t.metric.name(), "acc");
}

#[test]
fn piqa_as_lm_eval() {
    let t = load(
        "piqa.toml",
        "piqa_validation.jsonl",
        r#"{"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.", "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.", "label": 0}"#,
    );
    let e = &t.test[0];
    assert_eq!(
        e.prompt("default"),
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    assert_eq!(e.choices.len(), 2);
    assert!(
        e.choices[1].starts_with(" Provide the guinea pig")
            && e.choices[1].ends_with("jeans material.")
    );
    assert_eq!(e.gold, 0);
    assert_eq!(t.metric.name(), "acc_norm");
}

#[test]
fn hellaswag_as_lm_eval_preprocess() {
    let t = load(
        "hellaswag.toml",
        "hellaswag_validation.jsonl",
        concat!(
            r#"{"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}"#,
            "\n",
            r#"{"activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.", "ctx_b": "", "endings": ["[step] Water daily.", "[substeps] Plant them  deep."], "label": "0"}"#,
            "\n"
        ),
    );
    let a = &t.test[0];
    // preprocess("Roof shingle removal: A man is sitting on a roof. " + "he".capitalize())
    assert_eq!(
        a.prompt("default"),
        "Roof shingle removal: A man is sitting on a roof. He"
    );
    assert_eq!(a.choices[3], " starts pulling up roofing on a roof.");
    assert_eq!(a.gold, 3);
    let b = &t.test[1];
    // strip, " [title]" -> ". ", [header] removed, "  " -> " ".
    assert_eq!(
        b.prompt("default"),
        "Home and Garden: How to grow tomatoes. Pick a sunny spot."
    );
    // The delimiter " " before preprocess(ending), which keeps the space left by [step].
    assert_eq!(b.choices[0], "  Water daily.");
    assert_eq!(b.choices[1], "  Plant them deep.");
}

#[test]
fn gsm8k_task_reads_the_shared_data() {
    let p = gsm8k();
    if !Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/instructions/gsm8k_train_first5000.jsonl")
        .exists()
    {
        eprintln!("skipped: ../shared/data is not beside the repository");
        return;
    }
    let t = lever_eval::task::load(&p).unwrap();
    assert_eq!((t.test.len(), t.dev.len(), t.train.len()), (200, 100, 4700));
    assert!(t.test[0].target.contains("#### "));
    assert!(
        t.test[0]
            .prompt("instructed")
            .starts_with("Solve the problem step by step.")
    );
    let (score, got) = t
        .metric
        .score_text("... so 5 + 7 = 12.\n#### 12", "#### 12");
    assert_eq!((score, got.as_deref()), (1.0, Some("12")));
}

/// The pair of tasks that measures constrained decoding: the same items, prompts and metric;
/// the references are bare numbers, the pattern takes only a bare number, and one of the two
/// constrains the answer to a JSON integer.
#[test]
fn gsm8k_number_tasks_differ_only_by_the_constraint() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks");
    if !dir
        .join("../../../shared/data/instructions/gsm8k_train_first5000.jsonl")
        .exists()
    {
        eprintln!("skipped: ../shared/data is not beside the repository");
        return;
    }
    let free = lever_eval::task::load(&dir.join("gsm8k-number.toml")).unwrap();
    let json = lever_eval::task::load(&dir.join("gsm8k-number-json.toml")).unwrap();
    assert_eq!(free.test.len(), json.test.len());
    for (a, b) in free.test.iter().zip(&json.test) {
        assert_eq!(a.prompt("default"), b.prompt("default"));
        assert_eq!(a.target, b.target);
        assert!(
            a.target
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == '-'),
            "{}",
            a.target
        );
    }
    assert!(free.generation.constraint().is_none());
    assert_eq!(
        json.generation.constraint(),
        Some(lever_generate::Constraint::JsonSchema(
            serde_json::json!({"type": "integer"})
        ))
    );
    let target = &free.test[0].target;
    assert_eq!(free.metric.score_text(target, target).0, 1.0);
    assert_eq!(
        free.metric
            .score_text(&format!("The answer is {target}"), target)
            .0,
        0.0
    );
}
