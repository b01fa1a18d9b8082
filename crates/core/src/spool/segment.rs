//! The on-disk form of the spool log: segment files of framed records.
//!
//! A segment is `segments/NNNNNNNNNN.seg`: a file header, then records back to back. A
//! record is a 24-byte header, a small metadata part (JSON: an envelope, a delivery state
//! or an id; empty for the two bookkeeping kinds) and, for messages, the message bytes:
//!
//! ```text
//! magic u32 | kind u8 | 0 0 0 | meta_len u32 | body_len u32 | crc u32 | body_crc u32 | meta | body
//! ```
//!
//! `crc` covers kind, meta_len, body_len and the metadata, so a scan can trust a record's
//! lengths and skip its body without reading it; `body_crc` covers the body and is checked
//! whenever the body is read (recovery of the segment that was being written, and every read
//! for delivery). All integers are little-endian.
//!
//! Segments written since format 2 have the file header `COEXSEG2` followed by 8 random
//! bytes drawn when the segment is created, its **salt**: both checksums of every record are
//! CRC-32 over the salt and then the covered bytes, and a record's magic is `CXER` XORed
//! with the salt's first four bytes. Message bytes come from senders (`BDAT` passes any
//! byte), so a message may hold byte-exact copies of records; without the salt, a scan that
//! searches for the next record after damage could take them for real ones (a forged
//! `Commit`, message or `Done`). With it a copy from a mail body passes only by guessing
//! 64 secret bits (32 of the magic, 32 of the checksum state), for every segment anew.
//!
//! Format 2 segments also end every commit turn with a `Commit` record (header only),
//! written before the turn's `fdatasync`: any byte after a `Commit` record proves that turn
//! was synced, so recovery can tell a torn tail (damage in the last, unsynced turn) from
//! corruption (damage in a turn that was synced). A `Skip` record takes the place of
//! damaged bytes recovery moved aside, so the segment reads whole again. Segments of format
//! 1 (`COEXSEG1`: no salt, no turn markers, checksums over the covered bytes alone) are
//! still read.
//!
//! A new segment is written under a temporary name (`NNNNNNNNNN.seg.tmp`), synced, renamed
//! to its name and the folder synced: a segment file under its real name always has its
//! file header on disk.

use super::framed::{Framing, Turns};
use std::io;

/// First bytes of every segment file written now (format 2: commit turns are marked).
pub const FILE_MAGIC: &[u8; 8] = b"COEXSEG2";
/// First bytes of a segment file of format 1 (no turn markers; still read).
pub const FILE_MAGIC_V1: &[u8; 8] = b"COEXSEG1";
/// First bytes of every record of format 1 (format 2 XORs it with the segment's salt).
pub const RECORD_MAGIC: u32 = 0x5245_5843; // "CXER" little-endian
/// Random bytes after the file magic of a format 2 segment.
pub const SALT_LEN: usize = 8;
/// Length of a format 2 file header (magic and salt): where its first record starts.
pub const FILE_HEADER_LEN: usize = FILE_MAGIC.len() + SALT_LEN;

/// The key of a segment's checksums and record magic: the salt of a format 2 segment, none
/// for format 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Salt(Option<[u8; SALT_LEN]>);

impl Salt {
    /// Format 1: no salt.
    pub const NONE: Salt = Salt(None);

    /// A new random salt (from the operating system's random source).
    pub fn random() -> io::Result<Salt> {
        let mut b = [0u8; SALT_LEN];
        aws_lc_rs::rand::fill(&mut b)
            .map_err(|_| io::Error::other("no random bytes for a segment salt"))?;
        Ok(Salt(Some(b)))
    }

    /// The salt these bytes (after a `COEXSEG2` magic) hold.
    pub fn from_bytes(b: [u8; SALT_LEN]) -> Salt {
        Salt(Some(b))
    }

