//! Delivering the way Exchange Online and on-premises Exchange expect during a migration
//! (issue 15), against sinks that behave like them: a recipient limit per transaction, a
//! size limit per route, throttling replies (`451 4.7.500`), a `550 5.1.10` for a mailbox
//! the new side does not know yet, and a next hop that sends mail back.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{Sink, SinkMessage, SinkMode, SinkOptions};
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn dsns(msgs: &[SinkMessage]) -> Vec<SinkMessage> {
    msgs.iter().filter(|m| m.from.is_none()).cloned().collect()
}

/// The DSN's delivery-status part, folded lines joined.
fn dsn_status(dsn: &SinkMessage) -> String {
    let parsed = mailparse::parse_mail(&dsn.body).unwrap();
    String::from_utf8_lossy(&parsed.subparts[1].get_body_raw().unwrap())
        .replace("\r\n ", " ")
        .replace("\n ", " ")
}

async fn wait_dsn(sink: &Sink) -> SinkMessage {
    eventually("a DSN", || dsns(&sink.state.messages()).into_iter().next()).await
}

/// The relay's Prometheus text.
async fn metrics(h: &Harness) -> String {
    let (code, _, body) = http(
        h.relay.admin_addr.unwrap(),
        "GET",
        "/metrics",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the metric line that starts with `series` (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A message of about `n` bytes.
fn sized(subject: &str, n: usize) -> Vec<u8> {
    let mut m =
        format!("From: x@example.org\r\nTo: y@nhs.test\r\nSubject: {subject}\r\n\r\n").into_bytes();
    while m.len() < n {
        m.extend_from_slice(
            b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
        );
    }
    m
}

/// Sends `body` from `x@example.org` to `rcpts` (each must be accepted); the final reply.
async fn send_body(addr: SocketAddr, mail: &str, rcpts: &[&str], body: &[u8]) -> Reply {
    let mut c = connect(addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect(mail, 250).await;
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.expect("DATA", 354).await;
    let mut data = Vec::new();
    coexist::deliver::dot_stuff(body, &mut data);
    c.send(&data).await;
    c.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_beyond_the_route_limit_go_in_further_transactions_at_once() {
    let h = harness(|c| {
        c.routes
            .get_mut("onprem")
            .unwrap()
            .max_recipients_per_transaction = Some(2);
        unknown_onprem(c);
    })
    .await;
    // Five recipients on premises (alice, dave and three the directory does not list, sent
    // on premises by `unknown_onprem`).
    let rcpts = [
        "alice@nhs.test",
        "dave@nhs.test",
        "u1@nhs.test",
        "u2@nhs.test",
        "u3@nhs.test",
    ];
    let r = send_one(h.addr, &rcpts, "five").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&h.onprem, 5).await, 5);
    h.settled().await;
    let sizes: Vec<usize> = h
        .onprem
        .state
        .messages()
        .iter()
        .map(|m| m.rcpts.len())
        .collect();
    assert_eq!(sizes, vec![2, 2, 1], "at most two per transaction");
    // All in the first attempt, on one connection: nothing waited for a retry.
    assert_eq!(h.onprem.state.sessions.load(Ordering::SeqCst), 1);
    let all: Vec<String> = h
        .onprem
        .state
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.iter().map(|a| a.to_string()))
        .collect();
    assert_eq!(all, rcpts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_cannot_take_the_size_is_refused_for_its_recipients_only() {
    let h = harness(|c| {
        c.routes.get_mut("cloud").unwrap().max_message_size = Some(4096);
    })
    .await;
    let big = sized("big", 10_000);

    // With SIZE=: 552 5.3.4 at RCPT for bob (cloud), alice (on premises) is accepted.
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect(
        &format!("MAIL FROM:<x@example.org> SIZE={}", big.len()),
        250,
    )
    .await;
    let r = c.cmd("RCPT TO:<bob@nhs.test>").await;
    assert_eq!((r.code, r.status()), (552, "5.3.4"), "{r:?}");
    assert!(r.text.contains("cloud") && r.text.contains("4096"), "{r:?}");
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut data = Vec::new();
    coexist::deliver::dot_stuff(&big, &mut data);
    c.send(&data).await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(wait(&h.onprem, 1).await, 1);

    // Without SIZE=, to bob only: refused at the end of data, nothing queued.
    let r = send_body(h.addr, "MAIL FROM:<x@example.org>", &["bob@nhs.test"], &big).await;
    assert_eq!((r.code, r.status()), (552, "5.3.4"), "{r:?}");

    // Without SIZE=, to bob and dave: accepted; dave gets it, bob fails at once with a DSN
    // (never sent to the cloud, where it would bounce).
    let r = send_body(
        h.addr,
        "MAIL FROM:<x@example.org>",
        &["bob@nhs.test", "dave@nhs.test"],
        &big,
    )
    .await;
    assert_eq!(r.code, 250, "{r:?}");
    let dsn = wait_dsn(&h.onprem).await;
    let status = dsn_status(&dsn);
    for want in [
        "Final-Recipient: rfc822; bob@nhs.test",
        "Status: 5.3.4",
        "larger than route cloud takes (4096 bytes at most)",
    ] {
        assert!(status.contains(want), "{want} missing:\n{status}");
    }
    h.settled().await;
    assert!(
        h.cloud.state.messages().is_empty(),
        "nothing too big was sent to the cloud"
    );
    let onprem: Vec<String> = h
        .onprem
        .state
        .messages()
        .iter()
        .filter(|m| m.from.is_some())
        .flat_map(|m| m.rcpts.iter().map(|a| a.to_string()))
        .collect();
    assert_eq!(onprem, ["alice@nhs.test", "dave@nhs.test"]);
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, "coexist_route_message_too_big_total{route=\"cloud\"}"),
        3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_pauses_the_next_hop_not_each_message() {
    let h = harness(|c| {
        let cloud = c.routes.get_mut("cloud").unwrap();
        cloud.throttle_pause = Duration::from_secs(3);
        // Retries of the messages' own would come much sooner than the pause.
        c.queue.min_backoff = Duration::from_millis(200);
    })
    .await;
    h.cloud.state.set_mode(SinkMode::Throttle);
    let r = send_one(h.addr, &["bob@nhs.test"], "first").await;
    let first = queue_id(&r);
    let e = h.deferred(&first).await;
    assert_eq!(h.cloud.state.throttled.load(Ordering::SeqCst), 1);
    let reply = e.state.rcpts[0].last_reply.as_ref().unwrap().to_string();
    assert!(reply.contains("451 4.7.500"), "{reply}");
    let resume = e.next_attempt.expect("deferred");

    // The hop is paused: later messages wait for the same moment without reaching it.
    let mut ids = Vec::new();
    for i in 0..4 {
        let r = send_one(h.addr, &["carol@nhs.test"], &format!("more{i}")).await;
        ids.push(queue_id(&r));
    }
    for id in &ids {
        let e = h.deferred(id).await;
        let reply = e.state.rcpts[0].last_reply.as_ref().unwrap().to_string();
        assert!(
            reply.contains("is throttled") && reply.contains("451 4.7.500"),
            "{reply}"
        );
        let at = e.next_attempt.expect("deferred");
        assert!(at.abs_diff(resume) <= 1, "{at} vs the hop's {resume}");
    }
    assert_eq!(
        h.cloud.state.throttled.load(Ordering::SeqCst),
        1,
        "nothing else reached the throttled hop"
    );

    // The hop's state, as `status` and `queue list` show it, and in the metrics.
    let (code, _, body) = http(
        h.relay.admin_addr.unwrap(),
        "GET",
        "/v1/ready",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(code, 200);
    let ready: coexist::admin::types::Ready = serde_json::from_str(&body).unwrap();
    let hop = h.cloud.addr.to_string();
    let text = coexist::cli::status::ready_text(&ready);
    assert!(
        text.contains(&format!(
            "next hop {hop}: throttled (10 of 20 transactions at once"
        )) && text.contains("on route cloud; last reply: 451 4.7.500 Server busy"),
        "{text}"
    );
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, &format!("coexist_hop_throttled{{next_hop=\"{hop}\"}}")),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!("coexist_hop_concurrency_limit{{next_hop=\"{hop}\"}}")
        ),
        10.0,
        "{m}"
    );
    assert!(m.contains("coexist_hop_throttle_replies_total{"), "{m}");
    // The console's overview shows the route's next hop as throttled, with why.
    let (code, _, body) = http(
        h.relay.admin_addr.unwrap(),
        "GET",
        "/v1/overview",
        Some(TOKEN),
        None,
        b"",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let o: coexist::admin::types::Overview = serde_json::from_str(&body).unwrap();
    let cloud = o
        .hops
        .iter()
        .find(|s| s.route.as_deref() == Some("cloud"))
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(
        (cloud.next_hop.as_str(), cloud.state),
        (
            hop.as_str(),
            coexist::deliver::hops::HopCondition::Throttled
        ),
        "{body}"
    );
    assert!(
        cloud.detail.contains("10 of 20 transactions at once")
            && cloud.detail.contains("451 4.7.500"),
        "{body}"
    );

    // The hop takes mail again: after the pause, every message goes, without any action.
    h.cloud.state.set_mode(SinkMode::Accept);
    assert_eq!(wait(&h.cloud, 5).await, 5);
    h.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_just_moved_mailbox_unknown_on_its_new_side_is_deferred_until_the_grace_ends() {
    let files = tempfile::tempdir().unwrap();
    let directory = files.path().join("directory.csv");
    std::fs::write(
        &directory,
        "address,state\nunsynced.jo@nhs.test,onprem\nunsynced.old@nhs.test,cloud\nalice@nhs.test,onprem\n",
    )
    .unwrap();
    let h = harness(|c| {
        c.directory.file = Some(directory.clone());
        c.directory.move_grace = Duration::from_secs(4);
    })
    .await;
    let admin = h.relay.admin_addr.unwrap();
    let (code, _, body) = http(
        admin,
        "POST",
        "/v1/directory/batches?source=weekend.csv",
        Some(TOKEN),
        Some("text/csv"),
        b"address,state\nunsynced.jo@nhs.test,cloud\n",
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // Exchange Online does not know jo yet (5.1.10): deferred, not bounced.
    let r = send_one(h.addr, &["unsynced.jo@nhs.test"], "just moved").await;
    let id = queue_id(&r);
    let e = h.deferred(&id).await;
    let reply = e.state.rcpts[0].last_reply.as_ref().unwrap().to_string();
    assert!(
        reply.starts_with("451 4.1.10 550 5.1.10 RESOLVER.ADR.RecipientNotFound")
            && reply.contains("mailbox moved by batch 1"),
        "{reply}"
    );
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, "coexist_move_grace_deferrals_total{route=\"cloud\"}"),
        1.0,
        "{m}"
    );
    // A mailbox that did not move bounces at once.
    send_one(h.addr, &["unsynced.old@nhs.test"], "not moved").await;
    let dsn = wait_dsn(&h.onprem).await;
    assert!(dsn_status(&dsn).contains("Final-Recipient: rfc822; unsynced.old@nhs.test"));
    assert!(dsns(&h.onprem.state.messages()).len() == 1);

    // After the grace: the next attempt bounces as usual.
    eventually("jo's message to bounce after the grace", || {
        match h.relay.queue.get(&id) {
            None => true,
            Some(_) => {
                let _ = h.relay.queue.flush(&id);
                false
            }
        }
    })
    .await;
    let bounced = eventually("jo's DSN", || {
        dsns(&h.onprem.state.messages())
            .into_iter()
            .find(|d| dsn_status(d).contains("unsynced.jo@nhs.test"))
    })
    .await;
    let status = dsn_status(&bounced);
    assert!(status.contains("Status: 5.1.10"), "{status}");
    assert!(h.cloud.state.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_comes_back_from_a_routes_next_hop_is_not_sent_there_again() {
    // The on-premises next hop on 127.0.0.2; it sends mail from the same address.
    let onprem = Sink::start("127.0.0.2:0".parse().unwrap(), SinkOptions::default())
        .await
        .expect("127.0.0.2 is loopback on Linux");
    let h = harness(|c| {
        c.routes.get_mut("onprem").unwrap().next_hops = vec![onprem.addr.into()];
    })
    .await;
    let r = send_one(h.addr, &["alice@nhs.test"], "round trip").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&onprem, 1).await, 1);
    let delivered = onprem.state.messages()[0].body.clone();

    // On-premises Exchange thinks alice is in the cloud and sends the message back to us,
    // with bob added, from its own address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = sock.connect(h.addr).await.unwrap();
    let mut c = Client {
        io: tokio::io::BufReader::new(stream),
    };
    assert_eq!(c.reply().await.code, 220);
    c.expect("EHLO exch01.nhs.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut data = Vec::new();
    coexist::deliver::dot_stuff(&delivered, &mut data);
    c.send(&data).await;
    assert_eq!(c.reply().await.code, 250);

    // bob goes to the cloud; alice is not sent back on premises: a DSN names the loop.
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let dsn = wait_dsn(&onprem).await;
    let status = dsn_status(&dsn);
    for want in [
        "Final-Recipient: rfc822; alice@nhs.test",
        "Status: 5.4.6",
        "routing loop between coexist and onprem",
    ] {
        assert!(status.contains(want), "{want} missing:\n{status}");
    }
    h.settled().await;
    let to_alice = onprem
        .state
        .messages()
        .iter()
        .filter(|m| m.from.is_some())
        .count();
    assert_eq!(to_alice, 1, "alice's copy went on premises once only");
    let m = metrics(&h).await;
    assert_eq!(
        metric(&m, "coexist_routing_loops_total{route=\"onprem\"}"),
        1.0,
        "{m}"
    );
}

/// A next hop that answers like an overloaded Exchange front end: `421 4.3.2` at the
/// greeting (`at_mail` false) or to MAIL (after offering PIPELINING), then closes. Counts
/// connections.
async fn busy_next_hop(
    at_mail: bool,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = count.clone();
    const BUSY: &[u8] = b"421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel\r\n";
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                if !at_mail {
                    let _ = w.write_all(BUSY).await;
                    return;
                }
                let _ = w.write_all(b"220 busy.test ESMTP\r\n").await;
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let up = line.to_ascii_uppercase();
                    if up.starts_with("EHLO") {
                        let _ = w.write_all(b"250-busy.test\r\n250 PIPELINING\r\n").await;
                    } else if up.starts_with("MAIL") {
                        let _ = w.write_all(BUSY).await;
                        return;
                    } else if up.starts_with("QUIT") {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_at_the_greeting_or_to_mail_throttles_the_hop() {
    for at_mail in [false, true] {
        let (busy, connections) = busy_next_hop(at_mail).await;
        let h = harness(|c| {
            let cloud = c.routes.get_mut("cloud").unwrap();
            cloud.next_hops = vec![busy.into()];
            cloud.throttle_pause = Duration::from_secs(600);
        })
        .await;
        let first = queue_id(&send_one(h.addr, &["bob@nhs.test"], "first").await);
        let e = h.deferred(&first).await;
        let reply = e.state.rcpts[0].last_reply.as_ref().unwrap().to_string();
        assert!(reply.contains("421 4.3.2"), "at_mail {at_mail}: {reply}");
        let second = queue_id(&send_one(h.addr, &["carol@nhs.test"], "second").await);
        let e = h.deferred(&second).await;
        let reply = e.state.rcpts[0].last_reply.as_ref().unwrap().to_string();
        assert!(reply.contains("is throttled"), "at_mail {at_mail}: {reply}");
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "at_mail {at_mail}: the paused hop was not contacted again"
        );
        let (_, _, body) = http(
            h.relay.admin_addr.unwrap(),
            "GET",
            "/v1/hops",
            Some(TOKEN),
            None,
            b"",
        )
        .await;
        let hops: Vec<coexist::admin::types::HopView> = serde_json::from_str(&body).unwrap();
        let hop = hops
            .iter()
            .find(|v| v.next_hop == busy.to_string())
            .unwrap_or_else(|| panic!("{body}"));
        assert_eq!(
            hop.state,
            coexist::deliver::hops::HopCondition::Throttled,
            "at_mail {at_mail}: {body}"
        );
        assert!(
            hop.last_reply
                .as_deref()
                .unwrap_or("")
                .contains("421 4.3.2"),
            "{body}"
        );
    }
}
