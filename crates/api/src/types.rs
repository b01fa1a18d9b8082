//! The admin API's vocabulary: every request and response body, as Rust types.
//!
//! The server answers with these types and the CLI ([`super::client`]) deserializes the same
//! types and renders text from their fields, so the two cannot drift apart: renaming a field
//! is a compile error in the CLI's renderers, never a `null` on the admin's terminal.
//!
//! Bodies that belong to the part of the relay that produces them are defined there and
//! re-exported here, so this file is the one list of what the API speaks:
//!
//! | path | method | answer |
//! |---|---|---|
//! | `/v1/health` | GET | [`Health`] |
//! | `/v1/ready` | GET | [`Ready`] (503 while draining) |
//! | `/v1/queue?route=&state=&min_age=&rcpt=` ([`QueueFilter`]) | GET | `Vec<`[`MessageView`]`>` |
//! | `/v1/queue/{id}` | GET | [`MessageView`] |
//! | `/v1/queue/{id}/{action}` ([`QueueAction`]) | POST | [`QueueActionReply`] |
//! | `/v1/queue/flush?route=` | POST | [`FlushReply`] |
//! | `/v1/config/reload` | POST | [`ConfigReloadReply`] |
//! | `/v1/drain?on=` | POST | [`DrainReply`] |
//! | `/v1/directory/lookup?address=` | GET | [`Explain`] |
//! | `/v1/directory/batches` | GET | `Vec<`[`ChangeSummary`]`>` |
//! | `/v1/directory/batches?source=&state=&dry_run=&at=` (CSV body) | POST | [`BatchReply`] |
//! | `/v1/directory/batches?source=&state=&dry_run=&format=` ([`BatchFormat`]; CSV body) | POST | [`BatchReply`] |
//! | `/v1/directory/batches/{id}/rollback` | POST | [`BatchReply`] |
//! | `/v1/directory/scheduled` | GET | `Vec<`[`Scheduled`]`>` |
//! | `/v1/directory/scheduled/{id}/cancel` | POST | [`Scheduled`] |
//! | `/v1/directory/reload?force=` | POST | [`ReloadReport`] |
//! | `/v1/directory/import?source=&force=` (CSV body; fleet only) | POST | [`FleetBatch`] |
//! | `/v1/fleet` | GET | [`FleetStatus`] (404 without `[fleet]`) |
//! | `/v1/fleet/node` | GET | [`NodeApplied`] (404 without `[fleet]`) |
//! | `/v1/route/explain` ([`ExplainRequest`]) | POST | `Vec<`[`Explain`]`>` |
//! | `/v1/trace?address=&since=` | GET | [`TraceReply`] |
//! | `/v1/overview` | GET | [`Overview`] (the console's overview) |
//!
//! Every error is an [`ApiErrorBody`].

use serde::{Deserialize, Serialize};

pub use crate::deliver::hops::HopView;
pub use crate::deliver::states::{HopCondition, HopState};
pub use crate::directory::batch::BatchFormat;
pub use crate::directory::scheduled::{Scheduled, Status as ScheduledStatus};
pub use crate::directory::store::{ChangeKind, ChangeSummary};
pub use crate::directory::{BatchReport, RefusedReload, ReloadReport, ReloadStatus, StatusGroup};
pub use crate::fleet::{FleetBatch, FleetStatus, NodeApplied, NodeRow, PgHealth, Progress};
pub use crate::queue::rate::{MinuteCounts, ReasonCount};
pub use crate::queue::recent::Outcome;
pub use crate::queue::{MessageView, QueueShape, RcptView, RouteShape};
pub use crate::shadow::Resubmitted;
pub use crate::tracking::{Event as TrackEvent, EventReply, Kind as TrackKind};

/// `GET /v1/overview`: what the console's overview shows, in one answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overview {
    /// This node's name (the fleet node name, else `server.hostname`).
    pub node: String,
    /// Unix time of the answer.
    pub time: u64,
    /// Active messages.
    pub active: usize,
    /// Deferred messages.
    pub deferred: usize,
    /// Held messages.
    pub held: usize,
    /// The queue by route and age (Postfix's `qshape`).
    pub shape: QueueShape,
    /// Every next hop and its state.
    pub hops: Vec<HopState>,
    /// Recipients delivered, deferred and bounced per minute over the last hour, oldest
    /// first.
    pub minutes: Vec<MinuteCounts>,
    /// The most frequent deferral reasons of the last hour, by enhanced status code.
    pub deferral_reasons: Vec<ReasonCount>,
}

