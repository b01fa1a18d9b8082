//! The world of the outbound TLS policy tests (`tests/tls_policies.rs`, `tests/tls_dane.rs`):
//! a local DNS server serving DNSSEC-signed answers under a test root key, a local HTTPS
//! MTA-STS policy host with a test CA, certificates and TLSA records for them, and an MX
//! route to the internet that uses them.

#![allow(dead_code)]

use crate::common::*;
use coexist::config::{Config, TlsPolicy};
use coexist::load::sink::{Sink, SinkOptions};
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
pub const MAX_SERVED: usize = 10_000;

pub fn name(s: &str) -> Name {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).unwrap()
}

pub fn rec(owner: &str, data: RData) -> Record {
    Record::from_rdata(name(owner), 300, data)
}

/// The test's DNSSEC root key: signs every record it is asked to (as the root zone), and
/// writes itself as a trust anchor file.
pub struct RootKey {
    pub signer: DnssecSigner,
    pub dnskey: DNSKEY,
}

impl RootKey {
    pub fn new() -> RootKey {
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
    pub fn sign(&self, records: &[Record]) -> Record {
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
    pub fn signed(&self, records: Vec<Record>) -> Vec<Record> {
        let sig = self.sign(&records);
        let mut out = records;
        out.push(sig);
        out
    }

    /// `records` with an RRSIG whose signature bytes are altered (bogus).
    pub fn badly_signed(&self, records: Vec<Record>) -> Vec<Record> {
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
    pub fn apex(&self) -> Vec<Record> {
        self.signed(vec![Record::from_rdata(
            Name::root(),
            300,
            RData::DNSSEC(DNSSECRData::DNSKEY(self.dnskey.clone())),
        )])
    }

    /// An insecure delegation of `zone` from the signed root: its NS record, and the signed
    /// NSEC that proves it has no DS record (RFC 4035 5.2).
    pub fn insecure_delegation(&self, zone: &str) -> Vec<Record> {
        let mut out = vec![rec(zone, RData::NS(NS(name(&format!("ns.{zone}")))))];
        let nsec = NSEC::new(
            name(&format!("{zone}-next")),
            [RecordType::NS, RecordType::RRSIG, RecordType::NSEC],
        );
        out.extend(self.signed(vec![rec(zone, RData::DNSSEC(DNSSECRData::NSEC(nsec)))]));
        out
    }

    pub fn write_anchor(&self, dir: &Path) -> PathBuf {
        let path = dir.join("root.key");
        std::fs::write(&path, format!(". 300 IN DNSKEY {}\n", self.dnskey)).unwrap();
        path
    }
}

/// A small authoritative DNS server over UDP on loopback, answering from `zone` as given
/// (records and their RRSIGs): the records of the name and type asked (with the RRSIGs that
/// cover them), else NODATA with the NSEC records of the name (and their RRSIGs) when the
/// name exists (or has names below it), else NXDOMAIN. Written for the tests only.
pub async fn dns_server(zone: Vec<Record>) -> SocketAddr {
    dns_server_shared(Arc::new(Mutex::new(zone))).await
}

/// [`dns_server`] over a zone the test may change while it runs.
pub async fn dns_server_shared(zone: Arc<Mutex<Vec<Record>>>) -> SocketAddr {
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

pub fn covers(r: &Record, rtype: RecordType) -> bool {
    match &r.data {
        RData::DNSSEC(DNSSECRData::RRSIG(s)) => s.input().type_covered == rtype,
        _ => false,
    }
}

pub fn answer(query: &Message, zone: &[Record]) -> Option<Vec<u8>> {
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
pub fn cert_for(dir: &Path, host: &str) -> (Vec<u8>, PathBuf, tokio_rustls::TlsAcceptor) {
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
pub fn spki_sha256(der: &[u8]) -> Vec<u8> {
    let der = rustls_pki_types::CertificateDer::from(der.to_vec());
    let cert = webpki::EndEntityCert::try_from(&der).unwrap();
    let spki = cert.subject_public_key_info();
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.as_ref())
        .as_ref()
        .to_vec()
}

pub fn tlsa_3_1_1(owner: &str, data: Vec<u8>) -> Record {
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
pub struct PolicyServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub ca_file: PathBuf,
    /// The policy served (the test may change it).
    pub body: Arc<Mutex<String>>,
    /// When set, this raw HTTP response is sent instead of the policy.
    pub raw: Arc<Mutex<Option<String>>>,
}

pub async fn policy_server(dir: &Path, domain: &str, policy: &str) -> PolicyServer {
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
pub fn internet_route(c: &mut Config, ns: SocketAddr, domain: &str, tls: TlsPolicy) {
    c.dns.nameservers = vec![ns];
    // The MX hosts and the MTA-STS policy host here are servers on loopback.
    c.delivery.allow_private_destinations = true;
    let route = c.routes.get_mut("cloud").unwrap();
    route.port = route.next_hops[0].port;
    route.next_hops = Vec::new();
    route.mx = Some(coexist::types::Domain::parse(domain, false).unwrap());
    route.tls = tls;
}

pub fn sink_with_tls(acceptor: tokio_rustls::TlsAcceptor) -> SinkOptions {
    SinkOptions {
        tls: Some(acceptor),
        keep_bodies: true,
        ..SinkOptions::default()
    }
}

/// The last reply of recipient 0 of the deferred message `qid`, as the queue shows it.
pub async fn deferred_reply(h: &Harness, qid: &str) -> String {
    let entry = h.deferred(qid).await;
    let reply = entry.state.rcpts[0].last_reply.as_ref();
    serde_json::to_string(&reply).unwrap()
}

/// The relay's metrics text (admin API).
pub async fn metrics(h: &Harness) -> String {
    let admin = h.relay.admin_addr.unwrap();
    let (status, _, body) = http(admin, "GET", "/metrics", Some(TOKEN), None, b"").await;
    assert_eq!(status, 200);
    body
}

pub const POLICY: &str =
    "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmx: *.backup.sts.test\nmax_age: 86400\n";

/// An unsigned zone for MTA-STS: `domain` with MX `mx_host`, its TXT record and policy host.
pub fn sts_zone(domain: &str, mx_host: &str) -> Vec<Record> {
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

pub fn sts_config(c: &mut Config, ns: SocketAddr, server: &PolicyServer, smtp_ca: &Path) {
    internet_route(c, ns, "sts.test", TlsPolicy::MtaSts);
    c.routes.get_mut("cloud").unwrap().tls_ca_file = Some(smtp_ca.to_path_buf());
    c.delivery.mta_sts.ca_file = Some(server.ca_file.clone());
    c.delivery.mta_sts.https_port = server.addr.port();
}

/// A DNSSEC-signed world under the test root: `domain` MX `mx.DOMAIN` (127.0.0.1), with
/// the given TLSA records (already signed or not) for `_PORT._tcp.mx.DOMAIN`.
pub fn dane_zone(key: &RootKey, domain: &str, tlsa: Vec<Record>) -> Vec<Record> {
    let mx_host = format!("mx.{domain}");
    let mut zone = key.apex();
    zone.extend(key.signed(vec![rec(domain, RData::MX(MX::new(10, name(&mx_host))))]));
    zone.extend(key.signed(vec![rec(&mx_host, RData::A(A(Ipv4Addr::LOCALHOST)))]));
    zone.extend(tlsa);
    zone
}

/// A DANE test's world: the relay, and the TLS sink that is `mx.DOMAIN`.
pub struct DaneWorld {
    pub h: Harness,
    pub mx: Sink,
    pub _dir: tempfile::TempDir,
}

/// Starts a TLS sink with a certificate for `mx.DOMAIN`, serves the DNS zone that `zone`
/// makes from the test root key, the sink's certificate (DER) and port, and starts the
/// relay with the `cloud` route delivering to `domain` with `tls = "dane"` and the test
/// root as trust anchor.
pub async fn dane_world(
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
