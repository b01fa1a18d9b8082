//! Whole relay: routing by migration state, transparency, retries, failures, TLS policy.

mod common;

use coexist::config::TlsPolicy;
use coexist::load::sink::{SinkMode, SinkOptions};
use coexist::types::RouteName;
use common::*;
use std::path::PathBuf;
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

async fn verify_harness(name: &str) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    let acceptor = coexist::smtp::tls::load_acceptor(&certs.cert, &certs.key).unwrap();
    let opts = SinkOptions {
        tls: Some(acceptor),
        ..SinkOptions::default()
    };
    let name = name.to_string();
    let h = harness_with(opts, move |c| {
        let r = c.routes.get_mut("cloud").unwrap();
        r.tls = TlsPolicy::Verify;
        r.tls_ca_file = Some(ca);
        r.tls_name = Some(name);
    })
    .await;
    (h, dir) // the CA file must outlive the relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_policy_checks_the_next_hop_certificate() {
    // The sinks' certificate is for mx1.coexist.test, signed by the test CA.
    let (good, _ca) = verify_harness("mx1.coexist.test").await;
    assert_eq!(
        send_one(good.addr, &["bob@nhs.test"], "verified")
            .await
            .code,
        250
    );
    assert_eq!(wait(&good.cloud, 1).await, 1);
    assert!(good.cloud.state.messages()[0].tls);

    let (bad, _ca2) = verify_harness("exchange.other.test").await;
    let r = send_one(bad.addr, &["bob@nhs.test"], "unverified").await;
    assert_eq!(r.code, 250);
    bad.deferred(&queue_id(&r)).await;
    assert!(
        bad.cloud.state.messages().is_empty(),
        "a certificate for another name must not pass"
    );
    let spooled = spooled(&bad.dir.path().join("spool"));
    let text = &spooled.first().expect("message still queued").1;
    assert!(
        text.contains("TLS with") && text.contains("failed"),
        "{text}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_per_next_hop_are_limited() {
    // The next hop takes a second over each message, so transactions that the relay runs
    // together overlap there, and the sink counts the most it had at once. The retry delay
    // is an hour: only the flush below makes the deferred messages due.
    let opts = SinkOptions {
        delay: Duration::from_secs(1),
        ..SinkOptions::default()
    };
    let h = harness_with(opts, |c| {
        c.delivery.hop_concurrency = 2;
        c.queue.min_backoff = Duration::from_secs(3600);
        c.queue.max_backoff = Duration::from_secs(3600);
    })
    .await;
    h.cloud.state.set_mode(SinkMode::Defer);
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = send_one(h.addr, &["bob@nhs.test"], &format!("limit{i}")).await;
        assert_eq!(r.code, 250);
        ids.push(queue_id(&r));
    }
    for id in &ids {
        h.deferred(id).await;
    }
    // All five are due at the same moment.
    h.cloud.state.set_mode(SinkMode::Accept);
    assert_eq!(h.relay.queue.flush_where(|_| true), 5);
    assert_eq!(wait(&h.cloud, 5).await, 5);
    assert_eq!(
        h.cloud
            .state
            .peak_answering
            .load(std::sync::atomic::Ordering::SeqCst),
        2,
        "five deliveries due at once, at most two (and here two) in flight at the hop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_is_presented_to_a_next_hop_that_requires_one() {
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    // The next hop (like an Exchange Online connector) only takes senders with a
    // certificate from the test CA.
    let acceptor =
        coexist::smtp::tls::acceptor_requiring_client_cert(chain, key, certs.ca_pem.as_bytes())
            .unwrap();
    let opts = SinkOptions {
        tls: Some(acceptor),
        ..SinkOptions::default()
    };
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let h = harness_with(opts, move |c| {
        let r = c.routes.get_mut("cloud").unwrap();
        r.tls = TlsPolicy::Required;
        r.client_cert = Some(cert);
        r.client_key = Some(key);
        // Without a certificate the on-premises route cannot get through.
        c.routes.get_mut("onprem").unwrap().tls = TlsPolicy::Required;
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test", "alice@nhs.test"], "cert").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let summary = h.cloud.state.messages()[0]
        .tls_summary
        .clone()
        .unwrap_or_default();
    assert!(summary.contains("client certificate"), "{summary}");
    h.deferred(&queue_id(&r)).await;
    assert!(
        h.onprem.state.messages().is_empty(),
        "no certificate, no delivery"
    );
    drop(dir);
}

/// Writes a client certificate (its own CA) for `name`; returns (cert file, key file, CA PEM,
/// the certificate's DER).
fn client_identity(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, String, Vec<u8>) {
    use rustls_pki_types::pem::PemObject;
    let c = coexist::certs::generate(name).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(c.cert_pem.as_bytes())
        .unwrap()
        .to_vec();
    (cert, key, c.ca_pem, der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_different_client_certificates_never_share_a_session() {
    use rustls_pki_types::pem::PemObject;
    // One next hop (like Exchange Online) that tells connectors apart by the client
    // certificate, and two routes to it, each with its own certificate.
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let (on_cert, on_key, on_ca, on_der) = client_identity(dir.path(), "onprem-connector.test");
    let (cl_cert, cl_key, cl_ca, cl_der) = client_identity(dir.path(), "cloud-connector.test");
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&certs.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&certs.key).unwrap();
    let (acceptor, seen) =
        coexist::load::sink::client_cert_acceptor(chain, key, format!("{on_ca}{cl_ca}").as_bytes())
            .unwrap();
    let sink = coexist::load::sink::Sink::start(
        "127.0.0.1:0".parse().unwrap(),
        SinkOptions {
            tls: Some(acceptor),
            client_certs: Some(seen),
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = test_config(dir.path(), &certs, sink.addr, sink.addr);
    for (route, cert, key) in [("onprem", on_cert, on_key), ("cloud", cl_cert, cl_key)] {
        let r = cfg.routes.get_mut(route).unwrap();
        r.tls = TlsPolicy::Required;
        r.client_cert = Some(cert);
        r.client_key = Some(key);
    }
    let relay = coexist::relay::start(cfg).await.unwrap();
    let addr = relay.local_addrs[0];
    // Alternate between the routes, one message at a time, so a pooled session of one route
    // is idle and ready when the other route delivers.
    let order = [
        "alice@nhs.test",
        "bob@nhs.test",
        "dave@nhs.test",
        "carol@nhs.test",
    ];
    for (i, rcpt) in order.iter().enumerate() {
        assert_eq!(send_one(addr, &[rcpt], &format!("c{i}")).await.code, 250);
        assert_eq!(wait(&sink, i as u64 + 1).await, i as u64 + 1);
    }
    for m in sink.state.messages() {
        let rcpt = m.rcpts[0].to_string();
        let want = if rcpt == "alice@nhs.test" || rcpt == "dave@nhs.test" {
            ("the onprem route's", &on_der)
        } else {
            ("the cloud route's", &cl_der)
        };
        let got = m
            .client_cert
            .as_ref()
            .expect("no client certificate recorded");
        assert!(
            got == want.1,
            "{rcpt} arrived over a session presenting another route's certificate, not {} one",
            want.0
        );
    }
    // Each route still reuses its own session.
    assert_eq!(
        sink.state
            .sessions
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    drop(relay);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_beyond_the_next_hops_limit_go_in_further_transactions_at_once() {
    // The next hop takes 2 recipients per transaction; the message has 5. The retry delay
    // is an hour: if any recipient waited for a retry, it would not arrive in this test.
    for (pipelining, chunking) in [(true, true), (false, false)] {
        let opts = SinkOptions {
            max_rcpts: 2,
            pipelining,
            chunking,
            ..SinkOptions::default()
        };
        let h = harness_with(opts, |c| {
            c.queue.min_backoff = Duration::from_secs(3600);
            c.queue.max_backoff = Duration::from_secs(3600);
        })
        .await;
        // Unlisted addresses take the onprem route (directory.unknown).
        let rcpts = [
            "u1@nhs.test",
            "u2@nhs.test",
            "u3@nhs.test",
            "u4@nhs.test",
            "u5@nhs.test",
        ];
        let body = sample("many");
        let mut c = connect(h.addr).await;
        c.expect("EHLO client.test", 250).await;
        assert_eq!(c.mail("x@example.org", &rcpts, &body).await.code, 250);
        assert_eq!(
            wait(&h.onprem, 5).await,
            5,
            "pipelining={pipelining}: all recipients arrive without waiting for a retry"
        );
        let msgs = h.onprem.state.messages();
        assert_eq!(msgs.len(), 3, "2 + 2 + 1 recipients");
        let mut got: Vec<String> = msgs
            .iter()
            .flat_map(|m| m.rcpts.iter().map(|a| a.to_string()))
            .collect();
        got.sort();
        assert_eq!(got, rcpts, "each recipient exactly once");
        for m in &msgs {
            assert!(m.rcpts.len() <= 2);
            assert_eq!(strip_received(&m.body), &body[..]);
        }
        // Every recipient has its outcome: the message leaves the queue.
        h.settled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_hop_refusing_the_first_recipient_with_452_defers_without_looping() {
    // 452 4.5.3 to the very first RCPT of a transaction is not "send the rest in another
    // transaction" (nothing was taken): the recipients are deferred for a retry.
    let opts = SinkOptions {
        max_rcpts: 0,
        ..SinkOptions::default()
    };
    let h = harness_with(opts, |c| {
        c.queue.min_backoff = Duration::from_secs(3600);
        c.queue.max_backoff = Duration::from_secs(3600);
    })
    .await;
    let r = send_one(h.addr, &["u1@nhs.test", "u2@nhs.test"], "none").await;
    assert_eq!(r.code, 250);
    // The attempt ends (it does not loop on 452).
    let e = h.deferred(&queue_id(&r)).await;
    for rcpt in &e.state.rcpts {
        let reply = rcpt
            .last_reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        assert!(reply.starts_with("452 4.5.3"), "{reply}");
    }
    assert_eq!(
        h.onprem
            .state
            .recipients
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_is_passed_on_whenever_the_client_asked_for_it() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    // All-ASCII envelope; the client asked for SMTPUTF8 all the same.
    c.expect("MAIL FROM:<x@example.org> SMTPUTF8", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: café\r\n\r\nx\r\n.\r\n".as_bytes()).await;
    assert_eq!(c.reply().await.code, 250);
    // And one without SMTPUTF8: not added.
    assert_eq!(
        send_one(h.addr, &["carol@nhs.test"], "plain").await.code,
        250
    );
    assert_eq!(wait(&h.cloud, 2).await, 2);
    for m in h.cloud.state.messages() {
        let asked = m.rcpts[0].to_string() == "bob@nhs.test";
        assert_eq!(
            m.smtputf8, asked,
            "SMTPUTF8 on MAIL FROM for {}",
            m.rcpts[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_without_smtputf8_gets_only_what_needs_no_smtputf8() {
    // The cloud next hop does not offer SMTPUTF8; on premises (where DSNs to outside senders
    // go) does. Unlisted addresses take the cloud route here.
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let lo: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = coexist::load::sink::Sink::start(lo, SinkOptions::default())
        .await
        .unwrap();
    let cloud = coexist::load::sink::Sink::start(
        lo,
        SinkOptions {
            smtputf8: false,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = test_config(dir.path(), &certs, onprem.addr, cloud.addr);
    cfg.directory.unknown = "cloud".into();
    let relay = coexist::relay::start(cfg).await.unwrap();
    let addr = relay.local_addrs[0];
    let send = |rcpt: &'static str, subject: &'static str| async move {
        let mut c = connect(addr).await;
        c.expect("EHLO client.test", 250).await;
        c.expect("MAIL FROM:<x@example.org> SMTPUTF8", 250).await;
        c.expect(&format!("RCPT TO:<{rcpt}>"), 250).await;
        c.expect("DATA", 354).await;
        c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
            .await;
        let r = c.reply().await;
        assert_eq!(r.code, 250, "{r:?}");
    };
    // 1. Asked for SMTPUTF8, but nothing in it needs it: sent without.
    send("bob@nhs.test", "plain ascii").await;
    assert_eq!(wait(&cloud, 1).await, 1);
    let m = &cloud.state.messages()[0];
    assert!(!m.smtputf8);
    assert!(strip_received(&m.body).starts_with(b"Subject: plain ascii\r\n"));
    // 2. A UTF-8 header: cannot be sent there; bounced with 5.6.9.
    send("carol@nhs.test", "café").await;
    // 3. A non-ASCII recipient: bounced with 5.6.7.
    send("jörg@nhs.test", "plain").await;
    let dsns = eventually("2 DSNs", || {
        let d: Vec<_> = onprem
            .state
            .messages()
            .into_iter()
            .filter(|m| m.from.is_none())
            .collect();
        if d.len() >= 2 {
            Ok(d)
        } else {
            Err(format!("{} DSNs", d.len()))
        }
    })
    .await;
    let text: Vec<String> = dsns
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).to_string())
        .collect();
    let carol = text
        .iter()
        .find(|t| t.contains("Final-Recipient: rfc822; carol@nhs.test"))
        .expect("DSN for carol");
    assert!(carol.contains("Status: 5.6.9"), "{carol}");
    let jorg = text
        .iter()
        .find(|t| t.contains("Final-Recipient: rfc822; jörg@nhs.test"))
        .expect("DSN for jörg");
    assert!(jorg.contains("Status: 5.6.7"), "{jorg}");
    // Nothing that needed SMTPUTF8 reached the hop without it.
    assert_eq!(cloud.state.messages().len(), 1);
    drop(relay);
    drop(dir);
}
