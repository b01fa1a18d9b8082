//! Hostile input and hard failures: forged internal headers, per-client limits, slow
//! senders, a full disk, mail loops between two relays, pipelining abuse, bad TLS material.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::SinkOptions;
use common::bin::{cli, spawn, write_config};
use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FORGED: &[u8] = b"X-MS-Exchange-Organization-AuthAs: Internal\r\n\
X-MS-Exchange-Organization-SCL: -1\r\n\
x-ms-exchange-crosstenant-id: 0000\r\n\
\tcontinued\r\n\
Subject: forged\r\n\
X-Custom: kept\r\n\
\r\n\
X-MS-Exchange-Organization-AuthAs: in the body stays\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_headers_from_untrusted_clients_are_removed() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO outsider.test", 250).await;
    assert_eq!(
        c.mail("x@example.org", &["bob@nhs.test"], FORGED)
            .await
            .code,
        250
    );
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let body = h.cloud.state.messages()[0].body.clone();
    assert_eq!(
        strip_received(&body),
        b"Subject: forged\r\nX-Custom: kept\r\n\r\nX-MS-Exchange-Organization-AuthAs: in the body stays\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_on_premises_servers_keep_internal_headers() {
    let h = harness(|c| c.policy.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO exchange.corp.test", 250).await;
    assert_eq!(
        c.mail("x@nhs.test", &["bob@nhs.test"], FORGED).await.code,
        250
    );
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(strip_received(&h.cloud.state.messages()[0].body), FORGED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_connection_and_rate_limits() {
    let h = harness(|c| c.policy.max_connections_per_ip = 2).await;
    let _a = connect(h.addr).await;
    let _b = connect(h.addr).await;
    let refused = read_all(h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections from your address (limit 2)"),
        "{refused}"
    );
    drop(_a);
    // The slot is free again once the relay has seen the connection close.
    let _c = eventually_async("a session slot to free up", || async {
        let s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let mut c = Client {
            io: tokio::io::BufReader::new(s),
        };
        c.try_reply().await.filter(|r| r.code == 220).map(|_| c)
    })
    .await;

    let h = harness(|c| c.policy.max_connection_rate_per_ip = 3).await;
    for _ in 0..3 {
        connect(h.addr).await.expect("QUIT", 221).await;
    }
    let refused = read_all(h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections per minute"),
        "{refused}"
    );

    // Trusted networks are not limited.
    let h = harness(|c| {
        c.policy.max_connections_per_ip = 1;
        c.policy.trusted_networks = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let _x = connect(h.addr).await;
    let _y = connect(h.addr).await;
}

async fn read_all(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_hit_the_line_and_data_deadlines() {
    let h = harness(|c| {
        c.server.command_timeout = Duration::from_millis(800);
        c.server.data_timeout = Duration::from_millis(800);
    })
    .await;
    // A command trickled one byte at a time never completes a line in time. (The pace is
    // what is tested: each byte comes well within the timeout, the whole line does not.)
    let mut c = connect(h.addr).await;
    let mut got = None;
    for b in b"NOOP NOOP NOOP NOOP NOOP\r\n".iter() {
        if c.io.get_mut().write_all(&[*b]).await.is_err() {
            break;
        }
        // The sender's pace (one byte per 100 ms) is what is tested, not a wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(1), c.try_reply()).await {
            got = Some(r);
            break;
        }
    }
    let r = match got {
        Some(r) => r,
        None => c.reply().await,
    };
    assert_eq!((r.code, r.status()), (421, "4.4.2"), "{r:?}");

    // DATA trickled: each read is quick, the whole transfer is not (the pace is the test).
    let mut c = connect(h.addr).await;
    c.expect("EHLO slow.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut reply = None;
    for _ in 0..40 {
        if c.io.get_mut().write_all(b"x").await.is_err() {
            break;
        }
        // The sender's pace (one byte per 100 ms) is what is tested, not a wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(1), c.try_reply()).await {
            reply = Some(r);
            break;
        }
    }
    let r = reply.expect("no reply to a trickled DATA");
    assert_eq!((r.code, r.status()), (421, "4.4.2"), "{r:?}");
    assert!(h.cloud.state.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_452_and_accepts_again_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = coexist::load::sink::Sink::start(lo, SinkOptions::default())
        .await
        .unwrap();
    let cloud = coexist::load::sink::Sink::start(lo, SinkOptions::default())
        .await
        .unwrap();
    let mut cfg = write_config(dir.path(), onprem.addr, cloud.addr);
    let normal = cfg.config.spool.min_free_space;
    // More free space demanded than any disk has: as if the disk were full.
    cfg.config.spool.min_free_space = 9_000_000_000_000_000_000;
    cfg.write();
    let _server = spawn(&mut cfg);
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.cmd("MAIL FROM:<x@example.org>").await;
    assert_eq!((r.code, r.status()), (452, "4.3.1"), "{r:?}");

    // Space returns (here: the threshold is lowered and reloaded): mail is accepted again.
    cfg.config.spool.min_free_space = normal;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["reload"]);
    assert!(ok, "{err}");
    assert_eq!(
        send_one(cfg.listen(), &["bob@nhs.test"], "space")
            .await
            .code,
        250
    );
    assert_eq!(wait(&cloud, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_between_two_relays_ends_with_546() {
    // Relay A sends the cloud route to relay B, and B sends it back to A (through a port
    // held here from the start, as A's address is known only once A runs).
    let to_a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to_a_addr = to_a.local_addr().unwrap();
    let b = harness(|c| {
        c.server.max_hops = 6;
        c.routes.get_mut("cloud").unwrap().next_hops = vec![to_a_addr.into()];
    })
    .await;
    let a = harness(|c| {
        c.server.max_hops = 6;
        c.routes.get_mut("cloud").unwrap().next_hops = vec![b.addr.into()];
    })
    .await;
    forward(to_a, a.addr);
    assert_eq!(send_one(a.addr, &["bob@nhs.test"], "loop").await.code, 250);

    // The copy that crosses the limit is refused with 5.4.6; the relay that sent it bounces
    // the recipient: a DSN with Status 5.4.6 goes to the sender (external route: on
    // premises), and the loop stops.
    let dsn_546 = |sink: &coexist::load::sink::Sink| {
        sink.state
            .messages()
            .iter()
            .any(|m| m.from.is_none() && String::from_utf8_lossy(&m.body).contains("Status: 5.4.6"))
    };
    eventually("the loop to end with a 5.4.6 DSN", || {
        dsn_546(&a.onprem) || dsn_546(&b.onprem)
    })
    .await;
    // Only the relay that bounced still has work (finishing the original, sending the DSN).
    a.settled().await;
    b.settled().await;
    let active = |d: &std::path::Path| spooled(&d.join("spool")).len();
    assert_eq!(
        active(a.dir.path()) + active(b.dir.path()),
        0,
        "nothing left circling"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_message_pipelined_without_waiting_for_354() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.send(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<bob@nhs.test>\r\nDATA\r\nSubject: eager\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(c.reply().await.code);
    }
    assert_eq!(got, vec![250, 250, 354, 250, 250, 221]);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(
        strip_received(&h.cloud.state.messages()[0].body),
        b"Subject: eager\r\n\r\nbody\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut cfg = test_config(dir.path(), &certs, lo, lo);
    std::fs::write(
        &certs.key,
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = coexist::relay::start(cfg.clone())
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(err.contains("server.key"), "{err}");
    cfg.tls.as_mut().unwrap().cert = dir.path().join("missing.crt");
    let err = coexist::relay::start(cfg)
        .await
        .err()
        .expect("must not start")
        .to_string();
    assert!(err.contains("missing.crt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_of_messages_in_transfer_is_enforced() {
    // Messages up to 200 KB; all transfers together may hold 270 KB (the least the config
    // allows: one whole message and a first 64 KiB buffer).
    let h = harness(|c| {
        c.server.max_message_size = 200_000;
        c.server.max_inflight_bytes = 270_000;
    })
    .await;
    let start = |name: &'static str| async move {
        let mut c = connect(h.addr).await;
        c.expect(&format!("EHLO {name}.test"), 250).await;
        c.expect("MAIL FROM:<x@example.org>", 250).await;
        c.expect("RCPT TO:<bob@nhs.test>", 250).await;
        c.expect("DATA", 354).await;
        c
    };
    let (mut a, mut b) = (start("a").await, start("b").await);
    let mut c = connect(h.addr).await;
    c.expect("EHLO c.test", 250).await;
    // A and B each send 120 KB: their buffers grow to 128 KiB, and what is left of the budget
    // no longer holds a first buffer: a new transaction is refused for now (452, not an
    // error of the client's).
    let line = [b'a'; 998];
    for s in [&mut a, &mut b] {
        s.send(b"Subject: big\r\n\r\n").await;
        for _ in 0..120 {
            s.send(&line).await;
            s.send(b"\r\n").await;
        }
    }
    // The budget is spent once the relay has read what A and B sent.
    let c = tokio::sync::Mutex::new(c);
    let shared = &c;
    let r = eventually_async("MAIL refused while the budget is spent", || async move {
        let mut c = shared.lock().await;
        let r = c.cmd("MAIL FROM:<y@example.org>").await;
        if r.code == 452 {
            return Ok(r);
        }
        c.expect("RSET", 250).await;
        Err(format!("{r:?}"))
    })
    .await;
    let mut c = c.into_inner();
    assert_eq!(r.status(), "4.3.1", "{r:?}");
    // A needs more than is left: its message is read to its end and refused with 452 4.3.1,
    // and its session goes on. B, within its buffer, is accepted.
    for _ in 0..60 {
        a.send(&line).await;
        a.send(b"\r\n").await;
    }
    a.send(b".\r\n").await;
    let r = a.reply().await;
    assert_eq!((r.code, r.status()), (452, "4.3.1"), "{r:?}");
    b.send(b".\r\n").await;
    assert_eq!(b.reply().await.code, 250);
    // The budget is given back: everyone can send again.
    for s in [&mut a, &mut c] {
        let r = s
            .mail("x@example.org", &["bob@nhs.test"], &sample("again"))
            .await;
        assert_eq!(r.code, 250, "{r:?}");
    }
    assert_eq!(wait(&h.cloud, 3).await, 3);
}
