//! Shared helpers for lever's integration tests.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

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
    let out = Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
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
