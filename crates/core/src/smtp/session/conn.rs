//! Buffered connection with reply batching.
//!
//! Replies are queued in `out` and written only when the session needs more input (RFC
//! 2920): a client that pipelines MAIL, RCPT and DATA gets their replies in one write, and a
//! client that does not pipeline sees no difference. Reads go into one growing buffer that
//! the DATA and BDAT readers consume in place, so the message is copied once, into its
//! [`MessageBuf`](crate::smtp::data::MessageBuf).
//!
//! Every read and write has a timeout (DESIGN.md invariant 5), and a command line has a
//! length limit: an over-long line is read to its end and reported once, never buffered
//! whole.

use crate::proto::Reply;
use crate::smtp::tls::MaybeTls;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Room for a read while commands are read: an idle session holds no more than this.
pub(super) const LINE_ROOM: usize = 4096;
/// Room for a read while a message is read: a typical message of a few KiB arrives in one
/// read (with [`LINE_ROOM`], a 5 KiB message took two).
pub(super) const BODY_ROOM: usize = 16 * 1024;

/// Outcome of reading a command line.
pub(super) enum Line {
    /// A line, without its CR LF.
    Text(Vec<u8>),
    /// Longer than the limit (read to its end and dropped).
    TooLong,
    /// The client closed the stream.
    Eof,
}

/// Buffered connection with reply batching: replies are queued and written when the
/// session needs more input (RFC 2920), so pipelined commands get their replies together.
pub(super) struct Conn<S> {
    /// The client's stream, clear text until STARTTLS.
    pub(super) stream: MaybeTls<S>,
    /// Bytes read; those before `start` are consumed.
    pub(super) inbuf: Vec<u8>,
    pub(super) start: usize,
    /// Replies not written yet.
    pub(super) out: Vec<u8>,
    /// Wait for each read and each write.
    pub(super) timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A connection over `stream` whose reads and writes each wait at most `timeout`.
    pub(super) fn new(stream: S, timeout: Duration) -> Self {
        Conn {
            stream: MaybeTls::Plain(stream),
            inbuf: Vec::new(),
            start: 0,
            out: Vec::new(),
            timeout,
        }
    }

    /// Input read but not consumed yet.
    pub(super) fn buffered(&self) -> &[u8] {
        &self.inbuf[self.start..]
    }

    /// Writes the queued replies.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let res = tokio::time::timeout(self.timeout, async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        })
        .await;
        self.out = out;
        self.out.clear();
        match res {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout")),
        }
    }

    /// Flushes replies, then reads more input, with room for at least `min` bytes
    /// ([`LINE_ROOM`] or [`BODY_ROOM`]). `Ok(0)` is end of stream.
    pub(super) async fn fill(&mut self, min: usize) -> io::Result<usize> {
        self.flush().await?;
        if self.start > 0 && self.start == self.inbuf.len() {
            self.inbuf.clear();
            if min <= LINE_ROOM {
                // Back to reading commands: an idle session holds no more than this.
                self.inbuf.shrink_to(LINE_ROOM);
            }
            self.start = 0;
        } else if self.start > 32 * 1024 {
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        // Read into what capacity there is, at least `min` bytes: an idle session holds a
        // small buffer, a session in a large DATA keeps the larger one it grew. The read
        // goes into the spare capacity as it is (no zeroing first).
        let len = self.inbuf.len();
        self.inbuf.reserve(min);
        let res = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.inbuf)).await;
        match res {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => {
                self.inbuf.truncate(len);
                Err(e)
            }
            Err(_) => {
                self.inbuf.truncate(len);
                Err(io::Error::new(io::ErrorKind::TimedOut, "read timeout"))
            }
        }
    }

    /// Queues a reply; it is written at the next [`Conn::flush`] or [`Conn::fill`].
    pub(super) fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    /// Reads one command line (without CR LF); over-long lines are read to their end and
    /// reported once.
    pub(super) async fn read_line(&mut self, max: usize) -> io::Result<Line> {
        let mut discarding = false;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', self.buffered()) {
                let end = self.start + pos;
                let mut line_end = end;
                if line_end > self.start && self.inbuf[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
                let too_long = discarding || end + 1 - self.start > max;
                let line = self.inbuf[self.start..line_end].to_vec();
                self.start = end + 1;
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Text(line)
                });
            }
            if self.buffered().len() > max {
                discarding = true;
                self.start = self.inbuf.len();
            }
            if self.fill(LINE_ROOM).await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }
}
