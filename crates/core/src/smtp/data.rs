//! Message readers: DATA (dot-unstuffing, end at `<CRLF>.<CRLF>` only) and BDAT chunks, both
//! writing into one [`MessageBuf`], the only copy of the message a session holds.
//!
//! Hand-written because the end-of-data rule is a security boundary (SMTP smuggling): the
//! end of data is exactly `.<CRLF>` at the start of a line that follows a `<CRLF>` (or at
//! the start of the data). A bare LF or a bare CR never starts a line, so `<LF>.<CRLF>`,
//! `<CR>.<CRLF>`, `<CRLF>.<LF>` and the like are message text; both are recorded so the
//! message can be refused whole (`550 5.5.2`), and the size limit and the memory budget are
//! enforced while reading.

use super::budget::Charge;

/// What a reader saw while collecting a message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BodyFlags {
    /// The message went over the size limit (the rest was read and dropped).
    pub too_big: bool,
    /// The memory budget of messages in transfer was spent (the rest was read and dropped).
    pub over_budget: bool,
    /// A LF not preceded by CR was seen.
    pub bare_lf: bool,
    /// A CR not followed by LF was seen.
    pub bare_cr: bool,
}

/// Smallest step a message buffer grows by (and its capacity at the start).
const MIN_GROW: usize = super::budget::FIRST_BUFFER as usize;

/// The bytes of one message being received: an optional prefix (our `Received:` header,
/// written first so the message is never copied to prepend it) and the message text,
/// bounded by the size limit and charged to the memory budget as it grows.
#[derive(Debug)]
pub struct MessageBuf {
    bytes: Vec<u8>,
    prefix: usize,
    limit: usize,
    charge: Option<Charge>,
    flags: BodyFlags,
}

impl MessageBuf {
    /// A buffer starting with `prefix`, keeping at most `limit` message bytes after it, and
    /// charging its capacity to `charge` when given.
    pub fn new(prefix: &[u8], limit: usize, charge: Option<Charge>) -> MessageBuf {
        let mut b = MessageBuf {
            bytes: Vec::new(),
            prefix: prefix.len(),
            limit,
            charge,
            flags: BodyFlags::default(),
        };
        if b.reserve(prefix.len() + limit.min(MIN_GROW)) {
            b.bytes.extend_from_slice(prefix);
        }
        b
    }

    /// Grows the capacity to `cap` if the budget allows; on refusal the buffer is dropped.
    fn reserve(&mut self, cap: usize) -> bool {
        let extra = cap.saturating_sub(self.bytes.capacity());
        if extra == 0 {
            return true;
        }
        if let Some(c) = self.charge.as_mut() {
            if !c.grow(extra as u64) {
                self.flags.over_budget = true;
                self.discard();
                return false;
            }
        }
        self.bytes.reserve_exact(cap - self.bytes.len());
        true
    }

    /// Frees the bytes and gives their budget back.
    fn discard(&mut self) {
        self.bytes = Vec::new();
        if let Some(c) = self.charge.as_mut() {
            c.release();
        }
    }

    /// Appends message bytes (dropped once the limit or the budget was exceeded).
    fn push(&mut self, data: &[u8]) {
        if self.flags.too_big || self.flags.over_budget {
            return;
        }
        if self.bytes.len() - self.prefix + data.len() > self.limit {
            self.flags.too_big = true;
            self.discard();
            return;
        }
        let need = self.bytes.len() + data.len();
        if need > self.bytes.capacity() {
            // Double, but never past prefix + limit: a message at the limit costs its size,
            // not the next power of two.
            let cap = self.bytes.capacity();
            let target = cap
                .saturating_mul(2)
                .max(cap + MIN_GROW)
                .min(self.prefix.saturating_add(self.limit))
                .max(need);
            if !self.reserve(target) {
                return;
            }
        }
        self.bytes.extend_from_slice(data);
    }

    /// The message so far, without the prefix.
    pub fn message(&self) -> &[u8] {
        self.bytes.get(self.prefix..).unwrap_or_default()
    }

    /// The prefix and message so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Anomalies seen.
    pub fn flags(&self) -> &BodyFlags {
        &self.flags
    }

    /// The bytes, the flags and the budget charge (keep it while the bytes are in use).
    pub fn into_parts(self) -> (Vec<u8>, BodyFlags, Option<Charge>) {
        (self.bytes, self.flags, self.charge)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line: after a CRLF, or at the start of the data.
    LineStart,
    /// Inside a line (also after a bare LF, which does not start a line).
    Middle,
    /// After a CR (kept in the message); a LF next ends the line.
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
    buf: MessageBuf,
}

impl DataReader {
    /// A reader that keeps at most `limit` bytes, with no prefix and no budget.
    pub fn new(limit: usize) -> DataReader {
        DataReader::with_buf(MessageBuf::new(&[], limit, None))
    }

    /// A reader that writes into `buf`.
    pub fn with_buf(buf: MessageBuf) -> DataReader {
        DataReader {
            state: State::LineStart,
            buf,
        }
    }

