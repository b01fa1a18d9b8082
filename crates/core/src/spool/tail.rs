//! Recovery of the segment that was being written at a stop or crash: a torn tail is told
//! apart from corruption, and no damaged byte is destroyed. The scan and the rules are
//! those of every framed file ([`framed`](super::framed)); this file applies them to a
//! segment ([`Segment`]) and says what the spool does with what they find.
//!
//! The scan checks every record whole (header, metadata and body checksums) and goes on
//! after damage at the next whole record, never looking inside a record whose header is
//! intact. In format 2 every checksum (and the record magic) is keyed by the segment's
//! random salt (see [`segment`](super::segment)), so a copy of a record in a message body does not pass.
//!
//! Then, in a segment with turn markers (format 2):
//!
//! - Any byte after a `Commit` record proves that turn's `fdatasync` returned (the next turn
//!   is written only after it), so its records were acknowledged. Damage before the end of
//!   the last such turn is **corruption**: the damaged bytes are copied to
//!   `damaged/NNNNNNNNNN.seg.OFFSET.corrupt`, synced, and overwritten in place by a `Skip`
//!   record of the same length; every other record stays. The record is reported with file
//!   and offset (and the queue id when its metadata is intact), at `error` level, and counted
//!   in `coexist_spool_damaged_total{kind="corrupt"}`. A message whose record was damaged is
//!   lost from the queue (its bytes are in `damaged/`); a damaged state or `Done` record
//!   brings back an older state (at worst a repeated delivery, never a lost message).
//! - Damage after that point lies in the last turn, whose sync may not have finished: a
//!   **torn tail**. The bytes from the first damage to the end are copied to
//!   `damaged/NNNNNNNNNN.seg.OFFSET.torn`, synced, and then cut off the segment
//!   (`coexist_spool_damaged_total{kind="torn"}`). Those records were never acknowledged.
//!
//! When the damaged bytes cannot be copied to `damaged/` (a full disk, an I/O error), the
//! start goes on: a torn tail (never acknowledged) is cut all the same, with an `error` log;
//! corruption is left on disk exactly as it is and only skipped for this start (an `error`
//! log with file and offset, `coexist_spool_damaged_total{kind="corrupt_left"}`, and
//! [`Damaged::left`]); its segment is kept for this run, and the next start tries again to
//! move the bytes aside.
//!
//! A segment of format 1 (no turn markers) is recovered as before, the first damage ending
//! the scan and the rest cut off, but its bytes are also kept aside first.
//!
//! A sealed segment (one before the last) of format 2 found damaged at start (its records'
//! headers and metadata are checked, not its bodies) is repaired the same way, everything
//! up to its last `Commit` record counting as synced: the next segment was only started
//! after that turn's sync. A damaged sealed segment of format 1 stops the start with the
//! file and offset, as before.

use super::framed;
use super::inject::{self, Point};
use super::recover::RecordFn;
use super::segment::{Salt, Segment, HEADER_LEN};
use super::{io_err, Loc, SpoolError};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tracing::{error, warn};

pub use framed::Damaged;

/// How the last segment is scanned.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// Repair: damaged bytes are kept in this folder, then replaced or cut.
    Repair(&'a Path),
    /// Change nothing: corrupt records are skipped, the scan stops at a torn tail.
    ReadOnly,
}

/// What a scan of a segment needs to know of it besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Format 2: commit turns are marked.
    pub marked: bool,
    /// A later segment exists (this one was synced whole before it was started).
    pub sealed: bool,
    /// Where its bytes end for the scan when its end is void (see `void`).
    pub end: Option<u64>,
    /// The key of its checksums (from its file header; none for format 1).
    pub salt: Salt,
}

