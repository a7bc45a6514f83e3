//! Files written whole: through a temporary file beside the destination, synced, and renamed
//! over it ([`replace_file`]), or staged for a later rename ([`stage`], [`Staged`]) so that
//! several files (a sharded checkpoint's) go into place only once all are written.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Reads a whole file, as an [`Error::Io`] naming it on failure.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// [`replace_file`] with `bytes` for contents.
pub fn write_whole(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    stage_bytes(path, bytes)?.commit()
}

/// [`stage`] with `bytes` for contents.
pub fn stage_bytes(path: &Path, bytes: impl AsRef<[u8]>) -> Result<Staged> {
    stage(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| e.to_string())
    })
}

/// Writes `path` through a temporary file beside it (`write` fills it), synced to disk and
/// renamed over `path` once complete: a failure leaves no half-written file and an existing
/// one untouched, a crash the old file or the new. Failures are [`Error::Io`] naming `path`.
pub fn replace_file(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    stage(path, write)?.commit()
}

/// [`replace_file`] up to the rename.
pub fn stage(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<Staged> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::io(path, "not a file name"))?
        .to_string_lossy();
    let staged = Staged {
        tmp: path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id())),
        path: path.to_path_buf(),
    };
    write(&staged.tmp)
        .and_then(|()| {
            std::fs::File::open(&staged.tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())
        })
        .map_err(|why| Error::io(path, why))?;
    Ok(staged)
}

/// A file written and synced under a temporary name beside its destination: [`commit`]
/// renames it over the destination; dropped uncommitted, it is removed. Staging every file
/// of a sharded checkpoint before renaming any keeps a failure in one shard from leaving the
/// others converted.
///
/// [`commit`]: Staged::commit
#[must_use = "a staged file is removed unless committed"]
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

impl Staged {
    /// The file as written, under its temporary name.
    pub fn written(&self) -> &Path {
        &self.tmp
    }

    /// Where [`commit`](Staged::commit) puts it.
    pub fn destination(&self) -> &Path {
        &self.path
    }

    /// Renames the file over its destination.
    pub fn commit(mut self) -> Result<()> {
        let tmp = std::mem::take(&mut self.tmp);
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&self.path, e.to_string())
        })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
