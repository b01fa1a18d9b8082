//! "Where did mail for this address go": the record of recent outcomes through the admin API
//! (`GET /v1/trace`) and `coexist trace`, against the real binary. Mail for alice goes on
//! premises by the directory file, then to the cloud after a batch moves her, then is
//! refused by the cloud's next hop; each outcome shows its route, next hop, reply and the
//! origin of the routing decision.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, Target};
use coexist::admin::types::{Outcome, TraceEntry, TraceReply};
use coexist::load::sink::{SinkMode, SinkOptions};
use common::bin::{cli, with_sinks, Setup};
use common::*;
use std::net::SocketAddr;

/// The node's trace of `address` (default look-back), through the typed client.
async fn trace_api(admin: SocketAddr, address: &str) -> TraceReply {
    let address = address.to_string();
    tokio::task::spawn_blocking(move || {
        AdminClient::new(admin, TOKEN.into())
            .trace(&address, None)
            .unwrap()
    })
    .await
    .unwrap()
}

/// Waits until the trace of `address` shows `outcome` for message `qid`; returns that entry.
async fn wait_outcome(admin: SocketAddr, address: &str, qid: &str, outcome: Outcome) -> TraceEntry {
    eventually_async(&format!("{qid} {outcome} in the trace"), || async move {
        let t = trace_api(admin, address).await;
        t.entries
            .iter()
            .find(|e| e.queue_id == qid && e.outcome == outcome)
            .cloned()
            .ok_or_else(|| format!("{:?}", t.entries))
    })
    .await
}

