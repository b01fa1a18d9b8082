//! Outbound TLS for the internet: `tls = "mta-sts"` (RFC 8461) and `tls = "dane"`
//! (RFC 7672) on an MX route, against a local DNS server (serving DNSSEC-signed answers for
//! DANE, signed here with hickory's signer under a test root key that the relay gets as
//! `dns.trust_anchor`) and a local HTTPS server (the MTA-STS policy host, with a test CA).
//! The next hop is an in-process sink offering STARTTLS; tests look at what a user sees:
//! the bytes at the sink and whether they came over TLS, the queue entry's last reply, the
//! policy server's request count, and the metrics.

mod common;

use coexist::config::{Config, TlsPolicy};
use coexist::load::sink::{Sink, SinkOptions};
use common::*;
use hickory_resolver::proto::dnssec::crypto::EcdsaSigningKey;
use hickory_resolver::proto::dnssec::rdata::{DNSSECRData, DNSKEY, NSEC, RRSIG};
use hickory_resolver::proto::dnssec::{Algorithm, DnssecSigner, SigningKey};
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector, TLSA};
use hickory_resolver::proto::rr::rdata::{A, MX, NS, TXT};
use hickory_resolver::proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most queries or connections a test server answers (every loop is bounded).
const MAX_SERVED: usize = 10_000;

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).unwrap()
}

fn rec(owner: &str, data: RData) -> Record {
    Record::from_rdata(name(owner), 300, data)
}

/// The test's DNSSEC root key: signs every record it is asked to (as the root zone), and
/// writes itself as a trust anchor file.
struct RootKey {
    signer: DnssecSigner,
    dnskey: DNSKEY,
}

impl RootKey {
    fn new() -> RootKey {
        let alg = Algorithm::ECDSAP256SHA256;
        let pkcs8 = EcdsaSigningKey::generate_pkcs8(alg).unwrap();
        let key = EcdsaSigningKey::from_pkcs8(&pkcs8, alg).unwrap();
        let dnskey = DNSKEY::new(true, true, false, key.to_public_key().unwrap());
        let signer = DnssecSigner::new(
            dnskey.clone(),
            Box::new(key),
            Name::root(),
            std::time::Duration::from_secs(86_400),
        );
        RootKey { signer, dnskey }
    }

    /// The RRSIG over `records` (one RRset: same owner and type).
    fn sign(&self, records: &[Record]) -> Record {
        let first = &records[0];
        let mut set = RecordSet::new(first.name.clone(), first.record_type(), 0);
        for r in records {
            set.insert(r.clone(), 0);
        }
        let inception = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let sig = RRSIG::from_rrset(&set, DNSClass::IN, inception, &self.signer).unwrap();
        Record::from_rdata(
            first.name.clone(),
            first.ttl,
            RData::DNSSEC(DNSSECRData::RRSIG(sig)),
        )
    }

    /// `records` (one RRset) and their RRSIG.
    fn signed(&self, records: Vec<Record>) -> Vec<Record> {
        let sig = self.sign(&records);
        let mut out = records;
        out.push(sig);
        out
    }

    /// `records` with an RRSIG whose signature bytes are altered (bogus).
    fn badly_signed(&self, records: Vec<Record>) -> Vec<Record> {
        let sig = self.sign(&records);
        let RData::DNSSEC(DNSSECRData::RRSIG(rrsig)) = &sig.data else {
            unreachable!()
        };
        let mut bytes = rrsig.sig().to_vec();
        bytes[10] ^= 0xff;
        let bad = RRSIG::from_sig(rrsig.input().clone(), bytes);
        let mut out = records;
        out.push(Record::from_rdata(
            sig.name.clone(),
            sig.ttl,
            RData::DNSSEC(DNSSECRData::RRSIG(bad)),
        ));
        out
    }

