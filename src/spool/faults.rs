//! Failures injected into the spool's real file operations, for tests: a test names the
//! operation and a path (prefix), and the next calls there fail as the disk would. Outside
//! tests every check is a no-op the compiler removes.

/// Where a failure can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The sync of a new segment file, before it is renamed to its name.
    NewSegmentSync,
    /// The unlink of a spent segment.
    Unlink,
}

/// Fails when a failure is injected at `point` for `path` (outside tests: never).
#[cfg(not(test))]
#[inline(always)]
pub fn check(_point: Point, _path: &std::path::Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
pub use injected::{check, inject};

#[cfg(test)]
mod injected {
    use super::Point;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Injected failures: the point, a path prefix, and how many calls still fail.
    static FAULTS: Mutex<Vec<(Point, PathBuf, u32)>> = Mutex::new(Vec::new());

    /// Makes the next `times` operations at `point` on paths under `prefix` fail with EIO.
    pub fn inject(point: Point, prefix: &Path, times: u32) {
        let mut f = FAULTS.lock().unwrap_or_else(|p| p.into_inner());
        f.push((point, prefix.to_path_buf(), times));
    }

    /// Fails when a failure is injected at `point` for `path`.
    pub fn check(point: Point, path: &Path) -> io::Result<()> {
        let mut f = FAULTS.lock().unwrap_or_else(|p| p.into_inner());
        let hit = f
            .iter_mut()
            .find(|(p, prefix, n)| *p == point && *n > 0 && path.starts_with(prefix));
        match hit {
            Some((_, _, n)) => {
                *n -= 1;
                Err(io::Error::from_raw_os_error(5)) // EIO
            }
            None => Ok(()),
        }
    }
}
