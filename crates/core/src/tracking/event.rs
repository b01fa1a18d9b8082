//! The events of the tracking log: what happened to a message, with time, node-local queue
//! id and the details of its kind, and the search keys each event is indexed by.

use crate::queue::recent::Outcome;
use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Accepted with 250 after DATA (on disk and synced).
    Received,
    /// A recipient's route as decided at reception: state, its origin, route.
    Routed,
    /// A next hop took the recipient.
    Delivered,
    /// A temporary failure; it will be tried again.
    Deferred,
    /// A permanent failure.
    Bounced,
    /// Not delivered within `queue.max_lifetime`.
    Expired,
    /// Deleted from the queue by an admin.
    Deleted,
    /// Held by an admin.
    Held,
    /// Released by an admin.
    Released,
    /// A delivery status notification was queued for the sender (its queue id in
    /// `related`).
    Dsn,
    /// Taken over from a dead node (`origin` names the node and its queue id there).
    TakenOver,
}

impl Kind {
    /// The kind's name as written in the log (`received`, `taken_over`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Received => "received",
            Kind::Routed => "routed",
            Kind::Delivered => "delivered",
            Kind::Deferred => "deferred",
            Kind::Bounced => "bounced",
            Kind::Expired => "expired",
            Kind::Deleted => "deleted",
            Kind::Held => "held",
            Kind::Released => "released",
            Kind::Dsn => "dsn",
            Kind::TakenOver => "taken_over",
        }
    }
}

impl From<Outcome> for Kind {
    fn from(o: Outcome) -> Kind {
        match o {
            Outcome::Delivered => Kind::Delivered,
            Outcome::Deferred => Kind::Deferred,
            Outcome::Bounced => Kind::Bounced,
            Outcome::Expired => Kind::Expired,
            Outcome::Deleted => Kind::Deleted,
            Outcome::TakenOver => Kind::TakenOver,
        }
    }
}

