//! Framed, checksummed, append-only files: the one set of rules the spool's segments, the
//! directory's change log and the tracking log are written and recovered by. (It lives
//! under `spool`, where it started; nothing in it knows a spool, a directory or the log.)
//!
//! A framed file is a file header, then records back to back. A record is a fixed-length
//! header (starting with a marker, holding its lengths and checksums), an optional
//! metadata part covered by the header's checksum, and a body with a checksum of its own.
//! The byte layout of each file kind is its [`Framing`]: the segment format (salted
//! checksums, `Commit` turn markers) and the change-log format (a record per turn) keep
//! their bytes exactly as before; this module holds what they share:
//!
//! - **Reading** ([`scan`]): every record is checked whole (header, metadata, body). At a
//!   damaged record the scan looks for the next whole record, so the records after damage
//!   are still read. A record whose header is intact is never searched inside (a body may
//!   hold bytes a sender chose, copies of records included); past a damaged header, the
//!   length it says is tried first (when it decodes), then the bytes after it, for the
//!   record marker and a record whose checksums hold.
//! - **Torn tail or corruption** (DESIGN.md invariant 12). A record is acknowledged only
//!   after the `fsync` of its commit turn returned, and the next turn is written only after
//!   that. So everything before the end of a turn that has any byte after it is proven
//!   synced (and, for a *sealed* file, one a later file was started after, everything before
//!   its last turn end). Where a turn ends is the framing's [`Turns`]: after a marker record
//!   (segments of format 2), after every record (the change log: one record per turn, and a
//!   whole record also proves everything before its start was synced), or nowhere (segments
//!   of format 1: nothing is proven and the first damage ends the scan).
//!   Damage at or after the proven end lies in the last, unsynced turn: a **torn tail**, and
//!   only it may be cut, from its first damaged byte to the end of the file. Damage before
//!   the proven end is **corruption**: it is never cut; it is reported with file and offset,
//!   its bytes copied aside ([`keep_aside`]), then, when the framing has a stand-in record
//!   ([`Framing::filler`]), overwritten in place by one of the same length ([`fill`]) so the
//!   records after it stay; a framing without one (the change log, whose records are
//!   applied changes) stops instead, leaving the bytes where they are.
//! - **Keeping aside**: damaged bytes are copied to `damaged/NAME.OFFSET.torn` or
//!   `.corrupt` (synced, folder synced, never overwritten: `.1`, `.2`, ... when the name is
//!   taken) before anything is cut or overwritten. A torn tail whose copy fails is cut all
//!   the same (it was never acknowledged); corruption whose copy fails is left as it is.
//! - **Appending** ([`cut`]): a failed append (write or sync) is cut back to the end of the
//!   last whole record before anything else is written, so a later record is never glued to
//!   a torn one.

mod aside;
mod scan;
mod simple;

pub use aside::{cut, fill, keep_aside, AsideError};
pub use scan::{check_at, read_at_most, scan, walk, Check, Next, Scan, Stop};
pub use simple::{Simple, SimpleHeader};

use std::path::PathBuf;

/// The byte layout of one kind of framed file: how its record headers are decoded and its
/// checksums checked, and where its commit turns end.
pub trait Framing {
    /// A decoded record header.
    type Header: Copy;
    /// Length of a record header in bytes.
    const HEADER_LEN: usize;

    /// Where the first record starts (the length of the file header).
    fn data_start(&self) -> u64;
    /// The first bytes of every record, which the search after damage looks for.
    fn marker(&self) -> [u8; 4];
    /// Decodes a record header (`b` is [`Framing::HEADER_LEN`] bytes); `None` when the bytes
    /// are not one (wrong marker, impossible fields, or a header checksum that fails).
    fn decode(&self, b: &[u8]) -> Option<Self::Header>;
    /// Length of the metadata part of the record `h` heads.
    fn meta_len(&self, h: &Self::Header) -> u64;
    /// Length of the body of the record `h` heads.
    fn body_len(&self, h: &Self::Header) -> u64;
    /// True when `meta` is what `h` was written with (a framing whose header checksum
    /// covers no metadata returns true).
    fn meta_ok(&self, h: &Self::Header, meta: &[u8]) -> bool;
    /// True when `body` is what `h` was written with.
    fn body_ok(&self, h: &Self::Header, body: &[u8]) -> bool;
    /// True when a commit turn ends after the record `h` heads (see [`Turns`]).
    fn ends_turn(&self, h: &Self::Header) -> bool;
    /// How the file's commit turns are marked.
    fn turns(&self) -> Turns;
    /// False for a header found by the search after damage whose record is not worth
    /// checking (bounded work for bytes that only look like headers).
    fn plausible(&self, _h: &Self::Header) -> bool {
        true
    }
    /// What a damaged record with intact metadata was about (a queue id), for the report.
    fn describe(&self, _meta: &[u8]) -> Option<String> {
        None
    }
    /// The header of a stand-in record exactly `len` bytes long whose body is zeros, to
    /// write over corruption that was kept aside; `None` when the framing has none or no
    /// record can be that long.
    fn filler(&self, len: u64) -> Option<Vec<u8>>;

    /// Bytes the whole record `h` heads takes.
    fn record_len(&self, h: &Self::Header) -> u64 {
        Self::HEADER_LEN as u64 + self.meta_len(h) + self.body_len(h)
    }
}

/// Where a framed file's commit turns end, which is what proves bytes were synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turns {
    /// Not marked (spool segments of format 1): nothing is proven synced; the first damage
    /// ends the scan and is a torn tail.
    Unmarked,
    /// A turn ends after each record for which [`Framing::ends_turn`] holds (a `Commit`
    /// record, written before the turn's sync).
    Marked,
    /// Every record is a turn of its own, synced before the next one is written: a whole
    /// record proves everything before its start, and a record with any byte after it
    /// itself, were synced.
    EachRecord,
}

/// What a scan needs to know of a file besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// A later file was started after this one's last turn was synced: its last turn end
    /// counts as proven even with no byte after it.
    pub sealed: bool,
    /// Where its bytes end for the scan (a void end: bytes after it are ignored).
    pub end: Option<u64>,
}

/// Damaged bytes a scan found, and what recovery did with them.
#[derive(Debug, Clone)]
pub struct Damaged {
    /// The file.
    pub path: PathBuf,
    /// Offset of the damaged bytes.
    pub offset: u64,
    /// How many bytes were damaged (up to the next whole record, or the end of the file).
    pub len: u64,
    /// A torn tail (may be cut) rather than corruption (never cut).
    pub torn: bool,
    /// What the checks found.
    pub reason: String,
    /// What the damaged record was about (a queue id), when its metadata was intact.
    pub id: Option<String>,
    /// Where the damaged bytes were kept (`None` for a read-only scan, or when they could
    /// not be copied: a torn tail is then cut all the same, corruption left in place).
    pub kept: Option<PathBuf>,
    /// Corruption whose bytes could not be copied aside: they were left in the file as they
    /// were, skipped for this run; a later start tries again to move them aside.
    pub left: bool,
}

#[cfg(test)]
mod tests;
