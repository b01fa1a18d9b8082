//! The persistent directory store under `directory.store_dir`:
//!
//! - `snapshot.bin`: the whole table and every mailbox's current state, origin and routing
//!   address, as flat little-endian arrays with a CRC32. Loading it is a read and a
//!   checksum, with no parsing and no hashing, so a restart with 2,000,000 entries does not
//!   re-parse the CSV. Format `COEXDIR4`; a `COEXDIR3` snapshot (written before routing
//!   addresses existed, so from a file without them) still loads, with no routing addresses.
//! - `changes.log`: append-only, one record per batch, rollback or file reload, fsynced
//!   before the change takes effect. Records newer than the snapshot are replayed at start.
//!   Its format, framing and recovery are described in `log`. In a fleet each record also
//!   keeps the change's identity in PostgreSQL's log (`uid`, `committed`: see [`Stamp`]),
//!   which the fleet checks the log against; records written before identities existed
//!   have none and still load.
//! - `fleet.id` (fleet nodes): the fleet the store belongs to, written by `crate::fleet`.
//!
//! A hand-written format rather than an embedded KV store (redb, fjall): the table is read
//! whole at start and never queried on disk, so a store's B-tree would only add work; the
//! notes show the durable cost is the fsync, which both approaches pay once per batch.

mod log;

pub use log::{Change, ChangeEntry, ChangeKind, ChangeSummary, Stamp};

use super::routing::RoutingAddresses;
use super::table::Table;
use super::{io_err, DirectoryError};
use log::{convert_v1, open_log, RecordPos, LOG_MAGIC, LOG_NAME};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The snapshot format written: `COEXDIR3` plus the routing addresses at the end.
const MAGIC: &[u8; 8] = b"COEXDIR4";
/// The format before routing addresses: read, never written.
const MAGIC_V3: &[u8; 8] = b"COEXDIR3";

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
    /// Per mailbox: routing address, from the file.
    pub routing: RoutingAddresses,
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
    pub(crate) dir: PathBuf,
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

fn corrupt(path: &Path, offset: u64, reason: String) -> DirectoryError {
    DirectoryError::Corrupt {
        file: path.display().to_string(),
        offset,
        reason,
    }
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
        crate::fsmode::create_dir_all(dir).map_err(io_err(dir))?;
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
            let mut f = crate::fsmode::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()
        };
        write().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

fn encode(s: &Stored) -> Vec<u8> {
    let t = &s.table;
    let mut out = Vec::with_capacity(
        80 + t.arena.len()
            + 4 * t.primary.len()
            + 8 * t.slots.len()
            + s.states.len() * 6
            + s.routing.arena.len()
            + 4 * s.routing.ends.len(),
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
    put_bytes(&mut out, &s.routing.arena);
    put_u32s(&mut out, &s.routing.ends);
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
    let v3 = match r.take(8)? {
        m if m == MAGIC => false,
        m if m == MAGIC_V3 => true,
        _ => return None,
    };
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
        dead: 0,
    };
    let s = Stored {
        fingerprint,
        last_change,
        state_names,
        table,
        file_states: r.bytes()?,
        states: r.bytes()?,
        origin: r.u32s()?,
        routing: match v3 {
            true => RoutingAddresses::default(),
            false => RoutingAddresses {
                arena: r.bytes()?,
                ends: r.u32s()?,
            },
        },
    };
    let m = s.table.mailboxes();
    let ok = r.0.is_empty()
        && s.table.is_consistent()
        && s.file_states.len() == m
        && s.states.len() == m
        && s.origin.len() == m
        && s.routing.is_consistent(m);
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
            b"address,state,mailbox,routing_address\na@nhs.test,cloud,m,\nalias@other.test,cloud,m,a@tenant.mail.onmicrosoft.test\nb@nhs.test,onprem,,\n",
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
            routing: p.routing,
        };
        assert_eq!(s.routing.get(0), Some("a@tenant.mail.onmicrosoft.test"));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.read_snapshot().unwrap().is_none());
        store.write_snapshot(&s).unwrap();
        assert_eq!(store.read_snapshot().unwrap().unwrap(), s);
        let mut bytes = fs::read(dir.path().join("snapshot.bin")).unwrap();
        assert_eq!(&bytes[..8], b"COEXDIR4");
        bytes[20] ^= 1;
        fs::write(dir.path().join("snapshot.bin"), &bytes).unwrap();
        assert!(store.read_snapshot().unwrap().is_none());
    }

    /// A snapshot written before routing addresses (`COEXDIR3`: the same arrays without the
    /// routing addresses at the end) loads, with none.
    #[test]
    fn a_snapshot_of_the_format_before_loads_without_routing_addresses() {
        let states = vec![RouteName("cloud".into()), RouteName("onprem".into())];
        let p = super::super::table::parse(
            b"address,state\na@nhs.test,cloud\nb@nhs.test,onprem\n",
            "d",
            &states,
        )
        .unwrap();
        let s = Stored {
            fingerprint: Fingerprint {
                len: 1,
                mtime_ns: 2,
            },
            last_change: 3,
            state_names: vec!["cloud".into(), "onprem".into()],
            table: p.table,
            file_states: p.states.clone(),
            states: vec![1, 1],
            origin: vec![3, 0],
            routing: RoutingAddresses::default(),
        };
        // The v3 bytes: this format's, less the two empty routing arrays (two lengths of
        // 0) before the CRC, under the old magic and with the CRC of that.
        let v4 = encode(&s);
        let mut v3 = v4[..v4.len() - 4 - 16].to_vec();
        assert_eq!(&v4[v4.len() - 20..v4.len() - 4], &[0u8; 16]);
        v3[..8].copy_from_slice(MAGIC_V3);
        let crc = crc32fast::hash(&v3);
        v3.extend_from_slice(&crc.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("snapshot.bin"), &v3).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_snapshot().unwrap(), Some(s));
        // An unknown magic is no snapshot (the directory is rebuilt from its file).
        let mut other = v3[..v3.len() - 4].to_vec();
        other[..8].copy_from_slice(b"COEXDIR9");
        let crc = crc32fast::hash(&other);
        other.extend_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join("snapshot.bin"), &other).unwrap();
        assert_eq!(store.read_snapshot().unwrap(), None);
    }
}