impl Kind {
    /// The recipient's outcome this kind is (`None` for the message's other events:
    /// received, routed, held, released, DSN).
    pub fn outcome(self) -> Option<Outcome> {
        Some(match self {
            Kind::Delivered => Outcome::Delivered,
            Kind::Deferred => Outcome::Deferred,
            Kind::Bounced => Outcome::Bounced,
            Kind::Expired => Outcome::Expired,
            Kind::Deleted => Outcome::Deleted,
            Kind::TakenOver => Outcome::TakenOver,
            Kind::Received | Kind::Routed | Kind::Held | Kind::Released | Kind::Dsn => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reply behind an event: the next hop's, or the one a local error stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventReply {
    /// Reply code (`None` for an expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// Enhanced status code, e.g. `5.1.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The whole text, lines separated by `\n`.
    pub text: String,
}

/// One event of the tracking log. Fields that do not apply to its kind are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What happened.
    pub kind: Kind,
    /// The message's queue id on the node that logged it.
    pub queue_id: String,
    /// The node that logged it (filled in when read; not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `received`: the client's address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// `received`: the TLS version the client used (`none` without TLS); an attempt's
    /// outcome: `tls` or `none` for the session with the next hop that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// `received`: size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `received`: the Message-ID header, without angle brackets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// `received`: the reverse path (empty for `<>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// `received`: the recipients as received.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Per-recipient events: the recipient as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcpt: Option<String>,
    /// The recipient as sent to the next hop, when its route rewrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_as: Option<String>,
    /// `routed`: the directory state of the recipient (absent when unlisted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The route taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Where the directory's state behind the route came from (`file …`, `batch N`,
    /// `unlisted`); for `taken_over`, the node and queue id it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The next hop that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// The reply behind an outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<EventReply>,
    /// `dsn`: the queue id of the notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<String>,
}

impl Event {
    /// An event of `kind` for the message `queue_id` at `time_ms`, with no details yet.
    pub fn new(time_ms: u64, kind: Kind, queue_id: &str) -> Event {
        Event {
            time_ms,
            kind,
            queue_id: queue_id.to_string(),
            node: None,
            client: None,
            tls: None,
            size: None,
            message_id: None,
            sender: None,
            recipients: Vec::new(),
            rcpt: None,
            sent_as: None,
            state: None,
            route: None,
            origin: None,
            next_hop: None,
            reply: None,
            related: None,
        }
    }

    /// Calls `f` with each search key of the event (see [`Key`]).
    pub fn keys(&self, mut f: impl FnMut(Key<'_>)) {
        f(Key::QueueId(&self.queue_id));
        if let Some(r) = &self.related {
            f(Key::QueueId(r));
        }
        if let Some(m) = &self.message_id {
            f(Key::MessageId(m));
        }
        for a in self
            .sender
            .iter()
            .chain(&self.recipients)
            .chain(&self.rcpt)
            .chain(&self.sent_as)
        {
            if !a.is_empty() {
                f(Key::Address(a));
            }
        }
    }

    /// True when `key` is one of the event's keys in the role `role` asks for (any case).
    pub fn matches(&self, role: Role, value: &str) -> bool {
        let eq = |s: &String| s.eq_ignore_ascii_case(value);
        match role {
            Role::QueueId => self.queue_id == value || self.related.as_deref() == Some(value),
            Role::MessageId => self
                .message_id
                .as_ref()
                .is_some_and(|m| m.eq_ignore_ascii_case(trim_id(value))),
            Role::Sender => self.sender.as_ref().is_some_and(eq),
            Role::Recipient => {
                self.recipients.iter().any(eq)
                    || self.rcpt.as_ref().is_some_and(eq)
                    || self.sent_as.as_ref().is_some_and(eq)
            }
        }
    }
}

/// What a searched value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A recipient, as received or as sent.
    Recipient,
    /// The reverse path.
    Sender,
    /// A Message-ID header.
    MessageId,
    /// A queue id (of the message or of a DSN about it).
    QueueId,
}

/// A search key of an event, hashed into the index of its file.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// An address (sender or recipient, as received or as sent).
    Address(&'a str),
    /// A Message-ID.
    MessageId(&'a str),
    /// A queue id.
    QueueId(&'a str),
}

impl Key<'_> {
    /// The key's 64-bit hash: FNV-1a over a tag byte and the value in lower case (ASCII).
    /// FNV is written here because the index files need a hash that never changes between
    /// versions or builds (std's hasher may), and it is a dozen lines.
    pub fn hash(&self) -> u64 {
        let (tag, v) = match self {
            Key::Address(a) => (b'a', *a),
            Key::MessageId(m) => (b'm', trim_id(m)),
            Key::QueueId(q) => (b'q', *q),
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(tag).chain(v.bytes().map(|b| b.to_ascii_lowercase())) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// A Message-ID without surrounding blanks and angle brackets.
pub fn trim_id(m: &str) -> &str {
    let m = m.trim();
    let m = m.strip_prefix('<').unwrap_or(m);
    m.strip_suffix('>').unwrap_or(m)
}

/// How much of a message's start is searched for its Message-ID (it runs on the SMTP
/// session's task, before the reply: bounded whatever the header section's size).
const HEADER_SCAN: usize = 64 * 1024;

/// The Message-ID header of a message (its first one in the first 64 KiB of its header
/// section), without angle brackets; `None` when it has none there. Read with the policy's
/// streaming header scan: it runs for every message accepted, and a full header parse
/// (mailparse) allocates every header for the one wanted.
pub fn message_id(body: &[u8]) -> Option<String> {
    let head = &body[..body.len().min(HEADER_SCAN)];
    let value = crate::policy::headers::first_field(head, b"message-id")?;
    let value = String::from_utf8_lossy(&value);
    let id = trim_id(value.trim_matches(|c: char| c.is_whitespace()));
    (!id.is_empty()).then(|| cut(id, 998))
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    s[..i].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_case_and_angle_brackets() {
        assert_eq!(
            Key::Address("A.User@Example.ORG").hash(),
            Key::Address("a.user@example.org").hash()
        );
        assert_eq!(
            Key::MessageId("<X1@host>").hash(),
            Key::MessageId("x1@HOST").hash()
        );
        assert_ne!(Key::Address("x").hash(), Key::QueueId("x").hash());
    }

    #[test]
    fn message_id_is_read_from_the_header_section_only() {
        let m = b"Subject: hi\r\nMessage-ID:\r\n <abc@example.org>\r\n\r\nMessage-ID: <body@x>\r\n";
        assert_eq!(message_id(m).as_deref(), Some("abc@example.org"));
        assert_eq!(message_id(b"Subject: none\r\n\r\nbody"), None);
    }

    #[test]
    fn an_event_matches_by_role() {
        let mut e = Event::new(1, Kind::Received, "Q1");
        e.sender = Some("s@x.org".into());
        e.recipients = vec!["R@y.org".into()];
        e.message_id = Some("id@x".into());
        assert!(e.matches(Role::Recipient, "r@Y.org"));
        assert!(!e.matches(Role::Recipient, "s@x.org"));
        assert!(e.matches(Role::Sender, "S@x.org"));
        assert!(e.matches(Role::MessageId, "<ID@x>"));
        assert!(e.matches(Role::QueueId, "Q1"));
        let mut n = 0;
        e.keys(|_| n += 1);
        assert_eq!(n, 4);
    }
}
