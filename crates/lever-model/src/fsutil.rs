//! Writing a folder so that a kill at any moment leaves either the old folder or the new one:
//! fill a temporary sibling, fsync its files, move the old folder aside, rename the new one in.

use std::path::{Path, PathBuf};

use crate::error::Error;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path: PathBuf = path.into();
    move |source| Error::Io { path, source }
}

/// The folder holding `dir`; "." for a bare name (whose `parent()` is empty).
fn parent_of(dir: &Path) -> &Path {
    dir.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Replace `dir` with what `fill` writes into a fresh temporary folder. On any error the
/// temporary folder is removed and `dir` is untouched.
pub fn replace_dir<E: From<Error>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let parent = parent_of(dir);
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = replace_dir_inner(dir, &tmp, fill);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn replace_dir_inner<E: From<Error>>(
    dir: &Path,
    tmp: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    let pid = std::process::id();
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    fill(tmp)?;
    for entry in std::fs::read_dir(tmp).map_err(io(tmp))? {
        let path = entry.map_err(io(tmp))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    let old = parent.join(format!(".{name}.old-{pid}"));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(tmp, dir).map_err(io(dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io(parent))?;
    Ok(())
}