    /// The unstuffed message so far (after the buffer's prefix, if any).
    pub fn message(&self) -> &[u8] {
        self.buf.message()
    }

    /// Anomalies seen.
    pub fn flags(&self) -> &BodyFlags {
        &self.buf.flags
    }

    /// The buffer, once the message ended.
    pub fn finish(self) -> MessageBuf {
        self.buf
    }

    /// Consumes input; returns `(bytes used, ended)`. After `ended`, the rest of the input
    /// belongs to the next command.
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Middle => {
                    // Fast path: copy up to the next CR or LF; a CRLF goes with its line.
                    let Some(off) = memchr::memchr2(b'\r', b'\n', &input[i..]) else {
                        self.buf.push(&input[i..]);
                        return (input.len(), false);
                    };
                    let at = i + off;
                    if input[at] == b'\r' && input.get(at + 1) == Some(&b'\n') {
                        self.buf.push(&input[i..at + 2]);
                        i = at + 2;
                        self.state = State::LineStart;
                        continue;
                    }
                    self.buf.push(&input[i..=at]);
                    i = at + 1;
                    if input[at] == b'\r' {
                        self.state = State::Cr;
                    } else {
                        // A bare LF does not start a line: a dot after it is text, not an end.
                        self.buf.flags.bare_lf = true;
                    }
                }
                State::LineStart if input[i] == b'.' => {
                    i += 1;
                    self.state = State::Dot;
                }
                // A leading dot on a non-empty line is stuffing and is dropped (RFC 5321
                // 4.5.2); what follows it is line content.
                State::Dot if input[i] == b'\r' => {
                    i += 1;
                    self.state = State::DotCr;
                }
                State::LineStart | State::Dot => self.state = State::Middle,
                State::Cr if input[i] == b'\n' => {
                    self.buf.push(b"\n");
                    i += 1;
                    self.state = State::LineStart;
                }
                State::Cr => {
                    // The CR (already kept) is not followed by LF: it is bare.
                    self.buf.flags.bare_cr = true;
                    self.state = State::Middle;
                }
                State::DotCr if input[i] == b'\n' => return (i + 1, true),
                State::DotCr => {
                    // ".\r" followed by something else: the dot was stuffing, the CR is bare.
                    self.buf.push(b"\r");
                    self.buf.flags.bare_cr = true;
                    self.state = State::Middle;
                }
            }
        }
        (input.len(), false)
    }
}

/// Collects BDAT chunks into one message, enforcing the size limit and spotting bare CR and
/// bare LF (also across chunk and read boundaries).
#[derive(Debug)]
pub struct ChunkCollector {
    last_was_cr: bool,
    buf: MessageBuf,
}

impl ChunkCollector {
    /// A collector that keeps at most `limit` bytes, with no prefix and no budget.
    pub fn new(limit: usize) -> ChunkCollector {
        ChunkCollector::with_buf(MessageBuf::new(&[], limit, None))
    }

    /// A collector that writes into `buf`.
    pub fn with_buf(buf: MessageBuf) -> ChunkCollector {
        ChunkCollector {
            last_was_cr: false,
            buf,
        }
    }

    /// The message so far (after the buffer's prefix, if any).
    pub fn message(&self) -> &[u8] {
        self.buf.message()
    }

    /// Anomalies seen so far.
    pub fn flags(&self) -> &BodyFlags {
        &self.buf.flags
    }

    /// Adds chunk bytes (a chunk may arrive in several pieces).
    pub fn push(&mut self, bytes: &[u8]) {
        let Some(&last) = bytes.last() else { return };
        let flags = &mut self.buf.flags;
        if self.last_was_cr && bytes[0] != b'\n' {
            flags.bare_cr = true;
        }
        for pos in memchr::memchr2_iter(b'\r', b'\n', bytes) {
            if bytes[pos] == b'\n' {
                let after_cr = if pos == 0 {
                    self.last_was_cr
                } else {
                    bytes[pos - 1] == b'\r'
                };
                flags.bare_lf |= !after_cr;
            } else if pos + 1 < bytes.len() && bytes[pos + 1] != b'\n' {
                flags.bare_cr = true;
            }
        }
        self.last_was_cr = last == b'\r';
        self.buf.push(bytes);
    }

