//! The ladder's report page in a real browser: `lever ladder --report-only DIR` writes
//! DIR/report.html from a fixed ladder.json, and headless Chromium (Debian's `chromium`)
//! opens it: its scripts run without a console message, it marks itself ready, its two charts
//! are laid out with something in them, and a screenshot is taken. A page with a broken script
//! is opened too, to show that the console check catches one.
//!
//! Chromium is needed: the test fails without it, unless LEVER_SKIP_BROWSER=1.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lever_in;
use serde_json::{Value, json};

/// A ladder.json as `lever ladder` writes it: four rungs on five items, two of them sharing a
/// LoRA training, and an answer that holds markup.
fn ladder_json() -> Value {
    let a = |output: &str, right: bool| json!({"output": output, "score": f64::from(u8::from(right)), "right": right});
    let lora: Vec<[f64; 2]> = (1..=40)
        .map(|s| [f64::from(s), 2.6 * (-f64::from(s) / 25.0).exp() + 0.9])
        .collect();
    let rung = |name: &str, score: f64, ci: [f64; 2], seconds: f64, cost: Value| {
        json!({"name": name, "score": score, "ci": ci, "n": 5, "seconds": seconds,
               "metric": "contains", "cost": cost})
    };
    let mut rungs = vec![
        rung(
            "zero-shot",
            0.2,
            [0.0, 0.6],
            6.1,
            json!({"eval_s": 6.1, "latency_p50_ms": 1150.0, "latency_p95_ms": 1720.0,
                   "prompt_tokens_per_query": 41.0, "peak_rss_mb": 402.0, "money": 0.00017}),
        ),
        rung(
            "rag",
            0.6,
            [0.2, 1.0],
            71.0,
            json!({"eval_s": 9.0, "index_build_s": 62.0, "index_mb": 4.2,
                   "retrieval_ms_per_query": 12.0, "latency_p50_ms": 1600.0,
                   "latency_p95_ms": 2300.0, "prompt_tokens_per_query": 390.0,
                   "peak_rss_mb": 520.0, "money": 0.00197}),
        ),
        rung(
            "lora",
            0.4,
            [0.0, 0.8],
            412.0,
            json!({"eval_s": 7.0, "train_s": 405.0, "train_seconds": 398.0,
                   "train_tokens": 25600, "train_steps": 40, "latency_p50_ms": 1200.0,
                   "latency_p95_ms": 1800.0, "prompt_tokens_per_query": 41.0,
                   "peak_rss_mb": 1900.0, "money": 0.0114}),
        ),
        rung(
            "lora-rag",
            0.8,
            [0.4, 1.0],
            71.5,
            json!({"eval_s": 9.5, "index_build_s": 62.0, "index_mb": 4.2,
                   "train_seconds": 398.0, "train_tokens": 25600, "train_steps": 40,
                   "latency_p50_ms": 1650.0, "latency_p95_ms": 2350.0,
                   "prompt_tokens_per_query": 390.0, "peak_rss_mb": 610.0, "money": 0.00199}),
        ),
    ];
    for (r, below) in rungs.iter_mut().skip(1).zip(["zero-shot", "rag", "lora"]) {
        r["vs_below"] = json!({"rung": below, "gain": 0.2, "ci": [-0.2, 0.6],
                               "significant": false});
    }
    rungs[2]["loss_curve"] = json!(lora);
    rungs[3]["loss_curve"] = json!(lora);
    let item = |id: usize, q: &str, gold: &str, answers: [Value; 4]| {
        let names = ["zero-shot", "rag", "lora", "lora-rag"];
        let answers: serde_json::Map<String, Value> =
            names.iter().map(|n| n.to_string()).zip(answers).collect();
        json!({"id": format!("test.jsonl:{id}"),
               "question": format!("Answer with a short phrase only.\nQuestion: {q}"),
               "gold": gold, "answers": answers})
    };
    json!({
        "ladder": "squad.toml", "task": "squad-open", "split": "test", "metric": "contains",
        "out": "out", "price_per_hour": 0.1, "currency": "USD",
        "rungs": rungs,
        "items": [
            item(1, "Who developed the lithium-ion battery?", "John B. Goodenough",
                 [a("Sony", false), a("John B. Goodenough", true), a("Akira Yoshino", false),
                  a("John Goodenough", true)]),
            item(2, "What is the capital of France?", "Paris",
                 [a("Paris", true), a("Paris", true), a("Paris", true), a("Paris", true)]),
            item(3, "Which tag starts a script?", "<script>",
                 [a("<script>throw new Error('injected')</script>", false), a("<script>", true),
                  a("", false), a("<script>", true)]),
            item(4, "Who wrote Hamlet?", "William Shakespeare",
                 [a("Christopher Marlowe", false), a("Shakespeare", false),
                  a("William Shakespeare", true), a("William Shakespeare", true)]),
            item(5, "What is 2 & 3 in binary AND?", "2",
                 [a("5", false), a("1", false), a("0", false), a("3", false)]),
        ],
        "verdict": {"best": "lora-rag", "use": "rag",
                    "text": "use `rag`: not significantly below the best (`lora-rag`) on these 5 items, and cheaper (71 s vs 72 s)",
                    "next": {"rung": "full fine-tuning", "method": "full", "steps": 40,
                             "planned_s": 2400.0, "planned_cost": 0.0667, "calibrated": true}},
    })
}

