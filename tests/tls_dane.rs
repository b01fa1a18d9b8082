//! Outbound DANE (RFC 7672, `tls = "dane"` on an MX route) against a local DNS server that
//! serves DNSSEC-signed answers under a test root key (the relay's `dns.trust_anchor`): a
//! matching TLSA record delivers over TLS, a mismatch or a bogus signature defers, an
//! unsigned zone falls back to opportunistic TLS, and DANE never falls back to clear text.
//! The test world is in `common/tls_world.rs`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;
#[path = "common/tls_world.rs"]
mod tls_world;

use coexist::config::TlsPolicy;
use coexist::load::sink::{Sink, SinkOptions};
use common::*;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector, TLSA};
use hickory_resolver::proto::rr::rdata::{A, MX};
use hickory_resolver::proto::rr::RData;
use std::net::Ipv4Addr;
use tls_world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ee_match_delivers_over_tls() {
    let w = dane_world("dane.test", |key, der, port| {
        let tlsa = key.signed(vec![tlsa_3_1_1(
            &format!("_{port}._tcp.mx.dane.test"),
            spki_sha256(der),
        )]);
        dane_zone(key, "dane.test", tlsa)
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "dane match").await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&w.mx, 1).await, 1);
    let got = w.mx.state.messages();
    assert!(got[0].tls, "not over TLS");
    assert!(String::from_utf8_lossy(&got[0].body).contains("Subject: dane match"));
    let m = metrics(&w.h).await;
    assert!(
        m.contains("coexist_dane_verifications_total{result=\"match\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_tlsa_mismatch_defers_and_sends_nothing() {
    let w = dane_world("mismatch.test", |key, _der, port| {
        let tlsa = key.signed(vec![tlsa_3_1_1(
            &format!("_{port}._tcp.mx.mismatch.test"),
            vec![0x42; 32],
        )]);
        dane_zone(key, "mismatch.test", tlsa)
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "dane mismatch").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&w.h, &queue_id(&r)).await;
    assert!(
        reply.contains("DANE TLSA records of mx.mismatch.test")
            && reply.contains("matches no TLSA record"),
        "{reply}"
    );
    assert!(
        w.mx.state.messages().is_empty(),
        "sent despite the mismatch"
    );
    let m = metrics(&w.h).await;
    assert!(
        m.contains("coexist_dane_verifications_total{result=\"mismatch\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_unsigned_zone_delivers_with_opportunistic_tls() {
    let w = dane_world("plain.test", |key, _der, _port| {
        // plain.test is delegated from the signed root without DS: its (unsigned) records
        // are provably insecure, so DANE does not apply.
        let mut zone = key.apex();
        zone.extend(key.insecure_delegation("plain.test"));
        zone.push(rec(
            "plain.test",
            RData::MX(MX::new(10, name("mx.plain.test"))),
        ));
        zone.push(rec("mx.plain.test", RData::A(A(Ipv4Addr::LOCALHOST))));
        zone
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "unsigned").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&w.mx, 1).await, 1);
    assert!(
        w.mx.state.messages()[0].tls,
        "opportunistic TLS was offered and not used"
    );
    let m = metrics(&w.h).await;
    assert!(
        m.contains("coexist_dane_tlsa_lookups_total{result=\"insecure\"}"),
        "{m}"
    );
}

/// The control of the case above: the same unsigned records without the signed proof that
/// the zone is unsigned (no insecure delegation) are bogus, not insecure: deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_unsigned_records_without_proof_of_insecurity_defer() {
    let w = dane_world("stripped.test", |key, _der, _port| {
        let mut zone = key.apex();
        zone.push(rec(
            "stripped.test",
            RData::MX(MX::new(10, name("mx.stripped.test"))),
        ));
        zone.push(rec("mx.stripped.test", RData::A(A(Ipv4Addr::LOCALHOST))));
        zone
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "stripped").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&w.h, &queue_id(&r)).await;
    assert!(reply.contains("DNSSEC validation"), "{reply}");
    assert!(
        w.mx.state.messages().is_empty(),
        "sent to an unauthenticated MX"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_bogus_signature_defers() {
    let w = dane_world("bogus.test", |key, der, port| {
        let tlsa = key.badly_signed(vec![tlsa_3_1_1(
            &format!("_{port}._tcp.mx.bogus.test"),
            spki_sha256(der),
        )]);
        dane_zone(key, "bogus.test", tlsa)
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "bogus").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&w.h, &queue_id(&r)).await;
    assert!(
        reply.contains("TLSA lookup of") && reply.contains("DNSSEC validation failed"),
        "{reply}"
    );
    assert!(
        w.mx.state.messages().is_empty(),
        "sent despite bogus TLSA records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_never_falls_back_to_clear_text_when_starttls_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (der, _, _) = cert_for(dir.path(), "mx.strip.test");
    // The MX host does not offer STARTTLS (as after a downgrade attack).
    let mx = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let key = RootKey::new();
    let anchor = key.write_anchor(dir.path());
    let port = mx.addr.port();
    let tlsa = key.signed(vec![tlsa_3_1_1(
        &format!("_{port}._tcp.mx.strip.test"),
        spki_sha256(&der),
    )]);
    let ns = dns_server(dane_zone(&key, "strip.test", tlsa)).await;
    let h = harness(|c| {
        internet_route(c, ns, "strip.test", TlsPolicy::Dane);
        c.routes.get_mut("cloud").unwrap().port = port;
        c.dns.trust_anchor = Some(anchor);
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "no starttls").await;
    assert_eq!(r.code, 250);
    let reply = deferred_reply(&h, &queue_id(&r)).await;
    assert!(
        reply.contains("does not offer STARTTLS") && reply.contains("DANE TLSA records"),
        "{reply}"
    );
    assert!(mx.state.messages().is_empty(), "sent in clear text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_with_only_unusable_tlsa_records_requires_unauthenticated_tls() {
    let w = dane_world("pkix.test", |key, der, port| {
        // PKIX-EE (usage 1) is unusable for SMTP (RFC 7672 3.1.3): TLS is still required.
        let owner = format!("_{port}._tcp.mx.pkix.test");
        let record = rec(
            &owner,
            RData::TLSA(TLSA::new(
                CertUsage::PkixEe,
                Selector::Spki,
                Matching::Sha256,
                spki_sha256(der),
            )),
        );
        dane_zone(key, "pkix.test", key.signed(vec![record]))
    })
    .await;
    let r = send_one(w.h.addr, &["bob@nhs.test"], "pkix").await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&w.mx, 1).await, 1);
    assert!(w.mx.state.messages()[0].tls);
    let m = metrics(&w.h).await;
    assert!(
        m.contains("coexist_dane_tlsa_lookups_total{result=\"unusable\"}"),
        "{m}"
    );
}
