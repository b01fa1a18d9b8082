//! Recovery of the segment that was being written at a stop or crash: a torn tail is told
//! apart from corruption, and no damaged byte is destroyed.
//!
//! The scan checks every record whole (header, metadata and body checksums). At a damaged
//! record it looks for the next whole record, so the records after the damage are still
//! read; it never looks inside a record whose header is intact (its checksum holds), since
//! a message's body holds bytes a sender chose and may copy records byte for byte:
//!
//! - header intact, record running past the end of the file: a torn tail from that header
//!   on (a large message cut short by a crash);
//! - header intact, body damaged: the search starts where the header says the record ends;
//! - header damaged: where its lengths point (if it decodes), then byte by byte after the
//!   header for a record whose checksums hold. In format 2 every checksum (and the record
//!   magic) is keyed by the segment's random salt (see [`segment`]), so a copy of a record
//!   in a message body does not pass.
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

use super::inject::{self, Point};
use super::recover::RecordFn;
use super::segment::{self, Header, Kind, Salt, HEADER_LEN};
use super::{io_err, Loc, SpoolError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tracing::{error, warn};

/// Damage recovery found in a segment (and what it did with it).
#[derive(Debug, Clone)]
pub struct Damaged {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the damaged bytes.
    pub offset: u64,
    /// How many bytes were damaged (up to the next whole record, or the end of the file).
    pub len: u64,
    /// A torn tail (cut off) rather than corruption (replaced by a `Skip` record).
    pub torn: bool,
    /// What the checks found.
    pub reason: String,
    /// The queue id of the damaged record, when its metadata was intact.
    pub id: Option<String>,
    /// Where the damaged bytes were kept (`None` for a read-only scan, or when they could
    /// not be copied: a torn tail is then cut all the same, corruption left in place).
    pub kept: Option<PathBuf>,
    /// Corruption whose bytes could not be copied aside: they were left in the segment as
    /// they were, skipped for this start; a later start tries again to move them aside.
    pub left: bool,
}

/// How the last segment is scanned.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// Repair: damaged bytes are kept in this folder, then replaced or cut.
    Repair(&'a Path),
    /// Change nothing: corrupt records are skipped, the scan stops at a torn tail.
    ReadOnly,
}

/// One stretch of the segment: a whole record, or damaged bytes.
struct Span {
    off: u64,
    len: u64,
    what: What,
}

enum What {
    Rec(Header),
    Damage {
        reason: &'static str,
        id: Option<String>,
    },
}

/// The result of checking the bytes at one offset.
enum Check {
    Whole(Header),
    Bad {
        reason: &'static str,
        /// Where the next record may be.
        next: Next,
        /// Its metadata, when that was intact (only the body was damaged).
        meta: Option<Vec<u8>>,
    },
}

/// Where to look for the next record after a damaged one.
#[derive(Clone, Copy)]
enum Next {
    /// The header is damaged: try the length it says (when it decodes), then search the
    /// bytes after the header.
    Search(Option<u64>),
    /// The header is intact (its checksum holds), the body damaged: the record ends after
    /// this many bytes; nothing inside it is searched.
    After(u64),
    /// The header is intact but the record runs past the end of the file: a torn tail from
    /// this header on.
    Torn,
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
    let Shape {
        marked,
        sealed,
        end,
        salt,
    } = shape;
    let file = OpenOptions::new()
        .read(true)
        .write(matches!(mode, Mode::Repair(_)))
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    // A void end (a failed write its callers were told about, see `void`) is not read.
    let file_len = end.map_or(file_len, |e| e.min(file_len));
    let spans = spans(&file, salt, marked, file_len).map_err(io_err(path))?;
    // Everything before the end of the last Commit record that has any byte after it was
    // synced; in a sealed segment, everything before its last Commit record (the next segment
    // was started after that turn's sync). Format 1 proves nothing.
    let start = salt.data_start();
    let proven = spans
        .iter()
        .filter(|s| matches!(s.what, What::Rec(h) if h.kind == Kind::Commit))
        .map(|s| s.off + s.len)
        .filter(|&end| marked && (sealed || end < file_len))
        .max()
        .unwrap_or(start);
    let cut = spans
        .iter()
        .find(|s| matches!(s.what, What::Damage { .. }) && s.off >= proven)
        .map(|s| s.off);
    for s in &spans {
        let What::Damage { reason, id } = &s.what else {
            continue;
        };
        let torn = s.off >= proven;
        if torn && Some(s.off) != cut {
            continue; // inside the cut
        }
        let len = if torn { file_len - s.off } else { s.len };
        let mut d = Damaged {
            path: path.to_path_buf(),
            offset: s.off,
            len,
            torn,
            reason: reason.to_string(),
            id: id.clone(),
            kept: None,
            left: false,
        };
        if let Mode::Repair(aside) = mode {
            d.kept = repair(&file, &d, salt, aside)?;
            d.left = !d.torn && d.kept.is_none();
            report(&d);
        }
        found.push(d);
    }
    for s in &spans {
        if cut.is_some_and(|c| s.off >= c) {
            break;
        }
        let What::Rec(h) = s.what else { continue };
        let mut meta = vec![0u8; h.meta_len as usize];
        file.read_exact_at(&mut meta, s.off + HEADER_LEN as u64)
            .map_err(io_err(path))?;
        let loc = Loc {
            seg: n,
            meta_len: h.meta_len,
            off: s.off,
        };
        each(loc, &h, &meta).map_err(|reason| SpoolError::Corrupt {
            path: format!("{} at offset {}", path.display(), s.off),
            reason,
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

/// Reads the segment into spans of whole records and damaged bytes. In a marked segment the
/// scan goes on after damage at the next whole record; in a format 1 segment damage runs to
/// the end.
fn spans(file: &File, salt: Salt, marked: bool, file_len: u64) -> io::Result<Vec<Span>> {
    let mut spans = Vec::new();
    let mut off = salt.data_start();
    let mut body = Vec::new();
    while off < file_len {
        match check_at(file, salt, off, file_len, &mut body)? {
            Check::Whole(h) => {
                spans.push(Span {
                    off,
                    len: h.record_len(),
                    what: What::Rec(h),
                });
                off += h.record_len();
            }
            Check::Bad { reason, next, meta } => {
                let next = if marked {
                    resync(file, salt, off, next, file_len, &mut body)?
                } else {
                    None
                };
                let end = next.unwrap_or(file_len);
                spans.push(Span {
                    off,
                    len: end - off,
                    what: What::Damage {
                        reason,
                        id: meta.as_deref().and_then(record_id),
                    },
                });
                off = end;
            }
        }
    }
    Ok(spans)
}

/// Checks the record at `off` whole: header, metadata and body.
fn check_at(
    file: &File,
    salt: Salt,
    off: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Check> {
    let bad = |reason, next, meta| Check::Bad { reason, next, meta };
    let mut hb = [0u8; HEADER_LEN];
    if file_len - off < HEADER_LEN as u64 {
        return Ok(bad("incomplete record header", Next::Search(None), None));
    }
    file.read_exact_at(&mut hb, off)?;
    let Some(h) = segment::decode_header(&salt, &hb) else {
        return Ok(bad("damaged record header", Next::Search(None), None));
    };
    let meta_end = off + (HEADER_LEN as u64) + h.meta_len as u64;
    if meta_end > file_len {
        // Its checksum cannot be checked: its lengths are not to be trusted.
        return Ok(bad(
            "record runs past the end of the file",
            Next::Search(None),
            None,
        ));
    }
    let mut meta = vec![0u8; h.meta_len as usize];
    file.read_exact_at(&mut meta, off + HEADER_LEN as u64)?;
    if !h.meta_ok(&meta) {
        return Ok(bad(
            "record checksum mismatch",
            Next::Search(Some(h.record_len())),
            None,
        ));
    }
    // The header is intact: its lengths are what was written.
    if off + h.record_len() > file_len {
        return Ok(bad(
            "record runs past the end of the file",
            Next::Torn,
            Some(meta),
        ));
    }
    body.resize(h.body_len as usize, 0);
    file.read_exact_at(body, meta_end)?;
    if !h.body_ok(body) {
        return Ok(bad(
            "message checksum mismatch",
            Next::After(h.record_len()),
            Some(meta),
        ));
    }
    Ok(Check::Whole(h))
}

/// Largest metadata part a record found by searching after damage may have (a real
/// envelope is far smaller; a bigger one is left inside the damaged bytes, kept aside).
const RESYNC_META_MAX: u32 = 1 << 20;

/// The offset of the next whole record after damage at `off`, or `None` when the damage
/// runs to the end of the file. A record whose header is intact is never searched inside:
/// its body holds bytes a sender chose (`BDAT`), which may copy records byte for byte. When
/// it runs past the end of the file it is a torn tail to the end; otherwise the search
/// starts where it ends. A damaged header's lengths are tried first, then the bytes after
/// the header are searched (the salt keeps copies from a message body from passing).
fn resync(
    file: &File,
    salt: Salt,
    off: u64,
    next: Next,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Option<u64>> {
    let from = match next {
        Next::Torn => return Ok(None),
        Next::After(len) => off + len,
        Next::Search(len) => {
            if let Some(next) = len.map(|l| off + l) {
                if next == file_len {
                    return Ok(None); // the damaged record is the last one
                }
                if next < file_len
                    && matches!(check_at(file, salt, next, file_len, body)?, Check::Whole(_))
                {
                    return Ok(Some(next));
                }
            }
            off + HEADER_LEN as u64
        }
    };
    const CHUNK: usize = 1 << 20;
    let magic = salt.magic();
    let mut window = vec![0u8; CHUNK + magic.len() - 1];
    let mut at = from;
    while at + (HEADER_LEN as u64) <= file_len {
        let want = window.len().min((file_len - at) as usize);
        file.read_exact_at(&mut window[..want], at)?;
        for i in 0..want.saturating_sub(magic.len() - 1) {
            if window[i..i + magic.len()] == magic {
                let cand = at + i as u64;
                // A header whose metadata would be huge is not checked further: bounded work
                // for bytes that only look like headers.
                let plausible = window
                    .get(i..i + HEADER_LEN)
                    .and_then(|b| <[u8; HEADER_LEN]>::try_from(b).ok())
                    .and_then(|b| segment::decode_header(&salt, &b))
                    .is_none_or(|h| h.meta_len <= RESYNC_META_MAX);
                if plausible
                    && matches!(check_at(file, salt, cand, file_len, body)?, Check::Whole(_))
                {
                    return Ok(Some(cand));
                }
            }
        }
        at += CHUNK as u64;
    }
    Ok(None)
}

/// The queue id in a record's metadata (an envelope, a state or a `Done`).
fn record_id(meta: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(meta).ok()? {
        serde_json::Value::String(id) => Some(id),
        v => v.get("id")?.as_str().map(str::to_string),
    }
}

/// Keeps the damaged bytes aside (synced), then replaces them by a `Skip` record
/// (corruption) or cuts them off (torn tail). Returns where they were kept. When they cannot
/// be kept, a torn tail (never acknowledged) is cut all the same, and corruption is left
/// as it is on disk (skipped for this start, moved aside by a later one): `Ok(None)`.
fn repair(
    file: &File,
    d: &Damaged,
    salt: Salt,
    aside: &Path,
) -> Result<Option<PathBuf>, SpoolError> {
    let kept = match keep_aside(file, d, aside) {
        Ok(p) => Some(p),
        Err(e) => {
            error!(path = %d.path.display(), offset = d.offset, bytes = d.len, error = %e,
                "cannot copy damaged spool bytes to damaged/");
            None
        }
    };
    let path = &d.path;
    let done = if d.torn {
        file.set_len(d.offset).and_then(|()| file.sync_data())
    } else if kept.is_none() {
        return Ok(None);
    } else {
        let Some(h) = segment::skip_header(&salt, d.len) else {
            return Err(SpoolError::Corrupt {
                path: format!("{} at offset {}", path.display(), d.offset),
                reason: format!("{} damaged bytes cannot be skipped", d.len),
            });
        };
        let zeros = vec![0u8; (1 << 20).min(d.len as usize)];
        let mut res = file.write_all_at(&h, d.offset);
        let mut at = d.offset + HEADER_LEN as u64;
        let end = d.offset + d.len;
        while res.is_ok() && at < end {
            let k = zeros.len().min((end - at) as usize);
            res = file.write_all_at(&zeros[..k], at);
            at += k as u64;
        }
        res.and_then(|()| file.sync_data())
    };
    done.map_err(io_err(path))?;
    Ok(kept)
}

/// Copies the damaged bytes to a new file in `aside` and syncs it and the folder.
fn keep_aside(file: &File, d: &Damaged, aside: &Path) -> Result<PathBuf, SpoolError> {
    fs::create_dir_all(aside).map_err(io_err(aside))?;
    let name = d
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    let what = if d.torn { "torn" } else { "corrupt" };
    let base = format!("{name}.{}.{what}", d.offset);
    let mut out = None;
    for i in 0..100u32 {
        let p = match i {
            0 => aside.join(&base),
            _ => aside.join(format!("{base}.{i}")),
        };
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => {
                out = Some((p, f));
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    let Some((p, mut f)) = out else {
        return Err(io_err(aside)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free name for {base}"),
        )));
    };
    // A copy cut short is removed: what is in `damaged/` is always whole.
    let copied = copy(file, d, &mut f, &p);
    if copied.is_err() {
        drop(f);
        let _ = fs::remove_file(&p);
    }
    copied?;
    File::open(aside)
        .and_then(|d| d.sync_all())
        .map_err(io_err(aside))?;
    Ok(p)
}

/// Copies the damaged bytes `d` of `file` into `out` (at `p`) and syncs it.
fn copy(file: &File, d: &Damaged, out: &mut File, p: &Path) -> Result<(), SpoolError> {
    inject::check(Point::KeepAside, p).map_err(io_err(p))?;
    let mut buf = vec![0u8; (1 << 20).min(d.len as usize)];
    let mut at = d.offset;
    let end = d.offset + d.len;
    while at < end {
        let k = buf.len().min((end - at) as usize);
        file.read_exact_at(&mut buf[..k], at)
            .map_err(io_err(&d.path))?;
        out.write_all(&buf[..k]).map_err(io_err(p))?;
        at += k as u64;
    }
    out.sync_all().map_err(io_err(p))
}
