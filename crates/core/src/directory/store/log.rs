//! The change log, `changes.log`: framed records appended and fsynced before a change takes
//! effect, read back (and a torn tail cut) at open, and the conversion of the line format of
//! earlier versions. The record types ([`Change`] and its parts) are here too.
//!
//! The file starts with the 8 bytes `COEXLOG2`; then records, each a 16-byte header (marker
//! `C0 4C 4F 47`, payload length, CRC32 of the payload, CRC32 of the first 12 header bytes,
//! little-endian) and the change as JSON. The marker's first byte never occurs in UTF-8, so
//! no JSON payload can look like the start of a record.
//!
//! Framing is what makes the log crash-safe; it is read and recovered by the rules of every
//! framed file ([`crate::spool::framed`]; this file is its [`LOG_FORMAT`]). A record is written
//! at the end of the last whole record and fsynced before the change takes effect, so each
//! record is a commit turn of its own and only the last one can be torn (a crash or a full
//! disk mid-append): at open a damaged record with no whole record after it is a torn tail,
//! copied to `damaged/changes.log.OFFSET.torn` and cut off with a warning (its change was
//! never applied). A failed append is cut off at once, so the next change is never glued to
//! it. Damage with a whole record after it cannot come from a crash: it is corruption, and
//! the open fails, naming the file and the offset, leaving the bytes where they are, rather
//! than skip a change that was applied.
//!
//! A fleet change's record also holds its identity in PostgreSQL's log (`uid` and
//! `committed`, optional JSON fields: records written before them load without them).
//!
//! Format 1 (before framing) was one JSON line per change. Such a log is converted at open:
//! its records are rewritten in format 2 (the old file is kept as `changes.log.v1`), a torn
//! last line is dropped, and a batch that an older version glued onto a torn line is
//! recovered.

use super::super::DirectoryError;
use super::{corrupt, Store};
use crate::directory::io_err;
use crate::spool::framed::{self, Check, Shape, Simple};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tracing::{error, info, warn};

/// First bytes of a change log in format 2 (framed records).
pub(super) const LOG_MAGIC: &[u8; 8] = b"COEXLOG2";
/// The change log's layout as a framed file: 16-byte headers with their own checksum, a
/// JSON payload, one record per commit turn, no stand-in record (an applied change cannot
/// be skipped). The record marker `C0 4C 4F 47`: 0xC0 never occurs in UTF-8 text. Records
/// hold at most 1 GiB (a batch of several million mailboxes fits).
pub(super) const LOG_FORMAT: Simple = Simple {
    magic: LOG_MAGIC,
    marker: [0xC0, b'L', b'O', b'G'],
    max_record: 1 << 30,
};
/// Record header length.
const REC_HEADER: u64 = Simple::HEADER;
/// Largest record.
const MAX_RECORD: u64 = LOG_FORMAT.max_record;
/// Name of the change log in the store directory.
pub(super) const LOG_NAME: &str = "changes.log";
/// Folder of the store directory where damaged bytes of the change log are kept.
const DAMAGED_DIR: &str = "damaged";

/// Where a record of the change log is.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordPos {
    pub(super) id: u32,
    pub(super) offset: u64,
}

/// The payload of the whole record at `off` of `f` (whose records end at `end`).
fn read_record(f: &File, path: &Path, off: u64, end: u64) -> Result<Vec<u8>, DirectoryError> {
    let mut payload = Vec::new();
    match framed::check_at(&LOG_FORMAT, f, off, end, &mut payload).map_err(io_err(path))? {
        Check::Whole(_) => Ok(payload),
        Check::Bad { reason, .. } => Err(corrupt(path, off, reason.to_string())),
    }
}

/// One entry of a change: an address and the state it had before.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeEntry {
    /// Primary address of the mailbox.
    pub address: String,
    /// State before (route name).
    pub from: String,
    /// Origin before (0 = file).
    pub from_origin: u32,
    /// State after (route name).
    pub to: String,
}

/// What kind of change a log record is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A migration batch.
    Apply,
    /// Undoing a batch.
    Rollback,
    /// The directory file was reloaded (recorded for audit; not replayed).
    Reload,
    /// A fleet node took a new base directory from PostgreSQL (its rows are in the
    /// snapshot written with it, not in the log).
    Base,
    /// A source sync's changes as rows (see `crate::directory::delta`), replayed from the
    /// log.
    Delta,
}

/// One record of the change log: its summary plus what it changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// Id, time, kind, source, count.
    #[serde(flatten)]
    pub head: ChangeSummary,
    /// Addresses in the batch that are not in the directory.
    #[serde(default)]
    pub not_found: usize,
    /// Mailboxes already in the target state (for a rollback: moved again since).
    #[serde(default)]
    pub already: usize,
    /// The changes (empty for reloads).
    #[serde(default)]
    pub entries: Vec<ChangeEntry>,
    /// A source delta's rows (kind `delta` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::directory::delta::Delta>,
}

