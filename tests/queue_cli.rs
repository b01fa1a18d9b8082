//! Queue control through the CLI against the real binary: list with filters, show, hold
//! (kept across a restart), release, delete, flush by route and retry-now.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{received_id, Sink, SinkMode, SinkOptions};
use common::bin::{cli, spawn, wait_queue_empty, with_sinks, Setup};
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

async fn send(addr: SocketAddr, rcpts: &[&str], subject: &str) -> String {
    let r = send_one(addr, rcpts, subject).await;
    assert_eq!(r.code, 250, "{r:?}");
    queue_id(&r)
}

/// Polls `coexist queue list ARGS` until its output contains `want`.
fn wait_listing(config: &std::path::Path, args: &[&str], want: &str) -> String {
    let mut a = vec!["queue", "list"];
    a.extend_from_slice(args);
    eventually_blocking(&format!("{want:?} in `queue list`"), || {
        let (ok, out, err) = cli(config, &a);
        assert!(ok, "{err}");
        if out.contains(want) {
            Ok(out)
        } else {
            Err(out)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_hold_release_delete_flush() {
    let Setup {
        onprem: _onprem,
        cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    cloud.state.set_mode(SinkMode::Defer);
    // Long backoff: only the admin's commands make retries happen during the test.
    cfg.config.queue.min_backoff = Duration::from_secs(3600);
    cfg.config.queue.max_backoff = Duration::from_secs(7200);
    cfg.write();
    let mut server = spawn(&mut cfg);

    let a = send(cfg.listen(), &["bob@nhs.test", "alice@nhs.test"], "a").await;
    let b = send(cfg.listen(), &["carol@nhs.test"], "b").await;
    let out = wait_listing(&cfg.path, &["--state", "deferred"], "2 message(s)");
    assert!(out.contains(&a) && out.contains(&b), "{out}");
    assert!(
        out.contains("bob@nhs.test") && out.contains("route cloud"),
        "{out}"
    );
    assert!(
        out.contains("451 4.3.0 Sink: deferring on request"),
        "{out}"
    );
    assert!(
        !out.contains("alice@nhs.test"),
        "delivered recipients are not listed: {out}"
    );
    let (_, out, _) = cli(&cfg.path, &["queue", "list", "--route", "onprem"]);
    assert!(out.starts_with("0 message(s)"), "{out}");
    let (_, out, _) = cli(&cfg.path, &["queue", "list", "--rcpt", "CAROL"]);
    assert!(out.starts_with("1 message(s)") && out.contains(&b), "{out}");
    let (ok, out, _) = cli(&cfg.path, &["queue", "show", &a, "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["recipients"][1]["status"], "delivered");
    assert_eq!(v["recipients"][0]["route"], "cloud");

    // Hold a, and it stays held across a restart.
    assert!(cli(&cfg.path, &["queue", "hold", &a]).0);
    wait_listing(&cfg.path, &["--state", "held"], &a);
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    let _server = spawn(&mut cfg);
    let out = wait_listing(&cfg.path, &["--state", "held"], &a);
    assert!(out.starts_with("1 message(s)"), "{out}");

    // Delete b: gone from the queue and the spool (a restart does not bring it back), never
    // delivered.
    assert!(cli(&cfg.path, &["queue", "delete", &b]).0);
    eventually(&format!("{b} to leave the queue"), || {
        cli(&cfg.path, &["queue", "show", &b]).1.is_empty()
    })
    .await;
    drop(_server);
    let _server = spawn(&mut cfg);
    wait_listing(&cfg.path, &["--state", "held"], &a);
    let (_, out, _) = cli(&cfg.path, &["queue", "show", &b]);
    assert!(out.is_empty(), "{out}");

    // The cloud comes back. A held message is not sent by a flush (the relay's answer says it
    // woke none, and the message is still there, held); released, it goes at once.
    cloud.state.set_mode(SinkMode::Accept);
    let (ok, out, _) = cli(&cfg.path, &["queue", "flush", "--route", "cloud"]);
    assert!(ok && out.contains("flushed 0"), "{out}");
    let out = wait_listing(&cfg.path, &["--state", "held"], &a);
    assert!(out.starts_with("1 message(s)"), "{out}");
    // (By queue id: a sink may still answer a transaction the relay gave up on, such as
    // b's attempt that timed out on a busy machine.)
    assert_eq!(went_out(&cloud, &a), 0, "a held message was sent");
    assert!(cli(&cfg.path, &["queue", "release", &a]).0);
    eventually("a to arrive", || went_out(&cloud, &a) == 1).await;
    let sent = cloud.state.messages();
    let m = sent
        .iter()
        .find(|m| received_id(&m.body).as_deref() == Some(a.as_str()))
        .unwrap();
    assert_eq!(m.rcpts[0].to_string(), "bob@nhs.test");

    // retry-now flushes every deferred message.
    cloud.state.set_mode(SinkMode::Defer);
    let c = send(cfg.listen(), &["bob@nhs.test"], "c").await;
    wait_listing(&cfg.path, &["--state", "deferred"], &c);
    cloud.state.set_mode(SinkMode::Accept);
    let (ok, out, _) = cli(&cfg.path, &["queue", "retry-now"]);
    assert!(ok && out.contains("flushed 1"), "{out}");
    eventually("c to arrive", || went_out(&cloud, &c) == 1).await;
    wait_queue_empty(&cfg);
    // Each message went out once: a (released) and c (retried now).
    assert_eq!((went_out(&cloud, &a), went_out(&cloud, &c)), (1, 1));
}

/// How many times `sink` took message `id` (by the queue id in its Received header).
fn went_out(sink: &Sink, id: &str) -> usize {
    sink.state
        .messages()
        .iter()
        .filter(|m| received_id(&m.body).as_deref() == Some(id))
        .count()
}
