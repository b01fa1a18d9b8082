//! Whole relay: routing by migration state, transparency, retries, failover, reuse of
//! connections. Toward the next hops (verify, client certificates, limits, SMTPUTF8):
//! `relay_next_hops.rs`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::TlsPolicy;
use coexist::load::sink::{SinkMode, SinkOptions};
use coexist::types::RouteName;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_for_both_estates_is_split_with_body_unchanged() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let body = b"From: <x@example.org>\r\nSubject: split\r\n\r\n.starts with a dot\r\n..two dots\r\nline\r\n".to_vec();
    let r = c
        .mail(
            "x@example.org",
            &["alice@nhs.test", "Bob@nhs.test", "carol@nhs.test"],
            &body,
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    let qid = queue_id(&r);
    assert_eq!(wait(&h.onprem, 1).await, 1);
    assert_eq!(wait(&h.cloud, 2).await, 2);
    let on = h.onprem.state.messages();
    let cl = h.cloud.state.messages();
    assert_eq!(on.len(), 1);
    assert_eq!(cl.len(), 1, "one delivery per estate");
    let rcpts = |m: &coexist::load::sink::SinkMessage| {
        m.rcpts.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(rcpts(&on[0]), vec!["alice@nhs.test"]);
    assert_eq!(rcpts(&cl[0]), vec!["Bob@nhs.test", "carol@nhs.test"]);
    assert_eq!(on[0].from.as_ref().unwrap().to_string(), "x@example.org");
    for m in [&on[0], &cl[0]] {
        assert_eq!(
            strip_received(&m.body),
            &body[..],
            "body changed in transit"
        );
        assert!(received_header(&m.body).contains(&format!("id {qid}")));
    }
    // Delivered messages leave the spool (before they leave the queue).
    h.settled().await;
    assert_eq!(spooled(&h.dir.path().join("spool")), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_to_next_hop_without_chunking_keeps_bytes() {
    let opts = SinkOptions {
        chunking: false,
        pipelining: false,
        ..SinkOptions::default()
    };
    let h = harness_with(opts, |_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let body = b".first line is a dot line\r\nSubject: x\r\n\r\n.\r\n..\r\nend\r\n".to_vec();
    assert_eq!(
        c.mail("x@example.org", &["bob@nhs.test"], &body).await.code,
        250
    );
    // Ends without CRLF through BDAT: DATA outbound must add one (the only change it makes).
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<carol@nhs.test>", 250).await;
    c.send(b"BDAT 9 LAST\r\nno CRLF!!").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(wait(&h.cloud, 2).await, 2);
    let mut msgs = h.cloud.state.messages();
    msgs.sort_by_key(|m| m.rcpts[0].to_string());
    assert_eq!(strip_received(&msgs[0].body), &body[..]);
    assert_eq!(strip_received(&msgs[1].body), b"no CRLF!!\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_message_is_retried_and_follows_a_moved_mailbox() {
    let h = harness(|_| {}).await;
    h.onprem.state.set_mode(SinkMode::Defer);
    let r = send_one(h.addr, &["dave@nhs.test"], "moving").await;
    assert_eq!(r.code, 250);
    // dave is on premises, which defers. Then dave's mailbox moves to the cloud.
    h.deferred(&queue_id(&r)).await;
    assert!(h.onprem.state.messages().is_empty());
    let states = vec![RouteName("cloud".into()), RouteName("onprem".into())];
    let rows = coexist::directory::batch::parse(
        b"EmailAddress\ndave@nhs.test\n",
        "b.csv",
        &states,
        Some("cloud"),
    )
    .unwrap();
    h.relay.directory.apply(&rows, "b.csv", false).unwrap();
    assert_eq!(
        wait(&h.cloud, 1).await,
        1,
        "the retry must use the current directory"
    );
    assert_eq!(
        h.cloud.state.messages()[0].rcpts[0].to_string(),
        "dave@nhs.test"
    );
    assert!(h.onprem.state.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferral_then_success_at_the_same_hop() {
    let h = harness(|_| {}).await;
    h.cloud.state.set_mode(SinkMode::Defer);
    let r = send_one(h.addr, &["bob@nhs.test"], "retry").await;
    assert_eq!(r.code, 250);
    h.deferred(&queue_id(&r)).await;
    let spooled = spooled(&h.dir.path().join("spool"));
    let text = &spooled.first().expect("state written after a deferral").1;
    assert!(text.contains("451 4.3.0"), "{text}");
    h.cloud.state.set_mode(SinkMode::Accept);
    assert_eq!(wait(&h.cloud, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_route_defers_when_next_hop_has_no_starttls() {
    // Sinks without a certificate do not offer STARTTLS.
    let h = harness(|c| c.routes.get_mut("cloud").unwrap().tls = TlsPolicy::Required).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail(
            "x@example.org",
            &["bob@nhs.test", "alice@nhs.test"],
            &sample("tls"),
        )
        .await;
    assert_eq!(r.code, 250);
    // The attempt is over (alice delivered, bob deferred) before anything is checked.
    h.deferred(&queue_id(&r)).await;
    assert_eq!(wait(&h.onprem, 1).await, 1);
    assert!(
        h.cloud.state.messages().is_empty(),
        "a required-TLS route must never send in clear text"
    );
    let spooled = spooled(&h.dir.path().join("spool"));
    let text = &spooled.first().expect("message still queued").1;
    assert!(text.contains("does not offer STARTTLS"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_route_uses_starttls_when_offered() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let acceptor = coexist::smtp::tls::load_acceptor(&certs.cert, &certs.key).unwrap();
    let opts = SinkOptions {
        tls: Some(acceptor),
        ..SinkOptions::default()
    };
    let h = harness_with(opts, |c| {
        c.routes.get_mut("cloud").unwrap().tls = TlsPolicy::Required
    })
    .await;
    assert_eq!(send_one(h.addr, &["bob@nhs.test"], "tls2").await.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert!(h.cloud.state.messages()[0].tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hops_are_tried_in_order() {
    // Both hops of the cloud route listen and record: the first named gets the mail.
    let h = harness(|c| {
        let onprem = c.routes["onprem"].next_hops[0].clone();
        c.routes.get_mut("cloud").unwrap().next_hops.push(onprem);
    })
    .await;
    for i in 0..3 {
        let subject = format!("order{i}");
        assert_eq!(
            send_one(h.addr, &["bob@nhs.test"], &subject).await.code,
            250
        );
    }
    assert_eq!(
        wait(&h.cloud, 3).await,
        3,
        "the first next hop gets the mail"
    );
    assert!(
        h.onprem.state.messages().is_empty(),
        "the second next hop got mail while the first was up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_first_hop_fails_over_to_a_named_next_hop() {
    // The first hop accepts TCP, records the attempt and closes without a greeting.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let tries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = tries.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = dead.accept().await {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    // The cloud route lists the dead hop first, then the cloud sink by host name.
    let h = harness(|c| {
        let route = c.routes.get_mut("cloud").unwrap();
        let port = route.next_hops[0].port;
        route.next_hops = vec![
            dead_addr.into(),
            coexist::config::NextHop::parse(&format!("localhost:{port}")).unwrap(),
        ];
    })
    .await;
    assert_eq!(
        send_one(h.addr, &["bob@nhs.test"], "failover").await.code,
        250
    );
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert!(
        tries.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the first next hop was never tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_route_rewrites_recipients_to_the_routing_domain() {
    let h = harness(|c| {
        c.routes.get_mut("cloud").unwrap().rewrite_domain =
            Some(coexist::types::Domain::parse("tenant.mail.onmicrosoft.com", false).unwrap())
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail(
            "x@example.org",
            &["Bob@nhs.test", "alice@nhs.test"],
            &sample("rewrite"),
        )
        .await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(wait(&h.onprem, 1).await, 1);
    let cl = h.cloud.state.messages();
    assert_eq!(
        cl[0].rcpts[0].to_string(),
        "Bob@tenant.mail.onmicrosoft.com"
    );
    assert_eq!(
        strip_received(&cl[0].body),
        &sample("rewrite")[..],
        "headers untouched"
    );
    assert_eq!(
        h.onprem.state.messages()[0].rcpts[0].to_string(),
        "alice@nhs.test"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_next_hop_are_reused() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..10 {
        assert_eq!(
            c.mail(
                "x@example.org",
                &["bob@nhs.test"],
                &sample(&format!("r{i}"))
            )
            .await
            .code,
            250
        );
        assert_eq!(wait(&h.cloud, i + 1).await, i + 1);
    }
    let sessions = h
        .cloud
        .state
        .sessions
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(sessions, 1, "ten deliveries, one reused session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_next_hop_is_skipped_while_its_circuit_is_open() {
    // A "dead" first hop: accepts TCP and closes at once, counting the attempts.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let tries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = tries.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = dead.accept().await {
            t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let h = harness(|c| {
        let route = c.routes.get_mut("cloud").unwrap();
        route.next_hops.insert(0, dead_addr.into());
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..20 {
        assert_eq!(
            c.mail(
                "x@example.org",
                &["bob@nhs.test"],
                &sample(&format!("d{i}"))
            )
            .await
            .code,
            250
        );
    }
    assert_eq!(
        wait(&h.cloud, 20).await,
        20,
        "every message failed over to the live hop"
    );
    let tries = tries.load(std::sync::atomic::Ordering::SeqCst);
    // Without the circuit every message would try it first (20 times).
    assert!(
        tries < 10,
        "the dead hop was tried {tries} times for 20 messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_and_dropping_next_hops_defer_and_mail_goes_out_later() {
    let h = harness(|c| c.delivery.timeout = Duration::from_millis(700)).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    for (mode, name) in [(SinkMode::Hang, "hang"), (SinkMode::Drop, "drop")] {
        h.cloud.state.set_mode(mode);
        let r = c
            .mail("x@example.org", &["bob@nhs.test"], &sample(name))
            .await;
        assert_eq!(r.code, 250);
        // The attempt ran into the timeout (hang) or the closed connection (drop).
        h.deferred(&queue_id(&r)).await;
        assert!(
            h.cloud.state.messages().is_empty(),
            "{name}: nothing may count as delivered"
        );
    }
    h.cloud.state.set_mode(SinkMode::Accept);
    assert_eq!(
        wait(&h.cloud, 2).await,
        2,
        "both delivered once the hop behaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_hop_that_is_down_then_comes_back_gets_everything() {
    let down = DownPort::new();
    let h =
        harness(|c| c.routes.get_mut("cloud").unwrap().next_hops = vec![down.addr.into()]).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = c
            .mail(
                "x@example.org",
                &["bob@nhs.test"],
                &sample(&format!("down{i}")),
            )
            .await;
        assert_eq!(r.code, 250);
        ids.push(queue_id(&r));
    }
    // Every message found the hop down (or skipped it while its circuit was open).
    for id in &ids {
        h.deferred(id).await;
    }
    let back =
        coexist::load::sink::Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
            .await
            .unwrap();
    down.forward_to(back.addr);
    assert_eq!(wait(&back, 5).await, 5);
}

/// When [`scripted_hop`] drops a session.
#[derive(Clone, Copy, PartialEq)]
enum Drops {
    Never,
    /// Without a reply, at the first command after the session's n-th transaction (a server
    /// that timed the session out just as the relay reused it).
    AtCommandAfter(usize),
    /// Right after the reply that ends the session's n-th transaction.
    AfterReply(usize),
}

/// A scripted next hop: logs every command with its connection's number (and `accepted`
/// for each message it takes), answers like Postfix (PIPELINING, DATA; a transaction whose
/// every RCPT was refused stays open, so a MAIL then gets `503 5.5.1 nested MAIL`), defers
/// recipients whose address starts with `refuse` (450), and drops sessions as `drops` says.
async fn scripted_hop(
    drops: Drops,
    refuse: Option<&'static str>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = log.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((s, _)) = l.accept().await {
            n += 1;
            let (conn, log) = (n, shared.clone());
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                w.write_all(b"220 hop.test ESMTP\r\n").await.unwrap();
                let (mut done, mut line) = (0, String::new());
                let (mut open, mut rcpts) = (false, 0);
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.trim_end().to_string();
                    if drops == Drops::AtCommandAfter(done) {
                        log.lock().unwrap().push((conn, format!("closed at {cmd}")));
                        return;
                    }
                    log.lock().unwrap().push((conn, cmd.clone()));
                    let verb = cmd.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-hop.test\r\n250 PIPELINING\r\n",
                        "MAIL" if open => {
                            log.lock().unwrap().push((conn, "503 nested MAIL".into()));
                            b"503 5.5.1 Error: nested MAIL command\r\n"
                        }
                        "MAIL" => {
                            (open, rcpts) = (true, 0);
                            b"250 2.1.0 ok\r\n"
                        }
                        "RCPT" if !open => b"503 5.5.1 Error: need MAIL command\r\n",
                        "RCPT" if refuse.is_some_and(|r| cmd[9..].starts_with(r)) => {
                            b"450 4.2.0 greylisted, try again later\r\n"
                        }
                        "RCPT" => {
                            rcpts += 1;
                            b"250 2.1.5 ok\r\n"
                        }
                        "DATA" if !open || rcpts == 0 => {
                            b"554 5.5.1 Error: no valid recipients\r\n"
                        }
                        "DATA" => {
                            w.write_all(b"354 go on\r\n").await.unwrap();
                            loop {
                                line.clear();
                                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if line == ".\r\n" {
                                    break;
                                }
                            }
                            (done, open) = (done + 1, false);
                            log.lock().unwrap().push((conn, "accepted".into()));
                            b"250 2.0.0 queued\r\n"
                        }
                        "RSET" => {
                            open = false;
                            b"250 2.0.0 ok\r\n"
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 2.0.0 bye\r\n").await;
                            return;
                        }
                        _ => b"250 2.0.0 ok\r\n",
                    };
                    w.write_all(reply).await.unwrap();
                    if drops == Drops::AfterReply(done) {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

/// A relay whose cloud route goes to `hop`, retrying after an hour: a message deferred by
/// mistake makes the test time out instead of going out later.
async fn relay_to(hop: std::net::SocketAddr) -> Harness {
    harness(|c| {
        c.routes.get_mut("cloud").unwrap().next_hops = vec![hop.into()];
        c.queue.min_backoff = Duration::from_secs(3600);
        c.queue.max_backoff = Duration::from_secs(3600);
    })
    .await
}

/// Sends `n` messages for the cloud route one after the other, each once the one before
/// has left the queue (so its session is back in the relay's pool).
async fn one_by_one(h: &Harness, n: usize) {
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..n {
        let r = c
            .mail(
                "x@example.org",
                &["bob@nhs.test"],
                &sample(&format!("q{i}")),
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        h.settled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_used_a_moment_ago_is_reused_without_rset() {
    let (hop, log) = scripted_hop(Drops::Never, None).await;
    let h = harness(|c| c.routes.get_mut("cloud").unwrap().next_hops = vec![hop.into()]).await;
    one_by_one(&h, 3).await;
    let log = log.lock().unwrap().clone();
    let verbs: Vec<&str> = log
        .iter()
        .filter(|(_, l)| l != "accepted")
        .map(|(_, l)| &l[..4])
        .collect();
    let mut want = vec!["EHLO"];
    for _ in 0..3 {
        want.extend(["MAIL", "RCPT", "DATA"]);
    }
    assert_eq!(verbs, want, "no RSET between transactions: {log:?}");
    assert!(log.iter().all(|(c, _)| *c == 1), "one session: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_found_dead_is_replaced_at_once() {
    // The hop drops every session at the first command after one transaction: each reuse
    // meets a dead connection, and the message goes out on a new one in the same attempt.
    let (hop, log) = scripted_hop(Drops::AtCommandAfter(1), None).await;
    let h = relay_to(hop).await;
    one_by_one(&h, 3).await;
    let log = log.lock().unwrap().clone();
    let datas: Vec<usize> = log
        .iter()
        .filter(|(_, l)| l == "DATA")
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(datas.len(), 3, "{log:?}");
    let sessions: std::collections::BTreeSet<usize> = datas.iter().copied().collect();
    assert_eq!(sessions.len(), 3, "one transaction per session: {log:?}");
    // Sessions 1 and 2 were reused as they were (no RSET) and found dead at MAIL.
    let dropped: Vec<&str> = log
        .iter()
        .filter(|(_, l)| l.starts_with("closed"))
        .map(|(_, l)| &l[..14])
        .collect();
    assert_eq!(dropped, ["closed at MAIL"; 2], "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_next_hop_closed_is_not_reused() {
    // The hop closes each session after its first transaction: the relay sees the end
    // before it sends anything more, and opens a new session.
    let (hop, log) = scripted_hop(Drops::AfterReply(1), None).await;
    let h = relay_to(hop).await;
    one_by_one(&h, 3).await;
    let log = log.lock().unwrap().clone();
    let verbs: Vec<(usize, &str)> = log
        .iter()
        .filter(|(_, l)| l != "accepted")
        .map(|(c, l)| (*c, &l[..4]))
        .collect();
    let mut want = Vec::new();
    for c in 1..=3 {
        want.extend([(c, "EHLO"), (c, "MAIL"), (c, "RCPT"), (c, "DATA")]);
    }
    assert_eq!(verbs, want, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_left_in_a_refused_transaction_gets_rset_before_reuse() {
    // The hop defers carol: the relay's pipelined DATA gets 554 and the hop keeps the MAIL
    // open, as Postfix does. The next message on that session must start with RSET, else
    // its MAIL meets "503 nested MAIL" and its recipient joins the open transaction.
    let (hop, log) = scripted_hop(Drops::Never, Some("carol")).await;
    let h = relay_to(hop).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail("x@example.org", &["carol@nhs.test"], &sample("greylisted"))
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    h.deferred(&queue_id(&r)).await;
    let r = c
        .mail("x@example.org", &["bob@nhs.test"], &sample("next"))
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    let second = queue_id(&r);
    eventually("the second message to leave the queue", || {
        match h.relay.queue.get(&second) {
            None => Ok(()),
            Some(e) => Err(format!("{:?}", e.phase)),
        }
    })
    .await;
    let log = log.lock().unwrap().clone();
    let lines: Vec<&str> = log.iter().map(|(_, l)| l.as_str()).collect();
    assert!(lines.contains(&"accepted"), "bob's message taken: {log:?}");
    assert!(!lines.iter().any(|l| l.starts_with("503")), "{log:?}");
    let rset = lines.iter().position(|l| *l == "RSET");
    let second_mail = lines.iter().rposition(|l| l.starts_with("MAIL"));
    assert!(
        rset.is_some() && rset < second_mail,
        "RSET before the second MAIL: {log:?}"
    );
    assert!(log.iter().all(|(c, _)| *c == 1), "one session: {log:?}");
}
