//! The migration-weekend console: a web page served by the admin listener at `/console`.
//!
//! The page is small hand-written HTML, CSS and JavaScript built into the binary
//! (`assets/`); nothing is loaded from elsewhere, and the Content-Security-Policy says so.
//! Its data comes from the admin API itself (`/v1/...`, the same handlers and types the CLI
//! uses): the API's auth layer accepts either the bearer token or a console session cookie
//! with its CSRF token ([`check_session`]), so there is one implementation of every query
//! and action. The console adds only what a browser needs: the login page, the session
//! ([`session`]) and the assets.
//!
//! | path | method | what |
//! |---|---|---|
//! | `/console` | GET | the console with a live session, else the login page |
//! | `/console/login` | POST | form field `token`: opens a session (303 to `/console`) |
//! | `/console/logout` | POST | form field `csrf`: ends the session |
//! | `/console/app.js`, `/console/app.css` | GET | the assets |
//!
//! Who the client is behind a proxy ([`proxy`]), how many wrong tokens it may present
//! ([`guesses`], for the API's bearer token too: [`check_bearer`]) and which host and
//! origin the console answers ([`site`]) are modules of their own.

pub mod guesses;
pub mod proxy;
pub mod session;
pub mod site;

use super::{AdminState, ApiError};
use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use guesses::Failure;
use proxy::Client;
use serde::Deserialize;
use site::Site;
use tracing::{info, warn};

const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_HTML: &str = include_str!("assets/app.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Where nothing but this origin may load or send anything.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (mounted next to the API's, outside its auth layer: they do their
/// own).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route("/console/app.js", get(js))
        .route("/console/app.css", get(css))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

/// What a request's session cookie says, for the API's auth layer.
pub(super) enum SessionCheck {
    /// No session cookie, or an unknown or expired one.
    None,
    /// A live session, and for a change the right CSRF token and origin.
    Ok,
    /// A live session, but a change without its CSRF token or from another origin.
    Refused(&'static str),
}

/// Checks the session cookie of an API request; a request that changes something (any
/// method but GET and HEAD) also needs the session's CSRF token in `X-CSRF-Token` and no
/// foreign `Origin`.
pub(super) fn check_session(s: &AdminState, method: &Method, headers: &HeaderMap) -> SessionCheck {
    let Some(csrf) = session_of(s, headers) else {
        return SessionCheck::None;
    };
    let site = site_of(s, headers);
    if site == Site::WrongHost {
        return SessionCheck::Refused(
            "request for another host refused: open the console at admin.public_url",
        );
    }
    if method == Method::GET || method == Method::HEAD {
        return SessionCheck::Ok;
    }
    if site != Site::Ok {
        return SessionCheck::Refused("cross-origin request refused");
    }
    let given = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !session::same(given, &csrf) {
        return SessionCheck::Refused("missing or wrong CSRF token: reload the console");
    }
    SessionCheck::Ok
}

/// The CSRF token of the request's live session.
fn session_of(s: &AdminState, headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_id)
        .and_then(|id| s.sessions.csrf_of(id))
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_id)
        .map(str::to_string)
}

/// The request's host and origin against `admin.public_url` (see [`site`]).
fn site_of(s: &AdminState, headers: &HeaderMap) -> Site {
    let get = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    let config = s.control.config();
    let public = config.admin.as_ref().and_then(|a| a.public_url.as_ref());
    site::check(public, get(header::ORIGIN), get(header::HOST))
}

/// The answer to a console request for another host than `admin.public_url`'s.
fn wrong_host(s: &AdminState) -> Response {
    let config = s.control.config();
    let url = config
        .admin
        .as_ref()
        .and_then(|a| a.public_url.as_ref())
        .map(|u| u.origin())
        .unwrap_or_default();
    login_page(
        StatusCode::MISDIRECTED_REQUEST,
        &format!("This console answers at {url}/console: open it there."),
    )
}

/// What [`check_bearer`] found.
pub(super) enum Bearer {
    /// The right token.
    Right,
    /// No token, or a wrong one (counted, and logged at the start of a burst and when it
    /// reaches the limit).
    Wrong,
    /// The `429` for a client that presented too many wrong tokens lately; its token was
    /// not compared.
    Refused(Response),
}

