//! The local directory store's `fleet.id` marker: which fleet the store's sequence numbers
//! belong to.

use super::FleetError;
use crate::directory::DirectoryError;
use std::path::Path;
use tracing::warn;

/// Makes `dir` the local store of fleet `id`: a store left by another fleet (its schema
/// dropped and created again) is cleared, since its sequence numbers mean nothing here.
#[allow(clippy::disallowed_methods)] // Start-up (`Fleet::start`), before the node serves.
pub(super) fn claim_store(dir: &Path, id: &str) -> Result<(), FleetError> {
    let io = |e: std::io::Error| {
        FleetError::Directory(DirectoryError::Io {
            file: dir.display().to_string(),
            source: e,
        })
    };
    let marker = dir.join("fleet.id");
    match std::fs::read_to_string(&marker) {
        Ok(old) if old.trim() == id => return Ok(()),
        Ok(old) => {
            warn!(dir = %dir.display(), old = old.trim(), new = id, "fleet: the local directory store belongs to another fleet; starting it afresh from PostgreSQL");
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    write_marker(dir, id)
}

/// Writes the store's `fleet.id` marker (temp file, fsync, rename, directory fsync).
/// Blocking: at start-up, else through `commit::blocking`.
#[allow(clippy::disallowed_methods)] // Blocking boundary: start-up or the blocking pool.
pub(super) fn write_marker(dir: &Path, id: &str) -> Result<(), FleetError> {
    let io = |e: std::io::Error| {
        FleetError::Directory(DirectoryError::Io {
            file: dir.display().to_string(),
            source: e,
        })
    };
    let marker = dir.join("fleet.id");
    crate::fsmode::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join("fleet.id.tmp");
    crate::fsmode::write(&tmp, id)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &marker))
        .and_then(|_| std::fs::File::open(dir)?.sync_all())
        .map_err(io)
}

/// The fleet id in the store's `fleet.id` marker, if any (a node started while PostgreSQL is
/// down follows the fleet its store belongs to).
#[allow(clippy::disallowed_methods)] // Start-up (`Fleet::start`), before the node serves.
pub(super) fn read_marker(dir: &Path) -> Option<String> {
    let id = std::fs::read_to_string(dir.join("fleet.id")).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_another_fleet_is_cleared_and_the_marker_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fleet");
        claim_store(&dir, "aaa").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("fleet.id")).unwrap(),
            "aaa"
        );
        std::fs::write(dir.join("snapshot.bin"), b"x").unwrap();
        claim_store(&dir, "aaa").unwrap();
        assert!(dir.join("snapshot.bin").exists(), "same fleet: kept");
        claim_store(&dir, "bbb").unwrap();
        assert!(!dir.join("snapshot.bin").exists(), "another fleet: cleared");
        assert_eq!(
            std::fs::read_to_string(dir.join("fleet.id")).unwrap(),
            "bbb"
        );
    }
}
