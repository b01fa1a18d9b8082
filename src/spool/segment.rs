//! The on-disk form of the spool log: segment files of framed records.
//!
//! A segment is `segments/NNNNNNNNNN.seg`: an 8-byte file header, then records back to back.
//! A record is a 24-byte header, a small metadata part (JSON: an envelope, a delivery state
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
//! Segments written since format 2 (file header `COEXSEG2`) end every commit turn with a
//! `Commit` record (header only), written before the turn's `fdatasync`: any byte after a
//! `Commit` record proves that turn was synced, so recovery can tell a torn tail (damage in
//! the last, unsynced turn) from corruption (damage in a turn that was synced). A `Skip`
//! record takes the place of damaged bytes recovery moved aside, so the segment reads whole
//! again. Segments of format 1 (`COEXSEG1`, no turn markers) are still read.
//!
//! A new segment is written under a temporary name (`NNNNNNNNNN.seg.tmp`), synced, renamed
//! to its name and the folder synced: a segment file under its real name always has its
//! file header on disk.

/// First bytes of every segment file written now (format 2: commit turns are marked).
pub const FILE_MAGIC: &[u8; 8] = b"COEXSEG2";
/// First bytes of a segment file of format 1 (no turn markers; still read).
pub const FILE_MAGIC_V1: &[u8; 8] = b"COEXSEG1";
/// First bytes of every record.
pub const RECORD_MAGIC: u32 = 0x5245_5843; // "CXER" little-endian
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
}

impl Header {
    /// Bytes the whole record takes.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.meta_len as u64 + self.body_len as u64
    }

    /// True when `meta` is the metadata this header was written with.
    pub fn meta_ok(&self, meta: &[u8]) -> bool {
        meta_crc(self.kind, self.meta_len, self.body_len, meta) == self.crc
    }

    /// True when `body` is the body this header was written with.
    pub fn body_ok(&self, body: &[u8]) -> bool {
        crc32fast::hash(body) == self.body_crc
    }
}

fn meta_crc(kind: Kind, meta_len: u32, body_len: u32, meta: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind as u8]);
    h.update(&meta_len.to_le_bytes());
    h.update(&body_len.to_le_bytes());
    h.update(meta);
    h.finalize()
}

/// The header for a record of `kind` with this metadata and body.
pub fn encode_header(kind: Kind, meta: &[u8], body: &[u8]) -> [u8; HEADER_LEN] {
    header(kind, meta, body.len() as u32, crc32fast::hash(body))
}

fn header(kind: Kind, meta: &[u8], body_len: u32, body_crc: u32) -> [u8; HEADER_LEN] {
    let meta_len = meta.len() as u32;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&meta_len.to_le_bytes());
    h[12..16].copy_from_slice(&body_len.to_le_bytes());
    h[16..20].copy_from_slice(&meta_crc(kind, meta_len, body_len, meta).to_le_bytes());
    h[20..24].copy_from_slice(&body_crc.to_le_bytes());
    h
}

/// The header of a `Skip` record exactly `len` bytes long whose body is zeros, to write over
/// damaged bytes that were moved aside; `None` when `len` is shorter than a header or too
/// long for one record.
pub fn skip_header(len: u64) -> Option<[u8; HEADER_LEN]> {
    let body_len = u32::try_from(len.checked_sub(HEADER_LEN as u64)?).ok()?;
    let zeros = [0u8; 4096];
    let mut crc = crc32fast::Hasher::new();
    let mut left = body_len as usize;
    while left > 0 {
        let k = left.min(zeros.len());
        crc.update(&zeros[..k]);
        left -= k;
    }
    Some(header(Kind::Skip, &[], body_len, crc.finalize()))
}

/// Decodes a header; `None` when it is not one (torn or foreign bytes).
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Option<Header> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32_at(0) != RECORD_MAGIC || b[5..8] != [0, 0, 0] {
        return None;
    }
    let h = Header {
        kind: Kind::from_u8(b[4])?,
        meta_len: u32_at(8),
        body_len: u32_at(12),
        crc: u32_at(16),
        body_crc: u32_at(20),
    };
    (h.meta_len <= MAX_META).then_some(h)
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
        let h = encode_header(Kind::Message, b"{\"id\":1}", b"body");
        let d = decode_header(&h).unwrap();
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
            let ok = decode_header(&bad).is_some_and(|d| d.meta_ok(b"{\"id\":1}"));
            assert!(!ok, "byte {i}");
        }
        assert_eq!(number(&file_name(42)), Some(42));
        assert_eq!(number("42.seg"), None);
        assert!(is_temp(&temp_name(7)) && !is_temp(&file_name(7)));
        let d = decode_header(&skip_header(10_000).unwrap()).unwrap();
        assert_eq!((d.kind, d.record_len()), (Kind::Skip, 10_000));
        assert!(d.meta_ok(&[]) && d.body_ok(&[0u8; 10_000 - HEADER_LEN]));
        assert!(skip_header(23).is_none());
    }
}
