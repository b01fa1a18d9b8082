//! The message tracking log against the real binary: every event of a message that is
//! deferred, held, released and delivered, and of one that bounces, found by queue id,
//! recipient, sender and Message-ID after a restart; a torn tail after kill -9 is cut and
//! nothing else lost; files past `tracking.max_age` are deleted.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, TraceAsk, TraceField};
use coexist::admin::types::{TraceReply, TrackKind};
use coexist::load::sink::{SinkMode, SinkOptions};
use common::bin::{cli, spawn_with, with_sinks, Start};
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

/// This node's answer to a trace question (the last hour).
async fn ask(admin: SocketAddr, field: TraceField, value: &str) -> TraceReply {
    let ask = TraceAsk {
        field,
        value: value.to_string(),
        since: Some(3600),
        until: None,
    };
    tokio::task::spawn_blocking(move || {
        AdminClient::new(admin, TOKEN.into())
            .trace_by(&ask)
            .unwrap()
    })
    .await
    .unwrap()
}

/// The kinds of the events of message `qid`, oldest first.
async fn kinds(admin: SocketAddr, qid: &str) -> Vec<TrackKind> {
    ask(admin, TraceField::QueueId, qid)
        .await
        .events
        .iter()
        .map(|e| e.kind)
        .collect()
}

