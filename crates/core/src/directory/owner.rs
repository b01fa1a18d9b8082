//! Which directory file a store's state came from: `source` in the store folder.
//!
//! A store (snapshot and change log) carries the batches applied on top of one directory
//! file. Pointed at by a config with another `directory.file` (two configs sharing a folder,
//! or a file renamed), it would route on the other file's mailboxes, and its shrink guard
//! would refuse this config's own file as "too small" while the old directory stays in force.
//! So the store records the file it was last loaded from, and at start a store that came
//! from another file is said out loud, naming both. The record is updated once this config's
//! file has been loaded into it; a refused load keeps the old name, so the warning repeats
//! until the admin acts.

use std::path::{Path, PathBuf};
use tracing::warn;

/// The record's name in the store folder.
pub const SOURCE_FILE: &str = "source";

/// The absolute form of `file` used in the record (canonical when it exists).
fn absolute(file: &Path) -> PathBuf {
    std::fs::canonicalize(file).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(file))
            .unwrap_or_else(|_| file.to_path_buf())
    })
}

/// The file the store in `store_dir` was last loaded from, when it is not `file`; logged
/// as a warning naming both. `None` for a new store or the same file.
pub fn other_source(store_dir: &Path, file: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(store_dir.join(SOURCE_FILE)).ok()?;
    let recorded = PathBuf::from(text.trim_end_matches('\n'));
    if recorded.as_os_str().is_empty() || recorded == absolute(file) {
        return None;
    }
    warn!(
        store = %store_dir.display(),
        store_source = %recorded.display(),
        directory_file = %absolute(file).display(),
        "the directory store holds the state of another directory file: its batches carry over to this config's file, and a reload that removes more than directory.max_shrink is refused; if that file belongs to another config, give this config a directory.store_dir of its own"
    );
    Some(recorded)
}

/// Records `file` as the source of the store in `store_dir` (written to a temporary name
/// and renamed, so a crash leaves the old record or the new one). A failure is logged: the
/// record only feeds a warning.
pub fn record(store_dir: &Path, file: &Path) {
    let path = store_dir.join(SOURCE_FILE);
    let tmp = store_dir.join(format!("{SOURCE_FILE}.tmp"));
    let line = format!("{}\n", absolute(file).display());
    if std::fs::read_to_string(&path).ok().as_deref() == Some(line.as_str()) {
        return;
    }
    let res = crate::fsmode::write(&tmp, line).and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        warn!(file = %path.display(), error = %e, "cannot record which directory file the store holds");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_names_the_file_it_came_from_until_another_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        std::fs::write(&a, "address,state\n").unwrap();
        std::fs::write(&b, "address,state\n").unwrap();
        assert_eq!(other_source(dir.path(), &a), None, "a new store");
        record(dir.path(), &a);
        assert_eq!(other_source(dir.path(), &a), None);
        assert_eq!(other_source(dir.path(), &b), Some(absolute(&a)));
        record(dir.path(), &b);
        assert_eq!(other_source(dir.path(), &b), None);
    }
}
