//! Delivery Status Notifications (RFC 3464): the bounce sent to the envelope sender when
//! recipients fail permanently or expire. The DSN goes back into the spool like any message,
//! from the null sender `<>`.
//!
//! A DSN quotes text we do not control: next hops' replies (often several lines, kept with
//! `\n` between them), local errors, and the original message. Strict receivers, coexist
//! itself included, refuse a message with a bare LF or a bare CR, so every line of the DSN
//! is written here with CRLF and nothing else:
//! - quoted replies are split into their lines; control characters become spaces;
//! - in the human-readable part each reply line is a line of its own (indented after the
//!   first), wrapped before 998 octets;
//! - in `message/delivery-status` a reply line becomes a header-field continuation line
//!   (starting with a space), so `Diagnostic-Code` unfolds to the whole reply; lines are
//!   folded at spaces to about 78 octets and never longer than 998 (RFC 5322 2.1.1, 2.2.3);
//!   the field is US-ASCII (RFC 3464), other characters become `?`;
//! - the returned original (its header section, or all of it with `RET=FULL`) gets CRLF for
//!   any bare CR or LF, and lines over 998 octets broken (folded in the header section).

use crate::proto::Failure as Reason;
use crate::proto::Ret;
use crate::spool::Envelope;
use crate::types::{Address, QueueId};
use std::fmt::Write;

/// One failed recipient to report.
pub struct Failure<'a> {
    /// The recipient.
    pub rcpt: &'a Address,
    /// ORCPT as the client gave it (`rfc822;addr`).
    pub orcpt: Option<&'a str>,
    /// The last reply or error (`None`: none was recorded).
    pub reply: Option<&'a Reason>,
}

impl Failure<'_> {
    /// The text quoted in the DSN: the reply or error as displayed, or `unknown error`.
    fn text(&self) -> String {
        self.reply
            .map(|r| r.to_string())
            .unwrap_or_else(|| "unknown error".into())
    }
}

/// The enhanced status code for a failure: `5.4.7` for an expired message, else the
/// reply's (or local error's) own code made permanent, else `5.0.0`.
pub fn status_of(reply: Option<&Reason>) -> String {
    match reply.and_then(|r| r.status()) {
        Some(s) if matches!(s.class(), 4 | 5) => format!("5.{}.{}", s.subject(), s.detail()),
        _ => "5.0.0".into(),
    }
}

/// The header section of a message (up to, not including, the blank line), at most `max`
/// bytes, cut after the last whole line that fits; and whether it was cut. (A message made
/// only of header lines would otherwise come back whole, whatever its size.)
fn header_section(message: &[u8], max: u64) -> (&[u8], bool) {
    let head = match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    };
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    if head.len() <= max {
        return (head, false);
    }
    let cut = memchr::memrchr(b'\n', &head[..max]).map_or(0, |i| i + 1);
    (&head[..cut], true)
}

/// Longest line written, line end excluded (RFC 5322 2.1.1 allows 998).
const MAX_LINE: usize = 998;
/// Lines of header fields are folded at a space before this many octets where possible.
const FOLD_AT: usize = 78;