/// Checks the API's bearer token `given` for `client` (called by the API's auth layer).
pub(super) fn check_bearer(s: &AdminState, client: Client, given: &[u8]) -> Bearer {
    if given.is_empty() {
        return Bearer::Wrong;
    }
    let guesses = s.sessions.guesses();
    if let Some(wait) = guesses.blocked(client.ip) {
        let secs = wait.as_secs().max(1);
        let mut r = ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many wrong tokens from your address: try again in {secs} s"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Bearer::Refused(r);
    }
    if s.token.matches(given) {
        guesses.ok(client.ip);
        return Bearer::Right;
    }
    match guesses.failed(client.ip) {
        Failure::First => warn!(%client, "admin API: wrong bearer token"),
        Failure::Limit(wait) => warn!(
            %client,
            failures = guesses::FAILURES,
            seconds = wait.as_secs().max(1),
            "admin API: too many wrong bearer tokens; this client's requests with a token get 429 until the window ends"
        ),
        Failure::Counted => {}
    }
    Bearer::Wrong
}

/// The request came over TLS: the admin listener's own TLS (it sets the header itself,
/// whatever the client wrote) or a TLS-terminating proxy that says so. The cookie then gets
/// `Secure`. (A direct client that writes the header only makes its own cookie `Secure`,
/// which it then no longer sends over clear HTTP: nothing to gain.)
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// An HTML page with the console's security headers.
fn html(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        body,
    )
        .into_response()
}

fn login_page(code: StatusCode, message: &str) -> Response {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" id=\"login-error\" role=\"alert\">{message}</p>")
    };
    html(code, LOGIN_HTML.replace("{{MESSAGE}}", &message))
}

async fn page(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if site_of(&s, &headers) == Site::WrongHost {
        return wrong_host(&s);
    }
    match session_of(&s, &headers) {
        Some(csrf) => {
            let node = s.control.config().server.hostname.clone();
            let node: String = node
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                .collect();
            html(
                StatusCode::OK,
                APP_HTML
                    .replace("{{CSRF}}", &csrf)
                    .replace("{{NODE}}", &node),
            )
        }
        None => login_page(StatusCode::OK, ""),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(
    State(s): State<AdminState>,
    client: Client,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    match site_of(&s, &headers) {
        Site::Ok => {}
        Site::WrongHost => return wrong_host(&s),
        Site::WrongOrigin => {
            return login_page(StatusCode::FORBIDDEN, "Cross-origin login refused.")
        }
    }
    let guesses = s.sessions.guesses();
    if let Some(wait) = guesses.blocked(client.ip) {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many failed logins from your address: try again in {} s.",
                wait.as_secs().max(1)
            ),
        );
    }
    let token = form.map(|Form(f)| f.token).unwrap_or_default();
    if !s.token.matches(token.trim().as_bytes()) {
        // At most `guesses::FAILURES` lines per client and window: no need to thin them.
        guesses.failed(client.ip);
        warn!(%client, "console: login with a wrong token");
        return login_page(
            StatusCode::UNAUTHORIZED,
            "Wrong token: use the admin API token (admin.token or admin.token_file).",
        );
    }
    guesses.ok(client.ip);
    let opened = match s.sessions.open() {
        Ok(o) => o,
        Err(e @ session::SessionError::Full) => {
            warn!(%client, "console: login refused: every session slot is taken by a live session");
            return login_page(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
        Err(e) => return login_page(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    info!(%client, "console: login");
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/console".to_string()),
            (
                header::SET_COOKIE,
                session::set_cookie(&opened.id, over_tls(&headers)),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(s): State<AdminState>,
    client: Client,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let given = form.map(|Form(f)| f.csrf).unwrap_or_default();
    let site = site_of(&s, &headers);
    match (session_id(&headers), session_of(&s, &headers)) {
        (Some(id), Some(csrf)) if site == Site::Ok && session::same(&given, &csrf) => {
            s.sessions.close(&id);
            info!(%client, "console: logout");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/console".to_string()),
                    (
                        header::SET_COOKIE,
                        session::clear_cookie(over_tls(&headers)),
                    ),
                ],
            )
                .into_response()
        }
        _ => login_page(
            StatusCode::FORBIDDEN,
            "Logout refused: no session, or a cross-site request.",
        ),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
