//! The admin API's directory handlers: lookups and route explanations, batches (now and
//! scheduled), rollbacks, imports, reloads and the fleet's status. Every change goes through
//! the node's directory writer (`Controls::writer`).

use super::*;

#[derive(Deserialize)]
pub(super) struct LookupQuery {
    address: String,
}

pub(super) async fn lookup(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<LookupQuery>,
) -> Result<Json<Explain>, ApiError> {
    let mut out =
        explain(&s.directory, &s.control.config(), &[q.address]).map_err(unprocessable)?;
    out.pop()
        .map(Json)
        .ok_or_else(|| unprocessable("no address"))
}

pub(super) async fn route_explain(
    State(s): State<AdminState>,
    ApiJson(b): ApiJson<ExplainRequest>,
) -> Result<Json<Vec<Explain>>, ApiError> {
    explain(&s.directory, &s.control.config(), &b.addresses)
        .map(Json)
        .map_err(unprocessable)
}

#[derive(Deserialize)]
pub(super) struct BatchQuery {
    state: Option<String>,
    source: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// Apply at this time instead of now (RFC 3339).
    at: Option<String>,
    /// `auto` (our CSV, `New-MigrationBatch`) or `migration-users` (an Exchange report).
    #[serde(default)]
    format: batch::BatchFormat,
}

/// A directory write's error as an API error: 503 while the fleet's PostgreSQL is
/// unreachable, 404 for what only a fleet does, 500 for a failed task, else 422.
pub(super) fn write_err(e: WriteError) -> ApiError {
    let code = match &e {
        WriteError::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
        WriteError::NeedsFleet(_) => StatusCode::NOT_FOUND,
        WriteError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        WriteError::Directory(_) | WriteError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError(code, e.to_string())
}

pub(super) fn task_err(e: tokio::task::JoinError) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The fleet, or 404 naming `what` when this node is not in one.
pub(super) fn need_fleet<'a>(
    s: &'a AdminState,
    what: &str,
) -> Result<&'a crate::fleet::Fleet, ApiError> {
    s.control.fleet().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{what} needs a fleet: this node has no [fleet] section"),
        )
    })
}

pub(super) async fn apply_batch(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<BatchQuery>,
    ApiBody(body): ApiBody,
) -> Result<Json<BatchReply>, ApiError> {
    let source = q.source.unwrap_or_else(|| "batch".into());
    let dir = s.directory.clone();
    let kept = body.clone();
    let batch::Batch {
        rows,
        not_completed,
    } = {
        let (src, state, format) = (source.clone(), q.state.clone(), q.format);
        tokio::task::spawn_blocking(move || {
            batch::read(format, &body, &src, dir.states(), state.as_deref())
        })
        .await
        .map_err(task_err)?
        .map_err(unprocessable)?
    };
    let mut rows_kept: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
    // An address written twice in the batch counts once.
    rows_kept.sort_unstable();
    rows_kept.dedup();
    let writer = s.control.writer();
    if let Some(at) = &q.at {
        // Scheduled: checked now (bad rows are refused at once), kept, applied at `at` (in
        // a fleet by whichever node is live then).
        let at = crate::directory::scheduled::parse_at(at).map_err(unprocessable)?;
        let mut report = writer
            .apply(rows, source.clone(), true)
            .await
            .map_err(write_err)?
            .report;
        let scheduled = writer
            .schedule(LaterBatch {
                body: kept.to_vec(),
                source: source.clone(),
                state: q.state.clone(),
                format: q.format.as_str().to_string(),
                at,
            })
            .await
            .map_err(write_err)?;
        info!(client = %peer, source, id = scheduled.id, at = %scheduled.at, "admin: directory batch scheduled");
        report.not_completed = not_completed;
        let traffic = traffic(&s, &rows_kept).await;
        return Ok(Json(BatchReply {
            report,
            fleet: None,
            scheduled: Some(scheduled),
            traffic,
        }));
    }
    let written = writer
        .apply(rows, source.clone(), q.dry_run)
        .await
        .map_err(write_err)?;
    let traffic = if q.dry_run {
        traffic(&s, &rows_kept).await
    } else {
        None
    };
    let mut reply = BatchReply {
        report: written.report,
        fleet: written.progress,
        scheduled: None,
        traffic,
    };
    let left = not_completed
        .as_ref()
        .map_or(0, |g| g.iter().map(|g| g.count).sum::<usize>());
    reply.report.not_completed = not_completed;
    if reply.report.id.is_some() {
        metrics::counter!(crate::metrics::DIRECTORY_CHANGES, "kind" => "apply").increment(1);
    }
    info!(client = %peer, source, format = %q.format, dry_run = q.dry_run, id = ?reply.report.id, changed = reply.report.changed, not_completed = left, "admin: directory batch");
    Ok(Json(reply))
}

/// Days of the tracking log a batch preview's traffic looks at.
const TRAFFIC_DAYS: u64 = 7;

