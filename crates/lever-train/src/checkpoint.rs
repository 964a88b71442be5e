//! Checkpoints worth trusting: how a checkpoint folder is sealed, checked, found and kept.
//!
//! ```text
//! RUN/checkpoints/
//!   last/             the newest checkpoint (state.safetensors, trainer.json, complete.json)
//!   step-000250/      snapshots of `last` (hard links, no copy): --keep N newest, and every
//!                     multiple of --keep-every M forever (llm.c's -nk and -nm)
//! ```
//!
//! A checkpoint is written into a temporary folder, every file fsynced, then renamed into place
//! (`lever_model::fsutil::write_atomic`), so a kill leaves the old one or the new one. Inside
//! it, `complete.json` is written last: the step and the sha256 of every other file. A folder
//! without it, or whose files do not hash to what it says (a disk that lost or flipped bits,
//! a copy cut short, a file edited by hand), is not a checkpoint: [`newest_good`] skips it for
//! the one before it and says why, so that a resumed run never starts from damaged weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The completion marker, written last into a checkpoint folder.
pub const MARKER: &str = "complete.json";

/// What `complete.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    /// Optimizer steps done when the checkpoint was taken.
    step: u64,
    /// Seconds since the Unix epoch when it was sealed.
    saved_unix: f64,
    /// sha256 (hex) of every other file of the folder, by name.
    sha256: BTreeMap<String, String>,
}

/// A checkpoint that passed [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct Good {
    pub dir: PathBuf,
    pub step: u64,
    /// When it was sealed (seconds since the Unix epoch).
    pub saved_unix: f64,
}

/// A checkpoint folder that was passed over, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub dir: PathBuf,
    pub problem: String,
}

fn bad(dir: &Path, problem: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: dir.to_path_buf(),
        problem: problem.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

pub(crate) fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seal the checkpoint being written in `tmp`: hash every file in it and write
/// `complete.json` last. Errors name `target`, the folder the user will see.
pub(crate) fn seal(tmp: &Path, target: &Path, step: u64) -> Result<()> {
    let mut sha256 = BTreeMap::new();
    for entry in std::fs::read_dir(tmp).map_err(io(target))? {
        let path = entry.map_err(io(target))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == MARKER {
            continue;
        }
        let hash = lever_model::registry::sha256_file(&path).map_err(io(&target.join(&name)))?;
        sha256.insert(name, hash);
    }
    let marker = Marker {
        step,
        saved_unix: now_unix(),
        sha256,
    };
    let text = serde_json::to_string_pretty(&marker).unwrap_or_default() + "\n";
    std::fs::write(tmp.join(MARKER), text).map_err(io(&target.join(MARKER)))
}

/// Check a checkpoint folder: its `complete.json` is there and every file it lists hashes to
/// what it says. The error says what is wrong, naming the folder.
pub fn verify(dir: &Path) -> Result<Good> {
    let marker = read_marker(dir)?;
    for (name, want) in &marker.sha256 {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(bad(dir, format!("{name} is missing (torn)")));
        }
        let got = lever_model::registry::sha256_file(&path).map_err(io(&path))?;
        if &got != want {
            return Err(bad(
                dir,
                format!(
                    "{name} has sha256 {}…, {MARKER} says {}… (corrupt)",
                    &got[..12],
                    &want[..12.min(want.len())]
                ),
            ));
        }
    }
    Ok(Good {
        dir: dir.to_path_buf(),
        step: marker.step,
        saved_unix: marker.saved_unix,
    })
}

fn read_marker(dir: &Path) -> Result<Marker> {
    let path = dir.join(MARKER);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(dir, format!("no {MARKER}: never completed (torn)"))
        } else {
            Error::Io {
                path: path.clone(),
                source: e,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| bad(dir, format!("{MARKER} is not valid: {e}")))
}

