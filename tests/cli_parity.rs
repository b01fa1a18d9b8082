//! The CLI says what the server knows, and `check-config` refuses what `serve` refuses.
//!
//! - The text the CLI prints for `queue list`, `queue show`, `status` and `directory lookup`
//!   carries every value of the server's answer that it renders, field by field (taken from
//!   the answer through the API's own types): a field the server names differently from what
//!   the CLI reads would show up here as a missing or empty column, not as a silent `null`.
//! - A config with a problem that only `serve` used to find (a spool or store folder that
//!   cannot be created, a missing client key of a route, a missing directory file) is refused
//!   by `check-config` with the very words `serve` stops with.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::AdminClient;
use coexist::admin::types::{Explain, MessageView, Ready};
use coexist::load::sink::{SinkMode, SinkOptions};
use common::bin::{cli, serve_exit, spawn, with_sinks, write_config, Setup, NOWHERE};
use common::*;
use std::net::SocketAddr;
use std::path::Path;

/// The server's own answer to GET `path`, through the API's type.
fn server_has<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> T {
    let raw = AdminClient::new(admin, TOKEN.into()).get(path).unwrap();
    serde_json::from_value(raw).unwrap()
}

/// Runs the CLI; its stdout, after asserting success.
fn cli_ok(config: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(config, args);
    assert!(ok, "coexist {args:?}: {err}");
    out
}

/// Checks the text of one message (as `queue list` and `queue show` print it) against the
/// server's view of it.
fn assert_message_text(text: &str, m: &MessageView) {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(head.len(), 5, "head line: {text}");
    assert_eq!(head[0], m.id, "id: {text}");
    assert_eq!(head[2], m.size.to_string(), "size: {text}");
    assert_eq!(head[3], m.phase, "phase: {text}");
    assert_eq!(head[4], format!("<{}>", m.from), "sender: {text}");
    let body: Vec<&str> = lines.collect();
    let pending: Vec<_> = m
        .recipients
        .iter()
        .filter(|r| r.status != "delivered")
        .collect();
    assert!(!pending.is_empty(), "the test needs a pending recipient");
    for r in pending {
        let line = body
            .iter()
            .find(|l| l.split_whitespace().next() == Some(r.address.as_str()))
            .unwrap_or_else(|| panic!("{} not listed: {text}", r.address));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], r.status, "status: {text}");
        assert_eq!(
            cols[2..4],
            ["route", r.route.as_deref().unwrap_or("-")],
            "{text}"
        );
        if r.status == "deferred" {
            assert!(m.next_attempt_in_s.is_some(), "{m:?}");
            assert_eq!(cols[4..6], ["next", "in"], "next attempt: {text}");
        }
        let reply = r
            .last_reply
            .as_deref()
            .expect("a deferred recipient has a reply");
        assert!(text.contains(&format!("({reply})")), "last reply: {text}");
    }
    for r in m.recipients.iter().filter(|r| r.status == "delivered") {
        assert!(
            !text.contains(&r.address),
            "delivered recipients are not listed: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_text_carries_every_value_the_server_has() {
    let Setup {
        onprem: _onprem,
        cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    cloud.state.set_mode(SinkMode::Defer);
    let _server = spawn(&mut cfg);

    let r = send_one(cfg.listen(), &["bob@nhs.test", "alice@nhs.test"], "typed").await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = queue_id(&r);
    // Wait for the first attempt: alice delivered, bob deferred with the sink's reply.
    let m: MessageView = eventually_blocking("the message deferred", || {
        let m: MessageView = server_has(cfg.admin(), &format!("/v1/queue/{id}"));
        if m.phase == "deferred" {
            Ok(m)
        } else {
            Err(format!("{m:?}"))
        }
    });

    // queue show and queue list: every rendered field, from the server's typed answer.
    let out = cli_ok(&cfg.path, &["queue", "show", &id]);
    assert_message_text(&out, &m);
    let out = cli_ok(&cfg.path, &["queue", "list"]);
    let (count, listing) = out.split_once('\n').unwrap();
    assert_eq!(count, "1 message(s)", "{out}");
    assert_message_text(listing, &m);
    // --json is the API's type again, with the same content.
    let out = cli_ok(&cfg.path, &["queue", "list", "--json"]);
    let listed: Vec<MessageView> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(
        (
            &listed[0].id,
            &listed[0].phase,
            &listed[0].from,
            listed[0].size
        ),
        (&m.id, &m.phase, &m.from, m.size)
    );
    assert_eq!(
        serde_json::to_value(&listed[0].recipients).unwrap(),
        serde_json::to_value(&m.recipients).unwrap()
    );

    // status: the first line is the server's readiness, value by value.
    let ready: Ready = server_has(cfg.admin(), "/v1/ready");
    let out = cli_ok(&cfg.path, &["status"]);
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "ready: {}; draining: {}; SMTP sessions open: {}; directory entries: {}",
            ready.ready, ready.draining, ready.sessions_open, ready.directory_entries
        ),
        "{out}"
    );
    assert_eq!(ready.directory_entries, 4);
    let out = cli_ok(&cfg.path, &["status", "--json"]);
    assert_eq!(serde_json::from_str::<Ready>(&out).unwrap(), ready);

    // directory lookup: mailbox, state, origin, verdict, route, next hops, TLS.
    for address in ["bob@nhs.test", "nobody@elsewhere.test"] {
        let e: Explain = server_has(
            cfg.admin(),
            &format!("/v1/directory/lookup?address={address}"),
        );
        let out = cli_ok(&cfg.path, &["directory", "lookup", address]);
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let hops = if e.next_hops.is_empty() {
            "-".to_string()
        } else {
            e.next_hops.join(", ")
        };
        for want in [
            e.lookup.address.clone(),
            format!("  mailbox {}", dash(&e.lookup.mailbox)),
            format!(
                "  state   {} (from {})",
                dash(&e.lookup.state),
                e.lookup.origin
            ),
            format!("  rcpt    {}", e.rcpt),
            format!(
                "  route   {} -> {hops} (tls {})",
                dash(&e.lookup.route),
                dash(&e.tls)
            ),
        ] {
            assert!(out.lines().any(|l| l == want), "want {want:?} in:\n{out}");
        }
        let out = cli_ok(&cfg.path, &["directory", "lookup", address, "--json"]);
        assert_eq!(serde_json::from_str::<Explain>(&out).unwrap(), e);
    }
    let bob: Explain = server_has(cfg.admin(), "/v1/directory/lookup?address=bob@nhs.test");
    assert_eq!(
        (bob.lookup.state.as_deref(), bob.next_hops.clone()),
        (Some("cloud"), vec![cloud.addr.to_string()])
    );
}

