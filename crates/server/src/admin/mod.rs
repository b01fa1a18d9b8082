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

pub use coexist_api::{client, types};
pub mod console;
pub mod controls;
mod dir_routes;
pub mod listen;
mod queue_routes;
mod share;
pub mod token;
mod trace;

use crate::config::{AdminConfig, Config};
use crate::directory::writer::LaterBatch;
use crate::directory::{batch, Directory, WriteError};
use crate::policy::recipient::verdict;
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
use dir_routes::*;
use queue_routes::*;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::info;
use types::{
    ApiErrorBody, BatchReply, ConfigReloadReply, DrainReply, Explain, ExplainRequest, FlushReply,
    Health, Overview, QueueAction, QueueActionReply, QueueFilter, Ready,
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
    #[error("key `admin.listen`: {0} is not a loopback address and the admin API speaks clear HTTP; serve it over TLS (`tls_cert`, `tls_key`) or set `allow_plaintext_remote = true` to allow it")]
    Plaintext(SocketAddr),
    /// The admin certificate or key cannot be used.
    #[error("key `admin.tls_cert`: {0}")]
    Tls(#[from] crate::certs::TlsError),
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
            let rcpt = match verdict(
                &policy,
                &addr,
                |a| directory.resolve(a),
                || directory.source_down(),
            ) {
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
                policy: crate::policy::explain(config, directory, &addr, crate::clock::now_secs()),
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
    // Wrong tokens are counted per client; one that sent too many gets 429 (see
    // `console::guesses`).
    let client = console::proxy::Client::of(req.extensions());
    match console::check_bearer(&s, client, given) {
        console::Bearer::Refused(r) => return r,
        console::Bearer::Right => return next.run(req).await,
        console::Bearer::Wrong => {}
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
    let shadow = s.control.shadow();
    let shadow_unavailable = shadow.and_then(|sh| sh.unready());
    // No copy means 451 for every message under `on_failure = "defer"`: not ready.
    let shadow_refusing = shadow_unavailable.is_some()
        && s.control
            .config()
            .shadow
            .as_ref()
            .is_some_and(|c| c.on_failure == crate::config::OnFailure::Defer);
    let body = Ready {
        ready: !draining && !fleet_behind && !shadow_refusing,
        draining,
        sessions_open: s.control.open_sessions(),
        directory_entries: s.directory.len(),
        directory_reload: s.directory.reload_status(),
        directory_source_up: !s.directory.source_down(),
        directory_ldap: s.directory.ldap_health(),
        fleet_behind,
        fleet_postgres_up: fleet.map(|f| f.postgres_up()),
        fleet_log_mismatch: fleet.and_then(|f| f.log_mismatch()),
        shadow_unavailable,
        shadow_lease_held: shadow.map(|sh| sh.lease_held()),
        hops: s.control.outbound().hop_views(),
    };
    let code = if draining || fleet_behind || shadow_refusing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// `GET /v1/hops`: every next hop delivered to so far, with its state.
async fn hops(State(s): State<AdminState>) -> Json<Vec<types::HopView>> {
    Json(s.control.outbound().hop_views())
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
    let (syncs, records, segments) = s.control.spool_stats();
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
    let now = crate::clock::now_secs();
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
        hops: s.control.hop_states(),
        minutes: s.control.outcomes().rates().minutes(now),
        deferral_reasons: s.control.outcomes().rates().top_deferrals(now, TOP_REASONS),
    }))
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
        .route("/v1/queue/resubmit", post(queue_resubmit))
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
        .merge(console::router(state.clone()))
        // First of all: the real client behind a trusted proxy (`admin.trusted_proxies`).
        .layer(middleware::from_fn_with_state(
            state,
            console::proxy::forwarded,
        ))
        .layer(middleware::map_response(security_headers))
}

/// Headers on every answer of the listener, API and console alike: nothing is kept in a
/// cache (answers carry queue contents, addresses and tokens' effects), and browsers take
/// the content type as given. A handler that sets its own `Cache-Control` (the console's
/// static assets) keeps it.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    res
}

/// The admin listener's TLS acceptor, when `tls_cert` and `tls_key` are set.
pub fn tls_acceptor(admin: &AdminConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, AdminError> {
    match (&admin.tls_cert, &admin.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(crate::smtp::tls::load_acceptor(cert, key)?)),
        _ => Ok(None),
    }
}

/// Refuses a clear-text non-loopback listen address without `allow_plaintext_remote`.
fn check_listen(admin: &AdminConfig) -> Result<(), AdminError> {
    if admin.plaintext_remote_refused() {
        return Err(AdminError::Plaintext(admin.listen));
    }
    Ok(())
}

/// The rules [`start`] applies, checked without binding or writing anything (for
/// [`crate::preflight`]): the listen address, the TLS material and the token.
/// `Ok(Some(path))` names a token file that does not exist yet and that [`start`] will write.
pub fn check(admin: &AdminConfig) -> Result<Option<std::path::PathBuf>, AdminError> {
    check_listen(admin)?;
    tls_acceptor(admin)?;
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
    let tls = tls_acceptor(admin)?;
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
    let limits = listen::Limits::of(admin);
    let https = tls.is_some();
    let task = tokio::spawn(listen::serve(listener, app, limits, tls));
    info!(
        %addr,
        https,
        max_connections = limits.max_connections,
        "admin API listening"
    );
    Ok(Some((addr, task)))
}
