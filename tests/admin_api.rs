//! Admin API hardening, as an operator and an attacker see it: weak tokens are refused by
//! `check-config` and `serve` with the file, line and key; a missing token file is created
//! with a fresh token the CLI then uses; a clear-text non-loopback listener needs an explicit
//! opt-in; wrong tokens of any length get 401; malformed input gets a JSON error.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::AdminConfig;
use common::bin::{cli, serve_exit, spawn_with, write_config, BinConfig, Start, BIN, NOWHERE};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `[admin]` section of `cfg`.
fn admin(cfg: &mut BinConfig) -> &mut AdminConfig {
    cfg.config.admin.as_mut().unwrap()
}

/// `cfg` with the inline token `token` instead of the test token, written to `path`.
fn with_token(cfg: &BinConfig, path: PathBuf, token: &str) -> BinConfig {
    let mut weak = BinConfig {
        path,
        config: cfg.config.clone(),
    };
    admin(&mut weak).token = Some(token.into());
    weak.write();
    weak
}

/// 1-based line of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn check_config_refuses_placeholder_short_and_patterned_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let placeholder = "the token is a placeholder, not a secret";
    for (token, reason) in [
        ("change-me", placeholder),
        ("changeme", placeholder),
        ("secret", placeholder),
        ("password", placeholder),
        ("token", placeholder),
        ("test", placeholder),
        ("example-token-1234", placeholder),
        ("change-me-change-me", placeholder),
        ("k3Jx9pQ2vL", "the token is shorter than 16 characters"),
        (
            "zzzzzzzzzzzzzzzzzzzzzzzz",
            "the token is one character or a short pattern repeated",
        ),
    ] {
        let weak = with_token(&cfg, cfg.path.clone(), token);
        let (ok, out, err) = cli(&weak.path, &["check-config"]);
        assert!(!ok, "{token:?} accepted: {out}");
        let line = line_of(&weak.text(), &format!("token = \"{token}\""));
        let want = format!("coexist.toml:{line}: key `admin.token`: {reason}");
        assert!(err.contains(&want), "{token:?}: want {want:?} in {err}");
        // The refusal does not repeat the token (it goes to terminals and logs).
        // Neither quoted (as it was) nor, when it is no common word, as it is.
        assert!(
            !err.contains(&format!("{token:?}")) && (token.len() < 9 || !err.contains(token)),
            "{token:?} echoed: {err}"
        );
    }

    // The same rules for a token file (owner-only), named with its key.
    let file = dir.path().join("admin.token");
    std::fs::write(&file, "secret-token-secret\n").unwrap();
    chmod(&file, 0o600);
    admin(&mut cfg).token = None;
    admin(&mut cfg).token_file = Some(file.clone());
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(!ok);
    let line = line_of(&cfg.text(), "token_file = ");
    let want = format!(
        "coexist.toml:{line}: key `admin.token_file`: {}: the token is a placeholder",
        file.display()
    );
    assert!(err.contains(&want), "want {want:?} in {err}");
    assert!(!err.contains("secret-token-secret"), "token echoed: {err}");

    // A strong token passes.
    std::fs::write(&file, "Zq8mR2vLk1Tn7wBx\n").unwrap();
    let (ok, out, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains(": ok"), "{out}");
}

/// Sets `path`'s permission bits.
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_token_file_group_or_others_can_read_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let file = dir.path().join("admin.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    admin(&mut cfg).token = None;
    admin(&mut cfg).token_file = Some(file.clone());
    cfg.write();
    let line = line_of(&cfg.text(), "token_file = ");
    for mode in [0o644, 0o640, 0o604] {
        chmod(&file, mode);
        let (ok, out, err) = cli(&cfg.path, &["check-config"]);
        assert!(!ok, "mode {mode:o} accepted: {out}");
        let want = format!(
            "coexist.toml:{line}: key `admin.token_file`: {} is accessible to group or others (mode {mode:04o}): run `chmod 600 {}`, or set `allow_readable_token_file = true`",
            file.display(),
            file.display()
        );
        assert!(err.contains(&want), "want {want:?} in {err}");
        assert!(!err.contains(TOKEN), "token echoed: {err}");
        // serve refuses it the same way, before binding anything.
        let (exited, ok, err) = serve_outcome(&cfg.path, dir.path());
        assert!(exited && !ok, "serve started with mode {mode:o}: {err}");
        assert!(err.contains(&want), "want {want:?} in {err}");
    }
    // The CLI, which reads the same file, refuses too.
    let (ok, _, err) = cli(&cfg.path, &["status"]);
    assert!(!ok && err.contains("chmod 600"), "{err}");

    chmod(&file, 0o600);
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    chmod(&file, 0o644);
    admin(&mut cfg).allow_readable_token_file = true;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_says_no_store_and_nosniff() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let auth = format!("Bearer {TOKEN}");
    for (method, path, token) in [
        ("GET", "/v1/health", true),
        ("GET", "/v1/queue", true),
        ("GET", "/metrics", true),
        ("GET", "/v1/directory/lookup?address=bob@nhs.test", true),
        ("POST", "/v1/drain?on=false", true),
        ("GET", "/v1/nothing-here", true),
        ("GET", "/v1/health", false),
        ("GET", "/console", false),
    ] {
        let headers: Vec<(&str, &str)> = if token {
            vec![("Authorization", auth.as_str())]
        } else {
            vec![]
        };
        let (status, head, _) = http_request(api, method, path, &headers, b"").await;
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("\r\ncache-control: no-store\r\n"),
            "{method} {path} ({status}): {head}"
        );
        assert!(
            head.contains("\r\nx-content-type-options: nosniff\r\n"),
            "{method} {path} ({status}): {head}"
        );
    }
}

