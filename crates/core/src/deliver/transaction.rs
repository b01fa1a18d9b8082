//! One SMTP transaction on an open session: MAIL, RCPT and DATA or BDAT (pipelined when
//! the next hop offers PIPELINING), the reading of replies into per-recipient outcomes, and
//! the writing of the message bytes (exact with BDAT, dot-stuffed through a buffer with DATA).

use super::{Failure, LocalError, Outbound, RcptOutcome, TxError};
use crate::proto::{EnhancedStatus, Reply};
use mail_send::SmtpClient;
use smtp_proto::{EXT_8BIT_MIME, EXT_CHUNKING, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8};
use std::io::IoSlice;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// One recipient's result in one transaction.
pub(super) struct TxRcpt {
    pub(super) outcome: RcptOutcome,
    /// Refused because the transaction had too many recipients (RCPT `452 4.5.3`).
    pub(super) too_many: bool,
}

/// An I/O error as a [`TxError`]: a connection the peer closed or reset is
/// [`TxError::Closed`], which the transaction turns into [`TxError::MissingReply`] once a
/// reply has come (see [`after_first`]).
fn io_error(e: std::io::Error) -> TxError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        // UnexpectedEof: rustls's word for a TLS session whose TCP connection ended without
        // a close_notify.
        BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof => TxError::Closed,
        _ => TxError::Io(e),
    }
}

/// An error met after the next hop's first reply in a transaction: a closed connection is
/// then a missing reply (the next hop may have taken the message), never
/// [`TxError::Closed`].
fn after_first(e: TxError) -> TxError {
    match e {
        TxError::Closed => TxError::MissingReply,
        e => e,
    }
}

async fn write_timed<T: AsyncWrite + Unpin>(
    s: &mut T,
    buf: &[u8],
    timeout: Duration,
) -> Result<(), TxError> {
    write_parts(s, &[buf], timeout).await
}

/// Writes `parts` one after the other with vectored writes (a command and the message it
/// carries leave in one `writev`, one TCP segment train, without being joined in a copy of
/// the message), then flushes once. Each write has its own timeout, so a large message on
/// a slow link is timed per step of progress, not as a whole.
async fn write_parts<T: AsyncWrite + Unpin>(
    s: &mut T,
    parts: &[&[u8]],
    timeout: Duration,
) -> Result<(), TxError> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let n = tokio::time::timeout(timeout, s.write_vectored(left))
            .await
            .map_err(|_| TxError::WriteTimeout)?
            .map_err(io_error)?;
        if n == 0 {
            return Err(io_error(std::io::ErrorKind::WriteZero.into()));
        }
        IoSlice::advance_slices(&mut left, n);
    }
    tokio::time::timeout(timeout, s.flush())
        .await
        .map_err(|_| TxError::WriteTimeout)?
        .map_err(io_error)
}

/// Reads `n` replies (see [`crate::proto::reply::parse_wire`] for why not through
/// mail-send). The next hop sends nothing it was not asked for, so no bytes are left over
/// between calls. A `421` followed by the end of the connection stands for the replies
/// that did not come; an end (or reset) before any byte is [`TxError::Closed`].
pub(super) async fn read_n<T: AsyncRead + AsyncWrite + Unpin>(
    c: &mut SmtpClient<T>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Reply>, TxError> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut out = Vec::with_capacity(n);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while out.len() < n {
            match crate::proto::reply::parse_wire(&buf)? {
                Some((reply, used)) => {
                    buf.drain(..used);
                    out.push(reply);
                }
                None => match c.stream.read(&mut chunk).await {
                    Err(e) => {
                        return Err(match io_error(e) {
                            TxError::Closed if !out.is_empty() || !buf.is_empty() => {
                                TxError::MissingReply
                            }
                            e => e,
                        })
                    }
                    Ok(0) if out.is_empty() && buf.is_empty() => return Err(TxError::Closed),
                    // A 421 closes the connection (RFC 5321 3.8): it answers every command
                    // still waiting for a reply, so that what it says (e.g. "slow down")
                    // reaches the recipients.
                    Ok(0) => match out.last().filter(|r: &&Reply| r.code == 421).cloned() {
                        Some(closing) => {
                            out.resize(n, closing);
                            return Ok(out);
                        }
                        None => return Err(TxError::MissingReply),
                    },
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                },
            }
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| TxError::ReplyTimeout)?
}

