//! DANE for SMTP (RFC 7672) for routes with `tls = "dane"`.
//!
//! The MX records, the MX hosts' addresses and their TLSA records (`_PORT._tcp.HOST`) are
//! looked up through a DNSSEC-validating resolver (hickory, trust anchor `dns.trust_anchor`
//! or the IANA root). Per MX host:
//! - MX and address records secure, TLSA records secure and usable: STARTTLS is required
//!   and the certificate must match a TLSA record ([`DaneVerifier`]); a mismatch fails the
//!   handshake, never falls back to clear text.
//! - secure TLSA records, none usable: STARTTLS required, no authentication (RFC 7672 2.2).
//! - no TLSA record, or the MX or address records are insecure (unsigned): opportunistic
//!   TLS.
//! - bogus (validation failed) MX, address or TLSA records, or a TLSA lookup that fails: the
//!   host is not used; with no host left the delivery is deferred.
//!
//! Usable records (RFC 7672 3.1): DANE-EE(3) and DANE-TA(2), selector Cert(0) or SPKI(1),
//! matching Full(0), SHA2-256(1) or SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) are unusable
//! for SMTP. DANE-EE matches the server's own certificate with no name or expiry check
//! (RFC 7672 3.1.1); DANE-TA matches a certificate of the chain the server sent, which then
//! serves as the only trust anchor for a WebPKI path check with the MX host's name
//! (RFC 7672 3.1.2, 3.2.2). Signatures of the handshake are checked as always through the
//! provider's `verify_tls12_signature` / `verify_tls13_signature`.

use super::dns::{Dns, DnsError};
use super::tls::RouteTls;
use super::Hop;
use crate::metrics as m;
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// One usable TLSA record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub usage: u8,
    /// 0 (full certificate) or 1 (SubjectPublicKeyInfo).
    pub selector: u8,
    /// 0 (exact), 1 (SHA-256) or 2 (SHA-512).
    pub matching: u8,
    /// Certificate association data.
    pub data: Vec<u8>,
}

impl Tlsa {
    /// The record if it is usable for SMTP (see the module docs).
    pub fn usable(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Option<Tlsa> {
        let ok = matches!(usage, 2 | 3) && matches!(selector, 0 | 1) && matching <= 2;
        ok.then(|| Tlsa {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        })
    }

    /// The record's bytes, for the pool's session identity.
    pub fn key(&self) -> Vec<u8> {
        let mut k = vec![self.usage, self.selector, self.matching];
        k.extend_from_slice(&self.data);
        k
    }

    /// True when `cert` (DER) matches this record.
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let spki;
        let selected: &[u8] = match self.selector {
            0 => cert.as_ref(),
            _ => match webpki::EndEntityCert::try_from(cert) {
                Ok(c) => {
                    spki = c.subject_public_key_info();
                    spki.as_ref()
                }
                Err(_) => return false,
            },
        };
        let digest = |alg| aws_lc_rs::digest::digest(alg, selected);
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => digest(&aws_lc_rs::digest::SHA256).as_ref() == self.data.as_slice(),
            2 => digest(&aws_lc_rs::digest::SHA512).as_ref() == self.data.as_slice(),
            _ => false,
        }
    }
}