async fn send(addr: SocketAddr, rcpts: &[&str], subject: &str) -> String {
    let r = send_one(addr, rcpts, subject).await;
    assert_eq!(r.code, 250, "{r:?}");
    queue_id(&r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_each_delivery_with_its_route_next_hop_reply_and_origin() {
    let Setup {
        onprem,
        cloud,
        cfg: mut bin,
        dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let _server = common::bin::spawn(&mut bin);
    let (smtp, admin, config) = (bin.listen(), bin.admin(), bin.path.clone());

    // 1. By the directory file, alice is on premises.
    let first = send(smtp, &["alice@nhs.test"], "first").await;
    let e = wait_outcome(admin, "alice@nhs.test", &first, Outcome::Delivered).await;
    assert_eq!(e.route.as_deref(), Some("onprem"));
    assert_eq!(e.next_hop, Some(onprem.addr.to_string()));
    let file = bin
        .config
        .directory
        .file
        .as_ref()
        .unwrap()
        .display()
        .to_string();
    assert_eq!(e.origin, format!("file {file}"));
    assert_eq!(e.recipient, "alice@nhs.test");
    assert_eq!(e.sent_as, None);
    let reply = e.reply.unwrap();
    assert_eq!(
        (reply.code, reply.status.as_deref()),
        (Some(250), Some("2.0.0"))
    );

    // 2. A batch moves her to the cloud.
    let batch = dir.path().join("evening.csv");
    std::fs::write(&batch, "EmailAddress\nalice@nhs.test\n").unwrap();
    let (ok, out, err) = cli(
        &config,
        &[
            "directory",
            "apply",
            batch.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("applied: id 1"), "{out}");
    let second = send(smtp, &["alice@nhs.test"], "second").await;
    let e = wait_outcome(admin, "Alice@NHS.test", &second, Outcome::Delivered).await;
    assert_eq!(e.route.as_deref(), Some("cloud"));
    assert_eq!(e.next_hop, Some(cloud.addr.to_string()));
    assert_eq!(e.origin, "batch 1");

    // 3. The cloud's next hop refuses the next message: bounced, with its reply.
    cloud.state.set_mode(SinkMode::Reject);
    let third = send(smtp, &["alice@nhs.test"], "third").await;
    let e = wait_outcome(admin, "alice@nhs.test", &third, Outcome::Bounced).await;
    assert_eq!(e.route.as_deref(), Some("cloud"));
    assert_eq!(e.next_hop, Some(cloud.addr.to_string()));
    assert_eq!(e.origin, "batch 1");
    let reply = e.reply.unwrap();
    assert_eq!(
        (reply.code, reply.status.as_deref(), reply.text.as_str()),
        (Some(554), Some("5.6.0"), "Sink: rejecting on request")
    );

    // 4. It defers the next one; an admin deletes it.
    cloud.state.set_mode(SinkMode::Defer);
    let fourth = send(smtp, &["alice@nhs.test"], "fourth").await;
    let e = wait_outcome(admin, "alice@nhs.test", &fourth, Outcome::Deferred).await;
    let reply = e.reply.unwrap();
    assert_eq!(
        (reply.code, reply.status.as_deref()),
        (Some(451), Some("4.3.0"))
    );
    let (ok, _, err) = cli(&config, &["queue", "delete", &fourth]);
    assert!(ok, "{err}");
    let e = wait_outcome(admin, "alice@nhs.test", &fourth, Outcome::Deleted).await;
    assert_eq!((e.route, e.reply), (None, None));
    assert_eq!(e.origin, "batch 1");

    // The whole answer: this node, newest first, only alice.
    let t = trace_api(admin, "alice@nhs.test").await;
    assert_eq!(t.node, bin.config.server.hostname);
    assert!(t.entries.windows(2).all(|w| w[0].time >= w[1].time));
    assert!(t.entries.iter().all(|e| e.recipient == "alice@nhs.test"));
    let pos = |qid: &str| t.entries.iter().position(|e| e.queue_id == qid).unwrap();
    assert!(pos(&fourth) < pos(&third) && pos(&third) < pos(&second) && pos(&second) < pos(&first));
    assert!(trace_api(admin, "bob@nhs.test").await.entries.is_empty());

    // The same through the binary: one line per outcome, oldest first.
    let (ok, out, err) = cli(&config, &["trace", "ALICE@nhs.test", "--since", "1h"]);
    assert!(ok, "{err}");
    let line = |qid: &str, outcome: &str| {
        out.lines()
            .position(|l| l.contains(&format!(" {qid} {outcome} ")))
            .unwrap_or_else(|| panic!("no {outcome} line for {qid} in:\n{out}"))
    };
    let node = &bin.config.server.hostname;
    let l1 = out.lines().nth(line(&first, "delivered")).unwrap();
    assert!(
        l1.contains(&format!(
            "{node} {first} delivered rcpt=alice@nhs.test route=onprem hop={} origin={:?} reply=\"250 2.0.0 ",
            onprem.addr,
            format!("file {file}")
        )),
        "{l1}"
    );
    let l2 = out.lines().nth(line(&second, "delivered")).unwrap();
    assert!(
        l2.contains(&format!(
            "{node} {second} delivered rcpt=alice@nhs.test route=cloud hop={} origin=\"batch 1\" reply=\"250 2.0.0 ",
            cloud.addr
        )),
        "{l2}"
    );
    let l3 = out.lines().nth(line(&third, "bounced")).unwrap();
    assert!(
        l3.ends_with(&format!(
            "{third} bounced rcpt=alice@nhs.test route=cloud hop={} origin=\"batch 1\" reply=\"554 5.6.0 Sink: rejecting on request\"",
            cloud.addr
        )),
        "{l3}"
    );
    assert!(line(&first, "delivered") < line(&second, "delivered"));
    assert!(line(&second, "delivered") < line(&third, "bounced"));
    assert!(line(&third, "bounced") < line(&fourth, "deleted"));
    let t0 = l1.split(' ').next().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(t0).is_ok(),
        "time is RFC 3339: {l1}"
    );

    // --json prints each node's answer, as the API gives it.
    let (ok, out, err) = cli(&config, &["trace", "alice@nhs.test", "--json"]);
    assert!(ok, "{err}");
    let answers: Vec<TraceReply> = serde_json::from_str(&out).unwrap();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].entries.len(), t.entries.len());

    // Nothing for someone else.
    let (ok, out, err) = cli(&config, &["trace", "bob@nhs.test"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "nothing for address bob@nhs.test in the last 12h on 1 of 1 node(s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_be_asked_is_named_and_the_others_still_answer() {
    let Setup {
        onprem: _onprem,
        cloud: _cloud,
        cfg: mut bin,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let down = DownPort::new();
    {
        let _server = common::bin::spawn(&mut bin);
        let admin = bin.admin();
        let nodes = [Target::http(down.addr), Target::http(admin)];
        let answers = tokio::task::spawn_blocking(move || {
            let ask = coexist::admin::client::TraceAsk {
                field: coexist::admin::client::TraceField::Address,
                value: "alice@nhs.test".into(),
                since: Some(3600),
                until: None,
            };
            coexist::cli::trace::ask_nodes(&nodes, TOKEN, None, &ask)
        })
        .await
        .unwrap();
        assert_eq!(answers.len(), 2);
        let (t, first) = &answers[0];
        assert_eq!(t.addr, down.addr);
        let e = first.as_ref().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot reach the admin API at {}", down.addr)),
            "{e}"
        );
        let (t, second) = &answers[1];
        assert_eq!(t.addr, admin);
        assert_eq!(second.as_ref().unwrap().node, bin.config.server.hostname);
    }

    // With no node answering (the server is gone), the command fails and says why.
    let (ok, _, err) = cli(&bin.path, &["trace", "alice@nhs.test"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("node {}: cannot reach", bin.admin())),
        "{err}"
    );
    assert!(err.contains("no node answered (asked 1)"), "{err}");
}