    /// The root DNSKEY RRset, self-signed.
    fn apex(&self) -> Vec<Record> {
        self.signed(vec![Record::from_rdata(
            Name::root(),
            300,
            RData::DNSSEC(DNSSECRData::DNSKEY(self.dnskey.clone())),
        )])
    }

    /// An insecure delegation of `zone` from the signed root: its NS record, and the signed
    /// NSEC that proves it has no DS record (RFC 4035 5.2).
    fn insecure_delegation(&self, zone: &str) -> Vec<Record> {
        let mut out = vec![rec(zone, RData::NS(NS(name(&format!("ns.{zone}")))))];
        let nsec = NSEC::new(
            name(&format!("{zone}-next")),
            [RecordType::NS, RecordType::RRSIG, RecordType::NSEC],
        );
        out.extend(self.signed(vec![rec(zone, RData::DNSSEC(DNSSECRData::NSEC(nsec)))]));
        out
    }

    fn write_anchor(&self, dir: &Path) -> PathBuf {
        let path = dir.join("root.key");
        std::fs::write(&path, format!(". 300 IN DNSKEY {}\n", self.dnskey)).unwrap();
        path
    }
}

/// A small authoritative DNS server over UDP on loopback, answering from `zone` as given
/// (records and their RRSIGs): the records of the name and type asked (with the RRSIGs that
/// cover them), else NODATA with the NSEC records of the name (and their RRSIGs) when the
/// name exists (or has names below it), else NXDOMAIN. Written for the tests only.
async fn dns_server(zone: Vec<Record>) -> SocketAddr {
    dns_server_shared(Arc::new(Mutex::new(zone))).await
}

/// [`dns_server`] over a zone the test may change while it runs.
async fn dns_server_shared(zone: Arc<Mutex<Vec<Record>>>) -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        for _ in 0..MAX_SERVED {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let resp = answer(&query, &zone.lock().unwrap());
            if let Some(resp) = resp {
                let _ = sock.send_to(&resp, peer).await;
            }
        }
    });
    addr
}

fn covers(r: &Record, rtype: RecordType) -> bool {
    match &r.data {
        RData::DNSSEC(DNSSECRData::RRSIG(s)) => s.input().type_covered == rtype,
        _ => false,
    }
}

fn answer(query: &Message, zone: &[Record]) -> Option<Vec<u8>> {
    let q = query.queries.first()?.clone();
    let (qname, qtype) = (q.name().clone(), q.query_type());
    let mut resp = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(q);
    if let Some(e) = &query.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.set_dnssec_ok(e.flags().dnssec_ok);
        resp.set_edns(edns);
    }
    let at_name = |r: &&Record| r.name == qname;
    let answers: Vec<Record> = zone
        .iter()
        .filter(at_name)
        .filter(|r| r.record_type() == qtype || covers(r, qtype))
        .cloned()
        .collect();
    if !answers.is_empty() {
        resp.insert_answers(answers);
    } else if zone.iter().any(|r| qname.zone_of(&r.name)) {
        let nsec: Vec<Record> = zone
            .iter()
            .filter(at_name)
            .filter(|r| r.record_type() == RecordType::NSEC || covers(r, RecordType::NSEC))
            .cloned()
            .collect();
        resp.insert_authorities(nsec);
    } else {
        resp.metadata.response_code = ResponseCode::NXDomain;
    }
    resp.to_vec().ok()
}

/// A CA and a certificate for `host` (and localhost, 127.0.0.1) written under `dir`:
/// returns (certificate DER, CA file, SMTP acceptor for the certificate).
fn cert_for(dir: &Path, host: &str) -> (Vec<u8>, PathBuf, tokio_rustls::TlsAcceptor) {
    use rustls_pki_types::pem::PemObject;
    let c = coexist::certs::generate(host).unwrap();
    let (cert, key, ca) = (
        dir.join(format!("{host}.crt")),
        dir.join(format!("{host}.key")),
        dir.join(format!("{host}.ca")),
    );
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    std::fs::write(&ca, &c.ca_pem).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(c.cert_pem.as_bytes())
        .unwrap()
        .to_vec();
    let acceptor = coexist::smtp::tls::load_acceptor(&cert, &key).unwrap();
    (der, ca, acceptor)
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo: the data of a `3 1 1` TLSA record.
fn spki_sha256(der: &[u8]) -> Vec<u8> {
    let der = rustls_pki_types::CertificateDer::from(der.to_vec());
    let cert = webpki::EndEntityCert::try_from(&der).unwrap();
    let spki = cert.subject_public_key_info();
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.as_ref())
        .as_ref()
        .to_vec()
}

