//! Delivery outcomes as types that keep the next hop's reply (code, enhanced status, lines)
//! or a typed local error, never a formatted string. Bounces read their fields: the status
//! of a failure is [`Failure::status`], expiry is [`Failure::Expired`].
//!
//! `Display` gives the one-line form the logs, `queue list` and the DSN's diagnostic show:
//! the reply as `code status text`, a local error as the reply that stands for it, expiry as
//! `message expired in queue; last reply: ...`.
//!
//! [`LastReply`] is what the spool keeps per recipient. It is written as tagged JSON; state
//! files written before these types held the display string, and still load (see
//! [`LastReply::from_legacy`]).

use crate::proto::reply::EnhancedStatus;
use crate::proto::Reply;
use crate::types::RouteName;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The next hop took it: its reply.
    Delivered(Reply),
    /// Temporary failure: retry later.
    Deferred(Failure),
    /// Permanent failure.
    Failed(Failure),
}

/// Why a recipient was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The next hop's reply.
    Remote(#[serde(with = "reply_serde")] Reply),
    /// An error on our side of the connection.
    Local(LocalError),
    /// The message outlived `queue.max_lifetime`; the last failure before it, if any.
    Expired(Option<Box<Failure>>),
}

/// A local error: no reply from a next hop stands behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum LocalError {
    /// No next hop could be used (connection refused, timeout, TLS required but not
    /// offered, circuit open, DNS): the last hop's error.
    #[error("{0}")]
    Unreachable(String),
    /// The connection broke during the transaction.
    #[error("{0}")]
    Lost(String),
    /// The domain publishes a null MX (RFC 7505).
    #[error("{0}")]
    NullMx(String),
    /// A non-ASCII address and a next hop without SMTPUTF8.
    #[error(
        "Non-ASCII addresses not permitted for that sender/recipient \
         (the next hop does not offer SMTPUTF8)"
    )]
    Utf8Address,
    /// UTF-8 headers and a next hop without SMTPUTF8.
    #[error("UTF-8 header message cannot be transferred (the next hop does not offer SMTPUTF8)")]
    Utf8Headers,
    /// The next hop did not answer the end of data.
    #[error("no reply to end of data")]
    NoEndOfDataReply,
    /// The transaction ended before this recipient was tried.
    #[error("not attempted")]
    NotAttempted,
    /// The recipient has no route now (the directory no longer lists it).
    #[error("recipient is no longer in the directory")]
    NoRoute,
    /// The directory names a route the configuration does not have.
    #[error("route {0} is not configured")]
    RouteNotConfigured(String),
    /// The queued message could not be read from the spool.
    #[error("cannot read the queued message: {0}")]
    Unreadable(String),
    /// The message is larger than its route takes (`routes.NAME.max_message_size`): it is
    /// not sent there, as the next hop would certainly refuse it.
    #[error("message of {size} bytes is larger than route {route} takes ({limit} bytes at most)")]
    TooBigForRoute {
        /// The route.
        route: String,
        /// The message's size.
        size: u64,
        /// The route's `max_message_size`.
        limit: u64,
    },
    /// The message came back to us from this route's next hop: sending it there again
    /// would loop.
    #[error(
        "routing loop between coexist and {0}: the message came back from that route's next hop"
    )]
    RoutingLoop(String),
    /// Every next hop of the route is throttling us (paused): the hop's state.
    #[error("{0}")]
    Throttled(String),
    /// The route's next hop refused the recipient as unknown (`5.1.1`, `5.1.10`, `5.4.1`)
    /// within `directory.move_grace` of its mailbox's move: directory sync between the
    /// estates lags, so this is deferred, not bounced, until the grace ends.
    #[error("{reply} (deferred: mailbox moved by {origin} at {moved}; move grace until {until})")]
    MoveGrace {
        /// The next hop's reply, as displayed.
        reply: String,
        /// Subject and detail of its enhanced status (kept in the 4.x.x code shown).
        subject: u16,
        /// Detail of its enhanced status.
        detail: u16,
        /// The change that moved the mailbox (`batch 12`).
        origin: String,
        /// When (RFC 3339).
        moved: String,
        /// When the grace ends (RFC 3339).
        until: String,
    },
}