/// The step a checkpoint folder claims to hold, from its marker or its trainer.json, without
/// checking anything; None when neither can be read.
fn claimed_step(dir: &Path) -> Option<u64> {
    if let Ok(m) = read_marker(dir) {
        return Some(m.step);
    }
    let text = std::fs::read_to_string(dir.join("trainer.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("step")?
        .as_u64()
}

/// `step-NNNNNN` → N.
fn snapshot_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The snapshots under `root` (checkpoints/), by step, oldest first.
fn snapshots(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((snapshot_step(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    out.sort();
    out
}

/// Whether `root` holds anything that might be a checkpoint (`last` or a snapshot), checked
/// or not. A `last` that a killed writer had moved aside is put back first.
pub fn any(root: &Path) -> bool {
    let last = root.join("last");
    lever_model::fsutil::recover(&last);
    last.is_dir() || !snapshots(root).is_empty()
}

/// The newest checkpoint under `root` (`last` and `step-*`) that passes [`verify`], looking
/// only at those older than step `before` when given; the newer ones that failed come back
/// in `skipped`, newest first. `last` counts as the newest at its step: its claimed step
/// (unverified) orders it, or it is tried first when it claims none.
pub fn newest_good(root: &Path, before: Option<u64>) -> (Option<Good>, Vec<Skipped>) {
    let last = root.join("last");
    lever_model::fsutil::recover(&last);
    let mut candidates: Vec<(u64, u8, PathBuf)> = snapshots(root)
        .into_iter()
        .map(|(s, p)| (s, 0, p))
        .collect();
    if last.is_dir() {
        candidates.push((claimed_step(&last).unwrap_or(u64::MAX), 1, last));
    }
    // Newest first; at the same step `last` before its snapshot.
    candidates.sort_by_key(|c| std::cmp::Reverse((c.0, c.1)));
    let mut skipped = Vec::new();
    for (claimed, _, dir) in candidates {
        if before.is_some_and(|b| claimed >= b && claimed != u64::MAX) {
            continue;
        }
        match verify(&dir) {
            Ok(good) if before.is_some_and(|b| good.step >= b) => {}
            Ok(good) => return (Some(good), skipped),
            Err(e) => skipped.push(Skipped {
                dir: dir.clone(),
                problem: match e {
                    Error::Checkpoint { problem, .. } => problem,
                    e => e.to_string(),
                },
            }),
        }
    }
    (None, skipped)
}

/// After `last` was written at `step`: snapshot it as `step-NNNNNN` (hard links to its files,
/// no copy) when `keep` > 0 or `step` is a multiple of `keep_every`, then remove the
/// snapshots beyond the `keep` newest, except multiples of `keep_every`, which stay.
pub fn snapshot_and_prune(root: &Path, step: u64, keep: usize, keep_every: u64) -> Result<()> {
    let major = |s: u64| keep_every > 0 && s.is_multiple_of(keep_every);
    if keep == 0 && !major(step) {
        return Ok(());
    }
    let last = root.join("last");
    let snap = root.join(format!("step-{step:06}"));
    lever_model::fsutil::write_atomic(&snap, |tmp| -> Result<()> {
        std::fs::create_dir(tmp).map_err(io(&snap))?;
        for e in std::fs::read_dir(&last).map_err(io(&last))? {
            let e = e.map_err(io(&last))?;
            std::fs::hard_link(e.path(), tmp.join(e.file_name())).map_err(io(&snap))?;
        }
        Ok(())
    })?;
    let minor: Vec<PathBuf> = snapshots(root)
        .into_iter()
        .filter(|(s, _)| !major(*s))
        .map(|(_, p)| p)
        .collect();
    let excess = minor.len().saturating_sub(keep);
    for old in &minor[..excess] {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A sealed checkpoint at `step` in root/name, written as `save_state` writes one.
    fn write(root: &Path, name: &str, step: u64) -> PathBuf {
        let dir = root.join(name);
        lever_model::fsutil::write_atomic(&dir, |tmp| -> Result<()> {
            std::fs::create_dir(tmp).unwrap();
            std::fs::write(tmp.join("state.safetensors"), vec![step as u8; 1000]).unwrap();
            std::fs::write(tmp.join("trainer.json"), format!("{{\"step\": {step}}}")).unwrap();
            seal(tmp, &dir, step)
        })
        .unwrap();
        dir
    }

    fn flip_a_byte(path: &Path) {
        let mut b = std::fs::read(path).unwrap();
        b[500] ^= 0x40;
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn a_sealed_checkpoint_verifies_and_a_flipped_byte_or_missing_marker_does_not() {
        let d = tempfile::tempdir().unwrap();
        let dir = write(d.path(), "last", 7);
        let good = verify(&dir).unwrap();
        assert_eq!(good.step, 7);
        assert!(good.saved_unix > 1.6e9);
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(MARKER)).unwrap()).unwrap();
        assert_eq!(m["sha256"].as_object().unwrap().len(), 2);

        flip_a_byte(&dir.join("state.safetensors"));
        let e = verify(&dir).unwrap_err().to_string();
        assert!(
            e.contains("state.safetensors has sha256") && e.contains("(corrupt)"),
            "{e}"
        );
        std::fs::remove_file(dir.join(MARKER)).unwrap();
        let e = verify(&dir).unwrap_err().to_string();
        assert!(e.contains("no complete.json"), "{e}");
        let dir = write(d.path(), "other", 3);
        std::fs::remove_file(dir.join("trainer.json")).unwrap();
        let e = verify(&dir).unwrap_err().to_string();
        assert!(e.contains("trainer.json is missing"), "{e}");
    }

    #[test]
    fn the_newest_good_one_wins_and_newer_broken_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert_eq!(newest_good(root, None), (None, vec![]));
        assert!(!any(root));
        for s in [4, 5, 6] {
            write(root, &format!("step-{s:06}"), s);
        }
        let last = write(root, "last", 6);
        assert!(any(root));
        let (good, skipped) = newest_good(root, None);
        assert_eq!(good.unwrap().dir, last);
        assert!(skipped.is_empty());

        // `last` and step 6 broken: step 5, both named, newest first.
        flip_a_byte(&last.join("state.safetensors"));
        std::fs::remove_file(root.join("step-000006").join(MARKER)).unwrap();
        let (good, skipped) = newest_good(root, None);
        assert_eq!(good.unwrap().step, 5);
        let names: Vec<_> = skipped.iter().map(|s| s.dir.clone()).collect();
        assert_eq!(names, [last.clone(), root.join("step-000006")]);

        // Before step 5: step 4, and nothing newer is inspected.
        let (good, skipped) = newest_good(root, Some(5));
        assert_eq!(good.unwrap().step, 4);
        assert!(skipped.is_empty());

        // A `last` that claims no step (its marker and trainer.json gone) is tried first.
        std::fs::remove_file(last.join(MARKER)).unwrap();
        std::fs::remove_file(last.join("trainer.json")).unwrap();
        let (good, skipped) = newest_good(root, None);
        assert_eq!(good.unwrap().step, 5);
        assert_eq!(skipped[0].dir, last);
    }

    #[test]
    fn keep_keeps_the_newest_and_keep_every_keeps_its_multiples_forever() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for s in 1..=11 {
            write(root, "last", s);
            snapshot_and_prune(root, s, 2, 4).unwrap();
        }
        let names = |root: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(root),
            [
                "last",
                "step-000004",
                "step-000008",
                "step-000010",
                "step-000011"
            ]
        );
        // A snapshot is the checkpoint's files, verified as such.
        assert_eq!(verify(&root.join("step-000008")).unwrap().step, 8);

        // --keep 0 --keep-every 3: only the multiples.
        let d = tempfile::tempdir().unwrap();
        for s in 1..=7 {
            write(d.path(), "last", s);
            snapshot_and_prune(d.path(), s, 0, 3).unwrap();
        }
        assert_eq!(names(d.path()), ["last", "step-000003", "step-000006"]);
    }
}