    /// The buffer after the last chunk (a CR as the very last byte is bare).
    pub fn finish(mut self) -> MessageBuf {
        if self.last_was_cr {
            self.buf.flags.bare_cr = true;
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::budget::InflightBudget;

    fn read_all(input: &[u8], split: usize) -> (Vec<u8>, usize, bool, BodyFlags) {
        let mut r = DataReader::new(1 << 20);
        let mut used = 0;
        for chunk in input.chunks(split.max(1)) {
            let (n, done) = r.feed(chunk);
            used += n;
            if done {
                return (r.message().to_vec(), used, true, r.flags().clone());
            }
        }
        (r.message().to_vec(), used, false, r.flags().clone())
    }

    #[test]
    fn unstuffs_and_ends_at_crlf_dot_crlf() {
        for split in [1, 2, 3, 7, 1000] {
            let (m, used, done, f) = read_all(b"..first\r\nline\r\n..x\r\n.\r\nQUIT\r\n", split);
            assert!(done);
            assert_eq!(m, b".first\r\nline\r\n.x\r\n");
            assert_eq!(used, 23);
            assert_eq!(f, BodyFlags::default());
        }
    }

    #[test]
    fn empty_message_ends_immediately() {
        let (m, used, done, _) = read_all(b".\r\n", 1000);
        assert!(done);
        assert!(m.is_empty());
        assert_eq!(used, 3);
    }

    /// Every published smuggling variant, at every split: the data does not end before the
    /// real `<CRLF>.<CRLF>`, and the bare line end is flagged.
    #[test]
    fn no_fake_end_of_data_ends_the_message() {
        let fakes: [&[u8]; 9] = [
            b"\n.\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r.\n",
            b"\n..\r\n",
            b"\r\n.\r\r\n",
            b"\r\r\n.\r\r\n",
        ];
        for fake in fakes {
            let mut input = b"hi".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(b"MAIL FROM:<a@b>\r\nDATA\r\nx\r\n.\r\nNEXT");
            for split in 1..=input.len() {
                let (m, used, done, f) = read_all(&input, split);
                assert!(done, "{fake:?} split {split}");
                assert_eq!(used, input.len() - 4, "{fake:?} split {split}: ended early");
                assert!(m.ends_with(b"DATA\r\nx\r\n"), "{fake:?}");
                assert!(
                    f.bare_lf || f.bare_cr,
                    "{fake:?} split {split}: not flagged"
                );
            }
        }
    }

    #[test]
    fn bare_cr_and_bare_lf_are_told_apart() {
        let (m, _, done, f) = read_all(b"Subject: a\rX-Forged: 1\r\n.\r\n", 1000);
        assert!(done);
        assert_eq!(m, b"Subject: a\rX-Forged: 1\r\n");
        assert!(f.bare_cr && !f.bare_lf);
        let (_, _, done, f) = read_all(b"a\r\n.\nb\r\n.\r\n", 1);
        assert!(done);
        assert!(f.bare_lf && !f.bare_cr);
        let (m, _, done, f) = read_all(b"a\r\r\n.\r\n", 1);
        assert!(done);
        assert_eq!(m, b"a\r\r\n");
        assert!(f.bare_cr);
    }

    #[test]
    fn size_limit_is_enforced_while_reading() {
        let mut r = DataReader::new(10);
        let (_, done) = r.feed(b"0123456789abcdef\r\n.\r\n");
        assert!(done);
        assert!(r.flags().too_big);
        assert!(r.message().is_empty());
    }

    #[test]
    fn buffer_keeps_the_prefix_and_never_grows_past_the_limit() {
        let limit = 1_000_000;
        let mut r = DataReader::with_buf(MessageBuf::new(b"Received: x\r\n", limit, None));
        let line = [b'a'; 998];
        let mut fed = 0;
        while fed + 1000 <= limit {
            r.feed(&line);
            r.feed(b"\r\n");
            fed += 1000;
        }
        assert!(r.feed(b".\r\n").1);
        let buf = r.finish();
        assert!(buf.bytes().starts_with(b"Received: x\r\naaa"));
        assert_eq!(buf.bytes().len(), 13 + fed);
        let (bytes, flags, _) = buf.into_parts();
        assert!(bytes.capacity() <= 13 + limit, "{}", bytes.capacity());
        assert_eq!(flags, BodyFlags::default());
    }

    #[test]
    fn budget_bounds_buffers_and_is_given_back() {
        let budget = InflightBudget::new(200_000);
        let mk = || MessageBuf::new(b"", 1 << 20, Some(Charge::new(budget.clone())));
        let mut a = ChunkCollector::with_buf(mk());
        a.push(&[b'x'; 150_000]);
        assert!(!a.flags().over_budget);
        let mut b = ChunkCollector::with_buf(mk());
        b.push(&[b'y'; 150_000]);
        assert!(b.flags().over_budget, "the second buffer does not fit");
        assert!(b.message().is_empty());
        assert!(budget.used() <= 200_000);
        let (_, _, charge) = a.finish().into_parts();
        assert!(budget.used() > 0);
        drop(charge);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn chunks_spot_bare_lf_and_bare_cr_across_pieces() {
        let mut c = ChunkCollector::new(100);
        c.push(b"a\r");
        c.push(b"\nb");
        assert_eq!(c.flags(), &BodyFlags::default());
        c.push(b"\n");
        assert!(c.flags().bare_lf);
        let mut c = ChunkCollector::new(100);
        c.push(b"a\r");
        c.push(b"");
        c.push(b"b\r\n");
        assert!(c.flags().bare_cr);
        let mut c = ChunkCollector::new(100);
        c.push(b"a\r\nb\r");
        assert!(!c.flags().bare_cr);
        assert!(
            c.finish().flags().bare_cr,
            "a CR ending the message is bare"
        );
    }
}