/// What identifies a change; all that is kept in memory for listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeSummary {
    /// Change id (batch id), increasing.
    pub id: u32,
    /// RFC 3339 time.
    pub time: String,
    /// Kind.
    pub kind: ChangeKind,
    /// Batch file name or directory file.
    pub source: String,
    /// The batch this rollback undoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolls_back: Option<u32>,
    /// Mailboxes whose state changed.
    pub count: usize,
    /// In a fleet: the change's identity in PostgreSQL's log (random, given at commit), so
    /// a log that moved back and reused this sequence number is told apart. `None` for
    /// changes logged before identities existed and outside a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// In a fleet: when PostgreSQL committed the change (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<String>,
}

/// A fleet change's place and identity in PostgreSQL's log: its sequence number, and the
/// random id and commit time PostgreSQL stored with it (`None` when unknown: changes made
/// before identities existed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Sequence number.
    pub seq: u32,
    /// Random id.
    pub uid: Option<String>,
    /// Commit time (RFC 3339).
    pub committed: Option<String>,
}

impl Stamp {
    /// A change known by its number only.
    pub fn seq(seq: u32) -> Stamp {
        Stamp {
            seq,
            ..Stamp::default()
        }
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "change {} (id {}, committed {})",
            self.seq,
            self.uid.as_deref().unwrap_or("unknown"),
            self.committed.as_deref().unwrap_or("unknown")
        )
    }
}

impl Store {
    /// Reads every record and builds the index. A torn tail is copied to `damaged/` and cut
    /// off; corruption (damage with a whole record after it) fails the open, naming the file
    /// and offset, and changes nothing.
    pub(super) fn scan(&mut self) -> Result<(), DirectoryError> {
        let path = self.log_path.clone();
        let shape = Shape {
            sealed: false,
            end: None,
        };
        let scan = framed::scan(&LOG_FORMAT, &self.log, &path, shape).map_err(io_err(&path))?;
        if let Some(d) = scan.damaged.iter().find(|d| !d.torn) {
            return Err(corrupt(
                &path,
                d.offset,
                format!(
                    "{}, and a whole record follows at offset {}: not a torn end",
                    d.reason,
                    d.offset + d.len
                ),
            ));
        }
        for &(off, h) in &scan.records {
            let mut payload = vec![0u8; h.len as usize];
            self.log
                .read_exact_at(&mut payload, off + REC_HEADER)
                .map_err(io_err(&path))?;
            let s = serde_json::from_slice::<ChangeSummary>(&payload)
                .map_err(|e| corrupt(&path, off, format!("record is not a change: {e}")))?;
            self.index.push(RecordPos {
                id: s.id,
                offset: off,
            });
            self.summaries.push(s);
        }
        if let Some(d) = scan.damaged.iter().find(|d| d.torn) {
            let aside = self.dir.join(DAMAGED_DIR);
            let kept = framed::keep_aside(&self.log, d, &aside, &|_| Ok(()));
            match &kept {
                Ok(p) => warn!(
                    file = %path.display(),
                    offset = d.offset,
                    bytes = d.len,
                    reason = %d.reason,
                    kept = %p.display(),
                    "change log: cutting off a torn last record (an append interrupted by a crash or a full disk; its change was never applied)"
                ),
                Err(e) => error!(
                    file = %path.display(),
                    offset = d.offset,
                    bytes = d.len,
                    reason = %d.reason,
                    error = %e,
                    "change log: cutting off a torn last record (an append interrupted by a crash or a full disk; its change was never applied); it could NOT be copied to damaged/"
                ),
            }
            framed::cut(&self.log, d.offset).map_err(io_err(&path))?;
        }
        self.end = scan.end();
        Ok(())
    }