    /// The file header of a segment with this salt (format 2; format 1 for [`Salt::NONE`]).
    pub fn file_header(&self) -> Vec<u8> {
        match self.0 {
            Some(s) => [&FILE_MAGIC[..], &s[..]].concat(),
            None => FILE_MAGIC_V1.to_vec(),
        }
    }

    /// Where the first record of a segment with this salt starts.
    pub fn data_start(&self) -> u64 {
        match self.0 {
            Some(_) => FILE_HEADER_LEN as u64,
            None => FILE_MAGIC_V1.len() as u64,
        }
    }

    /// The first four bytes of every record of a segment with this salt.
    pub fn magic(&self) -> [u8; 4] {
        let m = match self.0 {
            Some(s) => RECORD_MAGIC ^ u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
            None => RECORD_MAGIC,
        };
        m.to_le_bytes()
    }

    /// A CRC-32 hasher that has taken the salt.
    fn hasher(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        if let Some(s) = self.0 {
            h.update(&s);
        }
        h
    }

    /// The keyed checksum of `b`.
    fn crc(&self, b: &[u8]) -> u32 {
        let mut h = self.hasher();
        h.update(b);
        h.finalize()
    }
}

/// What the first bytes of a segment file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileHeader {
    /// Shorter than its file header (created in place by an older version, cut by a crash).
    Short,
    /// A segment of format 1 or 2, with its salt.
    Segment(Salt),
    /// Not a coexist segment.
    Foreign,
}

/// Reads a segment's file header from its first bytes (up to [`FILE_HEADER_LEN`] of them).
pub fn parse_file_header(b: &[u8]) -> FileHeader {
    let Some(magic) = b.get(..FILE_MAGIC.len()) else {
        return FileHeader::Short;
    };
    if magic == FILE_MAGIC_V1 {
        return FileHeader::Segment(Salt::NONE);
    }
    if magic != FILE_MAGIC {
        return FileHeader::Foreign;
    }
    match b
        .get(FILE_MAGIC.len()..FILE_HEADER_LEN)
        .and_then(|s| <[u8; SALT_LEN]>::try_from(s).ok())
    {
        Some(s) => FileHeader::Segment(Salt::from_bytes(s)),
        None => FileHeader::Short,
    }
}
/// Size of a record header.
pub const HEADER_LEN: usize = 24;
/// Largest metadata part a record may have (an envelope with many recipients fits easily).
pub const MAX_META: u32 = 64 << 20;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A new message: envelope (meta) and message bytes (body).
    Message = 1,
    /// A message's delivery state after an attempt or an admin action; replaces earlier ones.
    State = 2,
    /// The message is finished (delivered, bounced, kept in `failed/` or deleted).
    Done = 3,
    /// The end of a commit turn (no metadata): written before the turn's `fdatasync`.
    Commit = 4,
    /// Stands in for damaged bytes that recovery moved aside; its body is zeros.
    Skip = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Message),
            2 => Some(Kind::State),
            3 => Some(Kind::Done),
            4 => Some(Kind::Commit),
            5 => Some(Kind::Skip),
            _ => None,
        }
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Record kind.
    pub kind: Kind,
    /// Length of the metadata part.
    pub meta_len: u32,
    /// Length of the body (0 for everything but messages).
    pub body_len: u32,
    crc: u32,
    body_crc: u32,
    salt: Salt,
}

impl Header {
    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.meta_len as u64 + self.body_len as u64
    }

    /// True when `meta` is the metadata this header was written with.
    pub fn meta_ok(&self, meta: &[u8]) -> bool {
        meta_crc(&self.salt, self.kind, self.meta_len, self.body_len, meta) == self.crc
    }

    /// True when `body` is the body this header was written with.
    pub fn body_ok(&self, body: &[u8]) -> bool {
        self.salt.crc(body) == self.body_crc
    }
}

