//! `GET /v1/trace?address=ADDR&since=SECONDS`: where mail for an address went on this node,
//! from the record of recent outcomes the queue reports to ([`crate::queue::recent`]).
//! `coexist trace` asks every node and merges the answers.

use super::types::{TraceEntry, TraceReply};
use super::{unprocessable, AdminState, ApiError, ApiQuery};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

#[derive(Deserialize)]
pub(super) struct TraceQuery {
    /// The recipient, as received or as sent.
    address: String,
    /// Seconds to look back (default [`TraceReply::DEFAULT_SINCE`]).
    since: Option<u64>,
}

/// The outcomes for the address, newest first. A node that keeps no record
/// (`queue.recent_outcomes = 0`) answers 404, so that it is not read as "no mail went there".
pub(super) async fn trace(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<TraceQuery>,
) -> Result<Json<TraceReply>, ApiError> {
    if q.address.trim().is_empty() {
        return Err(unprocessable("no address to trace"));
    }
    let control = s.control.clone();
    if !control.outcomes().recent().enabled() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this node keeps no record of recent outcomes (queue.recent_outcomes = 0)".into(),
        ));
    }
    let since =
        crate::clock::now_secs().saturating_sub(q.since.unwrap_or(TraceReply::DEFAULT_SINCE));
    // A scan of the whole record: off the async workers.
    let entries = tokio::task::spawn_blocking(move || {
        control
            .outcomes()
            .recent()
            .matching(&q.address, since)
            .iter()
            .map(TraceEntry::from)
            .collect()
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(TraceReply {
        node: match s.control.fleet() {
            Some(f) => f.node().to_string(),
            None => s.control.config().server.hostname.clone(),
        },
        entries,
    }))
}
