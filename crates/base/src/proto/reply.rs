//! SMTP replies as values: a code, an enhanced status code (RFC 3463) and one or more lines
//! of text.
//!
//! Both directions use this one type. The inbound session writes replies to clients with
//! [`Reply::write_to`] (multi-line replies with `250-` continuation lines, RFC 5321 4.2.1);
//! outbound delivery reads each next hop's reply, as mail-send parses it, into a `Reply`
//! (`From<smtp_proto::Response<String>>`), so the code and status of a refusal are fields,
//! not text to pick apart.
//!
//! The lines are kept in one string, separated by `\n`: a reply built in a `const` (the
//! [`canned`] ones) can then hold its text without allocating. No line holds a CR or LF.

use std::borrow::Cow;
use std::fmt;

/// An enhanced status code `class.subject.detail` such as `5.1.1` (RFC 3463).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    class: u8,
    subject: u16,
    detail: u16,
}

impl EnhancedStatus {
    /// The code `class.subject.detail`, taken as given (a next hop's reply may carry any).
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedStatus {
        EnhancedStatus {
            class,
            subject,
            detail,
        }
    }

    /// Parses `class.subject.detail` as RFC 3463 2 defines it: class 2, 4 or 5, subject and
    /// detail of one to three digits each; `None` for anything else.
    pub const fn parse(s: &str) -> Option<EnhancedStatus> {
        let b = s.as_bytes();
        let mut value = [0u16; 3];
        let mut digits = [0usize; 3];
        let mut part = 0;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'.' && part < 2 {
                part += 1;
            } else if c.is_ascii_digit() && digits[part] < 3 {
                value[part] = value[part] * 10 + (c - b'0') as u16;
                digits[part] += 1;
            } else {
                return None;
            }
            i += 1;
        }
        if part != 2 || digits[0] != 1 || digits[1] == 0 || digits[2] == 0 {
            return None;
        }
        if !matches!(value[0], 2 | 4 | 5) {
            return None;
        }
        Some(EnhancedStatus::new(value[0] as u8, value[1], value[2]))
    }

    /// The class: 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub const fn class(self) -> u8 {
        self.class
    }

    /// The subject (the middle number).
    pub const fn subject(self) -> u16 {
        self.subject
    }

    /// The detail (the last number).
    pub const fn detail(self) -> u16 {
        self.detail
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// The status of a reply written as a literal; a malformed literal is a bug caught by tests
/// in debug builds (and by the compiler in `const` items), and leaves the reply without an
/// enhanced status otherwise.
const fn literal_status(s: &'static str) -> Option<EnhancedStatus> {
    let parsed = EnhancedStatus::parse(s);
    debug_assert!(parsed.is_some(), "malformed enhanced status code literal");
    parsed
}

/// `text` with every CR removed: a CR may not appear inside a reply line, and LF already
/// separates lines.
fn without_cr(text: String) -> String {
    if text.contains('\r') {
        text.replace('\r', "")
    } else {
        text
    }
}

/// One SMTP reply such as `250 2.1.0 Ok`, of one or more lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code, e.g. `5.7.1`; `None` for replies that carry none (the EHLO
    /// reply, or a next hop that does not send them).
    pub status: Option<EnhancedStatus>,
    /// The lines, separated by `\n` (see the module docs).
    text: Cow<'static, str>,
}

