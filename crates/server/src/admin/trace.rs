//! `GET /v1/trace`: what became of mail on this node, by recipient (`address`), `sender`,
//! `message_id` or `queue_id`, between `since` and `until` seconds ago. Read from the
//! tracking log ([`crate::tracking`]) when it is on; a node without it answers recipient
//! searches from its record of recent outcomes ([`crate::queue::recent`]). `coexist trace`
//! asks every node and merges the answers.

use super::types::{TraceEntry, TraceReply};
use super::{unprocessable, AdminState, ApiError, ApiQuery};
use crate::tracking::{Query, Role};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

/// Most events one answer carries.
const MAX_EVENTS: usize = 20_000;

#[derive(Deserialize)]
pub(super) struct TraceQuery {
    /// A recipient, as received or as sent.
    address: Option<String>,
    /// A sender (reverse path).
    sender: Option<String>,
    /// A Message-ID header value (angle brackets optional).
    message_id: Option<String>,
    /// A queue id of this node.
    queue_id: Option<String>,
    /// Seconds to look back (default [`TraceReply::DEFAULT_SINCE`]).
    since: Option<u64>,
    /// Seconds ago the window ends (default 0: now).
    until: Option<u64>,
}

impl TraceQuery {
    /// The one thing searched for, and as what.
    fn key(&self) -> Result<(Role, String), ApiError> {
        let given: Vec<(Role, &String)> = [
            (Role::Recipient, &self.address),
            (Role::Sender, &self.sender),
            (Role::MessageId, &self.message_id),
            (Role::QueueId, &self.queue_id),
        ]
        .into_iter()
        .filter_map(|(r, v)| v.as_ref().map(|v| (r, v)))
        .collect();
        match given.as_slice() {
            [(r, v)] if !v.trim().is_empty() => Ok((*r, v.trim().to_string())),
            [_] => Err(unprocessable("the value to trace is empty")),
            [] => Err(unprocessable(
                "nothing to trace: give one of address, sender, message_id, queue_id",
            )),
            _ => Err(unprocessable(
                "give only one of address, sender, message_id, queue_id",
            )),
        }
    }
}

/// The events and outcomes matching the query: `entries` (outcomes) newest first,
/// `events` oldest first.
pub(super) async fn trace(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<TraceQuery>,
) -> Result<Json<TraceReply>, ApiError> {
    let (role, value) = q.key()?;
    let node = match s.control.fleet() {
        Some(f) => f.node().to_string(),
        None => s.control.config().server.hostname.clone(),
    };
    let now_ms = crate::clock::now_ms();
    let since = q.since.unwrap_or(TraceReply::DEFAULT_SINCE);
    let until = q.until.unwrap_or(0);
    if until > since {
        return Err(unprocessable("until must be less far back than since"));
    }
    let control = s.control.clone();
    let internal = |e: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e);
    if let Some(t) = control.tracking().cloned() {
        let query = Query {
            role,
            value,
            since_ms: now_ms.saturating_sub(since.saturating_mul(1000)),
            until_ms: now_ms.saturating_sub(until.saturating_mul(1000)),
            limit: MAX_EVENTS,
        };
        // Reads files: off the async workers.
        let found = tokio::task::spawn_blocking(move || t.search(&query))
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| internal(format!("reading the tracking log: {e}")))?;
        let mut events = found.events;
        for e in &mut events {
            e.node = Some(node.clone());
        }
        let mut entries: Vec<TraceEntry> = events.iter().filter_map(TraceEntry::of_event).collect();
        entries.reverse();
        return Ok(Json(TraceReply {
            node,
            entries,
            events,
            source: "log".into(),
            truncated: found.truncated,
        }));
    }
    if role != Role::Recipient {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this node keeps no tracking log ([tracking] enabled = false): only a recipient can be traced, in its recent outcomes".into(),
        ));
    }
    if !control.outcomes().recent().enabled() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this node keeps no tracking log and no record of recent outcomes (queue.recent_outcomes = 0)".into(),
        ));
    }
    let from = (now_ms / 1000).saturating_sub(since);
    let to = (now_ms / 1000).saturating_sub(until);
    // A scan of the whole record: off the async workers.
    let entries = tokio::task::spawn_blocking(move || {
        control
            .outcomes()
            .recent()
            .matching(&value, from)
            .iter()
            .filter(|o| o.time <= to)
            .map(TraceEntry::from)
            .collect()
    })
    .await
    .map_err(|e| internal(e.to_string()))?;
    Ok(Json(TraceReply {
        node,
        entries,
        events: Vec::new(),
        source: "memory".into(),
        truncated: false,
    }))
}
