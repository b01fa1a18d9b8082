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

pub mod session;

use super::AdminState;
use axum::extract::{ConnectInfo, Form, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::net::SocketAddr;
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
    if method == Method::GET || method == Method::HEAD {
        return SessionCheck::Ok;
    }
    if !origin_ok(headers) {
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

fn origin_ok(headers: &HeaderMap) -> bool {
    let get = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    session::origin_ok(get(header::ORIGIN), get(header::HOST))
}

/// The request came over TLS (through a TLS-terminating proxy that says so: the admin
/// listener itself speaks clear HTTP): the cookie gets `Secure`.
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !origin_ok(&headers) {
        return login_page(StatusCode::FORBIDDEN, "Cross-origin login refused.");
    }
    if let Some(wait) = s.sessions.login_blocked(peer.ip()) {
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
        s.sessions.login_failed(peer.ip());
        warn!(client = %peer, "console: login with a wrong token");
        return login_page(
            StatusCode::UNAUTHORIZED,
            "Wrong token: use the admin API token (admin.token or admin.token_file).",
        );
    }
    s.sessions.login_ok(peer.ip());
    let opened = match s.sessions.open() {
        Ok(o) => o,
        Err(e) => return login_page(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    info!(client = %peer, "console: login");
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let given = form.map(|Form(f)| f.csrf).unwrap_or_default();
    match (session_id(&headers), session_of(&s, &headers)) {
        (Some(id), Some(csrf)) if origin_ok(&headers) && session::same(&given, &csrf) => {
            s.sessions.close(&id);
            info!(client = %peer, "console: logout");
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
