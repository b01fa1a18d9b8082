//! Where the queue reports what became of each recipient: an [`OutcomeSink`]. The queue
//! reports (a delivery, a deferral, a bounce, an expiry, an admin's delete) and keeps
//! nothing of it; what is kept, and for whom, is the sink's business. The composition root
//! hands the queue one sink: today the [`super::recorder::Recorder`] (the record of recent
//! outcomes that `coexist trace` reads, and the per-minute rates of the console), which
//! lives beside the queue, not inside it.

use super::recent::Outcome;
use crate::proto::LastReply;
use crate::types::{Address, QueueId, RouteName};
use std::net::SocketAddr;

/// One recipient's outcome as the queue reports it (borrowed from the attempt: a sink
/// copies what it keeps).
#[derive(Debug, Clone, Copy)]
pub struct Reported<'a> {
    /// Unix time (seconds) of the outcome, by the queue's clock.
    pub time: u64,
    /// The same time in milliseconds.
    pub time_ms: u64,
    /// The message's queue id.
    pub queue_id: &'a QueueId,
    /// The message's reverse path (`None` for `<>`).
    pub sender: Option<&'a Address>,
    /// The recipient as the message was received for it.
    pub rcpt: &'a Address,
    /// The recipient as sent to the next hop, when the route rewrote it.
    pub sent_as: Option<&'a Address>,
    /// The route it took (`None`: no route, as for an unroutable recipient, an expiry or a
    /// delete).
    pub route: Option<&'a RouteName>,
    /// The next hop that answered, when one did.
    pub next_hop: Option<SocketAddr>,
    /// Whether the session with that next hop used TLS.
    pub tls: Option<bool>,
    /// What became of it.
    pub outcome: Outcome,
    /// The reply or error behind it (`None` for a delete).
    pub reply: Option<&'a LastReply>,
    /// Where the directory's state for the recipient came from when its route was decided
    /// (`file …`, `batch N`, `unlisted`); empty when the sink does not want it
    /// ([`OutcomeSink::wants_detail`]).
    pub origin: &'a str,
}

/// What the queue reports outcomes to.
pub trait OutcomeSink: Send + Sync {
    /// True when the sink keeps per-recipient detail: the queue then looks up each
    /// recipient's directory origin, and reads a deleted message back from the spool to
    /// report its pending recipients as deleted. False spares that work.
    fn wants_detail(&self) -> bool;

    /// Takes one recipient's outcome. Called on the delivery path: must be quick and must
    /// not block on I/O.
    fn report(&self, outcome: &Reported<'_>);

    /// Takes a message's event that is not a recipient's outcome (an admin's hold or
    /// release, a DSN sent). Quick, like [`OutcomeSink::report`]. Default: ignored.
    fn note(&self, _noted: &Noted<'_>) {}
}

/// What a [`Noted`] event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotedKind {
    /// Held by an admin.
    Held,
    /// Released by an admin.
    Released,
    /// A DSN about the message was queued (its queue id in `related`).
    Dsn,
}

/// A message's event that is not a recipient's outcome.
#[derive(Debug, Clone, Copy)]
pub struct Noted<'a> {
    /// Unix time in milliseconds, by the queue's clock.
    pub time_ms: u64,
    /// What happened.
    pub kind: NotedKind,
    /// The message's queue id.
    pub queue_id: &'a QueueId,
    /// A related message: the DSN's queue id.
    pub related: Option<&'a QueueId>,
    /// The message's reverse path, when known.
    pub sender: Option<&'a Address>,
}
