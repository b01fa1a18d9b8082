//! The files of the tracking log: `track-MS.log` (framed records, each a batch of events as
//! JSON lines; `MS` is the Unix time in milliseconds the file was started) and, once the
//! file is sealed, its index `track-MS.idx`:
//!
//! ```text
//! "COEXTIX1"  first_ms u64  last_ms u64  events u64  n_keys u64  n_counts u64
//! n_keys   × (key hash u64, record offset u32)   sorted
//! n_counts × (recipient hash u64, messages u32)  sorted
//! ```
//!
//! (little-endian). A key hash is [`super::event::Key::hash`]; the counts are the messages
//! received per recipient address, which the batch preview sums over a week. An index is
//! written to `.idx.tmp`, synced and renamed, so a present index is whole; a log without one
//! (the file open at a crash) is indexed again at start.

use super::event::{Event, Kind};
use crate::spool::framed::{self, Check, Shape, Simple};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The log files' layout: `COEXTRK1`, then records of at most 64 MiB.
pub const FORMAT: Simple = Simple {
    magic: b"COEXTRK1",
    marker: [0xC0, b'T', b'R', b'K'],
    max_record: 64 << 20,
};
const IDX_MAGIC: &[u8; 8] = b"COEXTIX1";
const IDX_HEADER: u64 = 48;
const ENTRY: u64 = 12;

/// The path of the log file started at `ms` in `dir`.
pub fn log_path(dir: &Path, ms: u64) -> PathBuf {
    dir.join(format!("track-{ms:013}.log"))
}

/// The index of the log file `log`.
pub fn idx_path(log: &Path) -> PathBuf {
    log.with_extension("idx")
}

/// The start time of a log file from its name.
fn start_of(name: &str) -> Option<u64> {
    name.strip_prefix("track-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// One log file of the folder.
#[derive(Debug, Clone)]
pub struct LogFile {
    /// The log file.
    pub path: PathBuf,
    /// When it was started (from its name).
    pub start_ms: u64,
    /// Bytes of the log and its index.
    pub bytes: u64,
    /// Its index's header, when it has one.
    pub index: Option<IndexHeader>,
}

/// What an index says of its log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    /// Time of its oldest event.
    pub first_ms: u64,
    /// Time of its newest event.
    pub last_ms: u64,
    /// Events in it.
    pub events: u64,
    /// Entries of the key section.
    pub n_keys: u64,
    /// Entries of the count section.
    pub n_counts: u64,
}

/// The log files of `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<LogFile>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(start_ms) = start_of(&name) else {
            continue;
        };
        let path = e.path();
        let idx = idx_path(&path);
        let index = read_header(&idx).ok();
        let Ok(meta) = e.metadata() else {
            // Deleted by the retention meanwhile.
            continue;
        };
        let bytes = meta.len() + fs::metadata(&idx).map_or(0, |m| m.len());
        out.push(LogFile {
            path,
            start_ms,
            bytes,
            index,
        });
    }
    out.sort_by_key(|f| f.start_ms);
    Ok(out)
}

