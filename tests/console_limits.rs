//! Console and API login limits (issue 24, item 9), over real HTTP to the admin listener:
//! behind a trusted proxy each client's wrong tokens are its own (`admin.trusted_proxies`,
//! `X-Forwarded-For`), and without one the header changes nothing; wrong bearer tokens get
//! `429` with `Retry-After` after the limit and are logged once per burst; at the session
//! cap a new login is refused while the live sessions keep working; with `admin.public_url`
//! a request for another host or from another origin is refused.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::bin::{cli, spawn_with, with_raw_value, write_config, Start, NOWHERE};
use common::*;
use std::net::SocketAddr;

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");
const WRONG: &str = "token=wrong-token-123456";
const PUBLIC: &str = "https://coexist-admin.example.org";

/// One HTTP/1.1 request with `Host: host` (the admin address when `None`) and extra
/// headers; (status, response head, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let host = host.map_or(addr.to_string(), str::to_string);
    http_request_for(addr, &host, method, path, headers, body.as_bytes()).await
}

/// A console login with `token`, as from `client` behind the proxy (its `X-Forwarded-For`).
async fn login_as(api: SocketAddr, client: &str, token: &str) -> (u16, String, String) {
    let xff = ("X-Forwarded-For", client);
    request(api, "POST", "/console/login", None, &[FORM, xff], token).await
}

/// The `coexist_session=…` pair of a response's Set-Cookie.
fn session_cookie(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no Set-Cookie in {head}"))
        .to_string()
}

