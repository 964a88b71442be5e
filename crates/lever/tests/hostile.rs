//! Hostile and broken model files (issue 16, item 4) and oversubscribed threads (item 7): copies
//! of the real default model (SmolLM2-135M-Instruct Q4_1) with one metadata value or weight
//! changed, each run through the real binary. Each must fail with exit code 1 and one error
//! line naming the problem, within 20 s and under 2 GB of peak resident memory (the child's
//! own, from `wait4`), where before they allocated 512 GB, ran for hours or printed NaN.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lever_model::registry;
use tempfile::TempDir;

const MAX_SECS: f64 = 20.0;
const MAX_RSS_MB: f64 = 2048.0;
/// A run still going after this is killed (and fails its test).
const KILL_AFTER: Duration = Duration::from_secs(120);

/// The default generator's GGUF, resolved as the other tests resolve it.
fn generator() -> PathBuf {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    source.path().to_path_buf()
}

/// A copy of the default model in `dir` with its metadata edited.
fn with_meta(dir: &Path, name: &str, edit: impl FnOnce(&mut BTreeMap<String, Value>)) -> PathBuf {
    let dst = dir.join(name);
    lever_model::testing::rewrite_gguf(&generator(), &dst, edit, |_| Ok(())).unwrap();
    dst
}

/// A finished run: exit code (None when killed by a signal), stderr, wall time, peak RSS.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    secs: f64,
    peak_rss_mb: f64,
}

impl Run {
    /// Exit 1 within the bounds, and stderr is one `error:` line holding every needle.
    #[track_caller]
    fn one_line_error(&self, needles: &[&str]) -> String {
        assert_eq!(self.code, Some(1), "stderr:\n{}", self.stderr);
        self.within_bounds();
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "one line expected:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        for n in needles {
            assert!(lines[0].contains(n), "error line lacks {n:?}: {}", lines[0]);
        }
        lines[0].to_string()
    }

    #[track_caller]
    fn within_bounds(&self) {
        eprintln!(
            "{:.2} s, peak RSS {:.0} MB: {}",
            self.secs,
            self.peak_rss_mb,
            self.stderr.trim()
        );
        assert!(self.secs < MAX_SECS, "took {:.1} s", self.secs);
        assert!(
            self.peak_rss_mb < MAX_RSS_MB,
            "peak RSS {:.0} MB",
            self.peak_rss_mb
        );
    }
}

/// Run `lever ARGS` in `dir`; its peak RSS comes from `wait4`'s resource usage (the child is
/// reaped by `wait4`, not by `Child::wait`).
#[allow(unsafe_code, clippy::zombie_processes)]
fn lever(dir: &Path, args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .current_dir(dir)
        .env_remove("LEVER_MODEL")
        .env_remove("LEVER_THREADS")
        .env_remove("RAYON_NUM_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lever");
    let t0 = Instant::now();
    let pid = child.id() as libc::pid_t;
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).ok();
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            while t0.elapsed() < KILL_AFTER {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !done.load(Ordering::SeqCst) {
                // SAFETY: the child is not reaped yet (`done` is set only after wait4).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data (integers and timevals), for which all zeros is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not reaped yet (nothing else waits on it); `status` and
    // `usage` are valid for writes for the duration of the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    done.store(true, Ordering::SeqCst);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4");
    watchdog.join().unwrap();
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        secs,
        // ru_maxrss is in KiB on Linux.
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
    }
}

fn tmp() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Regression: a context of 0xFFFFFFFF made the RoPE tables allocate 512 GB (abort).
#[test]
fn context_length_of_4_billion_is_refused_by_key() {
    let d = tmp();
    with_meta(d.path(), "ctx.gguf", |m| {
        m.insert("llama.context_length".into(), Value::U32(0xFFFF_FFFF));
    });
    lever(d.path(), &["ask", "Hi", "--model", "ctx.gguf", "-n", "3"]).one_line_error(&[
        "ctx.gguf",
        "`llama.context_length`",
        "4294967295",
    ]);
}

/// A large context that is accepted costs only the positions used: the RoPE tables grow on
/// demand (before, 8M positions took 4 GB of tables up front).
#[test]
fn a_large_accepted_context_allocates_only_what_is_used() {
    let d = tmp();
    with_meta(d.path(), "ctx8m.gguf", |m| {
        m.insert("llama.context_length".into(), Value::U32(1 << 23));
    });
    let run = lever(
        d.path(),
        &["ask", "Hi", "--model", "ctx8m.gguf", "-n", "3", "--json"],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.within_bounds();
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["completion_tokens"], 3, "{v}");
}

