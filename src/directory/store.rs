//! The persistent directory store under `directory.store_dir`:
//!
//! - `snapshot.bin`: the whole table and every mailbox's current state and origin, as flat
//!   little-endian arrays with a CRC32. Loading it is a read and a checksum, with no parsing
//!   and no hashing, so a restart with 2,000,000 entries does not re-parse the CSV.
//! - `changes.log`: append-only, one record per batch, rollback or file reload, fsynced
//!   before the change takes effect. Records newer than the snapshot are replayed at start.
//!
//! ## Change log format
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
//! Format 1 (before framing) was one JSON line per change. Such a log is converted at open:
//! its records are rewritten in format 2 (the old file is kept as `changes.log.v1`), a torn
//! last line is dropped, and a batch that an older version glued onto a torn line is
//! recovered.
//!
//! A hand-written format rather than an embedded KV store (redb, fjall): the table is read
//! whole at start and never queried on disk, so a store's B-tree would only add work; the
//! notes show the durable cost is the fsync, which both approaches pay once per batch.

use super::table::Table;
use super::DirectoryError;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

const MAGIC: &[u8; 8] = b"COEXDIR3";

/// First bytes of a change log in format 2 (framed records).
const LOG_MAGIC: &[u8; 8] = b"COEXLOG2";
/// First bytes of each record; 0xC0 never occurs in UTF-8 text.
const REC_MAGIC: [u8; 4] = [0xC0, b'L', b'O', b'G'];
/// Record header: marker, payload length, payload CRC32, header CRC32.
const REC_HEADER: u64 = 16;
/// Largest record (a batch of several million mailboxes fits).
const MAX_RECORD: u64 = 1 << 30;
/// Name of the change log in the store directory.
const LOG_NAME: &str = "changes.log";

/// What identifies the directory file a snapshot was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fingerprint {
    /// File length.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u64,
}

impl Fingerprint {
    /// Reads the fingerprint of `path`.
    pub fn of(path: &Path) -> io::Result<Fingerprint> {
        let m = fs::metadata(path)?;
        let mtime_ns = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Fingerprint {
            len: m.len(),
            mtime_ns,
        })
    }
}

/// The stored form of the live directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The directory file it was built from.
    pub fingerprint: Fingerprint,
    /// Highest change-log id included.
    pub last_change: u32,
    /// The state names the state numbers below refer to (route names at the time).
    pub state_names: Vec<String>,
    /// The address index.
    pub table: Table,
    /// Per mailbox: state as written in the file.
    pub file_states: Vec<u8>,
    /// Per mailbox: current state.
    pub states: Vec<u8>,
    /// Per mailbox: 0 = file, else the change id that set it.
    pub origin: Vec<u32>,
}