/// Scans segment `n` at `path` (whose file header was checked: `marked` for format 2; `sealed`
/// when a later segment exists), repairs it in `Repair` mode, calls `each` for every record
/// kept, and adds what it found to `found`.
pub fn scan_last(
    path: &Path,
    n: u32,
    shape: Shape,
    mode: Mode<'_>,
    each: &mut RecordFn<'_>,
    found: &mut Vec<Damaged>,
) -> Result<(), SpoolError> {
    let seg = Segment {
        salt: shape.salt,
        marked: shape.marked,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(matches!(mode, Mode::Repair(_)))
        .open(path)
        .map_err(io_err(path))?;
    let scan = framed::scan(
        &seg,
        &file,
        path,
        framed::Shape {
            sealed: shape.sealed,
            end: shape.end,
        },
    )
    .map_err(io_err(path))?;
    for mut d in scan.damaged {
        if let Mode::Repair(aside) = mode {
            d.kept = repair(&seg, &file, &d, aside)?;
            d.left = !d.torn && d.kept.is_none();
            report(&d);
        }
        found.push(d);
    }
    for (off, h) in scan.records {
        let mut meta = vec![0u8; h.meta_len as usize];
        file.read_exact_at(&mut meta, off + HEADER_LEN as u64)
            .map_err(io_err(path))?;
        let loc = Loc {
            seg: n,
            meta_len: h.meta_len,
            off,
        };
        each(loc, &h, &meta).map_err(|e| SpoolError::Corrupt {
            path: format!("{} at offset {}", path.display(), off),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Logs what recovery did with damaged bytes, loudly for corruption, and counts it.
fn report(d: &Damaged) {
    let kept = d.kept.as_deref().unwrap_or(Path::new("")).display();
    let path = d.path.display();
    let id = d.id.as_deref().unwrap_or("unknown");
    if d.left {
        error!(path = %path, offset = d.offset, bytes = d.len, reason = %d.reason, queue_id = %id,
            "CORRUPT record in the spool log (written and synced, damaged since) could NOT be copied to damaged/: left in place and skipped for this start; the next start tries again to move it aside");
        metrics::counter!(crate::metrics::SPOOL_DAMAGED, "kind" => "corrupt_left").increment(1);
    } else if d.torn {
        if d.kept.is_some() {
            warn!(path = %path, offset = d.offset, bytes = d.len, reason = %d.reason, kept = %kept,
                "torn tail in the spool log (a write cut short by a crash or a failed write, never acknowledged): moved aside and cut off");
        } else {
            error!(path = %path, offset = d.offset, bytes = d.len, reason = %d.reason,
                "torn tail in the spool log (a write cut short by a crash or a failed write, never acknowledged) could NOT be copied to damaged/: cut off without a copy");
        }
        metrics::counter!(crate::metrics::SPOOL_DAMAGED, "kind" => "torn").increment(1);
    } else {
        error!(path = %path, offset = d.offset, bytes = d.len, reason = %d.reason, queue_id = %id, kept = %kept,
            "CORRUPT record in the spool log (written and synced, damaged since): moved aside, the records after it are kept");
        metrics::counter!(crate::metrics::SPOOL_DAMAGED, "kind" => "corrupt").increment(1);
    }
}

/// Keeps the damaged bytes aside (synced), then replaces them by a `Skip` record
/// (corruption) or cuts them off (torn tail). Returns where they were kept. When they cannot
/// be kept, a torn tail (never acknowledged) is cut all the same, and corruption is left
/// as it is on disk (skipped for this start, moved aside by a later one): `Ok(None)`.
fn repair(
    seg: &Segment,
    file: &File,
    d: &Damaged,
    aside: &Path,
) -> Result<Option<PathBuf>, SpoolError> {
    let hook = |p: &Path| inject::check(Point::KeepAside, p);
    let kept = match framed::keep_aside(file, d, aside, &hook) {
        Ok(p) => Some(p),
        Err(e) => {
            error!(path = %d.path.display(), offset = d.offset, bytes = d.len, error = %e,
                "cannot copy damaged spool bytes to damaged/");
            None
        }
    };
    let path = &d.path;
    if d.torn {
        framed::cut(file, d.offset).map_err(io_err(path))?;
    } else if kept.is_some() && !framed::fill(seg, file, d).map_err(io_err(path))? {
        return Err(SpoolError::Corrupt {
            path: format!("{} at offset {}", path.display(), d.offset),
            reason: format!("{} damaged bytes cannot be skipped", d.len),
        });
    }
    Ok(kept)
}