fn tlsa_3_1_1(owner: &str, data: Vec<u8>) -> Record {
    rec(
        owner,
        RData::TLSA(TLSA::new(
            CertUsage::DaneEe,
            Selector::Spki,
            Matching::Sha256,
            data,
        )),
    )
}

/// The MTA-STS policy host: HTTPS on loopback with a test CA, serving `policy` at
/// `/.well-known/mta-sts.txt` and counting requests.
struct PolicyServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    ca_file: PathBuf,
    /// The policy served (the test may change it).
    body: Arc<Mutex<String>>,
    /// When set, this raw HTTP response is sent instead of the policy.
    raw: Arc<Mutex<Option<String>>>,
}

async fn policy_server(dir: &Path, domain: &str, policy: &str) -> PolicyServer {
    let (_, ca_file, acceptor) = cert_for(dir, &format!("mta-sts.{domain}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(Mutex::new(policy.to_string()));
    let raw: Arc<Mutex<Option<String>>> = Arc::default();
    let (count, body_c, raw_c) = (requests.clone(), body.clone(), raw.clone());
    tokio::spawn(async move {
        for _ in 0..MAX_SERVED {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let body = body_c.lock().unwrap().clone();
            let raw = raw_c.lock().unwrap().clone();
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tokio::time::timeout(PATIENCE, tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let resp = if text.starts_with("GET /.well-known/mta-sts.txt HTTP/1.1\r\n") {
                    count.fetch_add(1, Ordering::SeqCst);
                    raw.unwrap_or_else(|| format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ))
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                };
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    PolicyServer {
        addr,
        requests,
        ca_file,
        body,
        raw,
    }
}

/// Makes the `cloud` route (bob's) deliver to the MX hosts of `domain` with `tls`, through
/// the DNS server `ns`, on the port of the cloud sink (which the harness made its next hop).
fn internet_route(c: &mut Config, ns: SocketAddr, domain: &str, tls: TlsPolicy) {
    c.dns.nameservers = vec![ns];
    let route = c.routes.get_mut("cloud").unwrap();
    route.port = route.next_hops[0].port;
    route.next_hops = Vec::new();
    route.mx = Some(coexist::types::Domain::parse(domain, false).unwrap());
    route.tls = tls;
}

fn sink_with_tls(acceptor: tokio_rustls::TlsAcceptor) -> SinkOptions {
    SinkOptions {
        tls: Some(acceptor),
        keep_bodies: true,
        ..SinkOptions::default()
    }
}

/// The last reply of recipient 0 of the deferred message `qid`, as the queue shows it.
async fn deferred_reply(h: &Harness, qid: &str) -> String {
    let entry = h.deferred(qid).await;
    let reply = entry.state.rcpts[0].last_reply.as_ref();
    serde_json::to_string(&reply).unwrap()
}

/// The relay's metrics text (admin API).
async fn metrics(h: &Harness) -> String {
    let admin = h.relay.admin_addr.unwrap();
    let (status, _, body) = http(admin, "GET", "/metrics", Some(TOKEN), None, b"").await;
    assert_eq!(status, 200);
    body
}

const POLICY: &str =
    "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmx: *.backup.sts.test\nmax_age: 86400\n";

/// An unsigned zone for MTA-STS: `domain` with MX `mx_host`, its TXT record and policy host.
fn sts_zone(domain: &str, mx_host: &str) -> Vec<Record> {
    let lo = RData::A(A(Ipv4Addr::LOCALHOST));
    vec![
        rec(domain, RData::MX(MX::new(10, name(mx_host)))),
        rec(mx_host, lo.clone()),
        rec(
            &format!("_mta-sts.{domain}"),
            RData::TXT(TXT::new(vec!["v=STSv1; id=20261126T1;".into()])),
        ),
        rec(&format!("mta-sts.{domain}"), lo),
    ]
}

fn sts_config(c: &mut Config, ns: SocketAddr, server: &PolicyServer, smtp_ca: &Path) {
    internet_route(c, ns, "sts.test", TlsPolicy::MtaSts);
    c.routes.get_mut("cloud").unwrap().tls_ca_file = Some(smtp_ca.to_path_buf());
    c.delivery.mta_sts.ca_file = Some(server.ca_file.clone());
    c.delivery.mta_sts.https_port = server.addr.port();
}

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

/// A DNSSEC-signed world under the test root: `domain` MX `mx.DOMAIN` (127.0.0.1), with
/// the given TLSA records (already signed or not) for `_PORT._tcp.mx.DOMAIN`.
fn dane_zone(key: &RootKey, domain: &str, tlsa: Vec<Record>) -> Vec<Record> {
    let mx_host = format!("mx.{domain}");
    let mut zone = key.apex();
    zone.extend(key.signed(vec![rec(domain, RData::MX(MX::new(10, name(&mx_host))))]));
    zone.extend(key.signed(vec![rec(&mx_host, RData::A(A(Ipv4Addr::LOCALHOST)))]));
    zone.extend(tlsa);
    zone
}

/// A DANE test's world: the relay, and the TLS sink that is `mx.DOMAIN`.
struct DaneWorld {
    h: Harness,
    mx: Sink,
    _dir: tempfile::TempDir,
}

/// Starts a TLS sink with a certificate for `mx.DOMAIN`, serves the DNS zone that `zone`
/// makes from the test root key, the sink's certificate (DER) and port, and starts the
/// relay with the `cloud` route delivering to `domain` with `tls = "dane"` and the test
/// root as trust anchor.
async fn dane_world(
    domain: &str,
    zone: impl FnOnce(&RootKey, &[u8], u16) -> Vec<Record>,
) -> DaneWorld {
    let dir = tempfile::tempdir().unwrap();
    let (der, _, acceptor) = cert_for(dir.path(), &format!("mx.{domain}"));
    let mx = Sink::start("127.0.0.1:0".parse().unwrap(), sink_with_tls(acceptor))
        .await
        .unwrap();
    let key = RootKey::new();
    let anchor = key.write_anchor(dir.path());
    let ns = dns_server(zone(&key, &der, mx.addr.port())).await;
    let port = mx.addr.port();
    let h = harness(|c| {
        internet_route(c, ns, domain, TlsPolicy::Dane);
        c.routes.get_mut("cloud").unwrap().port = port;
        c.dns.trust_anchor = Some(anchor);
    })
    .await;
    DaneWorld { h, mx, _dir: dir }
}

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

#[test]
fn mta_sts_and_dane_need_an_mx_route_and_say_where() {
    let base = coexist::config::DEFAULT_CONFIG;
    for policy in ["mta-sts", "dane"] {
        // The default config's `cloud` route has next_hops: give it the policy.
        let text = base.replacen(
            "[routes.cloud]\nnext_hops = [\"127.0.0.1:2602\"]\ntls = \"opportunistic\"\n",
            &format!("[routes.cloud]\nnext_hops = [\"127.0.0.1:2602\"]\ntls = \"{policy}\"\n"),
            1,
        );
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
    c.routes.get_mut("onprem").unwrap().tls = TlsPolicy::Opportunistic;
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("tls = \"mta-sts\""), "{text}");
    assert_eq!(Config::parse(&text, "written").unwrap(), c);
}
