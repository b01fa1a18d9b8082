//! Failures injected into the spool's real file operations, for unit tests: a test names the
//! operation and a path (prefix), and the next calls there fail as the disk would. Outside
//! tests every check is a no-op the compiler removes. (`faults` is the hook integration
//! tests use, on a running spool's commit stage.)

/// Where a failure can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The sync of a new segment file, before it is renamed to its name.
    NewSegmentSync,
    /// The unlink of a spent segment.
    Unlink,
    /// The copy of damaged bytes to `damaged/` at start-up (the path is the new file's).
    KeepAside,
}

/// Fails when a failure is injected at `point` for `path` (outside tests: never).
#[cfg(not(test))]
#[inline(always)]
pub fn check(_point: Point, _path: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
pub use injected::{check, clear, hits, inject};

#[cfg(test)]
mod injected {
    use super::Point;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// An injected failure.
    struct Fault {
        point: Point,
        prefix: PathBuf,
        /// Calls that still fail.
        left: u32,
        /// Calls that failed.
        hits: u32,
    }

    static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

    fn faults() -> std::sync::MutexGuard<'static, Vec<Fault>> {
        FAULTS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `times` operations at `point` on paths under `prefix` fail with EIO.
    pub fn inject(point: Point, prefix: &Path, times: u32) {
        faults().push(Fault {
            point,
            prefix: prefix.to_path_buf(),
            left: times,
            hits: 0,
        });
    }

    /// Ends the failures injected under `prefix`.
    pub fn clear(prefix: &Path) {
        for f in faults().iter_mut().filter(|f| f.prefix.starts_with(prefix)) {
            f.left = 0;
        }
    }

    /// How many operations at `point` under `prefix` failed so far.
    pub fn hits(point: Point, prefix: &Path) -> u32 {
        faults()
            .iter()
            .filter(|f| f.point == point && f.prefix.starts_with(prefix))
            .map(|f| f.hits)
            .sum()
    }

    /// Fails when a failure is injected at `point` for `path`.
    pub fn check(point: Point, path: &Path) -> io::Result<()> {
        let mut f = faults();
        let hit = f
            .iter_mut()
            .find(|f| f.point == point && f.left > 0 && path.starts_with(&f.prefix));
        match hit {
            Some(f) => {
                f.left -= 1;
                f.hits += 1;
                Err(io::Error::from_raw_os_error(5)) // EIO
            }
            None => Ok(()),
        }
    }
}
