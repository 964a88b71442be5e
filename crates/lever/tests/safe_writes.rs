//! Issue 16: lever never writes over what a user made, writes nothing half-way, and refuses
//! bad requests with one line. Real `lever` processes in temp dirs; the model is a tiny GGUF
//! (`lever_model::testing::TinyGguf`) where the test is about files, the default model where
//! it is about answers.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;

use common::{lever_in as lever, lever_in_env};
use lever_model::testing::TinyGguf;

fn tiny(dir: &Path) -> String {
    let p = dir.join("tiny.gguf");
    TinyGguf::default().write(&p).unwrap();
    p.display().to_string()
}

/// Every name in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn export_merge_and_quantize_refuse_to_replace_what_exists_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let model = tiny(root);
    std::fs::create_dir(root.join("mine")).unwrap();
    std::fs::write(root.join("mine/notes.txt"), "my notes").unwrap();

    let e = lever(root, &["export", "-m", &model, "--out", "mine"]).failed_alone();
    assert!(e.contains("mine") && e.contains("--force"), "{e}");
    let e = lever(
        root,
        &["merge", "-m", &model, "--lora", "adapter", "--out", "mine"],
    )
    .failed_alone();
    assert!(e.contains("mine") && e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read_to_string(root.join("mine/notes.txt")).unwrap(),
        "my notes"
    );

    // An existing GGUF file, also the input itself.
    let before = std::fs::read(root.join("tiny.gguf")).unwrap();
    let e = lever(root, &["quantize", &model, &model, "--type", "q8_0"]).failed_alone();
    assert!(e.contains("tiny.gguf") && e.contains("--force"), "{e}");
    let e = lever(root, &["export", "-m", &model, "--out", &model]).failed_alone();
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(root.join("tiny.gguf")).unwrap(), before);

    // An empty folder is fine; --force replaces the folder whole, and no temporary is left.
    std::fs::create_dir(root.join("empty")).unwrap();
    lever(root, &["export", "-m", &model, "--out", "empty"]).ok();
    assert!(root.join("empty/config.json").is_file());
    lever(root, &["export", "-m", &model, "--out", "mine", "--force"]).ok();
    assert!(root.join("mine/model.safetensors").is_file());
    assert!(!root.join("mine/notes.txt").exists());
    lever(root, &["quantize", &model, "q.gguf", "--type", "q8_0"]).ok();
    lever(
        root,
        &["quantize", &model, "q.gguf", "--type", "q8_0", "--force"],
    )
    .ok();
    assert_eq!(
        names(root),
        ["empty", "mine", "q.gguf", "tiny.gguf"],
        "temporaries left behind"
    );
}

#[test]
fn a_killed_writer_leaves_no_half_file_and_the_next_run_cleans_up() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let model = tiny(root);
    // What a writer killed mid-way leaves: a temporary beside the target (pid not running).
    std::fs::write(root.join(".q.gguf.tmp-4194399"), "half").unwrap();
    lever(root, &["quantize", &model, "q.gguf", "--type", "q8_0"]).ok();
    assert_eq!(names(root), ["q.gguf", "tiny.gguf"]);
    // The result is a whole file: lever loads its weights and generates with it (`tokenize`
    // would read only the vocabulary).
    let out = lever(
        root,
        &[
            "ask",
            "hi",
            "-m",
            "q.gguf",
            "--raw",
            "--max-tokens",
            "2",
            "--json",
        ],
    )
    .ok();
    assert!(out.json()["text"].is_string());
}