/// What a batch or rollback did; in a fleet also how far it has spread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchReply {
    /// The directory's report.
    #[serde(flatten)]
    pub report: BatchReport,
    /// In a fleet, for a committed change: nodes that have applied it so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Progress>,
    /// With `at`: the batch kept for later (the report is then what it would change now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<Scheduled>,
    /// For a preview or a scheduled batch, on a node with the tracking log: the traffic the
    /// batch moves, on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<BatchTraffic>,
}

/// The mail a batch would move from one route to another, as one node saw it: what its
/// tracking log holds for the batch's addresses over the last week, and its queue now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchTraffic {
    /// The node whose log and queue these are (each MX node sees its share of the mail).
    pub node: String,
    /// Addresses of the batch looked up.
    pub addresses: usize,
    /// Days of the log looked at (7, or fewer when the log is younger).
    pub days: u32,
    /// Messages received for them in those days (a message to two of them counts twice).
    pub received: u64,
    /// `received` per day.
    pub per_day: f64,
    /// Messages in the queue now with a pending recipient among them.
    pub queued_now: usize,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiErrorBody {
    /// What is wrong, worded for the admin.
    pub error: String,
}

/// `GET /v1/health`: the API answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /v1/ready`: whether the relay takes mail, for load balancers and `coexist status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Listening and not draining.
    pub ready: bool,
    /// New sessions are answered 421.
    pub draining: bool,
    /// SMTP sessions open now.
    pub sessions_open: usize,
    /// Addresses in the directory.
    pub directory_entries: usize,
    /// How the reloads of the directory file went.
    pub directory_reload: ReloadStatus,
    /// The directory's source can be read (false while the LDAP source is down: unknown
    /// recipients get `451 4.4.3`).
    #[serde(default = "yes")]
    pub directory_source_up: bool,
    /// With `[directory.ldap]`: the source's current state: the reason while it fails (and
    /// since when), the last good round, the cursor (`highestCommittedUSN`, `invocationId`).
    /// On a fleet node, what this node saw when it last led the sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_ldap: Option<crate::directory::ldap::LdapHealth>,
    /// In a fleet: draining because this node is behind the fleet (`fleet.max_lag`).
    #[serde(default)]
    pub fleet_behind: bool,
    /// In a fleet: connected to PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_postgres_up: Option<bool>,
    /// In a fleet: why PostgreSQL's change log does not hold the history this node applied
    /// (a log that moved back: directory changes are refused, the node counts as behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_log_mismatch: Option<String>,
    /// With `[shadow]`: why redundant copies cannot be stored now (NATS JetStream
    /// unreachable). With `on_failure = "defer"` the node is then not ready (every message
    /// would get 451); with `"accept"` it takes mail on its local copy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_unavailable: Option<String>,
    /// With `[shadow]`: this node holds its lease and may deliver (false while fenced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_lease_held: Option<bool>,
    /// The next hops delivered to so far and their state (up, circuit open, throttled).
    #[serde(default)]
    pub hops: Vec<HopView>,
}

/// What `POST /v1/queue/{id}/{action}` does to one message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueAction {
    /// No delivery until released (kept across restarts).
    Hold,
    /// Release a held message (attempted at once).
    Release,
    /// Remove from the queue and the spool, without a bounce.
    Delete,
    /// Attempt now.
    Flush,
}