    /// Appends a change and fsyncs it. On failure nothing of it stays in the log: the bytes
    /// written are cut off (now, or before the next append if cutting fails too).
    pub fn append(&mut self, c: &Change) -> Result<(), DirectoryError> {
        let path = self.log_path.clone();
        let payload = serde_json::to_vec(c).map_err(|e| io_err(&path)(io::Error::other(e)))?;
        if payload.len() as u64 > MAX_RECORD {
            return Err(io_err(&path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a change of {} bytes is over the {MAX_RECORD}-byte record limit",
                    payload.len()
                ),
            )));
        }
        if self.dirty {
            framed::cut(&self.log, self.end).map_err(io_err(&path))?;
            self.dirty = false;
        }
        let rec = LOG_FORMAT.frame(&payload);
        let res = self
            .log
            .write_all_at(&rec, self.end)
            .and_then(|_| self.log.sync_data());
        if let Err(e) = res {
            self.dirty = true;
            if framed::cut(&self.log, self.end).is_ok() {
                self.dirty = false;
            }
            return Err(io_err(&path)(e));
        }
        self.index.push(RecordPos {
            id: c.head.id,
            offset: self.end,
        });
        self.summaries.push(c.head.clone());
        self.end += rec.len() as u64;
        Ok(())
    }

    /// Empties the log (a fleet node's store taken over by another fleet), durably.
    pub fn reset(&mut self) -> Result<(), DirectoryError> {
        let header = LOG_MAGIC.len() as u64;
        framed::cut(&self.log, header).map_err(io_err(&self.log_path))?;
        self.end = header;
        self.dirty = false;
        self.index.clear();
        self.summaries.clear();
        Ok(())
    }

    /// Summaries of all records, and the full records with an id above `after`.
    pub fn read_log(
        &self,
        after: u32,
    ) -> Result<(Vec<ChangeSummary>, Vec<Change>), DirectoryError> {
        let mut tail = Vec::new();
        for pos in self.index.iter().filter(|p| p.id > after) {
            tail.push(self.read_change(*pos)?);
        }
        Ok((self.summaries.clone(), tail))
    }

    /// The full record of change `id`.
    pub fn find(&self, id: u32) -> Result<Option<Change>, DirectoryError> {
        match self.index.iter().find(|p| p.id == id) {
            Some(pos) => self.read_change(*pos).map(Some),
            None => Ok(None),
        }
    }

    fn read_change(&self, pos: RecordPos) -> Result<Change, DirectoryError> {
        let path = &self.log_path;
        let payload = read_record(&self.log, path, pos.offset, self.end)?;
        serde_json::from_slice(&payload)
            .map_err(|e| corrupt(path, pos.offset, format!("record is not a change: {e}")))
    }
}

/// Opens (creating) the change log for reading and positioned writes; a new file's directory
/// entry is fsynced.
pub(super) fn open_log(dir: &Path, path: &Path) -> Result<File, DirectoryError> {
    let existed = path.exists();
    let f = crate::fsmode::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    if !existed {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(f)
}

/// Converts a format-1 log (JSON lines) at `path` to format 2, keeping the old file as
/// `changes.log.v1`. Crash-safe: the new file is written and fsynced aside, then renamed over.
pub(super) fn convert_v1(dir: &Path, path: &Path) -> Result<(), DirectoryError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let changes = parse_v1(&data, path)?;
    let tmp = dir.join("changes.log.tmp");
    let mut out = LOG_MAGIC.to_vec();
    for c in &changes {
        let payload = serde_json::to_vec(c).map_err(|e| io_err(&tmp)(io::Error::other(e)))?;
        out.extend_from_slice(&LOG_FORMAT.frame(&payload));
    }
    let write = || -> io::Result<()> {
        let mut f = crate::fsmode::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp))?;
    let backup = dir.join("changes.log.v1");
    if !backup.exists() {
        fs::hard_link(path, &backup).map_err(io_err(&backup))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    info!(
        file = %path.display(),
        records = changes.len(),
        backup = %backup.display(),
        "change log converted from JSON lines to framed records"
    );
    Ok(())
}

/// Reads a format-1 log: one JSON change per line. A torn last line is dropped; a line that
/// holds a torn record with a whole change glued after it (what versions before framing wrote
/// after a failed append) yields that change; any other unreadable line is an error.
fn parse_v1(data: &[u8], path: &Path) -> Result<Vec<Change>, DirectoryError> {
    let mut out = Vec::new();
    let mut off = 0u64;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let start = off;
        off += line.len() as u64;
        let complete = line.ends_with(b"\n");
        let body = line.trim_ascii();
        if body.is_empty() {
            continue;
        }
        let err = match serde_json::from_slice::<Change>(body) {
            Ok(c) => {
                out.push(c);
                continue;
            }
            Err(e) => e,
        };
        let glued = memchr::memmem::find_iter(body, b"{\"id\":")
            .filter(|&p| p > 0)
            .find_map(|p| {
                serde_json::from_slice::<Change>(&body[p..])
                    .ok()
                    .map(|c| (p, c))
            });
        match glued {
            Some((p, c)) => {
                warn!(
                    file = %path.display(),
                    offset = start,
                    dropped_bytes = p,
                    change = c.head.id,
                    "change log: dropped a torn record and recovered the change glued after it"
                );
                out.push(c);
            }
            None if !complete => warn!(
                file = %path.display(),
                offset = start,
                bytes = line.len(),
                "change log: dropped a torn last line (an append interrupted by a crash; its change was never applied)"
            ),
            None => return Err(corrupt(path, start, format!("line is not a change: {err}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
