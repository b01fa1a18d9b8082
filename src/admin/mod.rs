//! The admin HTTP API (axum) that the CLI talks to: directory lookups, batches, rollbacks,
//! reloads and route explanations. Every call needs `Authorization: Bearer TOKEN`; every
//! change is logged with the caller's address. Every error, including a malformed JSON body,
//! query string or path and an unknown path, is answered `{"error": "..."}`.
//!
//! The web console ([`console`]) is served by the same listener and reads and acts through
//! these same handlers: a request may carry a console session cookie (with its CSRF token
//! for changes) instead of the bearer token.
//!
//! Every body the API reads or answers is a named type, listed in [`types`]; the CLI's
//! [`client`] deserializes the same types, so server and CLI cannot disagree on a field.

pub mod client;
pub mod console;
pub mod controls;
pub mod token;
mod trace;
pub mod types;

use crate::config::{AdminConfig, Config};
use crate::directory::{batch, Directory, Lookup};
use crate::policy::Policy;
use crate::route;
use crate::types::Address;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub use controls::Controls;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::info;
use types::{
    ApiErrorBody, BatchReply, ConfigReloadReply, DrainReply, ExplainRequest, FlushReply, Health,
    Overview, QueueAction, QueueActionReply, QueueFilter, Ready,
};

/// Shared state of the API.
#[derive(Clone)]
pub struct AdminState {
    /// The live directory.
    pub directory: Arc<Directory>,
    /// Reload, drain, queue.
    pub control: Arc<dyn Controls>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    token: Arc<token::Expected>,
    /// The console's sessions.
    sessions: Arc<console::session::Sessions>,
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No usable token (weak, unreadable, or the file cannot be written).
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// A non-loopback clear-text listen address without `allow_plaintext_remote`.
    #[error("key `admin.listen`: {0} is not a loopback address and the admin API speaks clear HTTP; set `allow_plaintext_remote = true` to allow it")]
    Plaintext(SocketAddr),
    /// The listen address cannot be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// An API error: HTTP status and a message naming what is wrong.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

fn unprocessable(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
}

/// axum's `Json`, with its rejections as `{"error": …}`: 400 for malformed JSON, 415 without
/// `Content-Type: application/json`, 422 for JSON of the wrong shape.
struct ApiJson<T>(T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

/// axum's `Query`, with a malformed query string answered 400 `{"error": …}`.
struct ApiQuery<T>(T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

/// axum's `Path`, with a malformed path parameter answered 400 `{"error": …}`.
struct ApiPath<T>(T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    Path<T>: FromRequestParts<S, Rejection = PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(ApiError(r.status(), r.body_text())),
        }
    }
}

/// The raw body, with a body over the limit answered 413 `{"error": …}`.
struct ApiBody(axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(|r: BytesRejection| ApiError(r.status(), r.body_text()))
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such API path: {}", req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Why a recipient would go where it goes, for `route explain`: the RCPT verdict and the
/// delivery of [`route::plan`], as delivery would make it now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explain {
    /// Directory facts.
    #[serde(flatten)]
    pub lookup: Lookup,
    /// RCPT-time verdict: `accept` or the reply a sender would get.
    pub rcpt: String,
    /// The rule that gave the route: `listed`, `unknown` (or `external` for `dsn_route`).
    pub rule: Option<route::Rule>,
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
}

/// An address `route explain` cannot read.
#[derive(Debug, thiserror::Error)]
#[error("{address:?}: {source}")]
pub struct ExplainError {
    /// The address as given.
    pub address: String,
    /// Why it is not an address.
    pub source: crate::types::AddressError,
}

/// Explains where each address would go now.
pub fn explain(
    directory: &Directory,
    config: &Config,
    addresses: &[String],
) -> Result<Vec<Explain>, ExplainError> {
    let policy = Policy::new(&config.server.accepted_domains);
    addresses
        .iter()
        .map(|a| {
            let addr = Address::parse(a, true).map_err(|source| ExplainError {
                address: a.clone(),
                source,
            })?;
            let lookup = directory.lookup(&addr);
            let rcpt = match route::admit(&policy, &addr, |a| directory.resolve(a)) {
                Err(r) => r.to_string(),
                Ok(_) => "accept".to_string(),
            };
            let resolve = |a: &Address| directory.resolve_routed(a);
            let plan = route::plan([(0, &addr)], route::Kind::Relayed, resolve, config);
            let dsn = route::plan([(0, &addr)], route::Kind::Dsn, resolve, config);
            let d = plan.deliveries.first();
            Ok(Explain {
                rule: d.map(|d| d.rules[0]),
                next_hops: match d.map(|d| &d.target) {
                    Some(route::Target::Hops(h)) => h.iter().map(|h| h.to_string()).collect(),
                    _ => Vec::new(),
                },
                mx: match d.map(|d| &d.target) {
                    Some(route::Target::Mx(dom, port)) => Some(format!("{dom}:{port}")),
                    _ => None,
                },
                rewritten: d
                    .map(|d| d.to[0].to_string())
                    .filter(|to| *to != addr.to_string()),
                tls: d.map(|d| d.tls.name().to_string()),
                tls_name: d.and_then(|d| d.tls_name.clone()),
                dsn_route: dsn.route_of(0).map(|r| r.as_str().to_string()),
                lookup,
                rcpt,
            })
        })
        .collect()
}

async fn auth(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    // The scheme is case-insensitive (RFC 9110 11.1); the token is compared as digests in
    // constant time (see `token::Expected`).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..]))
        .unwrap_or(b"");
    if s.token.matches(given) {
        return next.run(req).await;
    }
    // Or the console's session cookie, with its CSRF token for a change.
    match console::check_session(&s, req.method(), req.headers()) {
        console::SessionCheck::Ok => next.run(req).await,
        console::SessionCheck::Refused(why) => {
            ApiError(StatusCode::FORBIDDEN, why.into()).into_response()
        }
        console::SessionCheck::None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
struct LookupQuery {
    address: String,
}

async fn lookup(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<LookupQuery>,
) -> Result<Json<Explain>, ApiError> {
    let mut out =
        explain(&s.directory, &s.control.config(), &[q.address]).map_err(unprocessable)?;
    out.pop()
        .map(Json)
        .ok_or_else(|| unprocessable("no address"))
}

async fn route_explain(
    State(s): State<AdminState>,
    ApiJson(b): ApiJson<ExplainRequest>,
) -> Result<Json<Vec<Explain>>, ApiError> {
    explain(&s.directory, &s.control.config(), &b.addresses)
        .map(Json)
        .map_err(unprocessable)
}

#[derive(Deserialize)]
struct BatchQuery {
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

/// A fleet error as an API error: 503 while PostgreSQL is unreachable, else 422.
fn fleet_err(e: crate::fleet::FleetError) -> ApiError {
    let code = if e.is_unreachable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError(code, e.to_string())
}

fn task_err(e: tokio::task::JoinError) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The fleet, or 404 naming `what` when this node is not in one.
fn need_fleet<'a>(s: &'a AdminState, what: &str) -> Result<&'a crate::fleet::Fleet, ApiError> {
    s.control.fleet().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{what} needs a fleet: this node has no [fleet] section"),
        )
    })
}

