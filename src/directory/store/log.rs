//! The change log, `changes.log`: framed records appended and fsynced before a change takes
//! effect, read back (and a torn tail cut) at open, and the conversion of the line format of
//! earlier versions. The record types ([`Change`] and its parts) are here too.
//!
//! The file starts with the 8 bytes `COEXLOG2`; then records, each a 16-byte header (marker
//! `C0 4C 4F 47`, payload length, CRC32 of the payload, CRC32 of the first 12 header bytes,
//! little-endian) and the change as JSON. The marker's first byte never occurs in UTF-8, so
//! no JSON payload can look like the start of a record.
//!
//! Framing is what makes the log crash-safe. A record is written at the end of the last whole
//! record and fsynced before the change takes effect, so only the last record can be torn (a
//! crash or a full disk mid-append): at open a damaged record with no whole record after it is
//! a torn tail, cut off with a warning (its change was never applied). A failed append is cut
//! off at once, so the next change is never glued to it. Damage with a whole record after it
//! cannot come from a crash: the open fails, naming the file and the offset, rather than skip
//! a change that was applied.
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
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tracing::{info, warn};

/// First bytes of a change log in format 2 (framed records).
pub(super) const LOG_MAGIC: &[u8; 8] = b"COEXLOG2";
/// First bytes of each record; 0xC0 never occurs in UTF-8 text.
const REC_MAGIC: [u8; 4] = [0xC0, b'L', b'O', b'G'];
/// Record header: marker, payload length, payload CRC32, header CRC32.
const REC_HEADER: u64 = 16;
/// Largest record (a batch of several million mailboxes fits).
const MAX_RECORD: u64 = 1 << 30;
/// Name of the change log in the store directory.
pub(super) const LOG_NAME: &str = "changes.log";

/// Where a record of the change log is.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordPos {
    pub(super) id: u32,
    pub(super) offset: u64,
}

/// Why the bytes at an offset are not a whole record.
enum Bad {
    /// Not a record (torn or damaged), with the reason.
    Record(String),
    /// The file could not be read.
    Io(io::Error),
}

impl From<io::Error> for Bad {
    fn from(e: io::Error) -> Bad {
        Bad::Io(e)
    }
}

/// The framed form of `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(REC_HEADER as usize + payload.len());
    rec.extend_from_slice(&REC_MAGIC);
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let hcrc = crc32fast::hash(&rec);
    rec.extend_from_slice(&hcrc.to_le_bytes());
    rec.extend_from_slice(payload);
    rec
}

/// Reads the whole record at `off` (of a file `len` bytes long) and returns its payload.
fn read_record(f: &File, off: u64, len: u64) -> Result<Vec<u8>, Bad> {
    let bad = |r: &str| Err(Bad::Record(r.to_string()));
    if len.saturating_sub(off) < REC_HEADER {
        return bad("incomplete record header");
    }
    let mut h = [0u8; REC_HEADER as usize];
    f.read_exact_at(&mut h, off)?;
    if h[..4] != REC_MAGIC {
        return bad("no record marker");
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if crc32fast::hash(&h[..12]) != word(12) {
        return bad("record header checksum mismatch");
    }
    let n = u64::from(word(4));
    if n > MAX_RECORD {
        return bad("record length over the limit");
    }
    let have = len - off - REC_HEADER;
    if n > have {
        return Err(Bad::Record(format!(
            "record of {n} bytes cut short after {have} bytes"
        )));
    }
    let mut payload = vec![0u8; n as usize];
    f.read_exact_at(&mut payload, off + REC_HEADER)?;
    if crc32fast::hash(&payload) != word(8) {
        return bad("record checksum mismatch");
    }
    Ok(payload)
}

/// The offset of the first whole record that starts after `from`, if any.
fn next_whole_record(f: &File, from: u64, len: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = from;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], pos)?;
        for i in memchr::memchr_iter(REC_MAGIC[0], &buf[..n]) {
            match read_record(f, pos + i as u64, len) {
                Ok(_) => return Ok(Some(pos + i as u64)),
                Err(Bad::Io(e)) => return Err(e),
                Err(Bad::Record(_)) => {}
            }
        }
        pos += n as u64;
    }
    Ok(None)
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
    /// Reads every record, builds the index and cuts a torn tail.
    pub(super) fn scan(&mut self) -> Result<(), DirectoryError> {
        let path = self.log_path.clone();
        let len = self.log.metadata().map_err(io_err(&path))?.len();
        let mut off = LOG_MAGIC.len() as u64;
        while off < len {
            let reason = match read_record(&self.log, off, len) {
                Ok(payload) => {
                    let s = serde_json::from_slice::<ChangeSummary>(&payload)
                        .map_err(|e| corrupt(&path, off, format!("record is not a change: {e}")))?;
                    self.index.push(RecordPos {
                        id: s.id,
                        offset: off,
                    });
                    self.summaries.push(s);
                    off += REC_HEADER + payload.len() as u64;
                    continue;
                }
                Err(Bad::Io(e)) => return Err(io_err(&path)(e)),
                Err(Bad::Record(reason)) => reason,
            };
            // Damaged here. A crash can only tear the last record: with a whole record after
            // it, this is damage to a change that was applied.
            if let Some(next) = next_whole_record(&self.log, off + 1, len).map_err(io_err(&path))? {
                return Err(corrupt(
                    &path,
                    off,
                    format!(
                        "{reason}, and a whole record follows at offset {next}: not a torn end"
                    ),
                ));
            }
            warn!(
                file = %path.display(),
                offset = off,
                bytes = len - off,
                reason,
                "change log: cutting off a torn last record (an append interrupted by a crash or a full disk; its change was never applied)"
            );
            self.log
                .set_len(off)
                .and_then(|_| self.log.sync_all())
                .map_err(io_err(&path))?;
            break;
        }
        self.end = off;
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
            self.log
                .set_len(self.end)
                .and_then(|_| self.log.sync_all())
                .map_err(io_err(&path))?;
            self.dirty = false;
        }
        let rec = frame(&payload);
        let res = self
            .log
            .write_all_at(&rec, self.end)
            .and_then(|_| self.log.sync_data());
        if let Err(e) = res {
            self.dirty = true;
            if self
                .log
                .set_len(self.end)
                .and_then(|_| self.log.sync_all())
                .is_ok()
            {
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
        self.log
            .set_len(header)
            .and_then(|_| self.log.sync_all())
            .map_err(io_err(&self.log_path))?;
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
        let payload = read_record(&self.log, pos.offset, self.end).map_err(|b| match b {
            Bad::Io(e) => io_err(path)(e),
            Bad::Record(r) => corrupt(path, pos.offset, r),
        })?;
        serde_json::from_slice(&payload)
            .map_err(|e| corrupt(path, pos.offset, format!("record is not a change: {e}")))
    }
}

