//! One process per folder: an exclusive lock on the spool and on the directory store.
//!
//! Two relays on one spool would append to the same segments and deliver each other's
//! messages; two on one directory store would overwrite each other's snapshot and replay each
//! other's batches. Both happen by accident when two configs are started from one folder with
//! the same relative paths (Postfix stops a second master on the same queue with its
//! `master.lock` for the same reason). So `serve` takes an advisory lock (`flock`, through
//! `fs4`) on `coexist.lock` in each folder before it opens anything there, holds it while it
//! runs, and refuses to start when another process holds it, naming that process. The kernel
//! drops the lock when the process ends, however it ends, so a `kill -9` leaves nothing to
//! clean up. The file holds the holder's pid, for the message only.
#![allow(clippy::disallowed_methods)] // Taken at start-up, before anything is served.

use fs4::{FileExt, TryLockError};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name in a locked folder.
pub const LOCK_FILE: &str = "coexist.lock";

/// Why a folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{what} {dir} is in use by another coexist process ({holder}): give each config a {key} of its own")]
    Held {
        /// What the folder is ("spool.dir", "directory.store_dir").
        what: &'static str,
        /// The config key that names the folder.
        key: &'static str,
        /// The folder.
        dir: String,
        /// The holder as its lock file names it (`pid N`), or `pid unknown`.
        holder: String,
    },
    /// The lock file could not be opened or written.
    #[error("{what} {file}: {source}")]
    Io {
        /// What the folder is.
        what: &'static str,
        /// The lock file.
        file: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` (created if missing) for this process. `what` names the folder in errors,
    /// as the config key that sets it (`spool.dir`, `directory.store_dir`).
    pub fn take(dir: &Path, what: &'static str) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            what,
            file: path.display().to_string(),
            source,
        };
        crate::fsmode::create_dir_all(dir).map_err(io)?;
        let mut file = crate::fsmode::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid unknown".into(),
                };
                return Err(LockError::Held {
                    what,
                    key: what,
                    dir: dir.display().to_string(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path(), "spool.dir").unwrap();
        let err = DirLock::take(dir.path(), "spool.dir")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is in use by another coexist process")
                && err.contains(&format!("pid {}", std::process::id()))
                && err.contains(&dir.path().display().to_string()),
            "{err}"
        );
        drop(first);
        DirLock::take(dir.path(), "spool.dir").unwrap();
    }
}