/// Checks a server certificate against an MX host's usable TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    tlsa: Vec<Tlsa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl DaneVerifier {
    /// A verifier for `tlsa` (usable records only).
    pub fn new(tlsa: Vec<Tlsa>, provider: Arc<rustls::crypto::CryptoProvider>) -> DaneVerifier {
        DaneVerifier { tlsa, provider }
    }

    /// DANE-TA: a certificate of the chain matches; the chain up to it must be valid for
    /// `name` with that certificate as the trust anchor.
    fn trust_anchor(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        for (i, ca) in intermediates.iter().enumerate() {
            if !self.tlsa.iter().any(|t| t.usage == 2 && t.matches(ca)) {
                continue;
            }
            let Ok(anchor) = webpki::anchor_from_trusted_cert(ca) else {
                continue;
            };
            let store = rustls::RootCertStore {
                roots: vec![anchor.to_owned()],
            };
            let Ok(v) = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                self.provider.clone(),
            )
            .build() else {
                continue;
            };
            if v.verify_server_cert(ee, &intermediates[..i], name, &[], now)
                .is_ok()
            {
                return true;
            }
        }
        false
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee_match = self.tlsa.iter().any(|t| t.usage == 3 && t.matches(ee));
        if ee_match || self.trust_anchor(ee, intermediates, name, now) {
            metrics::counter!(m::DANE_VERIFICATIONS, "result" => "match").increment(1);
            return Ok(ServerCertVerified::assertion());
        }
        metrics::counter!(m::DANE_VERIFICATIONS, "result" => "mismatch").increment(1);
        Err(rustls::Error::General(
            "certificate matches no TLSA record (DANE)".into(),
        ))
    }
    crate::certs::provider_signatures!(provider);
}

/// The DNSSEC status of a set of answers.
fn status(records: &[&Record]) -> Proof {
    if records.iter().any(|r| r.proof == Proof::Bogus) {
        Proof::Bogus
    } else if !records.is_empty() && records.iter().all(|r| r.proof == Proof::Secure) {
        Proof::Secure
    } else {
        Proof::Insecure
    }
}

/// An error of a validating lookup: was DNSSEC validation what failed (a bogus answer, or
/// a denial of existence that could not be proven)?
fn bogus_error(e: &hickory_resolver::net::NetError) -> bool {
    use hickory_resolver::net::{DnsError as E, NetError};
    match e {
        NetError::Dns(E::DnssecBogus) => true,
        NetError::Dns(E::Nsec { proof, .. }) => proof.is_bogus(),
        _ => false,
    }
}

/// An error of a validating lookup that says the records do not exist, provably or in an
/// insecure zone (not bogus).
fn no_records(e: &hickory_resolver::net::NetError) -> bool {
    use hickory_resolver::net::{DnsError as E, NetError};
    e.is_no_records_found()
        || matches!(e, NetError::Dns(E::Nsec { proof, .. }) if proof.is_insecure())
}

/// The MX hosts of `domain` by preference and whether the MX RRset is secure.
async fn mx(resolver: &TokioResolver, domain: &str) -> Result<(Vec<String>, bool), DnsError> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let lookup = match resolver.lookup(fqdn.as_str(), RecordType::MX).await {
        Ok(l) => l,
        // No MX (the name exists): the domain is its own mail host, authenticated like
        // any host by its address records.
        Err(e) if no_records(&e) && !e.is_nx_domain() => {
            return Ok((vec![domain.to_string()], true))
        }
        Err(e) if bogus_error(&e) => {
            return Err(DnsError::Policy(format!(
                "DNSSEC validation of the MX records of {domain} failed: {e}"
            )))
        }
        Err(e) => return Err(DnsError::Temporary(domain.to_string(), e.to_string())),
    };
    let records: Vec<&Record> = lookup
        .answers()
        .iter()
        .filter(|r| r.record_type() == RecordType::MX)
        .collect();
    let proof = status(&records);
    if proof == Proof::Bogus {
        metrics::counter!(m::DANE_LOOKUPS, "result" => "bogus").increment(1);
        return Err(DnsError::Policy(format!(
            "DNSSEC validation of the MX records of {domain} failed (bogus)"
        )));
    }
    let hosts = super::dns::mail_hosts(domain, records.iter().copied())?;
    Ok((hosts, proof == Proof::Secure))
}

