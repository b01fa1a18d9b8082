//! `GET /v1/trace` from the client: the key asked by ([`TraceField`]), the question
//! ([`TraceAsk`]) and the calls.

use super::{encode, AdminClient, ClientError};
use crate::types::TraceReply;

/// What `GET /v1/trace` searches by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceField {
    /// A recipient, as received or as sent.
    Address,
    /// The reverse path.
    Sender,
    /// A Message-ID header.
    MessageId,
    /// A queue id.
    QueueId,
}

impl TraceField {
    /// The query parameter.
    pub fn param(self) -> &'static str {
        match self {
            TraceField::Address => "address",
            TraceField::Sender => "sender",
            TraceField::MessageId => "message_id",
            TraceField::QueueId => "queue_id",
        }
    }
}

/// A trace question: a key and a window (`since` and `until` seconds ago).
#[derive(Debug, Clone)]
pub struct TraceAsk {
    /// What `value` is.
    pub field: TraceField,
    /// The address, Message-ID or queue id.
    pub value: String,
    /// Seconds to look back (the server's default when `None`).
    pub since: Option<u64>,
    /// Seconds ago the window ends (now when `None`).
    pub until: Option<u64>,
}

impl AdminClient {
    /// `GET /v1/trace`: where mail for `address` went on this node in the last `since`
    /// seconds (the server's default, 12 hours, when `None`), newest first.
    pub fn trace(&self, address: &str, since: Option<u64>) -> Result<TraceReply, ClientError> {
        self.trace_by(&TraceAsk {
            field: TraceField::Address,
            value: address.to_string(),
            since,
            until: None,
        })
    }

    /// `GET /v1/trace` by any key: what became of the mail `ask` names on this node.
    pub fn trace_by(&self, ask: &TraceAsk) -> Result<TraceReply, ClientError> {
        let mut path = format!("/v1/trace?{}={}", ask.field.param(), encode(&ask.value));
        if let Some(s) = ask.since {
            path.push_str(&format!("&since={s}"));
        }
        if let Some(u) = ask.until {
            path.push_str(&format!("&until={u}"));
        }
        self.get_typed(&path)
    }
}