/// Opens (creating) the change log for reading and positioned writes; a new file's directory
/// entry is fsynced.
pub(super) fn open_log(dir: &Path, path: &Path) -> Result<File, DirectoryError> {
    let existed = path.exists();
    let f = OpenOptions::new()
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
        out.extend_from_slice(&frame(&payload));
    }
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
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
mod tests {
    use super::*;

    fn change(id: u32) -> Change {
        Change {
            head: ChangeSummary {
                id,
                time: "2026-11-01T10:00:00Z".into(),
                kind: ChangeKind::Apply,
                source: format!("b{id}.csv"),
                rolls_back: None,
                count: 1,
                uid: None,
                committed: None,
            },
            not_found: 0,
            already: 0,
            entries: vec![ChangeEntry {
                address: format!("u{id}@nhs.test"),
                from: "onprem".into(),
                from_origin: 0,
                to: "cloud".into(),
            }],
        }
    }

    fn ids(store: &Store) -> Vec<u32> {
        store
            .read_log(0)
            .unwrap()
            .1
            .iter()
            .map(|c| c.head.id)
            .collect()
    }

    /// A fleet change keeps its identity; a record written before identities existed (no
    /// `uid` in its JSON) loads without one; `reset` empties the log for good.
    #[test]
    fn identities_are_kept_and_records_without_them_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let old = serde_json::to_vec(&change(1)).unwrap();
        assert!(!String::from_utf8_lossy(&old).contains("uid"));
        store.append(&change(1)).unwrap();
        let mut c = change(2);
        c.head.uid = Some("9f0c".into());
        c.head.committed = Some("2026-11-01T10:00:00.000001Z".into());
        store.append(&c).unwrap();
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        let (list, _) = store.read_log(0).unwrap();
        assert_eq!(list[0].uid, None);
        assert_eq!(list[1].uid.as_deref(), Some("9f0c"));
        assert_eq!(
            list[1].committed.as_deref(),
            Some("2026-11-01T10:00:00.000001Z")
        );
        store.reset().unwrap();
        store.append(&change(7)).unwrap();
        drop(store);
        assert_eq!(ids(&Store::open(dir.path()).unwrap()), vec![7]);
    }

    /// Every shape a torn append can leave (part of a header, part of a payload, zeros from
    /// a file extended but not written, a whole-length record with wrong bytes) is cut off at
    /// open, back to the end of the last whole record; appends then continue there.
    #[test]
    fn torn_tails_are_cut_back_to_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.log");
        let mut store = Store::open(dir.path()).unwrap();
        store.append(&change(1)).unwrap();
        store.append(&change(2)).unwrap();
        drop(store);
        let whole = fs::read(&path).unwrap();
        let mut last = frame(&serde_json::to_vec(&change(3)).unwrap());
        let n = last.len();
        last[n - 3] ^= 0x55;
        let tails: Vec<Vec<u8>> = vec![
            last[..5].to_vec(),
            last[..40].to_vec(),
            vec![0u8; 4096],
            last,
        ];
        for tail in tails {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&tail);
            fs::write(&path, &bytes).unwrap();
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(
                fs::read(&path).unwrap(),
                whole,
                "tail of {} bytes",
                tail.len()
            );
            assert_eq!(ids(&store), vec![1, 2]);
            store.append(&change(3)).unwrap();
            drop(store);
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(ids(&store), vec![1, 2, 3]);
            assert_eq!(
                store.find(3).unwrap().unwrap().entries[0].address,
                "u3@nhs.test"
            );
            drop(store);
            fs::write(&path, &whole).unwrap();
        }

        // A file that is neither format is refused, not overwritten.
        fs::write(&path, b"PK\x03\x04 something else").unwrap();
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("offset 0: not a coexist change log"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"PK\x03\x04 something else");
    }
}