async fn apply_batch(
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
    let dir = s.directory.clone();
    if let Some(at) = &q.at {
        // Scheduled: checked now (bad rows are refused at once), kept, applied at `at`.
        let at = crate::directory::scheduled::parse_at(at).map_err(unprocessable)?;
        let (src, state, format) = (source.clone(), q.state.clone(), q.format);
        let (report, scheduled) = match s.control.fleet() {
            // In a fleet: kept in PostgreSQL, applied by whichever node is live at `at`.
            Some(fleet) => {
                let report = tokio::task::spawn_blocking(move || dir.apply(&rows, &src, true))
                    .await
                    .map_err(task_err)?
                    .map_err(unprocessable)?;
                let kept = fleet
                    .schedule(
                        kept.to_vec(),
                        source.clone(),
                        state,
                        format.as_str().to_string(),
                        at,
                    )
                    .await
                    .map_err(fleet_err)?;
                (report, kept)
            }
            None => {
                let store = s.control.scheduled().clone();
                tokio::task::spawn_blocking(move || {
                    let report = dir.apply(&rows, &src, true)?;
                    let kept = store.add(&kept, &src, state.as_deref(), format.as_str(), at)?;
                    Ok::<_, crate::directory::DirectoryError>((report, kept))
                })
                .await
                .map_err(task_err)?
                .map_err(unprocessable)?
            }
        };
        info!(client = %peer, source, id = scheduled.id, at = %scheduled.at, "admin: directory batch scheduled");
        let mut report = report;
        report.not_completed = not_completed;
        return Ok(Json(BatchReply {
            report,
            fleet: None,
            scheduled: Some(scheduled),
        }));
    }
    let reply = match s.control.fleet() {
        Some(fleet) if !q.dry_run => {
            let (report, fleet) = fleet.apply(rows, source.clone()).await.map_err(fleet_err)?;
            BatchReply {
                report,
                fleet,
                scheduled: None,
            }
        }
        _ => {
            let (src, dry_run) = (source.clone(), q.dry_run);
            let report = tokio::task::spawn_blocking(move || dir.apply(&rows, &src, dry_run))
                .await
                .map_err(task_err)?
                .map_err(unprocessable)?;
            BatchReply {
                report,
                fleet: None,
                scheduled: None,
            }
        }
    };
    let mut reply = reply;
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

async fn rollback(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<u32>,
) -> Result<Json<BatchReply>, ApiError> {
    let reply = match s.control.fleet() {
        Some(fleet) => {
            let (report, p) = fleet.rollback(id).await.map_err(fleet_err)?;
            BatchReply {
                report,
                fleet: Some(p),
                scheduled: None,
            }
        }
        None => {
            let dir = s.directory.clone();
            let report = tokio::task::spawn_blocking(move || dir.rollback(id))
                .await
                .map_err(task_err)?
                .map_err(unprocessable)?;
            BatchReply {
                report,
                fleet: None,
                scheduled: None,
            }
        }
    };
    metrics::counter!(crate::metrics::DIRECTORY_CHANGES, "kind" => "rollback").increment(1);
    info!(client = %peer, batch = id, restored = reply.report.changed, "admin: directory rollback");
    Ok(Json(reply))
}

#[derive(Deserialize)]
struct ImportQuery {
    source: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn import(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    ApiBody(body): ApiBody,
) -> Result<Json<crate::fleet::FleetBatch>, ApiError> {
    let fleet = need_fleet(&s, "directory import")?;
    let source = q.source.unwrap_or_else(|| "import".into());
    let r = fleet
        .import(body.to_vec(), source.clone(), q.force)
        .await
        .map_err(fleet_err)?;
    metrics::counter!(crate::metrics::DIRECTORY_CHANGES, "kind" => "base").increment(1);
    info!(client = %peer, source, id = ?r.id, entries = r.report.entries, changed = r.report.changed, "admin: directory import");
    Ok(Json(r))
}

async fn scheduled_list(
    State(s): State<AdminState>,
) -> Result<Json<Vec<crate::directory::scheduled::Scheduled>>, ApiError> {
    if let Some(fleet) = s.control.fleet() {
        return fleet.scheduled().await.map(Json).map_err(fleet_err);
    }
    let store = s.control.scheduled().clone();
    tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(task_err)?
        .map(Json)
        .map_err(unprocessable)
}

async fn scheduled_cancel(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<u32>,
) -> Result<Json<crate::directory::scheduled::Scheduled>, ApiError> {
    use crate::directory::scheduled::Status;
    if let Some(fleet) = s.control.fleet() {
        let r = fleet.cancel_scheduled(id).await.map_err(fleet_err)?;
        info!(client = %peer, id, "admin: scheduled batch cancelled (fleet)");
        return Ok(Json(r));
    }
    let store = s.control.scheduled().clone();
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let r = tokio::task::spawn_blocking(move || store.settle(id, Status::Cancelled { time }))
        .await
        .map_err(task_err)?
        .map_err(unprocessable)?;
    info!(client = %peer, id, "admin: scheduled batch cancelled");
    Ok(Json(r))
}

async fn fleet_status(
    State(s): State<AdminState>,
) -> Result<Json<crate::fleet::FleetStatus>, ApiError> {
    Ok(Json(need_fleet(&s, "fleet status")?.status().await))
}

async fn fleet_node(
    State(s): State<AdminState>,
) -> Result<Json<crate::fleet::NodeApplied>, ApiError> {
    Ok(Json(need_fleet(&s, "fleet node")?.node_applied()))
}

async fn batches(State(s): State<AdminState>) -> Json<Vec<crate::directory::store::ChangeSummary>> {
    Json(s.directory.history_snapshot())
}

#[derive(Deserialize)]
struct ReloadQuery {
    /// Apply even if the file removes more than `directory.max_shrink` of the addresses.
    #[serde(default)]
    force: bool,
}

async fn reload(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<ReloadQuery>,
) -> Result<Json<crate::directory::ReloadReport>, ApiError> {
    let dir = s.directory.clone();
    let res = tokio::task::spawn_blocking(move || dir.reload_file(q.force))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    info!(client = %peer, force = q.force, ok = res.is_ok(), "admin: directory reload");
    Ok(Json(res.map_err(unprocessable)?))
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Ready to take mail: listening and not draining (503 while draining, so a load balancer
/// moves traffic away).
async fn ready(State(s): State<AdminState>) -> Response {
    let draining = s.control.draining();
    let fleet = s.control.fleet();
    let fleet_behind = fleet.is_some_and(|f| f.behind());
    let body = Ready {
        ready: !draining && !fleet_behind,
        draining,
        sessions_open: s.control.open_sessions(),
        directory_entries: s.directory.len(),
        directory_reload: s.directory.reload_status(),
        directory_source_up: !s.directory.source_down(),
        fleet_behind,
        fleet_postgres_up: fleet.map(|f| f.postgres_up()),
        fleet_log_mismatch: fleet.and_then(|f| f.log_mismatch()),
        hops: s.control.queue().hops(),
    };
    let code = if draining || fleet_behind {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// `GET /v1/hops`: every next hop delivered to so far, with its state.
async fn hops(State(s): State<AdminState>) -> Json<Vec<types::HopView>> {
    Json(s.control.queue().hops())
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    use crate::metrics as m;
    let q = s.control.queue().stats();
    metrics::gauge!(m::QUEUE_MESSAGES, "state" => "active").set(q.active as f64);
    metrics::gauge!(m::QUEUE_MESSAGES, "state" => "deferred").set(q.deferred as f64);
    metrics::gauge!(m::QUEUE_OLDEST, "state" => "active").set(q.oldest_active as f64);
    metrics::gauge!(m::QUEUE_OLDEST, "state" => "deferred").set(q.oldest_deferred as f64);
    metrics::gauge!(m::QUEUE_MESSAGES, "state" => "held").set(q.held as f64);
    metrics::gauge!(m::QUEUE_UNWRITTEN).set(q.unwritten as f64);
    metrics::gauge!(m::DIRECTORY_ENTRIES).set(s.directory.len() as f64);
    let (syncs, records, segments) = s.control.queue().spool_stats();
    metrics::counter!(m::SPOOL_SYNCS).absolute(syncs);
    metrics::counter!(m::SPOOL_RECORDS).absolute(records);
    metrics::gauge!(m::SPOOL_SEGMENTS).set(segments as f64);
    if let Some(f) = s.control.fleet() {
        metrics::gauge!(m::FLEET_LOG_MISMATCH).set(if f.log_mismatch().is_some() {
            1.0
        } else {
            0.0
        });
    }
    for (route, down) in s.control.queue().routes_down() {
        metrics::gauge!(m::ROUTE_UNREACHABLE, "route" => route).set(if down { 1.0 } else { 0.0 });
    }
    match &s.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed".into(),
        )
        .into_response(),
    }
}

/// Messages the overview's queue shape looks at, the oldest first (each is read from the
/// spool): bounds what one refresh of the console costs.
pub const SHAPE_LIMIT: usize = 10_000;

/// Deferral reasons the overview lists.
const TOP_REASONS: usize = 10;

async fn overview(State(s): State<AdminState>) -> Result<Json<Overview>, ApiError> {
    let q = s.control.queue().clone();
    let shape = tokio::task::spawn_blocking(move || q.shape(SHAPE_LIMIT))
        .await
        .map_err(task_err)?;
    let q = s.control.queue();
    let stats = q.stats();
    let now = crate::queue::unix_now();
    Ok(Json(Overview {
        node: match s.control.fleet() {
            Some(f) => f.node().to_string(),
            None => s.control.config().server.hostname.clone(),
        },
        time: now,
        active: stats.active,
        deferred: stats.deferred,
        held: stats.held,
        shape,
        hops: q.hop_states(),
        minutes: q.rates().minutes(now),
        deferral_reasons: q.rates().top_deferrals(now, TOP_REASONS),
    }))
}

async fn queue_list(
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

async fn queue_show(
    State(s): State<AdminState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<crate::queue::MessageView>, ApiError> {
    let q = s.control.queue();
    q.get(&id).map(|e| Json(q.view(&e))).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no message {id} in the queue"),
        )
    })
}

async fn queue_action(
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
struct FlushQuery {
    route: Option<String>,
}

async fn queue_flush(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(f): ApiQuery<FlushQuery>,
) -> Json<FlushReply> {
    let q = s.control.queue();
    let n = q.flush_where(|e| match &f.route {
        None => true,
        Some(r) => q
            .pending_routes(e)
            .iter()
            .any(|(_, x)| x.as_ref() == Some(r)),
    });
    info!(client = %peer, route = ?f.route, messages = n, "admin: queue flush");
    Json(FlushReply { flushed: n })
}

async fn config_reload(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Json<ConfigReloadReply>, ApiError> {
    let control = s.control.clone();
    let res = tokio::task::spawn_blocking(move || control.reload())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    info!(client = %peer, ok = res.is_ok(), "admin: config reload");
    res.map(|changed| {
        Json(ConfigReloadReply {
            reloaded: true,
            changed,
        })
    })
    .map_err(unprocessable)
}

#[derive(Deserialize)]
struct DrainQuery {
    #[serde(default = "yes")]
    on: bool,
}

fn yes() -> bool {
    true
}

async fn drain(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(q): ApiQuery<DrainQuery>,
) -> Json<DrainReply> {
    s.control.set_draining(q.on);
    info!(client = %peer, draining = q.on, "admin: drain");
    Json(DrainReply {
        draining: q.on,
        sessions_open: s.control.open_sessions(),
    })
}

/// The API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/v1/queue", get(queue_list))
        .route("/v1/hops", get(hops))
        .route("/v1/queue/flush", post(queue_flush))
        .route("/v1/queue/{id}", get(queue_show))
        .route("/v1/queue/{id}/{action}", post(queue_action))
        .route("/v1/trace", get(trace::trace))
        .route("/v1/config/reload", post(config_reload))
        .route("/v1/drain", post(drain))
        .route("/v1/directory/lookup", get(lookup))
        .route("/v1/directory/batches", get(batches).post(apply_batch))
        .route("/v1/directory/batches/{id}/rollback", post(rollback))
        .route("/v1/directory/reload", post(reload))
        .route("/v1/directory/import", post(import))
        .route("/v1/directory/scheduled", get(scheduled_list))
        .route(
            "/v1/directory/scheduled/{id}/cancel",
            post(scheduled_cancel),
        )
        .route("/v1/fleet", get(fleet_status))
        .route("/v1/fleet/node", get(fleet_node))
        .route("/v1/route/explain", post(route_explain))
        .route("/v1/overview", get(overview))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(state.clone())
        .merge(console::router(state))
}

/// Refuses a clear-text non-loopback listen address without `allow_plaintext_remote`.
fn check_listen(admin: &AdminConfig) -> Result<(), AdminError> {
    if admin.plaintext_remote_refused() {
        return Err(AdminError::Plaintext(admin.listen));
    }
    Ok(())
}

/// The rules [`start`] applies, checked without binding or writing anything (for
/// [`crate::preflight`]): the listen address and the token. `Ok(Some(path))` names a token
/// file that does not exist yet and that [`start`] will write.
pub fn check(admin: &AdminConfig) -> Result<Option<std::path::PathBuf>, AdminError> {
    check_listen(admin)?;
    Ok(token::check(admin)?)
}

/// Binds the admin listener and serves the API in a task; returns the bound address.
/// Refuses a weak token and a clear-text non-loopback address without
/// `allow_plaintext_remote`; writes a fresh token to a missing `admin.token_file`.
pub async fn start(
    control: Arc<dyn Controls>,
) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>, AdminError> {
    let config = control.config();
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    check_listen(admin)?;
    let (token, origin) = token::for_server(admin)?;
    if let token::Origin::Created(path) = &origin {
        tracing::warn!(
            file = %path.display(),
            "admin token file did not exist: wrote a fresh random token to it (mode 0600); the CLI reads it from there with the same config"
        );
    }
    let listener = TcpListener::bind(admin.listen)
        .await
        .map_err(|e| AdminError::Bind(admin.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AdminError::Bind(admin.listen, e))?;
    let app = router(AdminState {
        directory: control.directory().clone(),
        control,
        metrics: crate::metrics::install(),
        token: Arc::new(token::Expected::new(&token)),
        sessions: Default::default(),
    });
    let task = tokio::spawn(async move {
        let svc = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, svc).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    info!(%addr, "admin API listening");
    Ok(Some((addr, task)))
}
