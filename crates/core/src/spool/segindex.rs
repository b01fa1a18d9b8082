//! The index of a sealed segment (`NNNNNNNNNN.idx` next to `NNNNNNNNNN.seg`): what each of
//! its records says about the queue, in a few dozen bytes per record, so a start-up reads
//! the index instead of every record's header and JSON metadata (DESIGN invariant 17).
//!
//! When the commit stage seals a segment (starts the next one), the indexer thread reads
//! the sealed segment back (it is in the page cache) and writes its index under a temporary
//! name, then renames it. The index is a cache of what the segment holds: it is not synced,
//! and a start-up uses it only when it is whole (its checksum holds) and belongs to the
//! segment as it is now (same number, same file header with the segment's random salt, same
//! length); otherwise the segment is read record by record as before, and a stale index is
//! removed. Segments sealed by a restart (the head at a crash) and segments of format 1 get
//! no index; they are read whole at each start until their messages are done.
//!
//! A sealed segment read through its index has its records' checksums checked when they are
//! read (at delivery), not at start-up: damage that appears on the disk after the index was
//! written shows as a message that cannot be read (logged, tried again), as damage that
//! appears while the relay runs always did.
//!
//! Layout (little-endian): `COEXIDX1`, segment number u32, the segment's file header
//! (16 bytes), segment length u64, route names (count u16, then each as length u16 and
//! bytes), records (count u32, then each: kind u8, offset u64, metadata length u32, queue
//! key u128, then for a message its acceptance time u64, for a state attempts u32, held
//! u8, next attempt u64 (`u64::MAX`: none), route u16 (`u16::MAX`: none)), and a CRC-32 of
//! everything before it.

use super::gathered::{Item, ItemId, Routes};
use super::segment::{self, FILE_HEADER_LEN};
use super::Loc;
use crate::types::QueueKey;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

const MAGIC: &[u8; 8] = b"COEXIDX1";

/// The index file of segment `n`.
pub fn file_name(n: u32) -> String {
    format!("{n:010}.idx")
}

/// The temporary name an index is written under.
fn temp_name(n: u32) -> String {
    format!("{n:010}.idx.tmp")
}

/// The segment number of an index file name (or of its temporary name, with `true`).
pub fn number(name: &str) -> Option<(u32, bool)> {
    let (stem, temp) = match name.strip_suffix(".idx.tmp") {
        Some(s) => (s, true),
        None => (name.strip_suffix(".idx")?, false),
    };
    (stem.len() == 10 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok().map(|n| (n, temp)))
        .flatten()
}

const KIND_MESSAGE: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_DONE: u8 = 3;

/// The records of a segment, encoded as an index of it (`header`: its file header, `len`:
/// its length). `None` when a record cannot be indexed (an id not of the generated form).
fn encode(
    n: u32,
    header: &[u8],
    len: u64,
    items: &[(Loc, Item)],
    routes: &Routes,
) -> Option<Vec<u8>> {
    let mut b = Vec::with_capacity(64 + items.len() * 48);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(header);
    b.extend_from_slice(&len.to_le_bytes());
    let names = routes.names();
    b.extend_from_slice(&u16::try_from(names.len()).ok()?.to_le_bytes());
    for name in names {
        b.extend_from_slice(&u16::try_from(name.len()).ok()?.to_le_bytes());
        b.extend_from_slice(name.as_bytes());
    }
    b.extend_from_slice(&u32::try_from(items.len()).ok()?.to_le_bytes());
    for (loc, item) in items {
        let (kind, id) = match item {
            Item::Message { id, .. } => (KIND_MESSAGE, id),
            Item::State { id, .. } => (KIND_STATE, id),
            Item::Done { id } => (KIND_DONE, id),
        };
        let ItemId::Key(key) = id else { return None };
        b.push(kind);
        b.extend_from_slice(&loc.off.to_le_bytes());
        b.extend_from_slice(&loc.meta_len.to_le_bytes());
        b.extend_from_slice(&key.to_u128().to_le_bytes());
        match item {
            Item::Message { received_at, .. } => b.extend_from_slice(&received_at.to_le_bytes()),
            Item::State {
                attempts,
                held,
                next_attempt_ms,
                route,
                ..
            } => {
                b.extend_from_slice(&attempts.to_le_bytes());
                b.push(*held as u8);
                b.extend_from_slice(&next_attempt_ms.unwrap_or(u64::MAX).to_le_bytes());
                b.extend_from_slice(&route.unwrap_or(u16::MAX).to_le_bytes());
            }
            Item::Done { .. } => {}
        }
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    Some(b)
}

/// Reads little-endian numbers off a byte slice; `None` past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Option<u128> {
        self.take(16)
            .and_then(|b| b.try_into().ok())
            .map(u128::from_le_bytes)
    }
}