/// Chromium on PATH; without it the test fails, unless LEVER_SKIP_BROWSER=1.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("chromium"))
            .find(|c| c.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("LEVER_SKIP_BROWSER").as_deref() == Ok("1"),
            "chromium is not installed: `apt-get install chromium` (Debian's package; .ci/run \
             installs it), or set LEVER_SKIP_BROWSER=1 to skip the browser test"
        );
        eprintln!("LEVER_SKIP_BROWSER=1: the report is not opened in a browser");
    }
    found
}

/// What headless Chromium made of a page: the DOM after its scripts ran, and the page's
/// console lines (Chromium logs each `console.*` call and each uncaught error as a `CONSOLE`
/// line on stderr, all at level INFO; the report writes none).
struct Browsed {
    dom: String,
    console: Vec<String>,
}

/// Runs headless Chromium on `page` with `args`, its profile in `work`, at most a minute.
fn run_chromium(chrome: &Path, work: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let profile = tempfile::tempdir_in(work).unwrap();
    let out_path = work.join("chromium.out");
    let err_path = work.join("chromium.err");
    let mut child = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("chromium took over a minute on {}", page.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert!(status.success(), "chromium: {status}\n{stderr}");
    (stdout, stderr)
}

fn browse(chrome: &Path, work: &Path, page: &Path) -> Browsed {
    let (dom, stderr) = run_chromium(chrome, work, page, &["--dump-dom"]);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    Browsed { dom, console }
}

#[test]
fn the_report_renders_in_chromium_without_console_errors() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(
        out.join("ladder.json"),
        serde_json::to_string_pretty(&ladder_json()).unwrap(),
    )
    .unwrap();
    let r = lever_in(d, &["ladder", "--report-only", "out"]).ok();
    assert!(r.stderr.contains("report.html"), "{}", r.stderr);
    let page = out.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(
        !html.contains("<script>throw"),
        "an answer's markup is text"
    );

    let Some(chrome) = chromium() else { return };
    let b = browse(&chrome, d, &page);
    assert!(b.console.is_empty(), "console: {:#?}", b.console);
    assert!(b.dom.contains("data-ready=\"1\""), "not ready: {}", b.dom);
    assert!(
        b.dom.contains("data-charts=\"2\""),
        "charts drawn: {}",
        b.dom
    );
    assert_eq!(b.dom.matches("<circle class=\"point\"").count(), 4);
    // One line for the training that lora and lora-rag share, of its 40 steps.
    let at = b.dom.find("<polyline class=\"loss\" points=\"").unwrap();
    let points = b.dom[at..].split('"').nth(3).unwrap();
    assert_eq!(points.split(' ').count(), 40, "{points}");
    assert_eq!(b.dom.matches("<polyline class=\"loss\"").count(), 1);
    // The script hid the item every rung got right; the one they all got wrong too.
    assert_eq!(b.dom.matches("<tr data-disagree=\"1\">").count(), 3);
    assert_eq!(
        b.dom
            .matches("<tr data-disagree=\"0\" hidden=\"\">")
            .count(),
        2
    );
    assert!(
        b.dom
            .contains("&lt;script&gt;throw new Error('injected')&lt;/script&gt;")
    );

    // The check can fail: the same page with its script broken logs an uncaught error and
    // never marks itself ready.
    let broken = d.join("broken.html");
    std::fs::write(
        &broken,
        html.replace("var rows = ", "var rows = notDefined.x || "),
    )
    .unwrap();
    let b = browse(&chrome, d, &broken);
    assert!(
        b.console
            .iter()
            .any(|l| l.contains("Uncaught ReferenceError: notDefined is not defined")),
        "{:#?}",
        b.console
    );
    assert!(!b.dom.contains("data-ready=\"1\""));

    // A screenshot of the whole page, kept in the target folder to look at.
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ladder-report.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &chrome,
        d,
        &page,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,2400",
            "--hide-scrollbars",
        ],
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 60_000,
        "a screenshot of {} bytes",
        bytes.len()
    );
    eprintln!(
        "screenshot {} ({} KB); {:.1} s",
        png.display(),
        bytes.len() / 1024,
        started.elapsed().as_secs_f64()
    );
}

/// `--report-only` on a folder that is not a ladder's: one line naming the file, exit 1;
/// with a ladder file as well: a usage error.
#[test]
fn report_only_needs_a_ladders_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = lever_in(d, &["ladder", "--report-only", "nowhere"]).failed_alone();
    assert!(e.contains("nowhere/ladder.json: cannot be read"), "{e}");
    std::fs::create_dir(d.join("other")).unwrap();
    std::fs::write(d.join("other/ladder.json"), "{\"model\": 1}").unwrap();
    let e = lever_in(d, &["ladder", "--report-only", "other"]).failed_alone();
    assert!(e.contains("other/ladder.json: no \"rungs\""), "{e}");
    assert!(!d.join("other/report.html").exists());
    let out = lever_in(d, &["ladder", "l.toml", "--report-only", "other"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}
