//! The result cache: what the model answered (or the choices' log-likelihoods) for an exact
//! prompt under exact parameters, so that re-running an evaluation, or a comparison that
//! shares settings with an earlier one, skips the model.
//!
//! One append-only JSONL file per model (`<dir>/<model key>.jsonl`), one `{"k": key, "v": …}`
//! line per result, flushed as it is written. A line cut short by a crash is ignored when the
//! file is read, so an interrupted run loses at most its last result.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub struct Cache {
    path: PathBuf,
    entries: HashMap<String, Value>,
    file: Option<File>,
    pub hits: usize,
}

impl Cache {
    /// Open (or start) the cache of `model_key` under `dir`.
    pub fn open(dir: &Path, model_key: &str) -> Result<Cache> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| Error::Io { path, err }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(format!(
            "{}.jsonl",
            format!("{:x}", Sha256::digest(model_key))[..24].to_owned()
        ));
        let mut entries = HashMap::new();
        if path.exists() {
            let text = std::fs::read(&path).map_err(io(&path))?;
            for line in String::from_utf8_lossy(&text).lines() {
                if let Ok(Value::Object(mut o)) = serde_json::from_str::<Value>(line)
                    && let (Some(Value::String(k)), Some(v)) = (o.remove("k"), o.remove("v"))
                {
                    entries.insert(k, v);
                }
            }
        }
        Ok(Cache {
            path,
            entries,
            file: None,
            hits: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&mut self, key: &str) -> Option<Value> {
        let v = self.entries.get(key).cloned();
        if v.is_some() {
            self.hits += 1;
        }
        v
    }

    pub fn put(&mut self, key: String, value: Value) -> Result<()> {
        let io = |err| Error::Io {
            path: self.path.clone(),
            err,
        };
        if self.file.is_none() {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(io)?;
            // A torn last line from an earlier crash must not swallow the next entry.
            if f.metadata().map_err(io)?.len() > 0 {
                f.write_all(b"\n").map_err(io)?;
            }
            self.file = Some(f);
        }
        let line = serde_json::json!({"k": key, "v": value}).to_string();
        if let Some(f) = self.file.as_mut() {
            f.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        }
        self.entries.insert(key, value);
        Ok(())
    }
}

/// The cache key of a request: a hash of everything that determines the answer.
pub fn key(parts: &Value) -> String {
    format!("{:x}", Sha256::digest(parts.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Cache::open(d.path(), "model-a").unwrap();
        c.put(
            key(&serde_json::json!(["p1"])),
            serde_json::json!({"text": "x"}),
        )
        .unwrap();
        let path = c.path().to_path_buf();
        drop(c);
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"k\": \"abc\", \"v\": {\"te").unwrap();
        drop(f);
        let mut c = Cache::open(d.path(), "model-a").unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.get(&key(&serde_json::json!(["p1"]))).unwrap()["text"],
            "x"
        );
        c.put(key(&serde_json::json!(["p2"])), serde_json::json!(2))
            .unwrap();
        drop(c);
        let mut c = Cache::open(d.path(), "model-a").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key(&serde_json::json!(["p2"]))).unwrap(), 2);
        assert_eq!(c.hits, 1);
        // Another model has its own file.
        assert!(Cache::open(d.path(), "model-b").unwrap().is_empty());
    }
}