/// The records of segment `n` from its index, when the index is whole and belongs to the
/// segment as it is (`header`: the segment's file header, `len`: its length); route names
/// are added to `routes`. `None` otherwise.
fn decode(
    bytes: &[u8],
    n: u32,
    header: &[u8],
    len: u64,
    routes: &mut Routes,
) -> Option<Vec<(Loc, Item)>> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let mut c = Cursor(body);
    if c.take(MAGIC.len())? != MAGIC || c.u32()? != n || c.take(FILE_HEADER_LEN)? != header {
        return None;
    }
    if c.u64()? != len {
        return None;
    }
    let names = c.u16()?;
    let mut local = Vec::with_capacity(names as usize);
    for _ in 0..names {
        let l = c.u16()? as usize;
        let name = std::str::from_utf8(c.take(l)?).ok()?;
        local.push(routes.id(name));
    }
    let count = c.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(body.len() / 29));
    for _ in 0..count {
        let kind = c.u8()?;
        let loc = Loc {
            off: c.u64()?,
            meta_len: c.u32()?,
            seg: n,
        };
        let id = ItemId::Key(QueueKey::from_u128(c.u128()?)?);
        let item = match kind {
            KIND_MESSAGE => Item::Message {
                id,
                received_at: c.u64()?,
            },
            KIND_STATE => Item::State {
                id,
                attempts: c.u32()?,
                held: c.u8()? != 0,
                next_attempt_ms: Some(c.u64()?).filter(|&t| t != u64::MAX),
                route: match c.u16()? {
                    u16::MAX => None,
                    r => Some(*local.get(r as usize)?),
                },
            },
            KIND_DONE => Item::Done { id },
            _ => return None,
        };
        items.push((loc, item));
    }
    c.0.is_empty().then_some(items)
}

/// The segment's file header and length, read now.
fn identity(seg: &Path) -> io::Result<(Vec<u8>, u64)> {
    let f = File::open(seg)?;
    let len = f.metadata()?.len();
    let mut h = vec![0u8; FILE_HEADER_LEN];
    let got = super::framed::read_at_most(&f, &mut h, 0)?;
    h.truncate(got);
    Ok((h, len))
}

/// The records of sealed segment `n` under `dir` as its index gives them, if it has a
/// usable one. An index that does not match the segment is removed when `tidy`.
pub fn load(dir: &Path, n: u32, routes: &mut Routes, tidy: bool) -> Option<Vec<(Loc, Item)>> {
    let path = dir.join(file_name(n));
    let bytes = fs::read(&path).ok()?;
    let (header, len) = identity(&dir.join(segment::file_name(n))).ok()?;
    let items = decode(&bytes, n, &header, len, routes);
    if items.is_none() {
        warn!(path = %path.display(), "segment index does not match its segment; the segment is read whole");
        if tidy {
            let _ = fs::remove_file(&path);
        }
    }
    items
}

/// Writes the index of sealed segment `n` under `dir` from `items` (every record of it, in
/// order). Not synced: an index that did not reach the disk whole is not used.
pub fn write(dir: &Path, n: u32, items: &[(Loc, Item)], routes: &Routes) -> io::Result<bool> {
    let (header, len) = identity(&dir.join(segment::file_name(n)))?;
    let Some(bytes) = encode(n, &header, len, items, routes) else {
        return Ok(false);
    };
    let tmp = dir.join(temp_name(n));
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, dir.join(file_name(n)))?;
    if !dir.join(segment::file_name(n)).exists() {
        // Spent and deleted while it was indexed: the commit stage removed no index then.
        remove(dir, n);
        return Ok(false);
    }
    Ok(true)
}

