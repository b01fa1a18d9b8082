//! Console sessions and what protects them: the session cookie, the per-session CSRF token,
//! the Origin check and the limit on wrong tokens.
//!
//! - A login with the admin token (compared like the API's bearer token, in constant time)
//!   opens a session: 32 random bytes from the operating system as its id, kept in a map on
//!   the server with its expiry ([`SESSION_TTL`]) and its CSRF token (32 more random bytes).
//!   The browser holds only the id, in an `HttpOnly`, `SameSite=Strict` cookie (`Secure`
//!   when the request came over TLS), so page scripts cannot read it and other sites'
//!   requests do not carry it.
//! - Every request that changes something must also carry the session's CSRF token (header
//!   `X-CSRF-Token` or form field `csrf`), which the console page holds and another site
//!   cannot read, and an `Origin` header, when there is one, naming this host.
//! - At most [`MAX_SESSIONS`] sessions live at once: at the cap, expired ones are dropped,
//!   and if none has expired a new login is refused ([`SessionError::Full`]); a live admin's
//!   session is never ended to make room. Wrong tokens are limited per client
//!   ([`super::guesses`]).

use super::guesses::Guesses;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the session cookie.
pub const COOKIE: &str = "coexist_session";

/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Most sessions alive at once.
pub const MAX_SESSIONS: usize = 256;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The operating system gave no random bytes.
    #[error("cannot draw random bytes for a session")]
    Random,
    /// [`MAX_SESSIONS`] sessions are live, none expired.
    #[error("{MAX_SESSIONS} console sessions are open, the most there may be: log out of one (or wait until one expires) and log in again")]
    Full,
}

/// 32 random bytes as 64 hex digits.
fn random_hex() -> Result<String, SessionError> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| SessionError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Equal in constant time (for CSRF tokens and session ids of the same length).
pub fn same(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// A session opened by a login.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The id (the cookie's value).
    pub id: String,
    /// Its CSRF token.
    pub csrf: String,
}

/// The live sessions and the count of wrong tokens.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    guesses: Guesses,
}

impl Sessions {
    /// Opens a session that lasts [`SESSION_TTL`]; refused when [`MAX_SESSIONS`] sessions are
    /// live.
    pub fn open(&self) -> Result<Opened, SessionError> {
        let opened = Opened {
            id: random_hex()?,
            csrf: random_hex()?,
        };
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_SESSIONS {
            return Err(SessionError::Full);
        }
        live.insert(
            opened.id.clone(),
            Session {
                csrf: opened.csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Ok(opened)
    }

    /// The CSRF token of the live session `id`, if there is one.
    pub fn csrf_of(&self, id: &str) -> Option<String> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The count of wrong tokens (logins and API bearer tokens).
    pub fn guesses(&self) -> &Guesses {
        &self.guesses
    }
}

/// The session id in a `Cookie` header value, if it has one.
pub fn cookie_id(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value for session `id` (`secure`: the request came over TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// True when an `Origin` header value names `host` (the request's `Host`), over HTTP or
/// HTTPS. A request without `Origin` passes this check (the CSRF token still applies).
pub fn origin_ok(origin: Option<&str>, host: Option<&str>) -> bool {
    let Some(origin) = origin else { return true };
    let Some(host) = host else { return false };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_look_up_and_close() {
        let s = Sessions::default();
        let a = s.open().unwrap();
        assert_eq!(a.id.len(), 64);
        assert_ne!(a.id, a.csrf);
        assert_eq!(s.csrf_of(&a.id).as_deref(), Some(a.csrf.as_str()));
        assert!(s.csrf_of("nope").is_none());
        s.close(&a.id);
        assert!(s.csrf_of(&a.id).is_none());
    }

    #[test]
    fn at_the_cap_a_login_is_refused_and_no_session_dropped() {
        let s = Sessions::default();
        let first = s.open().unwrap();
        for _ in 1..MAX_SESSIONS {
            s.open().unwrap();
        }
        assert!(matches!(s.open(), Err(SessionError::Full)));
        assert!(s.csrf_of(&first.id).is_some(), "the first session lives on");
        // An expired session makes room.
        s.live.lock().unwrap().get_mut(&first.id).unwrap().expires = Instant::now();
        s.open().unwrap();
        assert_eq!(s.live.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies_and_origins() {
        assert_eq!(cookie_id("a=b; coexist_session=abc; c=d"), Some("abc"));
        assert_eq!(cookie_id("coexist_session="), None);
        assert_eq!(cookie_id("other=1"), None);
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Max-Age="));
        assert!(!c.contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(origin_ok(None, Some("h:1")));
        assert!(origin_ok(Some("http://h:1"), Some("h:1")));
        assert!(!origin_ok(Some("http://evil.test"), Some("h:1")));
        assert!(!origin_ok(Some("null"), Some("h:1")));
        assert!(!origin_ok(Some("http://h:1"), None));
    }
}
