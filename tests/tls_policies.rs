//! Outbound TLS for the internet: `tls = "mta-sts"` (RFC 8461) and `tls = "dane"`
//! (RFC 7672) on an MX route, against a local DNS server (serving DNSSEC-signed answers for
//! DANE, signed here with hickory's signer under a test root key that the relay gets as
//! `dns.trust_anchor`) and a local HTTPS server (the MTA-STS policy host, with a test CA).
//! The next hop is an in-process sink offering STARTTLS; tests look at what a user sees (DANE's own tests: `tls_dane.rs`):
//! the bytes at the sink and whether they came over TLS, the queue entry's last reply, the
//! policy server's request count, and the metrics.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;
#[path = "common/tls_world.rs"]
mod tls_world;

use coexist::config::{Config, TlsPolicy};
use coexist::load::sink::SinkOptions;
use common::*;
use hickory_resolver::proto::rr::rdata::TXT;
use hickory_resolver::proto::rr::RData;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tls_world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_delivers_to_a_listed_mx_with_a_valid_certificate_and_caches_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "mx.sts.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca)
    })
    .await;

    for (i, expected) in [(0, 1), (1, 2)] {
        let r = send_one(h.addr, &["bob@nhs.test"], &format!("sts{i}")).await;
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(wait(&h.cloud, expected).await, expected);
    }
    let got = h.cloud.state.messages();
    assert!(got.iter().all(|m| m.tls), "delivered in clear: {got:?}");
    assert!(String::from_utf8_lossy(&got[1].body).contains("Subject: sts1"));
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "the second message used the cached policy"
    );
    // Persisted: after a restart the policy is read back, not fetched again.
    let spool = h.relay.control.config().spool.dir.clone();
    assert!(spool.join("mta-sts").join("sts.test.json").exists());
    let h = h.restart().await;
    let r = send_one(h.addr, &["bob@nhs.test"], "after restart").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 3).await, 3);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    let m = metrics(&h).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("coexist_mta_sts_fetches_total{result=\"ok\"}")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_defers_when_no_mx_is_in_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "mx.elsewhere.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    // The MX points at a host the policy does not list.
    let ns = dns_server(sts_zone("sts.test", "mx.elsewhere.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca)
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "unlisted mx").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&h, &queue_id(&r)).await;
    assert!(
        reply.contains("MTA-STS policy of sts.test (enforce) lists none of its MX hosts"),
        "{reply}"
    );
    assert!(h.cloud.state.messages().is_empty(), "delivered anyway");
    let m = metrics(&h).await;
    assert!(
        m.contains("coexist_mta_sts_refusals_total{mode=\"enforce\",reason=\"mx\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_defers_when_the_certificate_is_not_valid_for_the_mx() {
    let dir = tempfile::tempdir().unwrap();
    // The sink's certificate is for another name than the (listed) MX host.
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "wrong-name.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca)
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "bad cert").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&h, &queue_id(&r)).await;
    assert!(
        reply.contains("MTA-STS policy of sts.test (enforce)") && reply.contains("certificate"),
        "{reply}"
    );
    assert!(h.cloud.state.messages().is_empty(), "delivered anyway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_testing_delivers_despite_a_bad_certificate_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "wrong-name.test");
    let testing = POLICY.replace("mode: enforce", "mode: testing");
    let server = policy_server(dir.path(), "sts.test", &testing).await;
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca)
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "testing mode").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert!(h.cloud.state.messages()[0].tls);
    let m = metrics(&h).await;
    assert!(
        m.contains("coexist_mta_sts_refusals_total{mode=\"testing\",reason=\"certificate\"}"),
        "{m}"
    );
}

