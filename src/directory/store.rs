//! The persistent directory store under `directory.store_dir`:
//!
//! - `snapshot.bin`: the whole table and every mailbox's current state and origin, as flat
//!   little-endian arrays with a CRC32. Loading it is a read and a checksum, with no parsing
//!   and no hashing, so a restart with 2,000,000 entries does not re-parse the CSV.
//! - `changes.log`: append-only JSON lines, one per batch, rollback or file reload, fsynced
//!   before the change takes effect. Entries newer than the snapshot are replayed at start.
//!
//! A hand-written format rather than an embedded KV store (redb, fjall): the table is read
//! whole at start and never queried on disk, so a store's B-tree would only add work; the
//! notes show the durable cost is the fsync, which both approaches pay once per batch.

use super::table::Table;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"COEXDIR3";

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
    log: File,
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
            .map(|n| names.iter().position(|r| r.as_str() == n).map(|i| i as u8))
            .collect();
        for x in self.states.iter_mut().chain(self.file_states.iter_mut()) {
            *x = map.get(*x as usize).copied().flatten()?;
        }
        self.state_names = names.iter().map(|r| r.as_str().to_string()).collect();
        Some(self)
    }
}

impl Store {
    /// Opens (creating) the store directory and its change log.
    pub fn open(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(dir.join("changes.log"))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            log,
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    /// Reads the snapshot; `Ok(None)` when there is none or it is damaged (rebuilt from CSV).
    pub fn read_snapshot(&self) -> io::Result<Option<Stored>> {
        let mut data = Vec::new();
        match File::open(self.snapshot_path()) {
            Ok(mut f) => f.read_to_end(&mut data)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(decode(&data))
    }

    /// Writes the snapshot atomically (temp file, fsync, rename, directory fsync).
    pub fn write_snapshot(&self, s: &Stored) -> io::Result<()> {
        let data = encode(s);
        let tmp = self.dir.join("snapshot.bin.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, self.snapshot_path())?;
        File::open(&self.dir)?.sync_all()
    }

    /// Appends a change and fsyncs it.
    pub fn append(&mut self, c: &Change) -> io::Result<()> {
        let mut line = serde_json::to_vec(c).map_err(io::Error::other)?;
        line.push(b'\n');
        self.log.write_all(&line)?;
        self.log.sync_data()
    }

    /// Reads the change log: summaries of all records, and the full records with an id above
    /// `after`. A torn last line (crash while appending) is ignored.
    pub fn read_log(&self, after: u32) -> io::Result<(Vec<ChangeSummary>, Vec<Change>)> {
        let f = File::open(self.dir.join("changes.log"))?;
        let mut summaries = Vec::new();
        let mut tail = Vec::new();
        for line in io::BufReader::new(f).split(b'\n') {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            let Ok(s) = serde_json::from_slice::<ChangeSummary>(&line) else {
                continue;
            };
            if s.id > after {
                if let Ok(c) = serde_json::from_slice::<Change>(&line) {
                    tail.push(c);
                }
            }
            summaries.push(s);
        }
        Ok((summaries, tail))
    }

    /// The full record of change `id`.
    pub fn find(&self, id: u32) -> io::Result<Option<Change>> {
        let f = File::open(self.dir.join("changes.log"))?;
        for line in io::BufReader::new(f).split(b'\n') {
            let line = line?;
            if let Ok(s) = serde_json::from_slice::<ChangeSummary>(&line) {
                if s.id == id {
                    return Ok(serde_json::from_slice::<Change>(&line).ok());
                }
            }
        }
        Ok(None)
    }
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
}
