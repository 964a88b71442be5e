//! lever's one way to write a file or a folder so that a kill at any moment leaves either the
//! old one or the new one, never half of one: `fill` builds the new file or folder under a
//! temporary name beside the target, everything is fsynced, then it is renamed into place
//! and the parent folder is fsynced. A folder that already exists is moved aside first and
//! removed once the new one is in place.
//!
//! Temporary names are `.NAME.tmp-PID` and `.NAME.old-PID`. A killed run leaves them behind;
//! the next write of the same target removes those whose process is gone (and puts a folder
//! that was moved aside back, if the kill came between the two renames).

use std::path::{Path, PathBuf};

use crate::error::Error;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path: PathBuf = path.into();
    move |source| Error::Io { path, source }
}

/// The folder holding `path`; "." for a bare name (whose `parent()` is empty).
pub fn parent_or_dot(path: &Path) -> &Path {
    parent_of(path)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Write `target` (a file or a folder) atomically. `fill` gets the temporary path and must
/// create the file, or the folder and its contents, there; errors it returns should name
/// `target` (the user's path), not the temporary one. On any error the temporary is removed
/// and `target` is left as it was.
pub fn write_atomic<E: From<Error>>(
    target: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let parent = parent_of(target);
    std::fs::create_dir_all(parent).map_err(io(target))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Io {
            path: target.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    clean_stale(parent, &name, target);
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    remove_any(&tmp).map_err(io(target))?;
    let old = parent.join(format!(".{name}.old-{pid}"));
    let r = fill(&tmp).and_then(|()| commit(target, &tmp, &old).map_err(E::from));
    if r.is_err() {
        let _ = remove_any(&tmp);
    }
    r
}

fn commit(target: &Path, tmp: &Path, old: &Path) -> Result<(), Error> {
    let parent = parent_of(target);
    sync_tree(tmp).map_err(io(target))?;
    if tmp.is_dir() && target.exists() {
        // rename(2) cannot replace a non-empty folder: move the old one aside first.
        remove_any(old).map_err(io(target))?;
        std::fs::rename(target, old).map_err(io(target))?;
    }
    std::fs::rename(tmp, target).map_err(io(target))?;
    sync_dir(parent).map_err(io(target))?;
    remove_any(old).map_err(io(target))?;
    Ok(())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// fsync a file, or every file and folder under a folder.
fn sync_tree(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
        sync_dir(path)
    } else {
        std::fs::File::open(path)?.sync_all()
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // Folders can be opened and fsynced on Unix; elsewhere this is best effort.
    let r = std::fs::File::open(dir).and_then(|f| f.sync_all());
    if cfg!(unix) { r } else { Ok(()) }
}

/// Undo what a killed writer of `target` left behind, without writing anything new: its
/// temporaries are removed, and a folder it had moved aside is put back when `target` is
/// missing. A reader that finds `target` gone (a kill between the two renames of a folder)
/// calls this first.
pub fn recover(target: &Path) {
    if let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) {
        clean_stale(parent_of(target), &name, target);
    }
}

/// Remove the temporaries a killed writer of `target` left in `parent`. A folder moved aside
/// (`.NAME.old-PID`) whose target is missing is the last complete version: it is put back.
fn clean_stale(parent: &Path, name: &str, target: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let tmp_prefix = format!(".{name}.tmp-");
    let old_prefix = format!(".{name}.old-");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let (is_old, pid) = if let Some(p) = file_name.strip_prefix(&tmp_prefix) {
            (false, p)
        } else if let Some(p) = file_name.strip_prefix(&old_prefix) {
            (true, p)
        } else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if is_old && !target.exists() {
            let _ = std::fs::rename(&path, target);
        } else {
            let _ = remove_any(&path);
        }
    }
}

/// Whether a process with this id runs (Linux: /proc). Elsewhere every other process is
/// assumed alive, so nothing of a concurrent writer is ever removed.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fill_file(text: &'static str) -> impl FnOnce(&Path) -> Result<(), Error> {
        move |tmp| std::fs::write(tmp, text).map_err(io(tmp))
    }

    #[test]
    fn a_file_is_replaced_whole_and_a_failed_fill_leaves_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.json");
        write_atomic(&f, fill_file("one")).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "one");
        let r: Result<(), Error> = write_atomic(&f, |tmp| {
            std::fs::write(tmp, "half").map_err(io(tmp))?;
            Err(Error::Io {
                path: f.clone(),
                source: std::io::Error::other("disk full"),
            })
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "one");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn a_folder_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("old.txt"), "x").unwrap();
        write_atomic(&dir, |tmp| -> Result<(), Error> {
            std::fs::create_dir(tmp).map_err(io(tmp))?;
            std::fs::create_dir(tmp.join("sub")).map_err(io(tmp))?;
            std::fs::write(tmp.join("sub").join("new.txt"), "y").map_err(io(tmp))
        })
        .unwrap();
        assert!(!dir.join("old.txt").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("sub").join("new.txt")).unwrap(),
            "y"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_a_killed_writer_are_cleaned_and_a_moved_folder_restored() {
        let d = tempfile::tempdir().unwrap();
        // A pid that cannot be running (above Linux's pid_max limit).
        let dead = 4_194_399u32;
        let f = d.path().join("summary.json");
        std::fs::write(d.path().join(format!(".summary.json.tmp-{dead}")), "half").unwrap();
        write_atomic(&f, fill_file("new")).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

        // Killed between "move the old folder aside" and "rename the new one in".
        let dir = d.path().join("adapter");
        let old = d.path().join(format!(".adapter.old-{dead}"));
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("weights"), "complete").unwrap();
        std::fs::create_dir(d.path().join(format!(".adapter.tmp-{dead}"))).unwrap();
        let r: Result<(), Error> = write_atomic(&dir, |_| {
            Err(Error::Io {
                path: dir.clone(),
                source: std::io::Error::other("stop here"),
            })
        });
        assert!(r.is_err());
        assert_eq!(
            std::fs::read_to_string(dir.join("weights")).unwrap(),
            "complete"
        );
        assert!(!old.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);

        // A reader puts a folder moved aside back without writing a new one.
        std::fs::rename(&dir, &old).unwrap();
        recover(&dir);
        assert_eq!(
            std::fs::read_to_string(dir.join("weights")).unwrap(),
            "complete"
        );
        assert!(!old.exists());
    }

    #[test]
    fn errors_name_the_target_not_the_temporary() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), "x").unwrap();
        // The parent is a file: nothing can be created under it.
        let target = d.path().join("file").join("out.json");
        let e = write_atomic(&target, fill_file("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("file/out.json"), "{e}");
        assert!(!e.contains(".tmp-"), "{e}");
    }
}