fn put_u32s(out: &mut Vec<u8>, v: &[u32]) {
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_u64s(out: &mut Vec<u8>, v: &[u64]) {
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.reserve(v.len() * 8);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn u64s(&mut self) -> Option<Vec<u64>> {
        let n = usize::try_from(self.u64()?).ok()?;
        let raw = self.take(n.checked_mul(8)?)?;
        Some(
            raw.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )
    }
    fn u32s(&mut self) -> Option<Vec<u32>> {
        let n = usize::try_from(self.u64()?).ok()?;
        let raw = self.take(n.checked_mul(4)?)?;
        Some(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

/// The store's files.
pub struct Store {
    dir: PathBuf,
    log_path: PathBuf,
    log: File,
    /// End of the last whole record: where the next one is written.
    end: u64,
    /// Every record's id and place, in log order.
    index: Vec<RecordPos>,
    /// Every record's summary, in log order (read at open).
    summaries: Vec<ChangeSummary>,
    /// A failed append may have left bytes after `end`; cut them before the next one.
    dirty: bool,
}

/// Where a record of the change log is.
#[derive(Debug, Clone, Copy)]
struct RecordPos {
    id: u32,
    offset: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DirectoryError + '_ {
    move |source| DirectoryError::Io {
        file: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: String) -> DirectoryError {
    DirectoryError::Corrupt {
        file: path.display().to_string(),
        offset,
        reason,
    }
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
}

impl Stored {
    /// Renumbers the states for the current route names. `None` when a state of the snapshot
    /// is no longer a route (the directory is then rebuilt from its file).
    pub fn renumber(mut self, names: &[crate::types::RouteName]) -> Option<Stored> {
        let map: Vec<Option<u8>> = self
            .state_names
            .iter()
            .map(|n| super::StateId::find(names, n).map(super::StateId::raw))
            .collect();
        for x in self.states.iter_mut().chain(self.file_states.iter_mut()) {
            *x = map.get(*x as usize).copied().flatten()?;
        }
        self.state_names = names.iter().map(|r| r.as_str().to_string()).collect();
        Some(self)
    }
}

impl Store {
    /// Opens (creating) the store directory and its change log. A torn last record (a crash
    /// or a full disk mid-append) is cut off with a warning; a log in the line format of
    /// earlier versions is converted; damage before the last record is an error naming the
    /// file and offset.
    pub fn open(dir: &Path) -> Result<Store, DirectoryError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let log_path = dir.join(LOG_NAME);
        let mut log = open_log(dir, &log_path)?;
        let len = log.metadata().map_err(io_err(&log_path))?.len();
        let mut head = [0u8; 8];
        let n = len.min(8) as usize;
        log.read_exact_at(&mut head[..n], 0)
            .map_err(io_err(&log_path))?;
        if n < 8 && head[..n] == LOG_MAGIC[..n] {
            // New, or its header torn by a crash right after creation: (re)write the header.
            log.set_len(0).map_err(io_err(&log_path))?;
            log.write_all_at(LOG_MAGIC, 0)
                .and_then(|_| log.sync_all())
                .map_err(io_err(&log_path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        } else if head[..n] != LOG_MAGIC[..n] {
            if head[..n].trim_ascii_start().first() != Some(&b'{') {
                return Err(corrupt(
                    &log_path,
                    0,
                    "not a coexist change log (unknown header)".into(),
                ));
            }
            convert_v1(dir, &log_path)?;
            log = open_log(dir, &log_path)?;
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            log_path,
            log,
            end: LOG_MAGIC.len() as u64,
            index: Vec::new(),
            summaries: Vec::new(),
            dirty: false,
        };
        store.scan()?;
        Ok(store)
    }

    /// Reads every record, builds the index and cuts a torn tail.
    fn scan(&mut self) -> Result<(), DirectoryError> {
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

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    /// Reads the snapshot; `Ok(None)` when there is none or it is damaged (rebuilt from CSV).
    pub fn read_snapshot(&self) -> Result<Option<Stored>, DirectoryError> {
        let path = self.snapshot_path();
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut data).map_err(io_err(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(decode(&data))
    }

    /// Writes the snapshot atomically (temp file, fsync, rename, directory fsync).
    pub fn write_snapshot(&self, s: &Stored) -> Result<(), DirectoryError> {
        let data = encode(s);
        let path = self.snapshot_path();
        let tmp = self.dir.join("snapshot.bin.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()
        };
        write().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
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
fn open_log(dir: &Path, path: &Path) -> Result<File, DirectoryError> {
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
fn convert_v1(dir: &Path, path: &Path) -> Result<(), DirectoryError> {
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

fn encode(s: &Stored) -> Vec<u8> {
    let t = &s.table;
    let mut out = Vec::with_capacity(
        64 + t.arena.len() + 4 * t.primary.len() + 8 * t.slots.len() + s.states.len() * 6,
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&s.fingerprint.len.to_le_bytes());
    out.extend_from_slice(&s.fingerprint.mtime_ns.to_le_bytes());
    out.extend_from_slice(&u64::from(s.last_change).to_le_bytes());
    put_bytes(&mut out, s.state_names.join("\n").as_bytes());
    put_bytes(&mut out, &t.arena);
    out.extend_from_slice(&(t.count as u64).to_le_bytes());
    put_u32s(&mut out, &t.primary);
    put_u64s(&mut out, &t.slots);
    put_bytes(&mut out, &s.file_states);
    put_bytes(&mut out, &s.states);
    put_u32s(&mut out, &s.origin);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(data: &[u8]) -> Option<Stored> {
    let (body, crc) = data.split_at(data.len().checked_sub(4)?);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC {
        return None;
    }
    let fingerprint = Fingerprint {
        len: r.u64()?,
        mtime_ns: r.u64()?,
    };
    let last_change = u32::try_from(r.u64()?).ok()?;
    let names = String::from_utf8(r.bytes()?).ok()?;
    let state_names: Vec<String> = names.split('\n').map(str::to_string).collect();
    let table = Table {
        arena: r.bytes()?,
        count: usize::try_from(r.u64()?).ok()?,
        primary: r.u32s()?,
        slots: r.u64s()?,
    };
    let s = Stored {
        fingerprint,
        last_change,
        state_names,
        table,
        file_states: r.bytes()?,
        states: r.bytes()?,
        origin: r.u32s()?,
    };
    let m = s.table.mailboxes();
    let ok = s.table.is_consistent()
        && s.file_states.len() == m
        && s.states.len() == m
        && s.origin.len() == m;
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RouteName;

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let states = vec![RouteName("cloud".into()), RouteName("onprem".into())];
        let p = super::super::table::parse(
            b"address,state\na@nhs.test,cloud\nb@nhs.test,onprem\n",
            "d",
            &states,
        )
        .unwrap();
        let s = Stored {
            fingerprint: Fingerprint {
                len: 3,
                mtime_ns: 4,
            },
            last_change: 7,
            state_names: vec!["cloud".into(), "onprem".into()],
            table: p.table,
            file_states: p.states.clone(),
            states: vec![1, 1],
            origin: vec![7, 0],
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.read_snapshot().unwrap().is_none());
        store.write_snapshot(&s).unwrap();
        assert_eq!(store.read_snapshot().unwrap().unwrap(), s);
        let mut bytes = fs::read(dir.path().join("snapshot.bin")).unwrap();
        bytes[20] ^= 1;
        fs::write(dir.path().join("snapshot.bin"), &bytes).unwrap();
        assert!(store.read_snapshot().unwrap().is_none());
    }

    fn change(id: u32) -> Change {
        Change {
            head: ChangeSummary {
                id,
                time: "2026-11-01T10:00:00Z".into(),
                kind: ChangeKind::Apply,
                source: format!("b{id}.csv"),
                rolls_back: None,
                count: 1,
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
