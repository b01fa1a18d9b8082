//! Void ends: when a failed write cannot be cut off its segment, the commit stage leaves an
//! empty marker file `NNNNNNNNNN.seg.void-OFFSET` (see [`super::commit`]); at start the
//! segment's bytes from `OFFSET` on are cut, or ignored when the cut fails again, and the
//! marker removed ([`super::recover`]).

use super::segment;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::Path;
use tracing::warn;

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