impl QueueAction {
    /// The action's name in the API path.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueAction::Hold => "hold",
            QueueAction::Release => "release",
            QueueAction::Delete => "delete",
            QueueAction::Flush => "flush",
        }
    }

    /// The action named `name` in a path, if any.
    pub fn parse(name: &str) -> Option<QueueAction> {
        [
            QueueAction::Hold,
            QueueAction::Release,
            QueueAction::Delete,
            QueueAction::Flush,
        ]
        .into_iter()
        .find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for QueueAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a [`QueueAction`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueActionReply {
    /// Queue id.
    pub id: String,
    /// What was done.
    pub action: QueueAction,
}

/// `POST /v1/queue/flush`: deferred messages attempted now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlushReply {
    /// How many.
    pub flushed: usize,
}

/// `POST /v1/config/reload`: the new config is in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigReloadReply {
    /// Always true (a refused reload is an error answer).
    pub reloaded: bool,
    /// Config sections whose values changed.
    pub changed: Vec<String>,
}

/// `POST /v1/drain`: the drain state now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DrainReply {
    /// New sessions are answered 421.
    pub draining: bool,
    /// SMTP sessions still open.
    pub sessions_open: usize,
}

/// The body of `POST /v1/route/explain`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExplainRequest {
    /// Addresses to explain.
    pub addresses: Vec<String>,
}

/// The filters of `GET /v1/queue` (all optional; a message must match every one given).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueFilter {
    /// Only messages with a pending recipient on this route.
    pub route: Option<String>,
    /// Only messages in this phase: active, deferred, held.
    pub state: Option<String>,
    /// Only messages at least this many seconds old.
    pub min_age: Option<u64>,
    /// Only messages with a recipient containing this text (case-insensitive).
    pub rcpt: Option<String>,
    /// At most this many messages, oldest first (default [`QueueFilter::DEFAULT_LIMIT`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl QueueFilter {
    /// Messages listed when no `limit` is given: a listing reads each message from the spool,
    /// so a queue of millions is listed a page at a time.
    pub const DEFAULT_LIMIT: usize = 10_000;

    /// The filter as a query string (without `?`), for the client.
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(r) = &self.route {
            q.push(format!("route={}", super::client::encode(r)));
        }
        if let Some(s) = &self.state {
            q.push(format!("state={}", super::client::encode(s)));
        }
        if let Some(a) = self.min_age {
            q.push(format!("min_age={a}"));
        }
        if let Some(r) = &self.rcpt {
            q.push(format!("rcpt={}", super::client::encode(r)));
        }
        if let Some(n) = self.limit {
            q.push(format!("limit={n}"));
        }
        q.join("&")
    }
}

/// `GET /v1/trace?address=ADDR&since=SECONDS`: where mail for an address went on one node,
/// from its record of recent outcomes (`queue.recent_outcomes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceReply {
    /// The node that answered (its `server.hostname`).
    pub node: String,
    /// The outcomes for the address (as received or as sent, ignoring case) in the last
    /// `since` seconds (default [`TraceReply::DEFAULT_SINCE`]), newest first.
    pub entries: Vec<TraceEntry>,
    /// Every event of the tracking log that matched (received, routed, each outcome, DSNs,
    /// admin actions, takeovers), oldest first, each with this node's name. Empty on a node
    /// without the log.
    #[serde(default)]
    pub events: Vec<TrackEvent>,
    /// Where the answer comes from: `log` (the tracking log) or `memory` (the recent
    /// outcomes of a node without the log, which start empty at each start).
    #[serde(default)]
    pub source: String,
    /// More events matched than one answer carries (the oldest are given).
    #[serde(default)]
    pub truncated: bool,
}

impl TraceReply {
    /// Seconds looked back when `since` is not given: 12 hours.
    pub const DEFAULT_SINCE: u64 = 43_200;
}

/// One recipient's outcome in a [`TraceReply`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceEntry {
    /// Unix time (seconds) of the outcome.
    pub time: u64,
    /// Queue id of the message.
    pub queue_id: String,
    /// The recipient as received.
    pub recipient: String,
    /// The recipient as sent to the next hop, when the route rewrote it.
    pub sent_as: Option<String>,
    /// The route taken (`None`: no route, as for an unroutable recipient, an expiry or a
    /// delete).
    pub route: Option<String>,
    /// The next hop that answered (`host:port`), when one did.
    pub next_hop: Option<String>,
    /// What became of the recipient.
    pub outcome: Outcome,
    /// The reply behind the outcome (`None` for a delete).
    pub reply: Option<OutcomeReply>,
    /// Where the directory state behind the route came from when it was decided: `file …`,
    /// `batch N`, `unlisted`.
    pub origin: String,
}