fn meta_crc(salt: &Salt, kind: Kind, meta_len: u32, body_len: u32, meta: &[u8]) -> u32 {
    let mut h = salt.hasher();
    h.update(&[kind as u8]);
    h.update(&meta_len.to_le_bytes());
    h.update(&body_len.to_le_bytes());
    h.update(meta);
    h.finalize()
}

/// The header for a record of `kind` with this metadata and body, in a segment with `salt`.
pub fn encode_header(salt: &Salt, kind: Kind, meta: &[u8], body: &[u8]) -> [u8; HEADER_LEN] {
    header(salt, kind, meta, body.len() as u32, salt.crc(body))
}

fn header(salt: &Salt, kind: Kind, meta: &[u8], body_len: u32, body_crc: u32) -> [u8; HEADER_LEN] {
    let meta_len = meta.len() as u32;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&salt.magic());
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&meta_len.to_le_bytes());
    h[12..16].copy_from_slice(&body_len.to_le_bytes());
    h[16..20].copy_from_slice(&meta_crc(salt, kind, meta_len, body_len, meta).to_le_bytes());
    h[20..24].copy_from_slice(&body_crc.to_le_bytes());
    h
}

/// The header of a `Skip` record exactly `len` bytes long whose body is zeros, to write over
/// damaged bytes that were moved aside; `None` when `len` is shorter than a header or too
/// long for one record (in a segment with `salt`).
pub fn skip_header(salt: &Salt, len: u64) -> Option<[u8; HEADER_LEN]> {
    let body_len = u32::try_from(len.checked_sub(HEADER_LEN as u64)?).ok()?;
    let zeros = [0u8; 4096];
    let mut crc = salt.hasher();
    let mut left = body_len as usize;
    while left > 0 {
        let k = left.min(zeros.len());
        crc.update(&zeros[..k]);
        left -= k;
    }
    Some(header(salt, Kind::Skip, &[], body_len, crc.finalize()))
}

/// Decodes a header of a segment with `salt`; `None` when it is not one (torn or foreign
/// bytes, or a record of a segment with another salt).
pub fn decode_header(salt: &Salt, b: &[u8; HEADER_LEN]) -> Option<Header> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if b[0..4] != salt.magic() || b[5..8] != [0, 0, 0] {
        return None;
    }
    let h = Header {
        kind: Kind::from_u8(b[4])?,
        meta_len: u32_at(8),
        body_len: u32_at(12),
        crc: u32_at(16),
        body_crc: u32_at(20),
        salt: *salt,
    };
    (h.meta_len <= MAX_META).then_some(h)
}

/// Largest metadata part a record found by searching after damage may have (a real
/// envelope is far smaller; a bigger one is left inside the damaged bytes, kept aside).
const RESYNC_META_MAX: u32 = 1 << 20;

/// The segment format as a [`Framing`]: records keyed by `salt`; commit turns marked by
/// `Commit` records in format 2 (`marked`), unmarked in format 1.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// The key of its checksums (from its file header; none for format 1).
    pub salt: Salt,
    /// Format 2: commit turns are marked.
    pub marked: bool,
}

impl Framing for Segment {
    type Header = Header;
    const HEADER_LEN: usize = HEADER_LEN;

    fn data_start(&self) -> u64 {
        self.salt.data_start()
    }
    fn marker(&self) -> [u8; 4] {
        self.salt.magic()
    }
    fn decode(&self, b: &[u8]) -> Option<Header> {
        decode_header(&self.salt, b.try_into().ok()?)
    }
    fn meta_len(&self, h: &Header) -> u64 {
        h.meta_len.into()
    }
    fn body_len(&self, h: &Header) -> u64 {
        h.body_len.into()
    }
    fn meta_ok(&self, h: &Header, meta: &[u8]) -> bool {
        h.meta_ok(meta)
    }
    fn body_ok(&self, h: &Header, body: &[u8]) -> bool {
        h.body_ok(body)
    }
    fn ends_turn(&self, h: &Header) -> bool {
        h.kind == Kind::Commit
    }
    fn turns(&self) -> Turns {
        if self.marked {
            Turns::Marked
        } else {
            Turns::Unmarked
        }
    }
    fn plausible(&self, h: &Header) -> bool {
        h.meta_len <= RESYNC_META_MAX
    }
    fn describe(&self, meta: &[u8]) -> Option<String> {
        record_id(meta)
    }
    fn filler(&self, len: u64) -> Option<Vec<u8>> {
        skip_header(&self.salt, len).map(|h| h.to_vec())
    }
}