/// Runs `coexist serve --config PATH` in `cwd`; returns (exited on its own, success,
/// stderr). A server that does start is killed by PID.
fn serve_outcome(config: &Path, cwd: &Path) -> (bool, bool, String) {
    let exit = serve_exit(config, Some(cwd), "info");
    (exit.exited, exit.success, exit.stderr)
}

#[test]
fn serve_refuses_to_start_with_a_weak_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    for (token, reason) in [
        ("change-me", "is a placeholder"),
        ("k3Jx9pQ2vL", "shorter than 16"),
    ] {
        let weak = with_token(&cfg, dir.path().join("weak.toml"), token);
        let (exited, ok, err) = serve_outcome(&weak.path, dir.path());
        assert!(exited && !ok, "serve started with token {token:?}: {err}");
        let line = line_of(&weak.text(), &format!("token = \"{token}\""));
        assert!(
            err.contains(&format!("weak.toml:{line}: key `admin.token`:")) && err.contains(reason),
            "{err}"
        );
        // Refused before it bound anything (the log says where it listens, at info).
        assert!(!err.contains("listening"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_file_gets_a_fresh_token_that_the_cli_uses() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    // Relative, like the shipped config: resolved against the working directory.
    admin(&mut cfg).token = None;
    admin(&mut cfg).token_file = Some("var/admin.token".into());
    cfg.write();
    let file = dir.path().join("var/admin.token");
    let out = Command::new(BIN)
        .args(["check-config", "--config", cfg.path.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists(), "check-config must not write the token");

    let _server = spawn_with(
        &mut cfg,
        Start {
            cwd: Some(dir.path()),
            ..Start::default()
        },
    );
    let token = std::fs::read_to_string(&file).unwrap();
    let token = token.trim_end();
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let out = Command::new(BIN)
        .args(["status", "--config", cfg.path.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ready: true"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _, _) = http(cfg.admin(), "GET", "/v1/health", Some(token), None, b"").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_text_admin_api_off_loopback_needs_an_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    admin(&mut cfg).listen = "0.0.0.0:8025".parse().unwrap();
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(!ok);
    let line = line_of(&cfg.text(), "0.0.0.0:8025");
    assert!(
        err.contains(&format!(
            "coexist.toml:{line}: key `admin.listen`: 0.0.0.0:8025 is not a loopback address"
        )) && err.contains("allow_plaintext_remote = true"),
        "{err}"
    );
    // The same for an address of this host's own network and for IPv6.
    for addr in ["10.1.2.3:8025", "[::]:8025", "[2001:db8::1]:8025"] {
        admin(&mut cfg).listen = addr.parse().unwrap();
        cfg.write();
        let (ok, _, err) = cli(&cfg.path, &["check-config"]);
        assert!(
            !ok && err.contains("is not a loopback address"),
            "{addr}: {err}"
        );
    }
    // With the explicit opt-in the config is valid (not bound here: tests stay on loopback).
    admin(&mut cfg).listen = "0.0.0.0:8025".parse().unwrap();
    admin(&mut cfg).allow_plaintext_remote = true;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");

    // A server built from a config in memory refuses too, before binding anything.
    let h = harness(|_| {}).await;
    let mut c = (*h.relay.control.config()).clone();
    c.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.spool.dir = h.dir.path().join("spool2");
    c.directory.store_dir = h.dir.path().join("store2");
    c.admin.as_mut().unwrap().listen = "0.0.0.0:0".parse().unwrap();
    let e = coexist::relay::start(c).await.err().expect("started");
    assert!(
        e.to_string()
            .contains("key `admin.listen`: 0.0.0.0:0 is not a loopback address"),
        "{e}"
    );
}

/// Asserts a JSON `{"error": "..."}` answer with `status`; returns the message.
fn json_error(resp: &(u16, String, String), status: u16, what: &str) -> String {
    let (code, ct, body) = resp;
    assert_eq!(*code, status, "{what}: {body}");
    assert_eq!(ct, "application/json", "{what}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error text: {body}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_query_and_path_get_json_errors() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let t = Some(TOKEN);
    let json = Some("application/json");

    let ok = http(
        api,
        "POST",
        "/v1/route/explain",
        t,
        json,
        br#"{"addresses":["bob@nhs.test"]}"#,
    )
    .await;
    assert_eq!(ok.0, 200, "{}", ok.2);

    let e = json_error(
        &http(
            api,
            "POST",
            "/v1/route/explain",
            t,
            json,
            br#"{"addresses": ["#,
        )
        .await,
        400,
        "truncated JSON",
    );
    assert!(
        e.contains("Failed to parse the request body as JSON"),
        "{e}"
    );
    let e = json_error(
        &http(
            api,
            "POST",
            "/v1/route/explain",
            t,
            json,
            br#"{"addresses": "bob"}"#,
        )
        .await,
        422,
        "JSON of the wrong shape",
    );
    assert!(e.contains("addresses"), "{e}");
    let e = json_error(
        &http(
            api,
            "POST",
            "/v1/route/explain",
            t,
            None,
            br#"{"addresses":[]}"#,
        )
        .await,
        415,
        "no content type",
    );
    assert!(e.contains("application/json"), "{e}");

    let e = json_error(
        &http(api, "GET", "/v1/queue?min_age=soon", t, None, b"").await,
        400,
        "bad number in the query",
    );
    assert!(e.contains("min_age"), "{e}");
    let e = json_error(
        &http(api, "GET", "/v1/directory/lookup", t, None, b"").await,
        400,
        "missing query parameter",
    );
    assert!(e.contains("address"), "{e}");
    json_error(
        &http(api, "POST", "/v1/drain?on=maybe", t, None, b"").await,
        400,
        "bad boolean",
    );
    json_error(
        &http(
            api,
            "POST",
            "/v1/directory/reload?force=maybe",
            t,
            None,
            b"",
        )
        .await,
        400,
        "bad boolean in the reload query",
    );
    json_error(
        &http(
            api,
            "POST",
            "/v1/directory/batches?dry_run=perhaps",
            t,
            Some("text/csv"),
            b"EmailAddress\nbob@nhs.test\n",
        )
        .await,
        400,
        "bad boolean in a batch query",
    );
    let e = json_error(
        &http(
            api,
            "POST",
            "/v1/directory/batches/first/rollback",
            t,
            None,
            b"",
        )
        .await,
        400,
        "bad path parameter",
    );
    assert!(e.contains("first") || e.contains("parse"), "{e}");
    json_error(
        &http(api, "GET", "/v1/nothing-here", t, None, b"").await,
        404,
        "unknown path",
    );
    json_error(
        &http(api, "DELETE", "/v1/route/explain", t, None, b"").await,
        405,
        "wrong method",
    );
    // Nothing above was applied.
    assert!(!h.relay.control.draining());
    assert!(h.relay.directory.history_snapshot().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_of_any_length_get_401() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let mut same_len = TOKEN.as_bytes().to_vec();
    same_len[TOKEN.len() - 1] ^= 1; // differs in the last character only
    let same_len = String::from_utf8(same_len).unwrap();
    assert_eq!(same_len.len(), TOKEN.len());
    let longer = format!("{TOKEN}0");
    let prefix = &TOKEN[..TOKEN.len() - 1];
    for (what, token) in [
        ("same length, last character wrong", Some(same_len.as_str())),
        ("the token plus one character", Some(longer.as_str())),
        ("the token less its last character", Some(prefix)),
        ("a short wrong token", Some("x")),
        ("an empty token", Some("")),
        ("no Authorization header", None),
    ] {
        for path in ["/v1/health", "/v1/queue", "/metrics", "/v1/nothing-here"] {
            let r = http(api, "GET", path, token, None, b"").await;
            let e = json_error(&r, 401, &format!("{what} on {path}"));
            assert_eq!(e, "missing or wrong bearer token");
        }
        // The right token forgets this client's wrong ones, which would otherwise reach the
        // limit (5 per minute, then 429: tests/console_limits.rs).
        let r = http(api, "GET", "/v1/health", Some(TOKEN), None, b"").await;
        assert_eq!(r.0, 200);
    }
    // A wrong token changes nothing.
    let r = http(api, "POST", "/v1/drain?on=true", Some(&same_len), None, b"").await;
    json_error(&r, 401, "drain with a wrong token");
    assert!(!h.relay.control.draining());
    // The right token, with the scheme in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
            let req = format!(
                "GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {scheme} {TOKEN}\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{scheme}: {out}");
    }
}