/// Removes what a stop left half done (at start, before the writer runs): an index being
/// written (`.idx.tmp`), and an index whose log the retention had deleted.
pub fn clean(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let orphan = name.starts_with("track-")
            && name.ends_with(".idx")
            && !e.path().with_extension("log").exists();
        if orphan || name.ends_with(".idx.tmp") {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Reads the header of the index `idx`, checking that its length matches it.
pub fn read_header(idx: &Path) -> io::Result<IndexHeader> {
    let f = File::open(idx)?;
    let mut b = [0u8; IDX_HEADER as usize];
    f.read_exact_at(&mut b, 0)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a whole tracking index");
    if &b[..8] != IDX_MAGIC {
        return Err(bad());
    }
    let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let h = IndexHeader {
        first_ms: w(8),
        last_ms: w(16),
        events: w(24),
        n_keys: w(32),
        n_counts: w(40),
    };
    let want = IDX_HEADER + ENTRY * (h.n_keys.saturating_add(h.n_counts));
    if f.metadata()?.len() != want {
        return Err(bad());
    }
    Ok(h)
}

/// What an index is built from while its log is written: key hashes with the offset of
/// their record, and messages received per recipient.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    /// Time of the oldest event.
    pub first_ms: u64,
    /// Time of the newest event.
    pub last_ms: u64,
    /// Events seen.
    pub events: u64,
    /// Key hash (high and low half) and record offset: 12 bytes a key where `(u64, u32)`
    /// takes 16, and sorted as [`IndexBuilder::write`] needs (by hash, then offset). A busy
    /// 64 MiB log holds about a million keys.
    keys: Vec<[u32; 3]>,
    counts: HashMap<u64, u32>,
}

impl IndexBuilder {
    /// Adds the keys of `e`, whose record starts at `off`.
    pub fn add(&mut self, e: &Event, off: u64) {
        if self.events == 0 || e.time_ms < self.first_ms {
            self.first_ms = e.time_ms;
        }
        self.last_ms = self.last_ms.max(e.time_ms);
        self.events += 1;
        let off = off as u32;
        e.keys(|k| {
            let h = k.hash();
            self.keys.push([(h >> 32) as u32, h as u32, off]);
        });
        if e.kind == Kind::Received {
            for r in &e.recipients {
                *self
                    .counts
                    .entry(super::event::Key::Address(r).hash())
                    .or_default() += 1;
            }
        }
    }

    /// Writes the index of `log` (through a synced temporary file renamed into place).
    pub fn write(mut self, log: &Path) -> io::Result<IndexHeader> {
        self.keys.sort_unstable();
        self.keys.dedup();
        let mut counts: Vec<(u64, u32)> = self.counts.into_iter().collect();
        counts.sort_unstable();
        let h = IndexHeader {
            first_ms: self.first_ms,
            last_ms: self.last_ms,
            events: self.events,
            n_keys: self.keys.len() as u64,
            n_counts: counts.len() as u64,
        };
        let mut out = Vec::with_capacity((IDX_HEADER + ENTRY * (h.n_keys + h.n_counts)) as usize);
        out.extend_from_slice(IDX_MAGIC);
        for v in [h.first_ms, h.last_ms, h.events, h.n_keys, h.n_counts] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let keys = self
            .keys
            .iter()
            .map(|&[hi, lo, off]| ((u64::from(hi) << 32) | u64::from(lo), off));
        for (k, v) in keys.chain(counts) {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        let idx = idx_path(log);
        let tmp = idx.with_extension("idx.tmp");
        crate::fsmode::write(&tmp, &out)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &idx)?;
        if let Some(d) = idx.parent() {
            File::open(d)?.sync_all()?;
        }
        Ok(h)
    }
}

/// The offsets of the records of `log` that hold key `hash` (from its index).
pub fn lookup(log: &Path, h: &IndexHeader, hash: u64) -> io::Result<Vec<u64>> {
    let f = File::open(idx_path(log))?;
    let entry = |i: u64| -> io::Result<(u64, u32)> {
        let mut b = [0u8; ENTRY as usize];
        f.read_exact_at(&mut b, IDX_HEADER + i * ENTRY)?;
        Ok((
            u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            u32::from_le_bytes(b[8..].try_into().unwrap_or_default()),
        ))
    };
    // The first entry not below `hash`.
    let (mut lo, mut hi) = (0u64, h.n_keys);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if entry(mid)?.0 < hash {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    while lo < h.n_keys {
        let (k, off) = entry(lo)?;
        if k != hash {
            break;
        }
        out.push(u64::from(off));
        lo += 1;
    }
    Ok(out)
}

/// Messages received for each of `wanted` (sorted recipient hashes), added to `sums`
/// (same order), from the count section of `log`'s index.
pub fn add_counts(log: &Path, h: &IndexHeader, wanted: &[u64], sums: &mut [u64]) -> io::Result<()> {
    let f = File::open(idx_path(log))?;
    let mut b = vec![0u8; (h.n_counts * ENTRY) as usize];
    f.read_exact_at(&mut b, IDX_HEADER + h.n_keys * ENTRY)?;
    let at = |i: usize| {
        let e = &b[i * ENTRY as usize..(i + 1) * ENTRY as usize];
        (
            u64::from_le_bytes(e[..8].try_into().unwrap_or_default()),
            u32::from_le_bytes(e[8..].try_into().unwrap_or_default()),
        )
    };
    // Both sides are sorted: one merge.
    let (mut i, mut j) = (0usize, 0usize);
    while i < wanted.len() && j < h.n_counts as usize {
        let (k, n) = at(j);
        match wanted[i].cmp(&k) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                sums[i] += u64::from(n);
                i += 1;
            }
        }
    }
    Ok(())
}