/// A RCPT reply that means "too many recipients in this transaction": `452` with `4.5.3` or
/// without an enhanced code (RFC 5321 4.5.3.1.10), or `552 5.5.3` (RFC 821 servers).
fn too_many(r: &Reply) -> bool {
    const TOO_MANY: EnhancedStatus = EnhancedStatus::new(4, 5, 3);
    const TOO_MANY_OLD: EnhancedStatus = EnhancedStatus::new(5, 5, 3);
    (r.code == 452 && (r.status == Some(TOO_MANY) || r.status.is_none()))
        || (r.code == 552 && r.status == Some(TOO_MANY_OLD))
}

/// UTF-8 (any byte over 127) in the header section of `message`.
fn utf8_headers(message: &[u8]) -> bool {
    let end = memchr::memmem::find(message, b"\r\n\r\n").unwrap_or(message.len());
    !message[..end].is_ascii()
}

/// Classifies a reply for the recipients it applies to.
fn outcome(r: &Reply) -> RcptOutcome {
    match r.code {
        200..=399 => RcptOutcome::Delivered(r.clone()),
        500..=599 => RcptOutcome::Failed(Failure::Remote(r.clone())),
        _ => RcptOutcome::Deferred(Failure::Remote(r.clone())),
    }
}

pub(super) async fn transaction<T: AsyncRead + AsyncWrite + Unpin>(
    c: &mut SmtpClient<T>,
    caps: u32,
    timeout: Duration,
    out: &Outbound<'_>,
    split: bool,
    (mail_rcpt, taken): (&mut Option<Duration>, &mut bool),
) -> Result<Vec<TxRcpt>, TxError> {
    *taken = false;
    let started = std::time::Instant::now();
    let n = out.rcpts.len();
    let all = |o: RcptOutcome| -> Vec<TxRcpt> {
        (0..n)
            .map(|_| TxRcpt {
                outcome: o.clone(),
                too_many: false,
            })
            .collect()
    };
    let utf8_address = out.from.is_some_and(|a| !a.to_string().is_ascii())
        || out.rcpts.iter().any(|a| !a.to_string().is_ascii());
    let offers_utf8 = caps & EXT_SMTP_UTF8 != 0;
    if !offers_utf8 && utf8_address {
        return Ok(all(RcptOutcome::Failed(Failure::Local(
            LocalError::Utf8Address,
        ))));
    }
    if !offers_utf8 && out.smtputf8 && utf8_headers(out.message) {
        return Ok(all(RcptOutcome::Failed(Failure::Local(
            LocalError::Utf8Headers,
        ))));
    }
    let needs_utf8 = offers_utf8 && (out.smtputf8 || utf8_address);
    let mut mail = format!(
        "MAIL FROM:<{}>",
        out.from.map(|a| a.to_string()).unwrap_or_default()
    );
    if caps & EXT_SIZE != 0 {
        mail.push_str(&format!(" SIZE={}", out.message.len()));
    }
    if out.eight_bit && caps & EXT_8BIT_MIME != 0 {
        mail.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        mail.push_str(" SMTPUTF8");
    }
    let dsn = caps & EXT_DSN != 0;
    if dsn {
        if let Some(r) = out.ret {
            mail.push_str(&format!(" RET={r}"));
        }
        if let Some(e) = out.envid {
            mail.push_str(&format!(" ENVID={e}"));
        }
    }
    mail.push_str("\r\n");
    let mut cmds = mail.into_bytes();
    for (i, r) in out.rcpts.iter().enumerate() {
        let mut line = format!("RCPT TO:<{r}>");
        if let Some(d) = out.rcpt_dsn.get(i).filter(|_| dsn) {
            if let Some(n) = &d.notify {
                line.push_str(&format!(" NOTIFY={n}"));
            }
            if let Some(o) = &d.orcpt {
                line.push_str(&format!(" ORCPT={o}"));
            }
        }
        line.push_str("\r\n");
        cmds.extend_from_slice(line.as_bytes());
    }
    let chunking = caps & EXT_CHUNKING != 0;
    // The body command, and with BDAT the message bytes that follow it (written from the
    // queue's copy, never joined into a second one).
    let (body_cmd, body_data): (Vec<u8>, &[u8]) = if chunking {
        let cmd = format!("BDAT {} LAST\r\n", out.message.len()).into_bytes();
        (cmd, out.message)
    } else {
        (b"DATA\r\n".to_vec(), &[])
    };

    let (mail_reply, rcpt_replies, body_reply) = if caps & EXT_PIPELINING != 0 && split {
        // MAIL and RCPTs pipelined, then the body: the server sends nothing more until
        // the body command, so reading exactly n + 1 replies loses nothing.
        write_timed(&mut c.stream, &cmds, timeout).await?;
        let mut replies = read_n(c, n + 1, timeout).await?;
        *mail_rcpt = Some(started.elapsed());
        let mail_reply = replies.remove(0);
        write_parts(&mut c.stream, &[&body_cmd, body_data], timeout)
            .await
            .map_err(after_first)?;
        let body_reply = read_n(c, 1, timeout).await.map_err(after_first)?.remove(0);
        (mail_reply, replies, Some(body_reply))
    } else if caps & EXT_PIPELINING != 0 {
        cmds.extend_from_slice(&body_cmd);
        write_parts(&mut c.stream, &[&cmds, body_data], timeout).await?;
        let mut replies = read_n(c, n + 2, timeout).await?;
        let body_reply = replies.pop().ok_or(TxError::MissingReply)?;
        let mail_reply = replies.remove(0);
        (mail_reply, replies, Some(body_reply))
    } else {
        // Lockstep: one command, one reply.
        let mut lines = cmds.split_inclusive(|&b| b == b'\n');
        let mail_line = lines.next().unwrap_or_default();
        write_timed(&mut c.stream, mail_line, timeout).await?;
        let mail_reply = read_n(c, 1, timeout).await?.remove(0);
        if mail_reply.code >= 400 {
            return Ok(all(outcome(&mail_reply)));
        }
        let mut rcpt_replies = Vec::with_capacity(n);
        for line in lines {
            write_timed(&mut c.stream, line, timeout)
                .await
                .map_err(after_first)?;
            rcpt_replies.push(read_n(c, 1, timeout).await.map_err(after_first)?.remove(0));
        }
        *mail_rcpt = Some(started.elapsed());
        let any_ok = rcpt_replies.iter().any(|r| r.code < 400);
        let body_reply = if any_ok {
            write_parts(&mut c.stream, &[&body_cmd, body_data], timeout)
                .await
                .map_err(after_first)?;
            Some(read_n(c, 1, timeout).await.map_err(after_first)?.remove(0))
        } else {
            let _ = write_timed(&mut c.stream, b"RSET\r\n", timeout).await;
            let _ = read_n(c, 1, timeout).await;
            None
        };
        (mail_reply, rcpt_replies, body_reply)
    };

    if mail_reply.code >= 400 {
        if !chunking && body_reply.as_ref().is_some_and(|r| r.code == 354) {
            end_data_anyway(c, timeout).await.map_err(after_first)?;
        }
        return Ok(all(outcome(&mail_reply)));
    }
    let accepted = rcpt_replies.iter().any(|r| r.code < 400);
    let mut final_reply = body_reply;
    if !chunking && accepted {
        match &final_reply {
            Some(r) if r.code == 354 => {
                write_dot_stuffed(&mut c.stream, out.message, timeout)
                    .await
                    .map_err(after_first)?;
                final_reply = Some(read_n(c, 1, timeout).await.map_err(after_first)?.remove(0));
            }
            _ => {}
        }
    } else if !chunking && final_reply.as_ref().is_some_and(|r| r.code == 354) {
        end_data_anyway(c, timeout).await.map_err(after_first)?;
    }
    let body_outcome = final_reply
        .as_ref()
        .map(outcome)
        .unwrap_or(RcptOutcome::Deferred(Failure::Local(
            LocalError::NoEndOfDataReply,
        )));
    // Taken (a 2xx reply to the data): the transaction is over and the session back in its
    // initial state (RFC 5321 4.1.4). Anything else may leave it open: a next hop that
    // refused every RCPT keeps the MAIL, and answers the next one with 503.
    *taken = accepted
        && final_reply
            .as_ref()
            .is_some_and(|r| (200..300).contains(&r.code));
    Ok(rcpt_replies
        .iter()
        .map(|r| TxRcpt {
            outcome: if r.code >= 400 {
                outcome(r)
            } else {
                body_outcome.clone()
            },
            too_many: too_many(r),
        })
        .collect())
}