/// Regression: zero layers loaded and "answered" from the embeddings alone.
#[test]
fn block_count_zero_is_refused_by_key() {
    let d = tmp();
    with_meta(d.path(), "layers.gguf", |m| {
        m.insert("llama.block_count".into(), Value::U32(0));
    });
    lever(d.path(), &["ask", "Hi", "--model", "layers.gguf"]).one_line_error(&[
        "layers.gguf",
        "`llama.block_count`",
        "0 is not between 1 and",
    ]);
}

/// Regression: a negative RMS epsilon loaded (NaN from the square root of a negative mean).
#[test]
fn negative_rms_epsilon_is_refused_by_key() {
    let d = tmp();
    with_meta(d.path(), "eps.gguf", |m| {
        m.insert(
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(-1e-5),
        );
    });
    lever(d.path(), &["ask", "Hi", "--model", "eps.gguf"]).one_line_error(&[
        "eps.gguf",
        "`llama.attention.layer_norm_rms_epsilon`",
        "-0.00001",
    ]);
    // And a RoPE base that is not a number.
    with_meta(d.path(), "theta.gguf", |m| {
        m.insert("llama.rope.freq_base".into(), Value::F32(f32::NAN));
    });
    lever(d.path(), &["ask", "Hi", "--model", "theta.gguf"]).one_line_error(&[
        "theta.gguf",
        "`llama.rope.freq_base`",
        "NaN",
    ]);
}

/// Regression: a chat template of nested 100,000-step loops ran for hours.
#[test]
fn chat_template_of_nested_loops_runs_out_of_fuel() {
    let d = tmp();
    with_meta(d.path(), "loops.gguf", |m| {
        m.insert(
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
                    .into(),
            ),
        );
    });
    lever(d.path(), &["ask", "Hi", "--model", "loops.gguf"]).one_line_error(&[
        "loops.gguf",
        "chat template",
        "ran out of fuel",
    ]);
    // The same bound for a user's prompt template.
    std::fs::write(
        d.path().join("p.j2"),
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap();
    lever(d.path(), &["ask", "--template", "p.j2", "-n", "1"]).one_line_error(&[
        "p.j2",
        "prompt template",
        "ran out of fuel",
    ]);
}

/// A copy of the default model with one NaN in the first layer's attention norm.
fn nan_model(dir: &Path) -> PathBuf {
    let dst = dir.join("nan.gguf");
    lever_model::testing::rewrite_gguf(
        &generator(),
        &dst,
        |_| {},
        |ts| {
            let (_, t) = ts
                .iter_mut()
                .find(|(n, _)| n == "blk.0.attn_norm.weight")
                .expect("attn_norm");
            let mut v = t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
            v[7] = f32::NAN;
            let n = v.len();
            *t = QTensor::quantize(&Tensor::from_vec(v, n, &Device::Cpu)?, GgmlDType::F32)?;
            Ok(())
        },
    )
    .unwrap();
    dst
}

/// Regression: NaN weights gave "PPL = NaN" and exit 0, and `ask` answered with token 0
/// repeated.
#[test]
fn nan_weights_are_an_error_in_perplexity_and_ask() {
    let d = tmp();
    nan_model(d.path());
    let text = "The quick brown fox jumps over the lazy dog while the cat sleeps. ".repeat(20);
    std::fs::write(d.path().join("text.txt"), text).unwrap();
    lever(
        d.path(),
        &[
            "perplexity",
            "text.txt",
            "--model",
            "nan.gguf",
            "--ctx",
            "64",
            "--chunks",
            "1",
        ],
    )
    .one_line_error(&["text.txt", "nan.gguf", "logits after token 32 are NaN"]);
    lever(d.path(), &["ask", "Hi", "--model", "nan.gguf", "-n", "3"]).one_line_error(&[
        "nan.gguf",
        "are NaN",
        "the model's weights hold NaN",
    ]);
}

/// Regression: with more threads than cores, candle's spinning barrier pool made 3 tokens
/// take 58.6 s (2 cores, --threads 256) instead of 0.4 s.
#[test]
fn threads_above_the_core_count_warn_and_do_not_spin() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = (4 * cores).max(256).to_string();
    let d = tmp();
    let run = lever(
        d.path(),
        &["ask", "Hi", "-n", "3", "--threads", &n, "--json"],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    run.within_bounds();
    assert!(
        run.stderr.starts_with(&format!(
            "warning: {n} threads asked for, more than the {cores} cores here; using {cores}"
        )),
        "{}",
        run.stderr
    );
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["completion_tokens"], 3, "{v}");
}