/// Removes the index of segment `n`, if any (its segment is deleted).
pub fn remove(dir: &Path, n: u32) {
    match fs::remove_file(dir.join(file_name(n))) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => debug!(segment = n, error = %e, "cannot remove a segment index"),
    }
}

/// The indexer: writes the index of each segment the commit stage seals, off its thread.
pub fn run(dir: PathBuf, sealed: std::sync::mpsc::Receiver<u32>) {
    while let Ok(n) = sealed.recv() {
        let seg = dir.join(segment::file_name(n));
        if !seg.exists() {
            continue; // already spent and deleted
        }
        let mut routes = Routes::default();
        match super::recover::read_sealed(&seg, n, &mut routes) {
            Ok(items) => match write(&dir, n, &items, &routes) {
                Ok(true) => debug!(segment = n, records = items.len(), "segment index written"),
                Ok(false) => {}
                Err(e) if !seg.exists() => {
                    debug!(segment = n, error = %e, "segment spent while it was indexed")
                }
                Err(e) => {
                    warn!(segment = n, error = %e, "cannot write a segment index; the next start reads the segment whole")
                }
            },
            Err(_) if !seg.exists() => debug!(segment = n, "segment spent before it was indexed"),
            Err(e) => {
                warn!(segment = n, error = %e, "cannot read a sealed segment back for its index; the next start reads it whole")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(routes: &mut Routes) -> Vec<(Loc, Item)> {
        let key = |v: u128| ItemId::Key(QueueKey::from_u128(v).unwrap());
        let loc = |off| Loc {
            seg: 7,
            meta_len: 30,
            off,
        };
        vec![
            (
                loc(16),
                Item::Message {
                    id: key(5),
                    received_at: 1_700_000_000,
                },
            ),
            (
                loc(100),
                Item::State {
                    id: key(5),
                    attempts: 2,
                    held: true,
                    next_attempt_ms: Some(9),
                    route: Some(routes.id("cloud")),
                },
            ),
            (
                loc(200),
                Item::State {
                    id: key(5),
                    attempts: 3,
                    held: false,
                    next_attempt_ms: None,
                    route: None,
                },
            ),
            (loc(300), Item::Done { id: key(5) }),
        ]
    }

    #[test]
    fn an_index_reads_back_only_for_its_own_segment() {
        let mut routes = Routes::default();
        routes.id("onprem");
        let it = items(&mut routes);
        let header = [1u8; FILE_HEADER_LEN];
        let bytes = encode(7, &header, 4096, &it, &routes).unwrap();
        let mut other = Routes::default();
        let back = decode(&bytes, 7, &header, 4096, &mut other).unwrap();
        assert_eq!(format!("{back:?}"), format!("{it:?}"));
        assert_eq!(other.names(), ["onprem".to_string(), "cloud".to_string()]);
        assert!(
            decode(&bytes, 8, &header, 4096, &mut other).is_none(),
            "another number"
        );
        assert!(
            decode(&bytes, 7, &[2u8; FILE_HEADER_LEN], 4096, &mut other).is_none(),
            "another salt"
        );
        assert!(
            decode(&bytes, 7, &header, 4097, &mut other).is_none(),
            "another length"
        );
        for cut in [0, 1, 4, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode(&bytes[..cut], 7, &header, 4096, &mut other).is_none(),
                "cut at {cut}"
            );
        }
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(
            decode(&flipped, 7, &header, 4096, &mut other).is_none(),
            "a flipped bit"
        );
    }

    #[test]
    fn names_are_told_apart() {
        assert_eq!(number("0000000012.idx"), Some((12, false)));
        assert_eq!(number("0000000012.idx.tmp"), Some((12, true)));
        assert_eq!(number("0000000012.seg"), None);
        assert_eq!(segment::number(&file_name(3)), None);
    }
}