/// The addresses of `host` (A and AAAA) and whether they are all secure.
async fn addresses(resolver: &TokioResolver, host: &str) -> Result<(Vec<IpAddr>, bool), String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((vec![ip], false));
    }
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let mut ips = Vec::new();
    let mut proofs = Vec::new();
    let mut last = None;
    for rtype in [RecordType::A, RecordType::AAAA] {
        match resolver.lookup(fqdn.as_str(), rtype).await {
            Ok(lookup) => {
                for r in lookup.answers().iter().filter(|r| r.record_type() == rtype) {
                    match &r.data {
                        RData::A(a) => ips.push(IpAddr::V4(a.0)),
                        RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
                        _ => continue,
                    }
                    proofs.push(r.proof);
                }
            }
            // One family missing is normal; the other may have addresses.
            Err(e) => last = Some(e.to_string()),
        }
    }
    if proofs.contains(&Proof::Bogus) {
        return Err(format!(
            "DNSSEC validation of the addresses of {host} failed (bogus)"
        ));
    }
    if ips.is_empty() {
        return Err(format!(
            "no address for {host}: {}",
            last.unwrap_or_else(|| "no records".into())
        ));
    }
    let secure = proofs.iter().all(|p| *p == Proof::Secure);
    Ok((ips, secure))
}

/// What the TLSA lookup of one MX host gave.
enum TlsaAnswer {
    /// Secure, with usable records.
    Usable(Vec<Tlsa>),
    /// Secure, none usable.
    Unusable,
    /// No TLSA records, or insecure ones.
    None,
    /// Validation failed, or the lookup failed: the host must not be used.
    Refused(String),
}

async fn tlsa(resolver: &TokioResolver, host: &str, port: u16) -> TlsaAnswer {
    let name = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
    let lookup = match resolver.lookup(name.as_str(), RecordType::TLSA).await {
        Ok(l) => l,
        Err(e) if no_records(&e) => {
            metrics::counter!(m::DANE_LOOKUPS, "result" => "none").increment(1);
            return TlsaAnswer::None;
        }
        Err(e) => {
            let result = if bogus_error(&e) { "bogus" } else { "failed" };
            metrics::counter!(m::DANE_LOOKUPS, "result" => result).increment(1);
            return TlsaAnswer::Refused(format!("TLSA lookup of {name} failed: {e}"));
        }
    };
    let records: Vec<&Record> = lookup
        .answers()
        .iter()
        .filter(|r| r.record_type() == RecordType::TLSA)
        .collect();
    match status(&records) {
        Proof::Bogus => {
            metrics::counter!(m::DANE_LOOKUPS, "result" => "bogus").increment(1);
            TlsaAnswer::Refused(format!(
                "DNSSEC validation of the TLSA records {name} failed (bogus)"
            ))
        }
        Proof::Secure => {
            let usable: Vec<Tlsa> = records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Tlsa::usable(
                        usage_u8(t.cert_usage),
                        selector_u8(t.selector),
                        matching_u8(t.matching),
                        &t.cert_data,
                    ),
                    _ => None,
                })
                .collect();
            if usable.is_empty() {
                metrics::counter!(m::DANE_LOOKUPS, "result" => "unusable").increment(1);
                TlsaAnswer::Unusable
            } else {
                metrics::counter!(m::DANE_LOOKUPS, "result" => "secure").increment(1);
                TlsaAnswer::Usable(usable)
            }
        }
        _ => {
            metrics::counter!(m::DANE_LOOKUPS, "result" => "insecure").increment(1);
            TlsaAnswer::None
        }
    }
}

fn usage_u8(u: CertUsage) -> u8 {
    u.into()
}
fn selector_u8(s: Selector) -> u8 {
    s.into()
}
fn matching_u8(x: Matching) -> u8 {
    x.into()
}