fn right() -> String {
    format!("token={TOKEN}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_one_clients_failures_lock_only_that_client() {
    // The test connects from 127.0.0.1: the proxy.
    let h = harness(|c| {
        c.admin.as_mut().unwrap().trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let api = h.relay.admin_addr.unwrap();
    let (a, b) = ("203.0.113.5", "203.0.113.6");
    for _ in 0..5 {
        let (code, _, body) = login_as(api, a, WRONG).await;
        assert_eq!(code, 401, "{body}");
    }
    // A is locked out, even with the right token, and even when it writes another address
    // in front of its own (the proxy appends the real one: the right-most counts).
    let (code, _, body) = login_as(api, a, &right()).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("Too many failed logins"), "{body}");
    let (code, _, _) = login_as(api, &format!("{b}, {a}"), &right()).await;
    assert_eq!(code, 429);
    // B, behind the same proxy, logs in.
    let (code, head, body) = login_as(api, b, &right()).await;
    assert_eq!(code, 303, "{head}{body}");
    let (code, _, _) = request(
        api,
        "GET",
        "/v1/overview",
        None,
        &[("Cookie", &session_cookie(&head))],
        "",
    )
    .await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_x_forwarded_for_is_ignored() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    for _ in 0..5 {
        let (code, _, _) = login_as(api, "203.0.113.5", WRONG).await;
        assert_eq!(code, 401);
    }
    // The header names another client, but the peer (127.0.0.1) is the one counted.
    let (code, _, body) = login_as(api, "203.0.113.6", &right()).await;
    assert_eq!(code, 429, "{body}");
}

#[test]
fn wrong_bearer_tokens_get_429_after_the_limit_and_are_logged_once_per_burst() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    cfg.config.admin.as_mut().unwrap().trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.write();
    let log = dir.path().join("serve.log");
    let _server = spawn_with(
        &mut cfg,
        Start {
            log: Some(&log),
            ..Default::default()
        },
    );
    let api = cfg.admin();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let get = |client: &str, token: &str| {
        let auth = format!("Bearer {token}");
        let headers = [
            ("Authorization", auth.as_str()),
            ("X-Forwarded-For", client),
        ];
        rt.block_on(request(api, "GET", "/v1/health", None, &headers, ""))
    };
    let a = "203.0.113.5";
    for i in 0..5 {
        let (code, _, body) = get(a, &format!("wrong-token-{i:08}"));
        assert_eq!(code, 401, "{body}");
    }
    for token in ["wrong-token-again", TOKEN] {
        let (code, head, body) = get(a, token);
        assert_eq!(code, 429, "{head}{body}");
        assert!(body.contains("too many wrong tokens"), "{body}");
        let wait: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .unwrap_or_else(|| panic!("no Retry-After in {head}"))
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // Another client behind the proxy is not affected.
    let (code, _, body) = get("203.0.113.6", TOKEN);
    assert_eq!(code, 200, "{body}");

    // The burst is in the log twice: its first wrong token and the lock, with the client.
    let text = eventually_blocking("the lock in the log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("too many wrong bearer tokens") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("bearer token"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains("admin API: wrong bearer token"),
        "{lines:#?}"
    );
    for l in &lines {
        assert!(l.contains("203.0.113.5 via 127.0.0.1:"), "{l}");
        assert!(!l.contains("wrong-token-"), "a token in the log: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_session_cap_a_login_is_refused_and_live_sessions_keep_working() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let body = right();
    let login = || request(api, "POST", "/console/login", None, &[FORM], &body);
    let (code, head, _) = login().await;
    assert_eq!(code, 303);
    let first = session_cookie(&head);
    let max = coexist::admin::console::session::MAX_SESSIONS;
    let mut last = String::new();
    for _ in 1..max {
        let (code, head, _) = login().await;
        assert_eq!(code, 303);
        last = session_cookie(&head);
    }
    let (code, head, body) = login().await;
    assert_eq!(code, 503, "{head}");
    assert!(
        body.contains(&format!("{max} console sessions are open")),
        "{body}"
    );
    assert!(!head.contains("set-cookie"), "{head}");
    // Every admin who was logged in still is.
    for cookie in [&first, &last] {
        let (code, _, body) =
            request(api, "GET", "/v1/overview", None, &[("Cookie", cookie)], "").await;
        assert_eq!(code, 200, "{body}");
    }
    // One logs out: there is room again.
    let (_, _, page) = request(api, "GET", "/console", None, &[("Cookie", &first)], "").await;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("CSRF token in the page")
        .to_string();
    let (code, _, _) = request(
        api,
        "POST",
        "/console/logout",
        None,
        &[FORM, ("Cookie", &first)],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(code, 303);
    let (code, _, _) = login().await;
    assert_eq!(code, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_public_url_another_host_or_origin_is_refused() {
    let h = harness(|c| {
        c.admin.as_mut().unwrap().public_url =
            Some(coexist::config::PublicUrl::parse(PUBLIC).unwrap());
    })
    .await;
    let api = h.relay.admin_addr.unwrap();
    let public_host = "coexist-admin.example.org";
    let login = |host: Option<&str>, origin: &str| {
        let (host, origin) = (host.map(str::to_string), origin.to_string());
        async move {
            let headers = [FORM, ("Origin", origin.as_str())];
            request(
                api,
                "POST",
                "/console/login",
                host.as_deref(),
                &headers,
                &right(),
            )
            .await
        }
    };

    // Through the proxy (its Host and Origin), and through an SSH tunnel (loopback): fine.
    let (code, head, _) = login(Some(public_host), PUBLIC).await;
    assert_eq!(code, 303, "{head}");
    let cookie = session_cookie(&head);
    let (code, head, _) = login(None, &format!("http://{api}")).await;
    assert_eq!(code, 303, "{head}");

    // A name an attacker points at the listener (DNS rebinding), with its own origin.
    let evil = format!("evil.example:{}", api.port());
    let (code, _, body) = login(Some(&evil), &format!("http://{evil}")).await;
    assert_eq!(code, 421, "{body}");
    assert!(
        body.contains("This console answers at https://coexist-admin.example.org/console"),
        "{body}"
    );
    let (code, _, _) = request(api, "GET", "/console", Some(&evil), &[], "").await;
    assert_eq!(code, 421);
    // The right host, another origin (or the right one over http).
    for origin in ["https://evil.example", "http://coexist-admin.example.org"] {
        let (code, _, body) = login(Some(public_host), origin).await;
        assert_eq!(code, 403, "{origin}: {body}");
        assert!(body.contains("Cross-origin login refused"), "{body}");
    }

    // The API with the session cookie: the same rules.
    let (_, _, page) = request(
        api,
        "GET",
        "/console",
        Some(public_host),
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("CSRF token in the page")
        .to_string();
    let drain = |host: String, origin: &'static str| {
        let (cookie, csrf) = (cookie.clone(), csrf.clone());
        async move {
            let headers = [
                ("Cookie", cookie.as_str()),
                ("X-CSRF-Token", csrf.as_str()),
                ("Origin", origin),
            ];
            request(api, "POST", "/v1/drain?on=false", Some(&host), &headers, "").await
        }
    };
    let (code, _, body) = drain(evil.clone(), "http://evil.example").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("another host"), "{body}");
    let (code, _, body) = drain(public_host.into(), "https://evil.example").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross-origin"), "{body}");
    let (code, _, body) = drain(public_host.into(), PUBLIC).await;
    assert_eq!(code, 200, "{body}");
    // The bearer token (the CLI, fleet peers) is not bound to a host.
    let auth = format!("Bearer {TOKEN}");
    let (code, _, _) = request(
        api,
        "GET",
        "/v1/health",
        Some(&evil),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(code, 200);
}

#[test]
fn check_config_names_a_bad_public_url_and_trusted_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let admin = cfg.config.admin.as_mut().unwrap();
    admin.public_url = Some(coexist::config::PublicUrl::parse(PUBLIC).unwrap());
    admin.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    cfg.write();
    let (ok, out, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{out}{err}");
    for (key, raw) in [
        (
            "public_url",
            "\"https://coexist-admin.example.org/console\"",
        ),
        ("trusted_proxies", "[\"10.0.0.0/33\"]"),
    ] {
        let (text, line) = with_raw_value(&cfg.text(), "admin", key, raw);
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let (ok, _, err) = cli(&bad, &["check-config"]);
        assert!(!ok);
        let want = format!("bad.toml:{line}: key `admin.{key}`");
        assert!(err.contains(&want), "want {want:?} in {err}");
    }
}