#[test]
fn mta_sts_and_dane_need_an_mx_route_and_say_where() {
    let base = coexist::config::DEFAULT_CONFIG;
    for policy in ["mta-sts", "dane"] {
        // The default config's `cloud` route has next_hops: give it the policy.
        let text = base.replacen("tls = \"verify\"\n", &format!("tls = \"{policy}\"\n"), 1);
        assert_ne!(text, base, "the default config has no [routes.cloud]");
        let err = Config::parse(&text, "coexist.toml")
            .unwrap_err()
            .to_string();
        let line = text
            .lines()
            .position(|l| l == format!("tls = \"{policy}\""))
            .unwrap()
            + 1;
        assert!(
            err.starts_with(&format!("coexist.toml:{line}: key `routes.cloud.tls`"))
                && err.contains("needs `mx`"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_policy_is_fetched_again_when_the_txt_id_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "mx.sts.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    let zone = Arc::new(Mutex::new(sts_zone("sts.test", "mx.sts.test")));
    let ns = dns_server_shared(zone.clone()).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca);
    })
    .await;
    assert_eq!(send_one(h.addr, &["bob@nhs.test"], "one").await.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // The domain publishes a new policy (now listing only another host) and a new id.
    *server.body.lock().unwrap() = POLICY.replace("mx: mx.sts.test\n", "");
    for r in zone.lock().unwrap().iter_mut() {
        if let RData::TXT(_) = r.data {
            r.data = RData::TXT(TXT::new(vec!["v=STSv1; id=20261126T2;".into()]));
        }
    }
    // A relay started now (no DNS cache) sees the new id, fetches again and enforces the
    // new policy: the MX host is no longer listed.
    let h = h.restart().await;
    let r = send_one(h.addr, &["bob@nhs.test"], "two").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&h, &queue_id(&r)).await;
    assert!(reply.contains("lists none of its MX hosts"), "{reply}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 2);
    assert_eq!(h.cloud.state.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_unusable_policy_without_cache_means_opportunistic() {
    let dir = tempfile::tempdir().unwrap();
    // The sink's certificate would fail `enforce`: delivery shows the policy was not used.
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "wrong-name.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    *server.raw.lock().unwrap() = Some(
        "HTTP/1.1 301 Moved Permanently\r\nLocation: https://evil.test/\r\nContent-Length: 0\r\n\r\n"
            .into(),
    );
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca)
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "redirected").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert!(h.cloud.state.messages()[0].tls);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    let m = metrics(&h).await;
    assert!(
        m.contains("coexist_mta_sts_fetches_total{result=\"failed\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_testing_delivers_without_starttls_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, _) = cert_for(dir.path(), "mx.sts.test");
    let testing = POLICY.replace("mode: enforce", "mode: testing");
    let server = policy_server(dir.path(), "sts.test", &testing).await;
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    // The sink offers no STARTTLS.
    let opts = SinkOptions {
        keep_bodies: true,
        ..SinkOptions::default()
    };
    let h = harness_with(opts, |c| sts_config(c, ns, &server, &smtp_ca)).await;
    let r = send_one(h.addr, &["bob@nhs.test"], "testing, clear").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert!(!h.cloud.state.messages()[0].tls);
    let m = metrics(&h).await;
    assert!(
        m.contains("coexist_mta_sts_refusals_total{mode=\"testing\",reason=\"starttls\"}"),
        "{m}"
    );
}

#[test]
fn new_settings_round_trip_through_toml() {
    let mut c = Config::parse(coexist::config::DEFAULT_CONFIG, "default").unwrap();
    c.dns.trust_anchor = Some("lab-root.key".into());
    c.delivery.mta_sts.ca_file = Some("lab-ca.pem".into());
    c.delivery.mta_sts.https_port = 8443;
    c.delivery.mta_sts.cache_dir = Some("var/mta-sts".into());
    let route = c.routes.get_mut("cloud").unwrap();
    route.next_hops = Vec::new();
    route.mx = Some(coexist::types::Domain::parse("example.org", false).unwrap());
    route.tls = TlsPolicy::MtaSts;
    // (The shipped cloud route's tls_name is Exchange Online's; mta-sts checks the MX's own.)
    route.tls_name = None;
    c.routes.get_mut("onprem").unwrap().tls = TlsPolicy::Opportunistic;
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("tls = \"mta-sts\""), "{text}");
    assert_eq!(Config::parse(&text, "written").unwrap(), c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_policy_host_on_loopback_is_not_fetched_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, smtp_ca, acceptor) = cert_for(dir.path(), "mx.sts.test");
    let server = policy_server(dir.path(), "sts.test", POLICY).await;
    // The policy host (and the MX host) resolve to 127.0.0.1.
    let ns = dns_server(sts_zone("sts.test", "mx.sts.test")).await;
    let h = harness_with(sink_with_tls(acceptor), |c| {
        sts_config(c, ns, &server, &smtp_ca);
        c.delivery.allow_private_destinations = false;
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "sts").await;
    assert_eq!(r.code, 250, "{r:?}");
    // The attempt looked for the policy first, then refused the MX host as well.
    let reply = deferred_reply(&h, &queue_id(&r)).await;
    assert!(
        reply.contains("MX host mx.sts.test resolves to loopback address 127.0.0.1"),
        "{reply}"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "the policy was fetched from loopback"
    );
    assert!(h.cloud.state.messages().is_empty());
}
