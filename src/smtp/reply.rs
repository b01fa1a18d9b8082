//! SMTP replies: a code, an enhanced status code (RFC 3463) and text.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply such as `250 2.1.0 Ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code, e.g. `5.7.1`.
    pub status: &'static str,
    /// Human-readable text (one line).
    pub text: Cow<'static, str>,
}

impl Reply {
    /// A reply with static text.
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Borrowed(text),
        }
    }

    /// A reply with formatted text.
    pub fn owned(code: u16, status: &'static str, text: String) -> Reply {
        Reply {
            code,
            status,
            text: Cow::Owned(text),
        }
    }

    /// True for 2xx and 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form (`code status text CRLF`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(out, "{} {} {}\r\n", self.code, self.status, self.text);
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
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