/// The next hops of an MX route under DANE: the MX hosts of `domain` on `port`, each with
/// the TLS settings its TLSA records give it (see the module docs).
pub(super) async fn hops(
    dns: &Dns,
    domain: &str,
    port: u16,
    tls: &RouteTls,
) -> Result<Vec<Hop>, DnsError> {
    let resolver = dns.validating()?;
    let (hosts, mx_secure) = mx(resolver, domain).await?;
    let mut out = Vec::new();
    let mut last = None;
    for host in hosts {
        let (ips, addr_secure) = match addresses(resolver, &host).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(domain, mx = %host, error = %e, "DANE: MX host skipped");
                last = Some(e);
                continue;
            }
        };
        let hop_tls = if mx_secure && addr_secure {
            match tlsa(resolver, &host, port).await {
                TlsaAnswer::Usable(records) => match tls.dane(&host, records) {
                    Ok(t) => t,
                    Err(e) => {
                        last = Some(format!("DANE settings for {host}: {e}"));
                        continue;
                    }
                },
                TlsaAnswer::Unusable => tls.dane_unauthenticated(&host),
                TlsaAnswer::None => tls.opportunistic(),
                TlsaAnswer::Refused(e) => {
                    tracing::warn!(domain, mx = %host, error = %e, "DANE: MX host skipped");
                    last = Some(e);
                    continue;
                }
            }
        } else {
            metrics::counter!(m::DANE_LOOKUPS, "result" => "insecure").increment(1);
            tracing::debug!(domain, mx = %host, mx_secure, addr_secure, "DANE: not DNSSEC-signed; opportunistic TLS");
            tls.opportunistic()
        };
        out.extend(ips.into_iter().map(|ip| Hop {
            addr: SocketAddr::new(ip, port),
            host: host.clone(),
            tls: hop_tls.clone(),
        }));
    }
    if out.is_empty() {
        return Err(DnsError::Policy(last.unwrap_or_else(|| {
            format!("DANE: no usable MX host for {domain}")
        })));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_records_and_matching() {
        assert!(Tlsa::usable(0, 0, 1, b"x").is_none(), "PKIX-TA");
        assert!(Tlsa::usable(1, 0, 1, b"x").is_none(), "PKIX-EE");
        assert!(Tlsa::usable(3, 2, 1, b"x").is_none(), "selector 2");
        assert!(Tlsa::usable(3, 1, 3, b"x").is_none(), "matching 3");
        let c = crate::certs::generate("mx.dane.test").unwrap();
        let der = CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap();
        let spki = webpki::EndEntityCert::try_from(&der)
            .unwrap()
            .subject_public_key_info();
        let sha256 = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
        let sha512 = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, b);
        for t in [
            Tlsa::usable(3, 1, 1, sha256(spki.as_ref()).as_ref()),
            Tlsa::usable(3, 0, 2, sha512(der.as_ref()).as_ref()),
            Tlsa::usable(3, 0, 0, der.as_ref()),
            Tlsa::usable(3, 1, 0, spki.as_ref()),
        ] {
            assert!(t.unwrap().matches(&der));
        }
        assert!(!Tlsa::usable(3, 1, 1, &[0; 32]).unwrap().matches(&der));
    }

    #[test]
    fn verifier_checks_ee_and_ta_records() {
        let c = crate::certs::generate("mx.dane.test").unwrap();
        let ee = CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap();
        let ca = CertificateDer::from_pem_slice(c.ca_pem.as_bytes()).unwrap();
        let sha256 = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
        let now = UnixTime::now();
        let host = ServerName::try_from("mx.dane.test").unwrap();
        let other = ServerName::try_from("other.test").unwrap();
        let verify = |tlsa: Tlsa, chain: &[CertificateDer<'_>], name: &ServerName<'_>| {
            DaneVerifier::new(vec![tlsa], crate::certs::provider())
                .verify_server_cert(&ee, chain, name, &[], now)
                .is_ok()
        };
        // DANE-TA(2) on the issuing CA: the chain must lead to it and the name must match.
        let ta = Tlsa::usable(2, 0, 1, sha256(ca.as_ref()).as_ref()).unwrap();
        assert!(verify(ta.clone(), std::slice::from_ref(&ca), &host));
        assert!(!verify(ta.clone(), std::slice::from_ref(&ca), &other));
        assert!(!verify(ta, &[], &host), "the TA must be in the chain sent");
        // DANE-EE(3): no name check.
        let ee_rec = Tlsa::usable(3, 0, 1, sha256(ee.as_ref()).as_ref()).unwrap();
        assert!(verify(ee_rec, &[], &other));
        // A DANE-EE record of the CA does not match the server's own certificate.
        let wrong = Tlsa::usable(3, 0, 1, sha256(ca.as_ref()).as_ref()).unwrap();
        assert!(!verify(wrong, std::slice::from_ref(&ca), &host));
    }

    use rustls_pki_types::pem::PemObject;
}