/// A server that answers 354 with no valid recipient gets an empty message ended at once.
async fn end_data_anyway<T: AsyncRead + AsyncWrite + Unpin>(
    c: &mut SmtpClient<T>,
    timeout: Duration,
) -> Result<(), TxError> {
    write_timed(&mut c.stream, b".\r\n", timeout).await?;
    read_n(c, 1, timeout).await.map(|_| ())
}

/// The DATA form of `msg` as a sequence of slices: a dot is doubled at the start of every
/// line (the first line included) and the end marker is added. A message that does not end
/// in CRLF gets one, because DATA cannot carry it otherwise.
fn dot_stuffed(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    let lead: &[u8] = if msg.first() == Some(&b'.') {
        b"."
    } else {
        b""
    };
    let end: &[u8] = if msg.is_empty() || msg.ends_with(b"\r\n") {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    };
    // Every line that starts with a dot (after a CRLF) gets one more in front of it.
    let cuts = memchr::memmem::find_iter(msg, b"\r\n.").map(|pos| pos + 2);
    let mut last = 0;
    std::iter::once(lead).chain(cuts.chain(std::iter::once(msg.len())).flat_map(move |cut| {
        let piece = &msg[last..cut];
        last = cut;
        [piece, if cut == msg.len() { end } else { b"." }]
    }))
}