/// The queue id in a record's metadata (an envelope, a state or a `Done`).
fn record_id(meta: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(meta).ok()? {
        serde_json::Value::String(id) => Some(id),
        v => v.get("id")?.as_str().map(str::to_string),
    }
}

/// The file name of segment `n`.
pub fn file_name(n: u32) -> String {
    format!("{n:010}.seg")
}

/// The temporary name segment `n` is written under before it is renamed to [`file_name`].
pub fn temp_name(n: u32) -> String {
    format!("{n:010}.seg.tmp")
}

/// True for a file name written by [`temp_name`] (left by a crash or a failed creation).
pub fn is_temp(name: &str) -> bool {
    name.strip_suffix(".tmp").and_then(number).is_some()
}

/// The segment number of a file name written by [`file_name`].
pub fn number(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 10 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let salt = Salt::random().unwrap();
        let h = encode_header(&salt, Kind::Message, b"{\"id\":1}", b"body");
        let d = decode_header(&salt, &h).unwrap();
        assert_eq!(d.kind, Kind::Message);
        assert_eq!(d.record_len(), 24 + 8 + 4);
        assert!(d.meta_ok(b"{\"id\":1}"));
        assert!(!d.meta_ok(b"{\"id\":2}"));
        assert!(d.body_ok(b"body"));
        assert!(!d.body_ok(b"bodx"));
        // Any flipped header byte is caught by the magic, the kind, the padding or the crc.
        for i in 0..16 {
            let mut bad = h;
            bad[i] ^= 0x10;
            let ok = decode_header(&salt, &bad).is_some_and(|d| d.meta_ok(b"{\"id\":1}"));
            assert!(!ok, "byte {i}");
        }
        assert_eq!(number(&file_name(42)), Some(42));
        assert_eq!(number("42.seg"), None);
        assert!(is_temp(&temp_name(7)) && !is_temp(&file_name(7)));
        let d = decode_header(&salt, &skip_header(&salt, 10_000).unwrap()).unwrap();
        assert_eq!((d.kind, d.record_len()), (Kind::Skip, 10_000));
        assert!(d.meta_ok(&[]) && d.body_ok(&[0u8; 10_000 - HEADER_LEN]));
        assert!(skip_header(&salt, 23).is_none());
    }

    #[test]
    fn a_record_of_another_salt_or_without_one_is_not_a_record() {
        let (a, b) = (Salt::random().unwrap(), Salt::random().unwrap());
        for (w, r) in [(Salt::NONE, a), (a, b), (a, Salt::NONE)] {
            let h = encode_header(&w, Kind::Commit, &[], &[]);
            let ok = decode_header(&r, &h).is_some_and(|d| d.meta_ok(&[]) && d.body_ok(&[]));
            assert!(!ok, "{w:?} read as {r:?}");
        }
        let h = encode_header(&Salt::NONE, Kind::Commit, &[], &[]);
        assert!(decode_header(&Salt::NONE, &h).is_some_and(|d| d.meta_ok(&[])));
        assert_eq!(parse_file_header(&a.file_header()), FileHeader::Segment(a));
        assert_eq!(
            parse_file_header(b"COEXSEG1"),
            FileHeader::Segment(Salt::NONE)
        );
        assert_eq!(parse_file_header(b"COEXSEG2abc"), FileHeader::Short);
        assert_eq!(parse_file_header(b"COEXSEG9abcdefgh"), FileHeader::Foreign);
    }
}
