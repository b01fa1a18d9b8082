//! Whole relay, toward its next hops: the `verify` TLS policy, client certificates (one
//! session per identity), limits of a next hop (transactions, recipients per transaction, a
//! `452` on the first recipient) and SMTPUTF8 passed on or not. Routing, retries and
//! failover: `relay_e2e.rs`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::TlsPolicy;
use coexist::load::sink::{SinkMode, SinkOptions};
use common::*;
use std::path::PathBuf;
use std::time::Duration;

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
            unknown_onprem(c);
        })
        .await;
        // Unlisted addresses take the onprem route (`unknown_onprem`).
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
        unknown_onprem(c);
    })
    .await;
    // Unlisted, so on premises (`unknown_onprem`).
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
