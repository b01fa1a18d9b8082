//! Failures the commit stage makes up on purpose (a test hook, [`super::Spool::inject_faults`]),
//! for the rare paths a real disk seldom shows: a short write, a failed sync, a failed cut;
//! and the name of the marker that says a segment's end is void (a failed write that could
//! not be cut off, see [`super::commit`] and [`super::recover`]).

use super::commit::Rec;
use super::segment::{self, Kind};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use tracing::warn;

/// Test hook: failures the commit stage makes up on purpose, for the rare paths a real disk
/// seldom shows; each count is used up by one turn (or one cut).
#[derive(Debug, Default)]
pub struct Faults {
    /// Turns whose write stops half-way (a short write), then fails.
    pub short_writes: AtomicU32,
    /// Turns whose records are written whole, then whose sync fails.
    pub syncs: AtomicU32,
    /// Cuts of a failed turn off the segment that fail.
    pub cuts: AtomicU32,
    /// Turns holding a `Done` record whose sync fails (then cut off as usual).
    pub end_syncs: AtomicU32,
}

impl Faults {
    /// After a turn's records were written to `file` (from `start` to `end`) and synced: a
    /// made-up short write (the file left with half of those bytes) or failed sync, when
    /// one is asked for.
    pub fn turn(&self, file: &File, start: u64, end: u64, recs: &[&Rec]) -> io::Result<()> {
        if let Err(e) = made_up(&self.short_writes) {
            let _ = file.set_len(start + (end - start) / 2);
            return Err(e);
        }
        made_up(&self.syncs)?;
        if recs.iter().any(|r| matches!(r.kind, Kind::Done)) {
            made_up(&self.end_syncs)?;
        }
        Ok(())
    }
}

/// An error (EIO) when `count` asks for one, using it up.
pub fn made_up(count: &AtomicU32) -> io::Result<()> {
    match count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => Err(io::Error::from_raw_os_error(5)),
        Err(_) => Ok(()),
    }
}

/// The marker saying that segment `n`'s bytes from `off` on are void.
pub fn void_marker(n: u32, off: u64) -> String {
    format!("{}.void-{off}", segment::file_name(n))
}

/// The segment and offset a void marker's name gives (`NNNNNNNNNN.seg.void-OFFSET`).
pub fn parse_void_marker(name: &str) -> Option<(u32, u64)> {
    let (seg, off) = name.split_once(".void-")?;
    Some((segment::number(seg)?, off.parse().ok()?))
}

/// Where each segment with a void marker ends for the scan. Unless `read_only`, the void
/// bytes are cut off and the markers removed (a segment the cut fails for keeps its marker
/// and its end), and markers of segments that are gone are removed.
pub fn void_ends(
    dir: &Path,
    numbers: &[u32],
    voids: Vec<(u32, u64, String)>,
    read_only: bool,
) -> HashMap<u32, u64> {
    let mut ends: HashMap<u32, u64> = HashMap::new();
    for (n, off, name) in voids {
        let marker = dir.join(&name);
        if !numbers.contains(&n) {
            if !read_only {
                let _ = fs::remove_file(&marker);
            }
            continue;
        }
        let end = ends.entry(n).or_insert(off);
        *end = (*end).min(off);
        if read_only {
            continue;
        }
        let path = dir.join(segment::file_name(n));
        let cut = OpenOptions::new().write(true).open(&path).and_then(|f| {
            if f.metadata()?.len() > off {
                f.set_len(off)?;
                f.sync_all()?;
            }
            Ok(())
        });
        match cut {
            Ok(()) => {
                warn!(path = %path.display(), offset = off, "cut off the void end of a spool segment (a failed write its callers were told about)");
                if fs::remove_file(&marker).is_ok() {
                    let _ = File::open(dir).and_then(|d| d.sync_all());
                }
            }
            Err(e) => {
                warn!(path = %path.display(), offset = off, error = %e, "cannot cut the void end off a spool segment; it is ignored")
            }
        }
    }
    ends
}