/// The events of the record at `off` of `log` (whose bytes end at `end`); `None` when no
/// whole record is there.
pub fn read_record(f: &File, off: u64, end: u64) -> io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    match framed::check_at(&FORMAT, f, off, end, &mut body)? {
        Check::Whole(_) => Ok(Some(body)),
        Check::Bad { .. } => Ok(None),
    }
}

/// The whole records of a file whose bytes end at `end`, read in order: `f` gets each
/// record's offset and payload.
pub fn each_record(
    file: &File,
    path: &Path,
    end: u64,
    mut f: impl FnMut(u64, &[u8]),
) -> io::Result<()> {
    let shape = Shape {
        sealed: true,
        end: Some(end),
    };
    let scan = framed::scan(&FORMAT, file, path, shape)?;
    let mut body = Vec::new();
    for &(off, h) in &scan.records {
        body.resize(h.len as usize, 0);
        file.read_exact_at(&mut body, off + Simple::HEADER)?;
        f(off, &body);
    }
    Ok(())
}

/// The events of a record's payload (JSON lines; a line that does not parse is skipped).
pub fn events(payload: &[u8]) -> impl Iterator<Item = Event> + '_ {
    payload
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
}

/// Indexes a log file left without an index (the one open at a stop or a crash): a torn
/// tail is copied to `damaged/` and cut, corruption skipped (its records are lost, the rest
/// kept), and the index written. Returns the damage found, for the log.
pub fn seal_unindexed(path: &Path) -> io::Result<(IndexHeader, Vec<framed::Damaged>)> {
    let file = crate::fsmode::options().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len < FORMAT.magic.len() as u64 {
        // Cut short before its header was whole: nothing was ever in it.
        file.set_len(0)?;
        file.write_all_at(FORMAT.magic, 0)?;
        file.sync_all()?;
    }
    let shape = Shape {
        sealed: false,
        end: None,
    };
    let scan = framed::scan(&FORMAT, &file, path, shape)?;
    let mut b = IndexBuilder::default();
    let mut body = Vec::new();
    for &(off, h) in &scan.records {
        body.resize(h.len as usize, 0);
        file.read_exact_at(&mut body, off + Simple::HEADER)?;
        for e in events(&body) {
            b.add(&e, off);
        }
    }
    if let Some(d) = scan.damaged.iter().find(|d| d.torn) {
        let aside = path.parent().unwrap_or(Path::new(".")).join("damaged");
        let _ = framed::keep_aside(&file, d, &aside, &|_| Ok(()));
        framed::cut(&file, d.offset)?;
    }
    if b.events == 0 {
        let t = start_of(&path.file_name().unwrap_or_default().to_string_lossy()).unwrap_or(0);
        b.first_ms = t;
        b.last_ms = t;
    }
    let h = b.write(path)?;
    Ok((h, scan.damaged))
}