/// The traffic the batch of `addresses` moves, on this node: messages received for them
/// over the last week (its tracking log) and queued for them now. `None` without the log;
/// a log that cannot be read is logged and left out, the preview still answers.
async fn traffic(
    s: &AdminState,
    addresses: &[String],
) -> Option<crate::admin::types::BatchTraffic> {
    let tracking = s.control.tracking()?.clone();
    let queue = s.control.queue().clone();
    let node = match s.control.fleet() {
        Some(f) => f.node().to_string(),
        None => s.control.config().server.hostname.clone(),
    };
    let addresses = addresses.to_vec();
    let res = tokio::task::spawn_blocking(move || {
        let now = crate::clock::now_ms();
        let week = TRAFFIC_DAYS * 86_400_000;
        // The log may be younger than a week: count the days it covers.
        let oldest = crate::tracking::files::list(tracking.dir())?
            .first()
            .map_or(now, |f| {
                f.index.map_or(f.start_ms, |h| h.first_ms.min(f.start_ms))
            });
        let span = now.saturating_sub(oldest.max(now - week));
        let days = span.div_ceil(86_400_000).clamp(1, TRAFFIC_DAYS) as u32;
        let counts = tracking.received_counts(&addresses, now - week, now)?;
        let set: std::collections::HashSet<&str> = addresses.iter().map(String::as_str).collect();
        let queued_now = queue
            .select(None, 0, usize::MAX, |e| {
                e.state
                    .pending()
                    .iter()
                    .any(|&i| set.contains(e.envelope.rcpts[i].key().as_str()))
            })
            .len();
        let received: u64 = counts.iter().sum();
        Ok::<_, std::io::Error>(crate::admin::types::BatchTraffic {
            node,
            addresses: addresses.len(),
            days,
            received,
            per_day: received as f64 / f64::from(days),
            queued_now,
        })
    })
    .await;
    match res {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "batch preview: cannot read the tracking log; no traffic figures");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "batch preview: the traffic task failed");
            None
        }
    }
}

pub(super) async fn rollback(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<u32>,
) -> Result<Json<BatchReply>, ApiError> {
    let written = s.control.writer().rollback(id).await.map_err(write_err)?;
    let reply = BatchReply {
        traffic: None,
        report: written.report,
        fleet: written.progress,
        scheduled: None,
    };
    metrics::counter!(crate::metrics::DIRECTORY_CHANGES, "kind" => "rollback").increment(1);
    info!(client = %peer, batch = id, restored = reply.report.changed, "admin: directory rollback");
    Ok(Json(reply))
}

#[derive(Deserialize)]
pub(super) struct ImportQuery {
    source: Option<String>,
    #[serde(default)]
    force: bool,
}

pub(super) async fn import(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    ApiBody(body): ApiBody,
) -> Result<Json<crate::fleet::FleetBatch>, ApiError> {
    let source = q.source.unwrap_or_else(|| "import".into());
    let r = s
        .control
        .writer()
        .import(body.to_vec(), source.clone(), q.force)
        .await
        .map_err(write_err)?;
    metrics::counter!(crate::metrics::DIRECTORY_CHANGES, "kind" => "base").increment(1);
    info!(client = %peer, source, id = ?r.id, entries = r.report.entries, changed = r.report.changed, "admin: directory import");
    Ok(Json(r))
}

pub(super) async fn scheduled_list(
    State(s): State<AdminState>,
) -> Result<Json<Vec<crate::directory::scheduled::Scheduled>>, ApiError> {
    s.control
        .writer()
        .scheduled()
        .await
        .map(Json)
        .map_err(write_err)
}

pub(super) async fn scheduled_cancel(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<u32>,
) -> Result<Json<crate::directory::scheduled::Scheduled>, ApiError> {
    let r = s
        .control
        .writer()
        .cancel_scheduled(id)
        .await
        .map_err(write_err)?;
    info!(client = %peer, id, "admin: scheduled batch cancelled");
    Ok(Json(r))
}

pub(super) async fn fleet_status(
    State(s): State<AdminState>,
) -> Result<Json<crate::fleet::FleetStatus>, ApiError> {
    let mut status = need_fleet(&s, "fleet status")?.status().await;
    if let Some(sh) = s.control.shadow() {
        status.shadow = Some(sh.status().await);
    }
    Ok(Json(status))
}

pub(super) async fn fleet_node(
    State(s): State<AdminState>,
) -> Result<Json<crate::fleet::NodeApplied>, ApiError> {
    Ok(Json(need_fleet(&s, "fleet node")?.node_applied()))
}

pub(super) async fn batches(
    State(s): State<AdminState>,
) -> Json<Vec<crate::directory::store::ChangeSummary>> {
    Json(s.directory.history_snapshot())
}

#[derive(Deserialize)]
pub(super) struct ReloadQuery {
    /// Apply even if the file removes more than `directory.max_shrink` of the addresses.
    #[serde(default)]
    force: bool,
}

pub(super) async fn reload(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<ReloadQuery>,
) -> Result<Json<crate::directory::ReloadReport>, ApiError> {
    let res = s.control.writer().reload(q.force).await;
    info!(client = %peer, force = q.force, ok = res.is_ok(), "admin: directory reload");
    Ok(Json(res.map_err(write_err)?))
}