impl LocalError {
    /// The reply code and enhanced status that stand for this error.
    pub fn code(&self) -> (u16, EnhancedStatus) {
        let s = EnhancedStatus::new;
        match self {
            LocalError::Unreachable(_) => (451, s(4, 4, 1)),
            LocalError::Lost(_) => (451, s(4, 4, 2)),
            LocalError::NullMx(_) => (556, s(5, 1, 10)),
            LocalError::Utf8Address => (553, s(5, 6, 7)),
            LocalError::Utf8Headers => (554, s(5, 6, 9)),
            LocalError::NoEndOfDataReply | LocalError::NotAttempted => (451, s(4, 3, 0)),
            LocalError::NoRoute => (550, s(5, 1, 1)),
            LocalError::RouteNotConfigured(_) => (451, s(4, 3, 5)),
            LocalError::Unreadable(_) => (451, s(4, 3, 0)),
            LocalError::TooBigForRoute { .. } => (552, s(5, 3, 4)),
            LocalError::RoutingLoop(_) => (554, s(5, 4, 6)),
            LocalError::Throttled(_) => (451, s(4, 4, 5)),
            LocalError::MoveGrace {
                subject, detail, ..
            } => (451, s(4, *subject, *detail)),
        }
    }

    /// A route that is not configured.
    pub fn route_not_configured(r: &RouteName) -> LocalError {
        LocalError::RouteNotConfigured(r.as_str().to_string())
    }
}

impl Failure {
    /// The enhanced status code: the reply's, the local error's, `5.4.7` for expiry.
    pub fn status(&self) -> Option<EnhancedStatus> {
        match self {
            Failure::Remote(r) => r.status,
            Failure::Local(e) => Some(e.code().1),
            Failure::Expired(_) => Some(EnhancedStatus::new(5, 4, 7)),
        }
    }

    /// The reply code, when the failure has one (not for expiry).
    pub fn code(&self) -> Option<u16> {
        match self {
            Failure::Remote(r) => Some(r.code),
            Failure::Local(e) => Some(e.code().0),
            Failure::Expired(_) => None,
        }
    }

    /// True for [`Failure::Expired`].
    pub fn is_expired(&self) -> bool {
        matches!(self, Failure::Expired(_))
    }
}

/// `code status text`, as the logs, the queue view and DSNs have always shown it.
impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Remote(r) => write!(f, "{r}"),
            Failure::Local(e) => {
                let (code, status) = e.code();
                write!(f, "{code} {status} {e}")
            }
            Failure::Expired(last) => {
                f.write_str("message expired in queue; last reply: ")?;
                match last {
                    Some(l) => write!(f, "{l}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The last reply or error the spool keeps for a recipient. Written as
/// `{"failed": <Failure>, "text": "<as displayed>"}` (or `"delivered": <Reply>`): the typed
/// form is what is read back; `text` keeps state files greppable by the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastReply {
    /// The next hop's acceptance.
    Delivered(Reply),
    /// The last failure.
    Failed(Failure),
}

/// A reply as a newtype, so `Option<Reply>` fields can use [`reply_serde`].
#[derive(Serialize, Deserialize)]
struct ReplyWire(#[serde(with = "reply_serde")] Reply);

impl Serialize for LastReply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            delivered: Option<ReplyWire>,
            #[serde(skip_serializing_if = "Option::is_none")]
            failed: Option<&'a Failure>,
            text: String,
        }
        let (delivered, failed) = match self {
            LastReply::Delivered(r) => (Some(ReplyWire(r.clone())), None),
            LastReply::Failed(f) => (None, Some(f)),
        };
        Out {
            delivered,
            failed,
            text: self.to_string(),
        }
        .serialize(s)
    }
}

impl LastReply {
    /// The failure, when the last outcome was one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            LastReply::Delivered(_) => None,
            LastReply::Failed(f) => Some(f),
        }
    }

    /// Reads the display string that state files held before these types: `code status
    /// text`, or `message expired in queue; last reply: ...`. Only for loading old files.
    pub fn from_legacy(text: &str) -> LastReply {
        match legacy_reply(text) {
            Some(r) if r.code < 400 => LastReply::Delivered(r),
            _ => LastReply::Failed(legacy_failure(text)),
        }
    }
}

impl fmt::Display for LastReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LastReply::Delivered(r) => write!(f, "{r}"),
            LastReply::Failed(x) => write!(f, "{x}"),
        }
    }
}

impl From<&RcptOutcome> for LastReply {
    fn from(o: &RcptOutcome) -> LastReply {
        match o {
            RcptOutcome::Delivered(r) => LastReply::Delivered(r.clone()),
            RcptOutcome::Deferred(f) | RcptOutcome::Failed(f) => LastReply::Failed(f.clone()),
        }
    }
}

impl<'de> Deserialize<'de> for LastReply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Typed {
            #[serde(default)]
            delivered: Option<ReplyWire>,
            #[serde(default)]
            failed: Option<Failure>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Typed(Typed),
            Legacy(String),
        }
        match Stored::deserialize(d)? {
            Stored::Typed(Typed {
                delivered: Some(r), ..
            }) => Ok(LastReply::Delivered(r.0)),
            Stored::Typed(Typed {
                failed: Some(f), ..
            }) => Ok(LastReply::Failed(f)),
            Stored::Typed(_) => Err(serde::de::Error::custom(
                "a last reply needs `delivered` or `failed`",
            )),
            Stored::Legacy(s) => Ok(LastReply::from_legacy(&s)),
        }
    }
}