impl Reply {
    /// A one-line reply with static text; `status` is a literal such as `"5.1.1"`.
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status: literal_status(status),
            text: Cow::Borrowed(text),
        }
    }

    /// A reply with formatted text; `status` is a literal such as `"2.0.0"`. Each `\n` in
    /// `text` starts another line.
    pub fn owned(code: u16, status: &'static str, text: String) -> Reply {
        Reply {
            code,
            status: literal_status(status),
            text: Cow::Owned(without_cr(text)),
        }
    }

    /// A reply of several lines, each written with the same code and status (RFC 2034
    /// asks for the status on every line). No lines make one empty line.
    pub fn multiline<I, S>(code: u16, status: Option<EnhancedStatus>, lines: I) -> Reply
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut text = String::new();
        for (i, line) in lines.into_iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            text.push_str(&line.as_ref().replace('\n', " "));
        }
        Reply {
            code,
            status,
            text: Cow::Owned(without_cr(text)),
        }
    }

    /// The lines of text, without code and status (at least one, maybe empty).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }

    /// The text of all lines, separated by `\n`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True for 2xx and 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form to `out`: one `code-status text CRLF` line per line of text,
    /// the last with a space after the code instead of the hyphen.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let mut lines = self.lines().peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            // Writing to a Vec cannot fail.
            let _ = match self.status {
                Some(s) => write!(out, "{}{sep}{s} {line}\r\n", self.code),
                None => write!(out, "{}{sep}{line}\r\n", self.code),
            };
        }
    }
}

/// `code status text` (`code text` without a status), the lines of a multi-line reply
/// separated by `\n`: the form of logs, `last_reply` in the spool and bounces.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "{} {s} {}", self.code, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// A next hop's reply as mail-send reads it: smtp-proto keeps the code, the enhanced status
/// (all zeros when there is none) and the lines joined by `\n`, with the status taken off
/// each line. Trailing white space is dropped.
impl From<smtp_proto::Response<String>> for Reply {
    fn from(r: smtp_proto::Response<String>) -> Reply {
        let status = (r.esc[0] != 0)
            .then(|| EnhancedStatus::new(r.esc[0], r.esc[1].into(), r.esc[2].into()));
        let mut text = r.message;
        text.truncate(text.trim_end().len());
        Reply {
            code: r.code,
            status,
            text: Cow::Owned(without_cr(text)),
        }
    }
}

/// The longest reply [`parse_wire`] reads (all lines); a next hop that sends more is broken.
pub const MAX_WIRE_REPLY: usize = 64 * 1024;

/// Why a next hop's reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A line does not start with a three-digit code and a space or hyphen.
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    /// The lines of one reply carry different codes.
    #[error("reply lines with different codes ({0} then {1})")]
    MixedCodes(u16, u16),
    /// The reply is longer than [`MAX_WIRE_REPLY`].
    #[error("reply longer than {MAX_WIRE_REPLY} bytes")]
    TooLong,
}

/// Reads one whole reply from the start of `buf`: the reply and the bytes it took, or
/// `None` when its last line has not arrived yet. Lines end in CRLF (a bare LF is taken
/// too); each carries the code, `-` (more lines follow) or a space, and the text, whose
/// leading enhanced status (RFC 2034) is taken off. The status is read in full: mail-send's
/// parser (smtp-proto) keeps each part in a byte and turns Exchange Online's `4.7.500` into
/// `4.7.255`, so replies in the transaction are read here.
pub fn parse_wire(buf: &[u8]) -> Result<Option<(Reply, usize)>, WireError> {
    let mut pos = 0;
    let mut code = None;
    let mut status = None;
    // The lines' texts, separated by `\n` (the form `Reply` keeps).
    let mut text_out = String::new();
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            if buf.len() > MAX_WIRE_REPLY {
                return Err(WireError::TooLong);
            }
            return Ok(None);
        };
        let end = pos + nl + 1;
        if end > MAX_WIRE_REPLY {
            return Err(WireError::TooLong);
        }
        let raw = &buf[pos..pos + nl];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = String::from_utf8_lossy(line);
        let bad = || WireError::Malformed(text.chars().take(80).collect());
        let digits = line.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
        let Some(digits) = digits else {
            return Err(bad());
        };
        let this = digits
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if let Some(c) = code {
            if c != this {
                return Err(WireError::MixedCodes(c, this));
            }
        }
        code = Some(this);
        let (more, rest) = match line.get(3) {
            None => (false, ""),
            Some(b' ') => (false, text.get(4..).unwrap_or("")),
            Some(b'-') => (true, text.get(4..).unwrap_or("")),
            Some(_) => return Err(bad()),
        };
        let rest = match rest.split_once(' ') {
            Some((first, after)) if EnhancedStatus::parse(first).is_some() => {
                status = status.or(EnhancedStatus::parse(first));
                after
            }
            None if EnhancedStatus::parse(rest).is_some() => {
                status = status.or(EnhancedStatus::parse(rest));
                ""
            }
            _ => rest,
        };
        if pos > 0 {
            text_out.push('\n');
        }
        text_out.push_str(rest.trim_end());
        pos = end;
        if !more {
            let reply = Reply {
                code: code.unwrap_or_default(),
                status,
                text: Cow::Owned(without_cr(text_out)),
            };
            return Ok(Some((reply, pos)));
        }
    }
}