/// Appends the DATA form of `msg` (see [`dot_stuffed`]) to `out`.
pub fn dot_stuff(msg: &[u8], out: &mut Vec<u8>) {
    for piece in dot_stuffed(msg) {
        out.extend_from_slice(piece);
    }
}

/// Writes the DATA form of `msg` through a 64 KiB buffer: a large message is never copied
/// whole to stuff it, and small pieces still go out in few writes.
async fn write_dot_stuffed<T: AsyncWrite + Unpin>(
    s: &mut T,
    msg: &[u8],
    timeout: Duration,
) -> Result<(), TxError> {
    const BUF: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(BUF);
    for piece in dot_stuffed(msg) {
        if buf.len() + piece.len() > BUF && !buf.is_empty() {
            write_parts(s, &[&buf], timeout).await?;
            buf.clear();
        }
        if piece.len() >= BUF {
            write_parts(s, &[piece], timeout).await?;
        } else {
            buf.extend_from_slice(piece);
        }
    }
    write_parts(s, &[&buf], timeout).await
}

#[cfg(test)]
mod tests {
    use super::{dot_stuff, too_many};
    use crate::proto::Reply;

    #[test]
    fn too_many_recipients_is_read_from_code_and_status() {
        assert!(too_many(&Reply::new(452, "4.5.3", "Too many recipients")));
        assert!(too_many(&Reply::multiline(
            452,
            None,
            ["Too many", "recipients"]
        )));
        assert!(too_many(&Reply::new(552, "5.5.3", "Too many recipients")));
        assert!(!too_many(&Reply::new(
            452,
            "4.3.1",
            "Insufficient system storage"
        )));
        assert!(!too_many(&Reply::new(552, "5.3.4", "Message too big")));
        assert!(!too_many(&Reply::new(550, "5.5.3", "No")));
    }

    fn stuffed(m: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        dot_stuff(m, &mut v);
        v
    }

    #[test]
    fn stuffs_first_line_and_keeps_bytes() {
        assert_eq!(stuffed(b".a\r\n.b\r\nc\r\n"), b"..a\r\n..b\r\nc\r\n.\r\n");
        assert_eq!(stuffed(b"x"), b"x\r\n.\r\n");
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"a\r\n.\r\n"), b"a\r\n..\r\n.\r\n");
    }

    #[tokio::test]
    async fn buffered_writer_sends_what_dot_stuff_builds() {
        // Dot lines all through, a 100 KiB line larger than the buffer, no final CRLF.
        let mut m = Vec::new();
        for i in 0..5000 {
            m.extend_from_slice(format!(".line {i}\r\nplain\r\n").as_bytes());
        }
        m.extend_from_slice(&[b'x'; 100 * 1024]);
        m.extend_from_slice(b"\r\n.last");
        let mut wire = Vec::new();
        super::write_dot_stuffed(&mut wire, &m, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(wire, stuffed(&m));
    }
}