fn task(root: &Path, name: &str) {
    std::fs::write(
        root.join("qa.jsonl"),
        "{\"q\": \"2+2?\", \"a\": \"4\"}\n{\"q\": \"3+3?\", \"a\": \"6\"}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("t.toml"),
        format!(
            "name = {name:?}\n[data]\ntest = \"qa.jsonl\"\n[prompt]\ntemplate = \"Q: {{{{ q }}}}\\nA:\"\ntarget = \"{{{{ a }}}}\"\n[metric]\nname = \"exact_match\"\n[generation]\nmax_tokens = 2\n[fewshot]\nformat = \"block\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn eval_out_is_never_overwritten_and_a_task_name_cannot_leave_runs() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let model = tiny(root);
    task(root, "tiny-qa");
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "t.toml", "-m", &model, "--no-cache", "--json"];
        args.extend_from_slice(extra);
        lever(root, &args)
    };
    // Each run gets its own folder under runs/.
    eval(&[]).ok();
    eval(&[]).ok();
    assert_eq!(
        names(&root.join("runs")),
        ["eval-tiny-qa", "eval-tiny-qa-2"]
    );
    assert!(root.join("runs/eval-tiny-qa-2/summary.json").is_file());

    // --out that holds files: refused before any work, kept; --force replaces it.
    std::fs::create_dir(root.join("results")).unwrap();
    std::fs::write(root.join("results/keep.txt"), "mine").unwrap();
    let e = eval(&["--out", "results"]).failed_alone();
    assert!(e.contains("results") && e.contains("--force"), "{e}");
    assert!(root.join("results/keep.txt").is_file());
    eval(&["--out", "results", "--force"]).ok();
    assert_eq!(
        names(&root.join("results")),
        ["summary.json", "test-0-shot.jsonl"]
    );

    // A name that climbs out of runs/ is refused, and nothing is written.
    task(root, "../../escape");
    let e = eval(&[]).failed_alone();
    assert!(e.contains("t.toml") && e.contains("name"), "{e}");
    assert!(!root.parent().unwrap().join("escape").exists());
}

#[test]
fn small_refusals_are_one_line_or_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    // ask -n 0 asks for nothing: a usage error.
    let out = lever(root, &["ask", "hi", "-n", "0"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    // --adapter is offered only where an adapter is applied.
    for args in [
        &["tokenize", "hi", "--adapter", "a"][..],
        &["finetune", "--data", "d.jsonl", "--adapter", "a"],
        &["eval", "retrieval", "dir", "--adapter", "a"],
    ] {
        let out = lever(root, args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("--adapter"), "{}", out.stderr);
    }
    // A saved conversation with a role the chat template does not know.
    std::fs::write(
        root.join("c.json"),
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}"#,
    )
    .unwrap();
    let e = lever(root, &["chat", "--load", "c.json"]).failed_alone();
    assert!(
        e.contains("c.json") && e.contains("messages[1]") && e.contains("robot"),
        "{e}"
    );
}

#[test]
fn progress_goes_to_a_log_as_lines_when_stderr_is_not_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let text = common::shared_data("tinyshakespeare/input.txt");
    let text = text.display().to_string();
    let out = lever_in_env(
        d.path(),
        &["perplexity", &text, "--ctx", "128", "--chunks", "12"],
        &[("LEVER_PROGRESS_EVERY", "0.05")],
    )
    .ok();
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("perplexity chunks: "))
        .unwrap_or_else(|| panic!("no progress line in {}", out.stderr));
    assert!(line.contains("/s") && line.contains("elapsed"), "{line}");
}

/// The README's first command, as a new user runs it: a right answer, no loop.
#[test]
fn the_first_command_answers_the_capital_of_france() {
    let d = tempfile::tempdir().unwrap();
    let out = lever(
        d.path(),
        &["ask", "What is the capital of France?", "--json"],
    )
    .ok();
    let v = out.json();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["finish_reason"], "eog", "{v}");
    // The model card's settings, not greedy decoding (which loops on this question).
    let t = v["sampling"]["temperature"].as_f64().unwrap();
    assert!((t - 0.2).abs() < 1e-6, "{v}");
    assert!(
        v["sampling"]["defaults_from"]
            .as_str()
            .unwrap()
            .starts_with("the SmolLM2 model card"),
        "{v}"
    );
}