/// Replies used in several places, so their wording stays the same.
pub mod canned {
    use super::Reply;

    /// 250 for simple successes.
    pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
    /// Bad syntax.
    pub const SYNTAX: Reply = Reply::new(500, "5.5.2", "Syntax error, command unrecognized");
    /// Command line over the limit.
    pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
    /// Commands out of order.
    pub const BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
    /// Timeout.
    pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
    /// Too many errors.
    pub const TOO_MANY_ERRORS: Reply =
        Reply::new(421, "4.7.0", "Too many errors, closing connection");
    /// Too many refused recipients (directory harvesting).
    pub const TOO_MANY_REFUSALS: Reply = Reply::new(
        421,
        "4.7.0",
        "Too many refused recipients, closing connection",
    );
    /// The memory budget of messages in transfer is spent (`server.max_inflight_bytes`).
    pub const INFLIGHT_FULL: Reply = Reply::new(
        452,
        "4.3.1",
        "Insufficient system storage: too much mail in transfer, try again later",
    );
    /// Too many sessions.
    pub const TOO_MANY_CONNECTIONS: Reply =
        Reply::new(421, "4.7.0", "Too many connections, try again later");
    /// Local failure (disk).
    pub const LOCAL_ERROR: Reply =
        Reply::new(451, "4.3.0", "Local error in processing, try again later");
    /// Message over the size limit.
    pub const TOO_BIG: Reply = Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    );
    /// No recipient was accepted.
    pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
    /// Relay denied.
    pub const RELAY_DENIED: Reply = Reply::new(550, "5.7.1", "Relay access denied");
    /// Unknown recipient.
    pub const UNKNOWN_USER: Reply =
        Reply::new(550, "5.1.1", "Recipient address rejected: user unknown");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_replies_keep_three_digit_status_details() {
        let (r, used) =
            parse_wire(b"451 4.7.500 Server busy. Please try again later\r\n250 ok\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(used, 49);
        assert_eq!(r.code, 451);
        assert_eq!(r.status, Some(EnhancedStatus::new(4, 7, 500)));
        assert_eq!(
            r.to_string(),
            "451 4.7.500 Server busy. Please try again later"
        );
        // Several lines, the status on each; a bare LF; a code alone.
        let (r, _) = parse_wire(b"550-5.7.606 Access denied\n550 5.7.606 banned IP\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            ["Access denied", "banned IP"]
        );
        assert_eq!(r.status, Some(EnhancedStatus::new(5, 7, 606)));
        let (r, _) = parse_wire(b"354\r\n").unwrap().unwrap();
        assert_eq!((r.code, r.status), (354, None));
        // Not all there yet.
        assert_eq!(parse_wire(b"250-first\r\n250 sec").unwrap(), None);
        // Broken.
        assert!(matches!(
            parse_wire(b"25x ok\r\n"),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            parse_wire(b"250-a\r\n451 b\r\n"),
            Err(WireError::MixedCodes(250, 451))
        );
        assert_eq!(
            parse_wire(&vec![b'2'; MAX_WIRE_REPLY + 1]),
            Err(WireError::TooLong)
        );
    }

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// Reads `bytes` as the outbound side does: smtp-proto's parser, then `From`.
    fn read(bytes: &str) -> Reply {
        let mut it = bytes.as_bytes().iter();
        let r = smtp_proto::response::parser::ResponseReceiver::default()
            .parse(&mut it)
            .unwrap();
        assert_eq!(it.len(), 0, "the whole reply is read");
        Reply::from(r)
    }

    #[test]
    fn enhanced_status_codes() {
        let s = EnhancedStatus::parse("5.1.10").unwrap();
        assert_eq!((s.class(), s.subject(), s.detail()), (5, 1, 10));
        assert_eq!(s.to_string(), "5.1.10");
        assert_eq!(
            EnhancedStatus::parse("2.0.0"),
            Some(EnhancedStatus::new(2, 0, 0))
        );
        assert_eq!(EnhancedStatus::parse("4.999.999").unwrap().detail(), 999);
        for bad in [
            "", "5", "5.1", "5.1.", ".1.1", "5..1", "3.0.0", "55.1.1", "5.1000.1", "5.1.1.1",
            "5.1.x", "5.1.1 ", "+5.1.1",
        ] {
            assert_eq!(EnhancedStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn one_line_reply() {
        let r = Reply::new(550, "5.1.1", "No such user");
        assert_eq!(wire(&r), "550 5.1.1 No such user\r\n");
        assert_eq!(r.to_string(), "550 5.1.1 No such user");
        assert_eq!(r.lines().collect::<Vec<_>>(), ["No such user"]);
        assert!(!r.is_positive());
        assert!(canned::OK.is_positive());
        assert_eq!(canned::OK.status, EnhancedStatus::parse("2.0.0"));
    }

    #[test]
    fn multiline_reply_on_the_wire() {
        let r = Reply::multiline(250, None, ["mx.test Hello", "PIPELINING", "CHUNKING"]);
        assert_eq!(
            wire(&r),
            "250-mx.test Hello\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
        );
        let r = Reply::multiline(
            550,
            EnhancedStatus::parse("5.7.1"),
            ["Refused", "see policy"],
        );
        assert_eq!(wire(&r), "550-5.7.1 Refused\r\n550 5.7.1 see policy\r\n");
        assert_eq!(r.to_string(), "550 5.7.1 Refused\nsee policy");
        // `\n` in owned text starts a line; CR never reaches the wire.
        let r = Reply::owned(451, "4.3.0", "a\r\nb\rc".into());
        assert_eq!(wire(&r), "451-4.3.0 a\r\n451 4.3.0 bc\r\n");
        // A line given to `multiline` stays one line.
        let r = Reply::multiline(250, None, ["a\nb"]);
        assert_eq!(wire(&r), "250 a b\r\n");
        // No lines: one empty line.
        let r = Reply::multiline(250, None, Vec::<String>::new());
        assert_eq!(wire(&r), "250 \r\n");
    }

    #[test]
    fn outbound_replies_read_into_the_same_type() {
        let r = read("250 2.1.5 Recipient ok\r\n");
        assert_eq!(r, Reply::new(250, "2.1.5", "Recipient ok"));
        let r = read("550-5.1.1 mailbox unavailable\r\n550 5.1.1 user has moved\r\n");
        assert_eq!(r.code, 550);
        assert_eq!(r.status, EnhancedStatus::parse("5.1.1"));
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            ["mailbox unavailable", "user has moved"]
        );
        assert_eq!(
            r.to_string(),
            "550 5.1.1 mailbox unavailable\nuser has moved"
        );
        // Without enhanced status codes.
        let r = read("451 try again later  \r\n");
        assert_eq!(r.status, None);
        assert_eq!(r.to_string(), "451 try again later");
    }

    #[test]
    fn multiline_replies_round_trip() {
        for r in [
            Reply::multiline(
                452,
                EnhancedStatus::parse("4.5.3"),
                ["Too many", "recipients"],
            ),
            Reply::new(221, "2.0.0", "Bye"),
            Reply::multiline(554, EnhancedStatus::parse("5.6.0"), ["a", "b", "c"]),
        ] {
            assert_eq!(read(&wire(&r)), r);
        }
    }
}
