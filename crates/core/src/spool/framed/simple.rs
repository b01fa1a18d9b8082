//! The plain record layout of framed files with one record per commit turn (the directory's
//! change log, the tracking log): a 16-byte header of a 4-byte marker, the payload's length,
//! the payload's CRC32 and the CRC32 of the header's first 12 bytes (little-endian), then
//! the payload. No metadata part and no stand-in record.

use super::{Framing, Turns};

/// A decoded record header of a [`Simple`] framing.
#[derive(Debug, Clone, Copy)]
pub struct SimpleHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// CRC32 of the payload.
    pub crc: u32,
}

/// A [`Framing`] with one record per commit turn: the file starts with `magic`, records
/// start with `marker` and carry at most `max_record` bytes of payload.
#[derive(Debug, Clone, Copy)]
pub struct Simple {
    /// The file header.
    pub magic: &'static [u8; 8],
    /// The first bytes of every record.
    pub marker: [u8; 4],
    /// Largest payload a record may carry.
    pub max_record: u64,
}

impl Simple {
    /// Bytes of a record header.
    pub const HEADER: u64 = 16;

    /// The framed form of `payload`: header and payload, ready to append.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let mut rec = Vec::with_capacity(Self::HEADER as usize + payload.len());
        rec.extend_from_slice(&self.marker);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let hcrc = crc32fast::hash(&rec);
        rec.extend_from_slice(&hcrc.to_le_bytes());
        rec.extend_from_slice(payload);
        rec
    }
}

impl Framing for Simple {
    type Header = SimpleHeader;
    const HEADER_LEN: usize = Self::HEADER as usize;

    fn data_start(&self) -> u64 {
        self.magic.len() as u64
    }
    fn marker(&self) -> [u8; 4] {
        self.marker
    }
    fn decode(&self, h: &[u8]) -> Option<SimpleHeader> {
        if h.len() != Self::HEADER_LEN || h[..4] != self.marker {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        if crc32fast::hash(&h[..12]) != word(12) || u64::from(word(4)) > self.max_record {
            return None;
        }
        Some(SimpleHeader {
            len: word(4),
            crc: word(8),
        })
    }
    fn meta_len(&self, _h: &SimpleHeader) -> u64 {
        0
    }
    fn body_len(&self, h: &SimpleHeader) -> u64 {
        h.len.into()
    }
    fn meta_ok(&self, _h: &SimpleHeader, _meta: &[u8]) -> bool {
        true
    }
    fn body_ok(&self, h: &SimpleHeader, body: &[u8]) -> bool {
        crc32fast::hash(body) == h.crc
    }
    fn ends_turn(&self, _h: &SimpleHeader) -> bool {
        true
    }
    fn turns(&self) -> Turns {
        Turns::EachRecord
    }
    fn filler(&self, _len: u64) -> Option<Vec<u8>> {
        None
    }
}