/// Waits until message `qid` has an event of `kind`.
async fn wait_kind(admin: SocketAddr, qid: &str, kind: TrackKind) {
    eventually_async(&format!("{qid} {kind} in the log"), || async move {
        let k = kinds(admin, qid).await;
        if k.contains(&kind) {
            Ok(())
        } else {
            Err(format!("{k:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_message_is_logged_searchable_by_each_key_and_survives_a_restart() {
    let s = with_sinks(SinkOptions::default(), |_| {}).await;
    let mut bin = s.cfg;
    let (smtp, admin, config) = (bin.listen(), bin.admin(), bin.path.clone());
    let mut server = common::bin::spawn(&mut bin);

    // bob (cloud) is deferred, held, released, then delivered.
    s.cloud.state.set_mode(SinkMode::Defer);
    let r = send_one(smtp, &["bob@nhs.test"], "first").await;
    assert_eq!(r.code, 250, "{r:?}");
    let first = queue_id(&r);
    wait_kind(admin, &first, TrackKind::Deferred).await;
    for what in ["hold", "release"] {
        let (ok, _, err) = cli(&config, &["queue", what, &first]);
        assert!(ok, "{err}");
    }
    s.cloud.state.set_mode(SinkMode::Accept);
    let (ok, _, err) = cli(&config, &["queue", "flush"]);
    assert!(ok, "{err}");
    wait_kind(admin, &first, TrackKind::Delivered).await;

    // alice (on premises) is refused: bounced, and a DSN goes to the sender.
    s.onprem.state.set_mode(SinkMode::Reject);
    let r = send_one(smtp, &["alice@nhs.test"], "second").await;
    assert_eq!(r.code, 250, "{r:?}");
    let second = queue_id(&r);
    wait_kind(admin, &second, TrackKind::Dsn).await;

    // A restart: the log is read back.
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(30)));
    let _server = common::bin::spawn(&mut bin);

    use TrackKind::*;
    let k = kinds(admin, &first).await;
    assert_eq!(k[..2], [Received, Routed], "{k:?}");
    let pos = |k: &[TrackKind], x: TrackKind| {
        k.iter()
            .position(|y| *y == x)
            .unwrap_or_else(|| panic!("no {x} in {k:?}"))
    };
    assert!(pos(&k, Deferred) < pos(&k, Held));
    assert!(pos(&k, Held) < pos(&k, Released));
    assert!(pos(&k, Released) < pos(&k, Delivered));
    let k = kinds(admin, &second).await;
    assert_eq!(k, [Received, Routed, Bounced, Dsn], "{k:?}");

    // The details of each kind.
    let t = ask(admin, TraceField::QueueId, &first).await;
    assert_eq!(t.source, "log");
    let rec = &t.events[0];
    assert_eq!(rec.sender.as_deref(), Some("x@example.org"));
    assert_eq!(rec.recipients, ["bob@nhs.test"]);
    assert_eq!(rec.message_id.as_deref(), Some("first@example.org"));
    assert!(rec.size.unwrap() > 0 && rec.client.as_deref().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(
        rec.node.as_deref(),
        Some(bin.config.server.hostname.as_str())
    );
    let routed = &t.events[1];
    assert_eq!(
        (
            routed.rcpt.as_deref(),
            routed.state.as_deref(),
            routed.route.as_deref()
        ),
        (Some("bob@nhs.test"), Some("cloud"), Some("cloud"))
    );
    assert!(
        routed.origin.as_deref().unwrap().starts_with("file "),
        "{routed:?}"
    );
    let deferred = t.events.iter().find(|e| e.kind == Deferred).unwrap();
    assert_eq!(deferred.next_hop, Some(s.cloud.addr.to_string()));
    assert_eq!(deferred.reply.as_ref().unwrap().code, Some(451));
    assert_eq!(
        deferred.tls.as_deref(),
        Some("none"),
        "the sink offers no STARTTLS"
    );
    let t = ask(admin, TraceField::QueueId, &second).await;
    let bounced = t.events.iter().find(|e| e.kind == Bounced).unwrap();
    let reply = bounced.reply.as_ref().unwrap();
    assert_eq!(
        (reply.code, reply.status.as_deref(), reply.text.as_str()),
        (Some(554), Some("5.6.0"), "Sink: rejecting on request")
    );
    let dsn = t.events.iter().find(|e| e.kind == Dsn).unwrap();
    assert!(
        dsn.related.as_ref().is_some_and(|d| d != &second),
        "{dsn:?}"
    );

    // Search by each key, any case.
    let by_rcpt = ask(admin, TraceField::Address, "BOB@nhs.test").await;
    assert!(
        by_rcpt.events.iter().all(|e| e.queue_id == first),
        "{:?}",
        by_rcpt.events
    );
    assert!(by_rcpt
        .entries
        .iter()
        .any(|e| e.queue_id == first && e.outcome.as_str() == "delivered"));
    let by_sender = ask(admin, TraceField::Sender, "X@Example.org").await;
    for q in [&first, &second] {
        assert!(by_sender
            .events
            .iter()
            .any(|e| &e.queue_id == q && e.kind == Received));
    }
    let by_mid = ask(admin, TraceField::MessageId, "<SECOND@example.org>").await;
    let k: Vec<_> = by_mid.events.iter().map(|e| e.kind).collect();
    assert_eq!(k, [Received, Routed, Bounced, Dsn]);

    // The command line: one line per event, with the flags.
    let (ok, out, err) = cli(
        &config,
        &[
            "trace",
            "--message-id",
            "first@example.org",
            "--since",
            "1h",
        ],
    );
    assert!(ok, "{err}");
    let node = &bin.config.server.hostname;
    assert!(
        out.lines().next().unwrap().contains(&format!(
            "{node} {first} received from=x@example.org to=bob@nhs.test size="
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{first} held")) && out.contains(&format!("{first} released")),
        "{out}"
    );
    let (ok, out, err) = cli(
        &config,
        &[
            "trace",
            "--sender",
            "x@example.org",
            "--until",
            "0s",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let answers: Vec<TraceReply> = serde_json::from_str(&out).unwrap();
    assert_eq!(answers[0].events.len(), by_sender.events.len());
    let (ok, out, _) = cli(&config, &["trace", "--since", "1h"]);
    assert!(!ok, "a key is needed: {out}");
    let (ok, _, err) = cli(
        &config,
        &["trace", "--sender", "x@example.org", "--since", "yesterday"],
    );
    assert!(!ok && err.contains("--since \"yesterday\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_after_kill_9_is_cut_and_every_earlier_event_kept() {
    let s = with_sinks(SinkOptions::default(), |_| {}).await;
    let mut bin = s.cfg;
    let (smtp, admin) = (bin.listen(), bin.admin());
    let tracking = bin.config.tracking_dir();
    let log = s.dir.path().join("serve.log");
    let mut server = spawn_with(
        &mut bin,
        Start {
            log: Some(&log),
            ..Start::default()
        },
    );
    let r = send_one(smtp, &["alice@nhs.test"], "torn").await;
    let qid = queue_id(&r);
    wait_kind(admin, &qid, TrackKind::Delivered).await;
    server.kill_9();
    // The file that was open, with half a record at its end (a write cut by a crash).
    let open = std::fs::read_dir(&tracking)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap();
    assert!(!open.with_extension("idx").exists(), "killed: not sealed");
    let rec = coexist::tracking::files::FORMAT
        .frame(br#"{"time_ms":1,"kind":"received","queue_id":"Q"}"#);
    let mut bytes = std::fs::read(&open).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(&rec[..rec.len() - 3]);
    std::fs::write(&open, &bytes).unwrap();

    let _server = spawn_with(
        &mut bin,
        Start {
            log: Some(&log),
            ..Start::default()
        },
    );
    let k = kinds(admin, &qid).await;
    assert_eq!(
        k,
        [TrackKind::Received, TrackKind::Routed, TrackKind::Delivered]
    );
    assert_eq!(std::fs::metadata(&open).unwrap().len() as usize, whole);
    assert!(open.with_extension("idx").exists(), "indexed at the start");
    assert_eq!(
        std::fs::read_dir(tracking.join("damaged")).unwrap().count(),
        1
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("tracking log: damaged bytes skipped"),
        "{text}"
    );
    // And it goes on.
    let r = send_one(smtp, &["alice@nhs.test"], "after").await;
    wait_kind(admin, &queue_id(&r), TrackKind::Delivered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_past_max_age_are_deleted() {
    use coexist::tracking::{files, Event, Kind};
    let s = with_sinks(SinkOptions::default(), |c| {
        c.tracking.max_age = Duration::from_secs(7 * 86_400);
    })
    .await;
    let mut bin = s.cfg;
    let _keep = (s.dir, s.onprem, s.cloud);
    let tracking = bin.config.tracking_dir();
    std::fs::create_dir_all(&tracking).unwrap();
    let day = 86_400_000;
    let now = coexist::clock::now_ms();
    let mut paths = Vec::new();
    for age in [8 * day, 2 * day] {
        let path = files::log_path(&tracking, now - age);
        let mut e = Event::new(now - age, Kind::Received, "OLD");
        e.recipients = vec!["alice@nhs.test".into()];
        let mut bytes = files::FORMAT.magic.to_vec();
        bytes.extend_from_slice(&files::FORMAT.frame(&serde_json::to_vec(&e).unwrap()));
        std::fs::write(&path, &bytes).unwrap();
        let mut b = files::IndexBuilder::default();
        b.add(&e, 8);
        b.write(&path).unwrap();
        paths.push(path);
    }
    let _server = common::bin::spawn(&mut bin);
    assert!(!paths[0].exists() && !paths[0].with_extension("idx").exists());
    assert!(paths[1].exists());
    let t = ask(bin.admin(), TraceField::QueueId, "OLD").await;
    assert!(t.events.is_empty(), "older than the hour asked");
    let ask3 = TraceAsk {
        field: TraceField::Address,
        value: "alice@nhs.test".into(),
        since: Some(3 * 86_400),
        until: None,
    };
    let admin = bin.admin();
    let t = tokio::task::spawn_blocking(move || {
        AdminClient::new(admin, TOKEN.into())
            .trace_by(&ask3)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(t.events.len(), 1, "the file of 2 days ago is kept and read");
}
