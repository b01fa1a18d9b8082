//! Message readers: DATA (dot-unstuffing, end at `CRLF.CRLF` only) and BDAT chunks.
//!
//! Hand-written because the end-of-data rule is a security boundary (SMTP smuggling):
//! only `<CRLF>.<CRLF>` ends a message (the first line counts as following a CRLF), a bare LF
//! is recorded so the message can be refused, and the size limit is enforced while reading.

/// What a reader saw while collecting a message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFlags {
    /// The message went over the size limit (the rest was read and dropped).
    pub too_big: bool,
    /// A LF not preceded by CR was seen.
    pub bare_lf: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// Inside a line.
    Middle,
    /// After a CR inside a line.
    Cr,
    /// After a `.` at the start of a line (not yet known whether it ends the message).
    Dot,
    /// After `.` CR at the start of a line.
    DotCr,
}

/// Incremental DATA reader: feed it bytes, it returns how many it used and whether the
/// message ended.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    limit: usize,
    /// The unstuffed message so far (at most `limit` bytes).
    pub message: Vec<u8>,
    /// Anomalies seen.
    pub flags: BodyFlags,
    /// Total unstuffed size, also past the limit.
    pub total: u64,
}

impl DataReader {
    /// A reader that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> DataReader {
        DataReader {
            state: State::LineStart,
            limit,
            message: Vec::with_capacity(limit.min(64 * 1024)),
            flags: BodyFlags::default(),
            total: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.flags.too_big {
            return;
        }
        if self.message.len() + bytes.len() > self.limit {
            self.flags.too_big = true;
            self.message = Vec::new();
        } else {
            self.message.extend_from_slice(bytes);
        }
    }

    /// Consumes input; returns `(bytes used, ended)`. After `ended`, the rest of the input
    /// belongs to the next command.
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Middle => {
                    // Fast path: copy up to the next CR or LF.
                    match memchr::memchr2(b'\r', b'\n', &input[i..]) {
                        None => {
                            self.push(&input[i..]);
                            return (input.len(), false);
                        }
                        Some(off) => {
                            self.push(&input[i..i + off]);
                            i += off;
                            self.line_end_byte(input[i]);
                            i += 1;
                        }
                    }
                }
                State::LineStart => {
                    let b = input[i];
                    i += 1;
                    if b == b'.' {
                        self.state = State::Dot;
                    } else {
                        self.normal_byte(b);
                    }
                }
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        self.push(b"\n");
                        self.state = State::LineStart;
                    } else {
                        self.normal_byte(b);
                    }
                }
                State::Dot => {
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        self.state = State::DotCr;
                    } else {
                        // A leading dot on a non-empty line is removed (RFC 5321 4.5.2).
                        self.normal_byte(b);
                    }
                }
                State::DotCr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        return (i, true);
                    }
                    // ".\r" followed by something else: the dot is stuffing, the CR is data.
                    self.push(b"\r");
                    self.state = State::Cr;
                    i -= 1;
                }
            }
        }
        (input.len(), false)
    }

    /// Handles one byte that may be CR or LF or anything else, outside the dot states.
    fn normal_byte(&mut self, b: u8) {
        if b == b'\r' || b == b'\n' {
            self.line_end_byte(b);
        } else {
            self.push(&[b]);
            self.state = State::Middle;
        }
    }

    fn line_end_byte(&mut self, b: u8) {
        if b == b'\r' {
            // A CR right after another CR leaves the first one as a bare CR, kept as data.
            self.push(b"\r");
            self.state = State::Cr;
        } else {
            // LF: is it preceded by CR?
            if self.state != State::Cr {
                self.flags.bare_lf = true;
            }
            self.push(b"\n");
            self.state = State::LineStart;
        }
    }
}

/// Collects BDAT chunks into one message, enforcing the size limit and spotting bare LF.
#[derive(Debug)]
pub struct ChunkCollector {
    limit: usize,
    last_was_cr: bool,
    /// The message so far.
    pub message: Vec<u8>,
    /// Anomalies seen.
    pub flags: BodyFlags,
}

impl ChunkCollector {
    /// A collector that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> ChunkCollector {
        ChunkCollector {
            limit,
            last_was_cr: false,
            message: Vec::new(),
            flags: BodyFlags::default(),
        }
    }

    /// Adds chunk bytes (a chunk may arrive in several pieces).
    pub fn push(&mut self, bytes: &[u8]) {
        for pos in memchr::memchr_iter(b'\n', bytes) {
            let prev_cr = if pos == 0 {
                self.last_was_cr
            } else {
                bytes[pos - 1] == b'\r'
            };
            if !prev_cr {
                self.flags.bare_lf = true;
            }
        }
        if let Some(&b) = bytes.last() {
            self.last_was_cr = b == b'\r';
        }
        if self.flags.too_big {
            return;
        }
        if self.message.len() + bytes.len() > self.limit {
            self.flags.too_big = true;
            self.message = Vec::new();
        } else {
            self.message.extend_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], split: usize) -> (Vec<u8>, usize, bool, BodyFlags) {
        let mut r = DataReader::new(1 << 20);
        let mut used = 0;
        for chunk in input.chunks(split.max(1)) {
            let (n, done) = r.feed(chunk);
            used += n;
            if done {
                return (r.message, used, true, r.flags);
            }
        }
        (r.message, used, false, r.flags)
    }

    #[test]
    fn unstuffs_and_ends_at_crlf_dot_crlf() {
        for split in [1, 2, 3, 7, 1000] {
            let (m, used, done, f) = read_all(b"..first\r\nline\r\n..x\r\n.\r\nQUIT\r\n", split);
            assert!(done);
            assert_eq!(m, b".first\r\nline\r\n.x\r\n");
            assert_eq!(used, 23);
            assert!(!f.bare_lf);
        }
    }

    #[test]
    fn empty_message_ends_immediately() {
        let (m, used, done, _) = read_all(b".\r\n", 1000);
        assert!(done);
        assert!(m.is_empty());
        assert_eq!(used, 3);
    }

    #[test]
    fn bare_lf_dot_does_not_end_message() {
        for split in [1, 1000] {
            let (_, _, done, f) = read_all(b"a\n.\nMAIL FROM:<x@y>\r\n", split);
            assert!(!done);
            assert!(f.bare_lf);
            let (m, _, done, f) = read_all(b"a\r\n.\nb\r\n.\r\n", split);
            assert!(done);
            assert!(f.bare_lf);
            assert_eq!(m, b"a\r\n\nb\r\n");
        }
    }

    #[test]
    fn size_limit_is_enforced_while_reading() {
        let mut r = DataReader::new(10);
        let (_, done) = r.feed(b"0123456789abcdef\r\n.\r\n");
        assert!(done);
        assert!(r.flags.too_big);
        assert!(r.message.is_empty());
    }

    #[test]
    fn chunks_spot_bare_lf_across_pieces() {
        let mut c = ChunkCollector::new(100);
        c.push(b"a\r");
        c.push(b"\nb");
        assert!(!c.flags.bare_lf);
        c.push(b"\n");
        assert!(c.flags.bare_lf);
    }
}
