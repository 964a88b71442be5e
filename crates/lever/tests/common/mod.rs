//! Shared helpers for lever's integration tests.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lever_model::{Model, registry};

/// The default generator, provisioned into $LEVER_HOME (or ~/.cache/lever) on first use.
pub fn default_model() -> Model {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    Model::load(&source, &candle_core::Device::Cpu).expect("load the default model")
}

pub fn fixture(rel: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// ../shared/data beside the repository.
pub fn shared_data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel)
}

/// `lever pretrain`'s test data: the first `bytes` of tinyshakespeare, a `kind` tokenizer
/// (char, or bpe of 300 tokens) and shards (90/10, as nanoGPT's prepare.py) in `dir`;
/// returns the shard folder.
pub fn pretrain_shards(dir: &Path, bytes: usize, kind: &str) -> PathBuf {
    let text = std::fs::read_to_string(shared_data("tinyshakespeare/input.txt")).unwrap();
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= bytes)
        .unwrap_or(text.len());
    std::fs::write(dir.join("corpus.txt"), &text[..cut]).unwrap();
    let mut args = vec![
        "tokenizer",
        "train",
        "corpus.txt",
        "--kind",
        kind,
        "--out",
        "tok",
    ];
    if kind == "bpe" {
        args.extend(["--vocab-size", "300"]);
    }
    lever_in(dir, &args).ok();
    lever_in(
        dir,
        &[
            "data",
            "shard",
            "corpus.txt",
            "--tokenizer",
            "tok/tokenizer.json",
            "--val-fraction",
            "0.1",
            "--out",
            "shards",
        ],
    )
    .ok();
    dir.join("shards")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A finished `lever` process.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stderr:\n{}", self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: stdout {:?}", self.stdout))
    }

    /// Exit 1, no panic, and an `error: ` line last on stderr (after any progress lines),
    /// which is returned.
    pub fn failed(&self) -> String {
        assert_eq!(self.code, 1, "stderr:\n{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        let line = self.stderr.trim().lines().last().unwrap_or_default();
        assert!(line.starts_with("error: "), "{}", self.stderr);
        line.to_string()
    }

    /// As [`Out::failed`], and the error is all stderr holds.
    pub fn failed_alone(&self) -> String {
        let line = self.failed();
        assert_eq!(self.stderr.trim().lines().count(), 1, "{}", self.stderr);
        line
    }
}

/// Runs the lever binary in `dir` with `args`, stdin closed and the model, embedder and index
/// environment variables removed (so a developer's settings do not leak into tests).
pub fn lever_in(dir: &Path, args: &[&str]) -> Out {
    lever_in_env(dir, args, &[])
}

/// `lever_in` with extra environment variables.
pub fn lever_in_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .env_remove("LEVER_MODEL")
        .env_remove("LEVER_EMBEDDER")
        .env_remove("LEVER_INDEX")
        .stdin(Stdio::null())
        .output()
        .expect("run lever");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `lever serve` on a free loopback port; killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_lever"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .current_dir(dir)
            .env_remove("LEVER_MODEL")
            .env_remove("LEVER_EMBEDDER")
            .env_remove("LEVER_API_KEY")
            .env_remove("LEVER_PACKED")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lever serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(addr);
                }
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("lever serve did not start: {}", log.lock().unwrap()));
        Server { child, addr, log }
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> i32 {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
        self.child.wait().expect("wait").code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process ids whose parent is `pid` (Linux: /proc/*/stat).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, the last ')' ends it.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let mut fields = after.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(pid.to_string().as_str()) && state != Some("Z") {
            out.push(child);
        }
    }
    out
}

/// The JSON lines of a file (none when it is missing: a log not written yet).
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A training run's RUN/metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    jsonl(&run.join("metrics.jsonl"))
}

/// (step, value) of every metrics line with `key` (`loss`, `val_loss`, ...).
pub fn series(run: &Path, key: &str) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?)))
        .collect()
}

/// (step, training loss) of every step.
pub fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    series(run, "loss")
}