/// The reply behind a [`TraceEntry`]: the next hop's, or the one a local error stands for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutcomeReply {
    /// Reply code (`None` for an expiry).
    pub code: Option<u16>,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: Option<String>,
    /// The text, lines separated by `\n`.
    pub text: String,
}

impl TraceEntry {
    /// The entry of a tracking event that is a recipient's outcome (`None` for the others:
    /// received, routed, DSN, hold, release).
    pub fn of_event(e: &TrackEvent) -> Option<TraceEntry> {
        let outcome = e.kind.outcome()?;
        Some(TraceEntry {
            time: e.time_ms / 1000,
            queue_id: e.queue_id.clone(),
            recipient: e.rcpt.clone().unwrap_or_default(),
            sent_as: e.sent_as.clone(),
            route: e.route.clone(),
            next_hop: e.next_hop.clone(),
            outcome,
            reply: e.reply.as_ref().map(|r| OutcomeReply {
                code: r.code,
                status: r.status.clone(),
                text: r.text.clone(),
            }),
            origin: e.origin.clone().unwrap_or_default(),
        })
    }
}

impl From<&crate::queue::recent::RecentOutcome> for TraceEntry {
    fn from(o: &crate::queue::recent::RecentOutcome) -> TraceEntry {
        TraceEntry {
            time: o.time,
            queue_id: o.queue_id.to_string(),
            recipient: o.rcpt.to_string(),
            sent_as: o.sent_as.as_ref().map(|s| s.to_string()),
            route: o.route.as_ref().map(|r| r.as_str().to_string()),
            next_hop: o.next_hop.map(|h| h.to_string()),
            outcome: o.outcome,
            reply: o.reply.as_ref().map(|r| OutcomeReply {
                code: r.code,
                status: r.status.map(|s| s.to_string()),
                text: r.text.to_string(),
            }),
            origin: o.origin.to_string(),
        }
    }
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_actions_round_trip_by_name() {
        for a in [
            QueueAction::Hold,
            QueueAction::Release,
            QueueAction::Delete,
            QueueAction::Flush,
        ] {
            assert_eq!(QueueAction::parse(a.as_str()), Some(a));
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!("\"{}\"", a.as_str())
            );
        }
        assert_eq!(QueueAction::parse("bounce"), None);
    }

    #[test]
    fn queue_filter_query_encodes_its_values() {
        let f = QueueFilter {
            route: Some("cloud".into()),
            state: None,
            min_age: Some(1800),
            rcpt: Some("a b&c".into()),
            limit: Some(5),
        };
        assert_eq!(f.query(), "route=cloud&min_age=1800&rcpt=a%20b%26c&limit=5");
        assert_eq!(QueueFilter::default().query(), "");
    }
}

/// Why a recipient would go where it goes, for `route explain`: the RCPT verdict, the
/// delivery of [`crate::route::plan`], as delivery would make it now, and the policy
/// decisions that apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explain {
    /// Directory facts.
    #[serde(flatten)]
    pub lookup: crate::directory::Lookup,
    /// RCPT-time verdict: `accept` or the reply a sender would get.
    pub rcpt: String,
    /// The rule that gave the route: `listed`, `unknown` (or `external` for `dsn_route`).
    pub rule: Option<crate::route::Rule>,
    /// Next hops of the route, in order (empty for an MX route).
    pub next_hops: Vec<String>,
    /// The MX domain and port (`domain:port`) of an MX route.
    pub mx: Option<String>,
    /// The recipient as sent to the next hop, when the route rewrites it.
    pub rewritten: Option<String>,
    /// TLS policy of the route.
    pub tls: Option<String>,
    /// The name the next hop's certificate must carry, when the route sets one.
    pub tls_name: Option<String>,
    /// The route a DSN to this address would take (the external route for addresses
    /// outside our domains).
    pub dsn_route: Option<String>,
    /// Every policy decision that applies to mail for this address, stage by stage, the
    /// delivery-time ones included (see `policy::explain`; empty from a server that
    /// predates it).
    #[serde(default)]
    pub policy: Vec<crate::policy::Applies>,
}