const EXPIRED_PREFIX: &str = "message expired in queue; last reply: ";

fn legacy_failure(text: &str) -> Failure {
    if let Some(rest) = text.strip_prefix(EXPIRED_PREFIX) {
        let last = (!rest.is_empty()).then(|| Box::new(legacy_failure(rest)));
        return Failure::Expired(last);
    }
    match legacy_reply(text) {
        Some(r) => Failure::Remote(r),
        None => Failure::Local(LocalError::Unreachable(text.to_string())),
    }
}

/// `code [status] text` into a reply; `None` without a leading three-digit code.
fn legacy_reply(text: &str) -> Option<Reply> {
    let code: u16 = text.get(..3)?.parse().ok()?;
    let rest = text.get(3..)?.strip_prefix(' ').unwrap_or("");
    let (first, after) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(match EnhancedStatus::parse(first) {
        Some(s) => make_reply(code, Some(s), after.to_string()),
        None => make_reply(code, None, rest.to_string()),
    })
}

/// A reply from its parts; `\n` in `text` separates lines.
fn make_reply(code: u16, status: Option<EnhancedStatus>, text: String) -> Reply {
    Reply::multiline(code, status, text.split('\n'))
}

/// `Reply` as `{code, status, text}` in the spool's JSON.
mod reply_serde {
    use crate::proto::reply::EnhancedStatus;
    use crate::proto::Reply;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Wire {
        code: u16,
        status: Option<String>,
        text: String,
    }

    pub fn serialize<S: Serializer>(r: &Reply, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            code: r.code,
            status: r.status.map(|s| s.to_string()),
            text: r.text().to_string(),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Reply, D::Error> {
        let w = Wire::deserialize(d)?;
        let status = match &w.status {
            Some(s) => Some(EnhancedStatus::parse(s).ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not an enhanced status code"))
            })?),
            None => None,
        };
        Ok(super::make_reply(w.code, status, w.text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_keeps_the_old_text() {
        let r = Failure::Local(LocalError::Unreachable(
            "connect to 127.0.0.1:1 failed: x".into(),
        ));
        assert_eq!(r.to_string(), "451 4.4.1 connect to 127.0.0.1:1 failed: x");
        let e = Failure::Expired(Some(Box::new(r)));
        assert_eq!(
            e.to_string(),
            "message expired in queue; last reply: 451 4.4.1 connect to 127.0.0.1:1 failed: x"
        );
        assert_eq!(e.status(), EnhancedStatus::parse("5.4.7"));
        assert_eq!(
            Failure::Local(LocalError::NoRoute).to_string(),
            "550 5.1.1 recipient is no longer in the directory"
        );
    }

    #[test]
    fn old_state_strings_still_load() {
        let old: Vec<Option<LastReply>> = serde_json::from_str(
            r#"["250 2.0.0 Ok: queued as X", "550 5.1.1 no such user\nsecond line",
                "message expired in queue; last reply: 451 4.4.1 connect failed",
                "message expired in queue; last reply: ", "421 busy", null]"#,
        )
        .unwrap();
        let old: Vec<LastReply> = old.into_iter().flatten().collect();
        assert!(matches!(&old[0], LastReply::Delivered(r) if r.code == 250));
        let f = old[1].failure().unwrap();
        assert_eq!(f.status(), EnhancedStatus::parse("5.1.1"));
        assert_eq!(f.to_string(), "550 5.1.1 no such user\nsecond line");
        assert!(old[2].failure().unwrap().is_expired());
        assert_eq!(
            old[2].to_string(),
            "message expired in queue; last reply: 451 4.4.1 connect failed"
        );
        assert_eq!(old[3].failure(), Some(&Failure::Expired(None)));
        assert_eq!(old[4].failure().unwrap().status(), None);
        assert_eq!(old[4].to_string(), "421 busy");
    }

    #[test]
    fn typed_form_round_trips() {
        let all = [
            LastReply::Delivered(make_reply(250, EnhancedStatus::parse("2.0.0"), "Ok".into())),
            LastReply::Failed(Failure::Remote(make_reply(550, None, "a\nb".into()))),
            LastReply::Failed(Failure::Local(LocalError::RouteNotConfigured("x".into()))),
            LastReply::Failed(Failure::Expired(Some(Box::new(Failure::Local(
                LocalError::NotAttempted,
            ))))),
        ];
        for l in all {
            let json = serde_json::to_string(&l).unwrap();
            let back: LastReply = serde_json::from_str(&json).unwrap();
            assert_eq!(back, l, "{json}");
            let text = serde_json::to_string(&l.to_string()).unwrap();
            assert!(json.contains(&format!("\"text\":{text}")), "{json}");
        }
    }
}
