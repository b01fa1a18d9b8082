//! Owner-only files and folders: what coexist writes that holds mail or addresses.
//!
//! The spool (segments, `failed/`, `damaged/`, void markers), the directory store (snapshot,
//! change log with its undo records, scheduled batches, markers), the MTA-STS cache and the
//! lock files are created through this module: files with mode 0600, folders with 0700,
//! whatever the process umask (a umask only ever takes bits away). The mode is given to the
//! `open`/`mkdir` call itself, so there is no moment when a new file is readable by others.
//!
//! A file or folder that already exists keeps its mode (an older version created them 0644
//! and 0755 under the usual umask 022): [`exposed`] finds those, and `serve` and
//! `check-config` warn about them with the `chmod` that fixes them; nothing is changed
//! behind the admin's back. The one exception is [`create`], which truncates: a file it
//! empties is made owner-only before anything is written to it.
#![allow(clippy::disallowed_methods)] // Blocking helpers: for the blocking boundaries and start-up only.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the files coexist creates: read and write for the owner only.
pub const FILE_MODE: u32 = 0o600;

/// Mode of the folders coexist creates: the owner only.
pub const DIR_MODE: u32 = 0o700;

/// Permission bits for the group and others.
const OTHERS: u32 = 0o077;

/// `OpenOptions` that create a file with [`FILE_MODE`] (chain `read`, `write`, `create`...
/// as with `OpenOptions::new()`).
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates `path` (or truncates it) for writing, owner-only, like `File::create`. A file
/// that was there with bits for others is made owner-only while it is still empty.
pub fn create(path: &Path) -> io::Result<File> {
    let f = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    if f.metadata()?.permissions().mode() & OTHERS != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(f)
}

/// Writes `data` to `path` (created owner-only, or truncated), like `fs::write`.
pub fn write(path: &Path, data: impl AsRef<[u8]>) -> io::Result<()> {
    create(path)?.write_all(data.as_ref())
}

/// Creates `dir` and every missing folder above it with [`DIR_MODE`], like
/// `fs::create_dir_all` (folders that exist are left as they are).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// A file or folder that the group or others may read or enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    /// The first such path found (the root itself when it is one).
    pub path: PathBuf,
    /// Its mode (permission bits).
    pub mode: u32,
    /// How many were found under the root, the root included.
    pub count: usize,
}

/// Most entries [`exposed`] looks at under one root (a spool holds a few hundred segments at
/// most; this only bounds a folder that is not what it should be).
const MAX_WALK: usize = 100_000;

/// The files and folders under `root` (itself included) with bits for the group or others,
/// or `None` when there are none (or `root` does not exist). Symbolic links are not
/// followed; unreadable entries are skipped.
pub fn exposed(root: &Path) -> Option<Exposed> {
    let mut found: Option<Exposed> = None;
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0usize;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > MAX_WALK {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & OTHERS != 0 {
            match &mut found {
                Some(e) => e.count += 1,
                None => {
                    found = Some(Exposed {
                        path: p.clone(),
                        mode,
                        count: 1,
                    })
                }
            }
        }
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
    }
    found
}

/// The warning for an [`Exposed`] root named by config key `key` (e.g. `spool.dir`).
pub fn warning(key: &str, root: &Path, e: &Exposed) -> String {
    format!(
        "{key} {root}: {count} file(s) or folder(s) readable by group or others (e.g. {path}, mode {mode:04o}; written by an earlier version or another tool): they hold mail or addresses; run `chmod -R go-rwx {root}`",
        root = root.display(),
        count = e.count,
        path = e.path.display(),
        mode = e.mode,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_folders_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        create_dir_all(&sub).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&sub), 0o700);
        let f = sub.join("f");
        write(&f, b"mail").unwrap();
        assert_eq!(mode(&f), 0o600);
        let g = sub.join("g");
        options().write(true).create_new(true).open(&g).unwrap();
        assert_eq!(mode(&g), 0o600);
        assert_eq!(exposed(dir.path().join("a").as_path()), None);
    }

    #[test]
    fn a_truncated_file_loses_the_others_bits_and_old_ones_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        create_dir_all(&root).unwrap();
        let old = root.join("old.seg");
        std::fs::write(&old, b"x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let other = root.join("other.seg");
        std::fs::write(&other, b"x").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = exposed(&root).unwrap();
        assert_eq!(e.count, 2);
        assert!(warning("spool.dir", &root, &e).contains("chmod -R go-rwx"));
        write(&old, b"y").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(exposed(&root).unwrap().count, 1);
    }
}
