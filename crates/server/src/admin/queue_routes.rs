//! The admin API's queue handlers: list, show, hold/release/delete/retry, flush. Spool reads
//! run on the blocking pool.

use super::*;

pub(super) async fn queue_list(
    State(s): State<AdminState>,
    ApiQuery(f): ApiQuery<QueueFilter>,
) -> Json<Vec<crate::queue::MessageView>> {
    let q = s.control.queue().clone();
    let rcpt = f.rcpt.map(|r| r.to_lowercase());
    let phase = match f.state.as_deref() {
        None => None,
        Some("active") => Some(crate::queue::Phase::Active),
        Some("deferred") => Some(crate::queue::Phase::Deferred),
        Some("held") => Some(crate::queue::Phase::Held),
        Some(_) => return Json(Vec::new()),
    };
    let limit = f.limit.unwrap_or(QueueFilter::DEFAULT_LIMIT);
    let (route, min_age) = (f.route, f.min_age);
    // The index picks the candidates by phase and age; only those are read from the spool,
    // off the async workers.
    let views = tokio::task::spawn_blocking(move || {
        q.select(phase, min_age.unwrap_or(0), limit, |e| {
            let v = q.view(e);
            min_age.is_none_or(|a| v.age_s >= a)
                && route
                    .as_ref()
                    .is_none_or(|r| v.recipients.iter().any(|x| x.route.as_ref() == Some(r)))
                && rcpt.as_ref().is_none_or(|r| {
                    v.recipients
                        .iter()
                        .any(|x| x.address.to_lowercase().contains(r))
                })
        })
        .iter()
        .map(|e| q.view(e))
        .collect()
    })
    .await
    .unwrap_or_default();
    Json(views)
}

pub(super) async fn queue_show(
    State(s): State<AdminState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<crate::queue::MessageView>, ApiError> {
    // The message is read from the spool: off the async workers.
    let (q, key) = (s.control.queue().clone(), id.clone());
    let view = tokio::task::spawn_blocking(move || q.get(&key).map(|e| q.view(&e)))
        .await
        .map_err(task_err)?;
    view.map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no message {id} in the queue"),
        )
    })
}

pub(super) async fn queue_action(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<Json<QueueActionReply>, ApiError> {
    let q = s.control.queue();
    let Some(action) = QueueAction::parse(&action) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown queue action {action:?}"),
        ));
    };
    let res = match action {
        QueueAction::Hold => q.hold(&id),
        QueueAction::Release => q.release(&id),
        QueueAction::Delete => q.delete(&id).await,
        QueueAction::Flush => q.flush(&id),
    };
    res.map_err(|e| {
        let code = match e {
            crate::queue::QueueError::NotDeleted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            crate::queue::QueueError::DeletePending(_) => StatusCode::CONFLICT,
            _ => StatusCode::NOT_FOUND,
        };
        ApiError(code, e.to_string())
    })?;
    info!(client = %peer, qid = id, action = action.as_str(), "admin: queue");
    Ok(Json(QueueActionReply { id, action }))
}

#[derive(Deserialize)]
pub(super) struct FlushQuery {
    route: Option<String>,
}

pub(super) async fn queue_flush(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(f): ApiQuery<FlushQuery>,
) -> Json<FlushReply> {
    // The deferred messages are read from the spool (to route them) off the async workers;
    // then each is flushed.
    let (q, route) = (s.control.queue().clone(), f.route.clone());
    let picked: Vec<String> = tokio::task::spawn_blocking(move || {
        q.select(Some(crate::queue::Phase::Deferred), 0, usize::MAX, |e| {
            route.as_ref().is_none_or(|r| {
                q.pending_routes(e)
                    .iter()
                    .any(|(_, x)| x.as_ref() == Some(r))
            })
        })
        .iter()
        .map(|e| e.envelope.id.to_string())
        .collect()
    })
    .await
    .unwrap_or_default();
    let q = s.control.queue();
    let n = picked.iter().filter(|id| q.flush(id).is_ok()).count();
    info!(client = %peer, route = ?f.route, messages = n, "admin: queue flush");
    Json(FlushReply { flushed: n })
}

#[derive(Deserialize)]
pub(super) struct ResubmitQuery {
    route: String,
    since: i64,
    until: i64,
    #[serde(default)]
    preview: bool,
}

/// `POST /v1/queue/resubmit`: delivers again what went through one route in a window, from
/// the copies `shadow.keep_delivered` keeps (or, with `preview`, only counts it).
pub(super) async fn queue_resubmit(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(r): ApiQuery<ResubmitQuery>,
) -> Result<Json<crate::shadow::Resubmitted>, ApiError> {
    let keeps = s
        .control
        .config()
        .shadow
        .as_ref()
        .is_some_and(|c| c.keep_delivered.is_some());
    let Some(sh) = s.control.shadow().filter(|_| keeps) else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "resubmit needs [shadow] with keep_delivered (no copies of delivered messages are kept)".into(),
        ));
    };
    if !s.control.config().routes.contains_key(&r.route) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a route", r.route),
        ));
    }
    if r.until <= r.since {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "until must be after since".into(),
        ));
    }
    let (since, until) = (r.since.max(0) as u64, r.until.max(0) as u64);
    let done = sh
        .resubmit(&r.route, since, until, r.preview)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    info!(client = %peer, route = r.route, since, until, preview = r.preview, messages = done.messages, recipients = done.recipients, "admin: queue resubmit");
    Ok(Json(done))
}