/// The lines of a quoted reply or error: split at CR and LF, control characters made
/// spaces, trailing spaces dropped, empty lines left out.
fn text_lines(text: &str) -> Vec<String> {
    text.split(['\r', '\n'])
        .map(|l| {
            l.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
                .trim_end()
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// The largest index `<= max` that is a char boundary of `s`.
fn floor_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Splits `line` into pieces to put on lines of their own: at the last space before `soft`
/// octets (the space starts the next piece), else at the first space after it, and only
/// where a piece would exceed `hard` octets without a space, at that limit.
fn wrap(line: &str, soft: usize, hard: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while rest.len() > soft {
        let before = rest[..floor_boundary(rest, soft)]
            .rfind(' ')
            .filter(|&i| i > 0);
        let after = || {
            let (from, to) = (floor_boundary(rest, soft), floor_boundary(rest, hard));
            rest.get(from..to)
                .and_then(|t| t.find(' '))
                .map(|i| i + from)
                .filter(|&i| i > 0)
        };
        let cut = match before.or_else(after) {
            Some(i) => i,
            None if rest.len() > hard => {
                floor_boundary(rest, hard).max(rest.chars().next().map_or(1, char::len_utf8))
            }
            None => break,
        };
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// Appends header field `name` whose value is `first` and then `more` lines: each further
/// line becomes a continuation line (a space first), and every line is folded at spaces
/// near [`FOLD_AT`] octets and always within [`MAX_LINE`].
fn push_field(m: &mut String, name: &str, first: &str, more: &[String]) {
    let mut lines = vec![format!("{name}: {first}")];
    lines.extend(more.iter().map(|l| format!(" {}", l.trim_start())));
    for (i, l) in lines.iter().enumerate() {
        for (j, piece) in wrap(l, FOLD_AT, MAX_LINE - 1).into_iter().enumerate() {
            // Pieces cut at a space start with it; one cut inside a long word needs one.
            if (i > 0 || j > 0) && !piece.starts_with(' ') {
                m.push(' ');
            }
            m.push_str(piece);
            m.push_str("\r\n");
        }
    }
}

/// `text` for a `message/delivery-status` field: printable US-ASCII (RFC 3464).
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// Appends `bytes` with every line ended by CRLF (a bare CR or LF becomes CRLF, a missing
/// final line end is added) and no line over [`MAX_LINE`] octets: longer lines are broken,
/// in the header section as folded continuation lines.
fn push_lines(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut in_headers = true;
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        let skip = match (rest.get(end), rest.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => 2,
            (Some(_), _) => 1,
            (None, _) => 0,
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            in_headers = false;
        }
        let mut piece = line;
        let mut first = true;
        loop {
            let room = if first || !in_headers {
                MAX_LINE
            } else {
                MAX_LINE - 1
            };
            if !first && in_headers {
                out.push(b' ');
            }
            let take = piece.len().min(room);
            out.extend_from_slice(&piece[..take]);
            out.extend_from_slice(b"\r\n");
            piece = &piece[take..];
            first = false;
            if piece.is_empty() {
                break;
            }
        }
    }
}

/// What a DSN reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recipients failed for good (`Action: failed`).
    Failed,
    /// Recipients are still being retried (`Action: delayed`, a warning).
    Delayed,
}

/// The enhanced status code for a delay: the reply's own 4.x.x code, else `4.0.0`.
fn delay_status(reply: Option<&Reason>) -> String {
    match reply.and_then(|r| r.status()) {
        Some(s) if s.class() == 4 => s.to_string(),
        _ => "4.0.0".into(),
    }
}

/// Builds the DSN message (CRLF lines) for `failures` of the message `env`/`original`.
/// With `RET=FULL` the whole original is returned when it is at most `max_return` bytes
/// (`bounce.max_return_size`), otherwise its headers, and the human-readable part says why.
pub fn build(
    hostname: &str,
    dsn_id: &QueueId,
    env: &Envelope,
    original: &[u8],
    failures: &[Failure<'_>],
    kind: Kind,
    max_return: u64,
) -> Vec<u8> {
    let asked_full = env.ret == Some(Ret::Full);
    let full = asked_full && original.len() as u64 <= max_return;
    let (headers, headers_cut) = if full {
        (&original[..0], false)
    } else {
        header_section(original, max_return)
    };
    let (subject, intro, action) = match kind {
        Kind::Failed => (
            "Undelivered Mail Returned to Sender",
            "could not be delivered to one or more\r\nrecipients. The reasons are below.",
            "failed",
        ),
        Kind::Delayed => (
            "Delayed Mail (still being retried)",
            "has not yet been delivered to one or more\r\nrecipients. It is still being retried; you do not need to send it again.",
            "delayed",
        ),
    };
    let boundary = format!("{dsn_id}/{hostname}");
    let sender = env.from.as_ref().map(|a| a.to_string()).unwrap_or_default();
    let now = crate::clock::now_utc().to_rfc2822();
    let arrival = chrono::DateTime::from_timestamp(env.received_at as i64, 0)
        .map(|d| d.to_rfc2822())
        .unwrap_or_else(|| now.clone());
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        m,
        "From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n\
         To: <{sender}>\r\n\
         Subject: {subject}\r\n\
         Date: {now}\r\n\
         Message-ID: <{dsn_id}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message (queue id {}) {intro}\r\n\
         \r\n",
        env.id
    );
    for f in failures {
        let lines = text_lines(&f.text());
        let mut first = format!("<{}>:", f.rcpt);
        for (i, l) in lines.iter().enumerate() {
            let line = if i == 0 {
                format!("{first} {l}")
            } else {
                format!("    {l}")
            };
            for piece in wrap(&line, MAX_LINE, MAX_LINE) {
                m.push_str(piece);
                m.push_str("\r\n");
            }
            first.clear();
        }
        if lines.is_empty() {
            let _ = write!(m, "{first} (no reply text)\r\n");
        }
    }
    if headers_cut {
        let _ = write!(
            m,
            "\r\nThe message's headers alone are larger than {max_return} bytes: only their\r\n\
             first {} bytes are returned below, not its body.\r\n",
            headers.len()
        );
    } else if asked_full && !full {
        let _ = write!(
            m,
            "\r\nThe message is larger than {max_return} bytes: only its headers are\r\n\
             returned below, not its body.\r\n"
        );
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Coexist-Queue-ID: {}\r\n",
        env.id
    );
    if let Some(e) = &env.envid {
        push_field(&mut m, "Original-Envelope-Id", e, &[]);
    }
    let _ = write!(m, "Arrival-Date: {arrival}\r\n");
    for f in failures {
        let _ = write!(m, "\r\nFinal-Recipient: rfc822; {}\r\n", f.rcpt);
        if let Some(o) = f.orcpt {
            push_field(&mut m, "Original-Recipient", o, &[]);
        }
        let status = match kind {
            Kind::Failed => status_of(f.reply),
            Kind::Delayed => delay_status(f.reply),
        };
        let _ = write!(m, "Action: {action}\r\nStatus: {status}\r\n");
        let lines: Vec<String> = text_lines(&f.text()).iter().map(|l| ascii(l)).collect();
        let (first, more) = lines
            .split_first()
            .map_or(("", &[][..]), |(f, m)| (f.as_str(), m));
        // A reply or a local error has a reply code; expiry and "unknown error" have none.
        let kind = if f.reply.and_then(|r| r.code()).is_some() {
            "smtp"
        } else {
            "X-coexist"
        };
        push_field(&mut m, "Diagnostic-Code", &format!("{kind}; {first}"), more);
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
        if full {
            "message/rfc822"
        } else {
            "text/rfc822-headers"
        }
    );
    let mut out = m.into_bytes();
    if full {
        push_lines(&mut out, original);
    } else {
        push_lines(&mut out, headers);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests;