/// The error a command stops with: stderr from `Error: ` on, without log lines before it
/// or a backtrace after it (`RUST_BACKTRACE` may be set).
fn refusal(stderr: &str) -> String {
    let Some(i) = stderr.find("Error: ") else {
        return String::new();
    };
    let e = &stderr[i..];
    e[..e.find("\n\nStack backtrace:").unwrap_or(e.len())]
        .trim_end()
        .to_string()
}

/// Runs `coexist serve` on `config`: (exited on its own with failure, error).
fn serve_refusal(config: &Path) -> (bool, String) {
    let exit = serve_exit(config, None, "off");
    (exit.exited && !exit.success, refusal(&exit.stderr))
}

/// `config` with `table.key` set to `value`.
fn set(config: &Path, table: &str, key: &str, value: toml::Value) {
    let mut doc: toml::Table = std::fs::read_to_string(config).unwrap().parse().unwrap();
    let mut t = &mut doc;
    for part in table.split('.') {
        t = t.get_mut(part).unwrap().as_table_mut().unwrap();
    }
    t.insert(key.to_string(), value);
    std::fs::write(config, toml::to_string(&doc).unwrap()).unwrap();
}

#[test]
fn check_config_refuses_what_serve_refuses_in_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // A plain file where a folder would have to be created.
    std::fs::write(dir.path().join("plain"), "not a folder\n").unwrap();
    let cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let original = std::fs::read_to_string(&cfg.path).unwrap();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");

    let cert = std::fs::read_to_string(&cfg.path)
        .unwrap()
        .parse::<toml::Table>()
        .unwrap()["tls"]["cert"]
        .clone();
    // (what is wrong, how to break the config that way, a word the refusal names)
    type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "spool folder under a file",
            Box::new(|c| set(c, "spool", "dir", path("plain/spool").into())),
            "spool: ",
        ),
        (
            "directory store under a file",
            Box::new(|c| set(c, "directory", "store_dir", path("plain/store").into())),
            "directory: ",
        ),
        (
            "route client key missing",
            Box::new(|c| {
                set(c, "routes.cloud", "client_cert", cert.clone());
                set(c, "routes.cloud", "client_key", path("missing.key").into());
            }),
            "missing.key",
        ),
        (
            "directory file missing",
            // With a fresh store: over a snapshot from an earlier start, serve keeps the
            // directory it had and only logs the missing file (as a live reload does).
            Box::new(|c| {
                set(c, "directory", "file", path("missing.csv").into());
                set(c, "directory", "store_dir", path("fresh-store").into());
            }),
            "missing.csv",
        ),
    ];
    for (what, break_it, names) in cases {
        std::fs::write(&cfg.path, &original).unwrap();
        break_it(&cfg.path);
        let (refused, serve_says) = serve_refusal(&cfg.path);
        assert!(refused, "{what}: serve started or died without an error");
        assert!(serve_says.contains(names), "{what}: {serve_says}");
        let (ok, out, err) = cli(&cfg.path, &["check-config"]);
        assert!(!ok, "{what}: check-config passed it: {out}");
        assert_eq!(
            refusal(&err),
            serve_says,
            "{what}: check-config and serve differ"
        );
    }
    assert!(
        !dir.path().join("missing.key").exists()
            && std::fs::metadata(dir.path().join("plain"))
                .unwrap()
                .is_file(),
        "nothing created"
    );
}
