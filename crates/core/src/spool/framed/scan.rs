//! Reading a framed file: records checked whole, the search for the next whole record
//! after damage, and the line between a torn tail and corruption (see the module docs of
//! [`super`]).

use super::{Damaged, Framing, Shape, Turns};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The result of checking the bytes at one offset.
pub enum Check<H> {
    /// A whole record (its body is in the buffer given to [`check_at`]).
    Whole(H),
    /// Not a whole record.
    Bad {
        /// What the checks found.
        reason: &'static str,
        /// Where the next record may be.
        next: Next,
        /// Its metadata, when that was intact (only the body was damaged).
        meta: Option<Vec<u8>>,
    },
}

/// Where to look for the next record after a damaged one.
#[derive(Clone, Copy)]
pub enum Next {
    /// The header is damaged: try the length it says (when it decodes), then search the
    /// bytes after its first one.
    Search(Option<u64>),
    /// The header is intact (its checksum holds), the body damaged: the record ends after
    /// this many bytes; nothing inside it is searched.
    After(u64),
    /// The header is intact but the record runs past the end of the file: a torn tail from
    /// this header on.
    Torn,
}

/// Checks the record at `off` of a file whose bytes end at `file_len`: header, metadata
/// and body. On [`Check::Whole`], `body` holds the record's body.
pub fn check_at<F: Framing>(
    f: &F,
    file: &File,
    off: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Check<F::Header>> {
    let bad = |reason, next, meta| Check::Bad { reason, next, meta };
    let hl = F::HEADER_LEN as u64;
    if file_len.saturating_sub(off) < hl {
        return Ok(bad("incomplete record header", Next::Search(None), None));
    }
    let mut hb = vec![0u8; F::HEADER_LEN];
    file.read_exact_at(&mut hb, off)?;
    let Some(h) = f.decode(&hb) else {
        return Ok(bad("damaged record header", Next::Search(None), None));
    };
    let meta_len = f.meta_len(&h);
    let meta_end = off + hl + meta_len;
    if meta_end > file_len {
        // Its checksum cannot be checked: its lengths are not to be trusted.
        return Ok(bad(
            "record runs past the end of the file",
            Next::Search(None),
            None,
        ));
    }
    let mut meta = vec![0u8; meta_len as usize];
    file.read_exact_at(&mut meta, off + hl)?;
    if !f.meta_ok(&h, &meta) {
        return Ok(bad(
            "record checksum mismatch",
            Next::Search(Some(f.record_len(&h))),
            None,
        ));
    }
    // The header is intact: its lengths are what was written.
    if off + f.record_len(&h) > file_len {
        return Ok(bad(
            "record runs past the end of the file",
            Next::Torn,
            Some(meta),
        ));
    }
    body.resize(f.body_len(&h) as usize, 0);
    file.read_exact_at(body, meta_end)?;
    if !f.body_ok(&h, body) {
        return Ok(bad(
            "body checksum mismatch",
            Next::After(f.record_len(&h)),
            Some(meta),
        ));
    }
    Ok(Check::Whole(h))
}

/// What a scan found: the whole records to keep, and the damaged stretches (torn or not).
pub struct Scan<H> {
    /// Offset and header of every whole record before the torn tail, in file order.
    pub records: Vec<(u64, H)>,
    /// Damaged stretches: corruption, then at most one torn tail (to the end of the file).
    pub damaged: Vec<Damaged>,
    /// Where the file's bytes end for the scan (its length, or its void end).
    pub file_len: u64,
}

impl<H> Scan<H> {
    /// Where the kept bytes end: the start of the torn tail, or the end of the file.
    pub fn end(&self) -> u64 {
        self.damaged
            .iter()
            .find(|d| d.torn)
            .map_or(self.file_len, |d| d.offset)
    }
}

/// One stretch of the file: a whole record, or damaged bytes.
struct Span<H> {
    off: u64,
    len: u64,
    what: What<H>,
}

enum What<H> {
    Rec(H),
    Damage {
        reason: &'static str,
        id: Option<String>,
    },
}

/// Reads the framed file `file` (at `path`) of layout `f` whole and sorts its damage into
/// corruption and a torn tail by the rules of the module docs. Changes nothing.
pub fn scan<F: Framing>(
    f: &F,
    file: &File,
    path: &Path,
    shape: Shape,
) -> io::Result<Scan<F::Header>> {
    let file_len = file.metadata()?.len();
    let file_len = shape.end.map_or(file_len, |e| e.min(file_len));
    let spans = spans(f, file, file_len)?;
    let turns = f.turns();
    // The end of what is proven synced: see the module docs.
    let proven = spans
        .iter()
        .filter_map(|s| match &s.what {
            What::Rec(h) => Some((s, h)),
            What::Damage { .. } => None,
        })
        .flat_map(|(s, h)| {
            let end = s.off + s.len;
            let after = match turns {
                Turns::Unmarked => None,
                Turns::Marked | Turns::EachRecord => {
                    (f.ends_turn(h) && (shape.sealed || end < file_len)).then_some(end)
                }
            };
            let before = (turns == Turns::EachRecord).then_some(s.off);
            after.into_iter().chain(before)
        })
        .max()
        .unwrap_or(f.data_start());
    let cut = spans
        .iter()
        .find(|s| matches!(s.what, What::Damage { .. }) && s.off >= proven)
        .map(|s| s.off);
    let mut damaged = Vec::new();
    let mut records = Vec::new();
    for s in spans {
        if cut.is_some_and(|c| s.off > c) {
            break;
        }
        match s.what {
            What::Rec(h) => records.push((s.off, h)),
            What::Damage { reason, id } => {
                let torn = Some(s.off) == cut;
                damaged.push(Damaged {
                    path: path.to_path_buf(),
                    offset: s.off,
                    len: if torn { file_len - s.off } else { s.len },
                    torn,
                    reason: reason.to_string(),
                    id,
                    kept: None,
                    left: false,
                });
            }
        }
    }
    Ok(Scan {
        records,
        damaged,
        file_len,
    })
}

/// Reads the file into spans of whole records and damaged bytes. With marked turns the
/// scan goes on after damage at the next whole record; without, damage runs to the end.
fn spans<F: Framing>(f: &F, file: &File, file_len: u64) -> io::Result<Vec<Span<F::Header>>> {
    let mut spans = Vec::new();
    let mut off = f.data_start();
    let mut body = Vec::new();
    while off < file_len {
        match check_at(f, file, off, file_len, &mut body)? {
            Check::Whole(h) => {
                let len = f.record_len(&h);
                spans.push(Span {
                    off,
                    len,
                    what: What::Rec(h),
                });
                off += len;
            }
            Check::Bad { reason, next, meta } => {
                let next = match f.turns() {
                    Turns::Unmarked => None,
                    Turns::Marked | Turns::EachRecord => {
                        resync(f, file, off, next, file_len, &mut body)?
                    }
                };
                let end = next.unwrap_or(file_len);
                spans.push(Span {
                    off,
                    len: end - off,
                    what: What::Damage {
                        reason,
                        id: meta.as_deref().and_then(|m| f.describe(m)),
                    },
                });
                off = end;
            }
        }
    }
    Ok(spans)
}

/// The offset of the next whole record after damage at `off`, or `None` when the damage
/// runs to the end of the file. A record whose header is intact is never searched inside:
/// when it runs past the end of the file it is a torn tail to the end; otherwise the search
/// starts where it ends. A damaged header's length is tried first, then the bytes after its
/// first one are searched for the record marker and a record whose checksums hold.
fn resync<F: Framing>(
    f: &F,
    file: &File,
    off: u64,
    next: Next,
    file_len: u64,
    body: &mut Vec<u8>,
) -> io::Result<Option<u64>> {
    let from = match next {
        Next::Torn => return Ok(None),
        Next::After(len) => off + len,
        Next::Search(len) => {
            if let Some(next) = len.map(|l| off + l) {
                if next == file_len {
                    return Ok(None); // the damaged record is the last one
                }
                if next < file_len
                    && matches!(check_at(f, file, next, file_len, body)?, Check::Whole(_))
                {
                    return Ok(Some(next));
                }
            }
            off + 1
        }
    };
    const CHUNK: usize = 1 << 20;
    let marker = f.marker();
    let hl = F::HEADER_LEN;
    // Each window holds a whole header after any marker found in its first CHUNK bytes.
    let mut window = vec![0u8; CHUNK + hl];
    let mut at = from;
    while at + (hl as u64) <= file_len {
        let want = window.len().min((file_len - at) as usize);
        file.read_exact_at(&mut window[..want], at)?;
        let scan_to = want.min(CHUNK + marker.len() - 1);
        // Every occurrence, overlapping ones included (a salted marker may repeat itself).
        let hits = memchr::memchr_iter(marker[0], &window[..scan_to])
            .filter(|&i| window.get(i..i + marker.len()) == Some(&marker[..]));
        for i in hits {
            let cand = at + i as u64;
            let plausible = window
                .get(i..i + hl)
                .and_then(|b| f.decode(b))
                .is_none_or(|h| f.plausible(&h));
            if plausible && matches!(check_at(f, file, cand, file_len, body)?, Check::Whole(_)) {
                return Ok(Some(cand));
            }
        }
        at += CHUNK as u64;
    }
    Ok(None)
}

/// What stopped a [`walk`].
#[derive(Debug)]
pub enum Stop<E> {
    /// The file could not be read.
    Io(io::Error),
    /// The record at `offset` is not whole (its header or metadata).
    Damaged {
        /// Where the record starts.
        offset: u64,
        /// What the checks found.
        reason: &'static str,
    },
    /// `each` failed on the record at `offset`.
    Each {
        /// Where the record starts.
        offset: u64,
        /// Its error.
        error: E,
    },
}

/// What [`walk`] calls for each record: its offset, header and metadata.
pub type EachRecord<'a, H, E> = dyn FnMut(u64, &H, &[u8]) -> Result<(), E> + 'a;

/// Bytes read at a record's start by [`walk`]: its header and, nearly always, all its
/// metadata.
const GUESS: usize = 2048;
/// Bytes [`walk`] reads at once while records are small: the records in them (bodies
/// included, skipped in memory) cost one `pread` together rather than one each.
const WINDOW: usize = 64 << 10;

/// Records longer than this on average are read one by one, not in windows.
const SMALL: u64 = 8 << 10;

/// The part of a file [`walk`] read last. While the records walked lately are small (a
/// running average of their lengths up to [`SMALL`]), it reads [`WINDOW`] bytes at a time;
/// otherwise [`GUESS`] bytes at each record, as larger bodies are skipped, not read: a
/// spool of larger messages without indexes is read about as little as before.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    at: u64,
    /// Bytes of `buf` read (fewer than its length at the end of the file).
    len: usize,
    /// Running average of the records' lengths (each new one weighs an eighth).
    average: u64,
}

impl Window {
    /// The file's bytes from `off`, `want` of them or up to its end: from the window when
    /// it holds them, else read afresh from `off`.
    fn get(&mut self, file: &File, off: u64, want: usize) -> io::Result<&[u8]> {
        // Where `off` is in the window, if the window holds what is wanted (or all the file
        // has from there: its last read was cut short by the file's end).
        let at_end = self.len < self.buf.len();
        let held = off
            .checked_sub(self.at)
            .and_then(|d| usize::try_from(d).ok())
            .filter(|&from| from <= self.len && (from + want <= self.len || at_end));
        let from = match held {
            Some(from) => from,
            None => {
                let size = if self.average > SMALL { GUESS } else { WINDOW };
                self.buf.resize(size.max(want), 0);
                self.len = read_at_most(file, &mut self.buf, off)?;
                self.at = off;
                0
            }
        };
        Ok(&self.buf[from..(from + want).min(self.len)])
    }
}

/// Walks the records of a file that was synced whole (a sealed segment), up to `file_len`:
/// headers and metadata are checked and passed to `each` with their offsets; bodies are
/// skipped (only small ones are read with their neighbours: a restart over gigabytes of
/// queued mail reads little more than the envelopes). The first damage stops the walk: the
/// caller then scans the file whole ([`scan`]).
pub fn walk<F: Framing, E>(
    f: &F,
    file: &File,
    file_len: u64,
    each: &mut EachRecord<'_, F::Header, E>,
) -> Result<(), Stop<E>> {
    let hl = F::HEADER_LEN;
    let mut off = f.data_start();
    let mut window = Window::default();
    while off < file_len {
        let head = window.get(file, off, GUESS.max(hl)).map_err(Stop::Io)?;
        let header = (head.len() >= hl)
            .then(|| f.decode(&head[..hl]))
            .flatten()
            .filter(|h| off + f.record_len(h) <= file_len);
        let Some(h) = header else {
            return Err(Stop::Damaged {
                offset: off,
                reason: "incomplete or damaged record header",
            });
        };
        let want = hl + f.meta_len(&h) as usize;
        let head = window.get(file, off, want).map_err(Stop::Io)?;
        if head.len() < want {
            return Err(Stop::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let meta = &head[hl..want];
        if !f.meta_ok(&h, meta) {
            return Err(Stop::Damaged {
                offset: off,
                reason: "record checksum mismatch",
            });
        }
        each(off, &h, meta).map_err(|error| Stop::Each { offset: off, error })?;
        let len = f.record_len(&h);
        off += len;
        window.average = (window.average * 7 + len) / 8;
    }
    Ok(())
}

/// Reads into `buf` at `off` until it is full or the file ends; returns the bytes read.
pub fn read_at_most(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
