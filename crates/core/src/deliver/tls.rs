//! Outbound TLS per route: the policy, the rustls connector (verifying or not, with an
//! optional client certificate) and the name to check.
//!
//! A route's TLS settings also carry an identity: a SHA-256 digest of everything that shapes
//! a session made with them (policy, trusted roots, client certificate chain and key). The
//! connection pool keys idle sessions on it, so a session opened with one route's client
//! certificate is never reused by a route that presents another (Exchange Online tells
//! connectors apart by that certificate), nor a session checked against one CA bundle by a
//! route that trusts another.

use crate::certs::{load_certs, load_key, provider, TlsError};
use crate::certs::{provider_signatures, NoVerify};
use crate::config::{RouteConfig, TlsPolicy};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// A route's TLS settings, ready for connections.
#[derive(Clone)]
pub struct RouteTls {
    /// The policy.
    pub policy: TlsPolicy,
    /// Connector for STARTTLS.
    pub connector: TlsConnector,
    /// Name to present (SNI) and, for `verify`, to check; default: the next hop's host.
    pub name: Option<String>,
    /// Digest of the material behind `connector` (see the module docs).
    identity: Arc<[u8]>,
    /// The policy that gave a next hop these settings (MTA-STS, DANE), named in TLS errors.
    why: Option<Arc<str>>,
    /// MTA-STS `testing`: a session without TLS is logged and counted.
    report_clear: bool,
    /// For `mta-sts` and `dane` routes: what per-hop settings are made from.
    internet: Option<Arc<Internet>>,
}

/// What the per-hop settings of an `mta-sts` or `dane` route are made from (the trusted
/// roots for MTA-STS `enforce` are the route's: system, or `tls_ca_file`).
struct Internet {
    /// The route's client certificate and key.
    client: Option<ClientAuth>,
    /// Verifies with `roots` (MTA-STS `enforce`).
    strict: TlsConnector,
    /// Verifies with `roots` but only reports failures (MTA-STS `testing`).
    report: TlsConnector,
}

fn clone_client(c: &Option<ClientAuth>) -> Option<ClientAuth> {
    c.as_ref()
        .map(|(chain, key)| (chain.clone(), key.clone_key()))
}

impl RouteTls {
    /// Settings without certificate checks or client certificate (load client, tests).
    pub fn plain(policy: TlsPolicy) -> RouteTls {
        RouteTls {
            policy,
            connector: build(false, None, None).unwrap_or_else(|_| unverified_fallback()),
            name: None,
            identity: identity(policy, None, None),
            why: None,
            report_clear: false,
            internet: None,
        }
    }

    /// Settings of a route; CA and client certificate files are read now, so a bad file is
    /// reported at start-up or reload with its path.
    pub fn from_route(r: &RouteConfig) -> Result<RouteTls, TlsError> {
        let client = match (&r.client_cert, &r.client_key) {
            (Some(c), Some(k)) => Some((load_certs(c)?, load_key(k)?)),
            _ => None,
        };
        let needs_roots = matches!(r.tls, TlsPolicy::Verify | TlsPolicy::MtaSts);
        let roots = if needs_roots {
            Some(match &r.tls_ca_file {
                Some(f) => load_certs(f)?,
                None => crate::certs::system_roots(),
            })
        } else {
            None
        };
        let identity = identity(r.tls, roots.as_deref(), client.as_ref());
        let internet = match r.tls {
            TlsPolicy::MtaSts | TlsPolicy::Dane => {
                let roots = roots.clone().unwrap_or_default();
                let webpki = || webpki_verifier(&roots);
                Some(Arc::new(Internet {
                    strict: build_with(webpki()?, clone_client(&client))?,
                    report: build_with(
                        Arc::new(ReportOnly {
                            inner: webpki()?,
                            provider: provider(),
                        }),
                        clone_client(&client),
                    )?,
                    client: clone_client(&client),
                }))
            }
            _ => None,
        };
        let verify = r.tls == TlsPolicy::Verify;
        Ok(RouteTls {
            policy: r.tls,
            connector: build(verify, roots.filter(|_| verify), client)?,
            name: r.tls_name.clone(),
            identity,
            why: None,
            report_clear: false,
            internet,
        })
    }

    /// These settings for one next hop, with `policy`, `connector` and a tag added to the
    /// identity.
    fn for_hop(
        &self,
        policy: TlsPolicy,
        connector: TlsConnector,
        tag: &[&[u8]],
        why: Option<String>,
    ) -> RouteTls {
        let mut parts: Vec<&[u8]> = vec![&self.identity];
        parts.extend_from_slice(tag);
        RouteTls {
            policy,
            connector,
            name: None,
            identity: sha256(&parts),
            why: why.map(Arc::from),
            report_clear: false,
            internet: None,
        }
    }

    /// Opportunistic TLS for a next hop of an `mta-sts` or `dane` route without a policy.
    pub fn opportunistic(&self) -> RouteTls {
        self.for_hop(
            TlsPolicy::Opportunistic,
            self.connector.clone(),
            &[b"opportunistic"],
            None,
        )
    }

    /// STARTTLS required, the certificate valid for the MX host (MTA-STS `enforce` of
    /// `domain`); `None` for settings not made from an `mta-sts` or `dane` route.
    pub fn sts_enforce(&self, domain: &str) -> Option<RouteTls> {
        let connector = self.internet.as_ref()?.strict.clone();
        let why = format!("MTA-STS policy of {domain} (enforce)");
        Some(self.for_hop(
            TlsPolicy::Verify,
            connector,
            &[b"mta-sts enforce"],
            Some(why),
        ))
    }

    /// Opportunistic TLS whose certificate failures are logged and counted (MTA-STS
    /// `testing` of `domain`).
    pub fn sts_testing(&self, domain: &str) -> RouteTls {
        let connector = self
            .internet
            .as_ref()
            .map(|i| i.report.clone())
            .unwrap_or_else(|| self.connector.clone());
        let why = format!("MTA-STS policy of {domain} (testing)");
        RouteTls {
            report_clear: true,
            ..self.for_hop(
                TlsPolicy::Opportunistic,
                connector,
                &[b"mta-sts testing"],
                Some(why),
            )
        }
    }

    /// Under MTA-STS `testing`, logs and counts a session that goes without TLS (`enforce`
    /// would have refused it).
    pub fn report_clear_text(&self, addr: std::net::SocketAddr) {
        if self.report_clear {
            metrics::counter!(crate::metrics::MTA_STS_REFUSALS, "mode" => "testing", "reason" => "starttls").increment(1);
            tracing::warn!(next_hop = %addr, policy = self.why.as_deref().unwrap_or(""), "MTA-STS (testing): no STARTTLS; delivering in clear text");
        }
    }

    /// STARTTLS required and the certificate matched against `tlsa` (DANE, RFC 7672) for the
    /// MX host `host`.
    pub fn dane(&self, host: &str, tlsa: Vec<super::dane::Tlsa>) -> Result<RouteTls, TlsError> {
        let mut tag: Vec<Vec<u8>> = vec![b"dane".to_vec()];
        tag.extend(tlsa.iter().map(|t| t.key()));
        let verifier = Arc::new(super::dane::DaneVerifier::new(tlsa, provider()));
        let client = self.internet.as_ref().and_then(|i| clone_client(&i.client));
        let connector = build_with(verifier, client)?;
        let tag: Vec<&[u8]> = tag.iter().map(|t| t.as_slice()).collect();
        let why = format!("DANE TLSA records of {host}");
        Ok(self.for_hop(TlsPolicy::Verify, connector, &tag, Some(why)))
    }

    /// STARTTLS required without authentication: DNSSEC-secure TLSA records of `host`
    /// exist but none is usable (RFC 7672 2.2).
    pub fn dane_unauthenticated(&self, host: &str) -> RouteTls {
        let why = format!("DANE (unusable TLSA records) of {host}");
        self.for_hop(
            TlsPolicy::Required,
            self.connector.clone(),
            &[b"dane unusable"],
            Some(why),
        )
    }

    /// What requires TLS of a next hop: the policy that chose these settings, or the route.
    pub fn requirer(&self) -> String {
        match &self.why {
            Some(w) => w.to_string(),
            None => "the route".into(),
        }
    }

    /// `reason` with the policy that chose these settings, if any.
    pub fn explain(&self, reason: String) -> String {
        match &self.why {
            Some(w) => format!("{w}: {reason}"),
            None => reason,
        }
    }

    /// What tells sessions made with these settings apart from sessions made with others:
    /// equal for equal policy, roots and client certificate and key (see the module docs).
    pub fn identity(&self) -> &[u8] {
        &self.identity
    }

    /// The server name for a next hop `host`.
    pub fn server_name(&self, host: &str) -> String {
        self.name.clone().unwrap_or_else(|| host.to_string())
    }
}

type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// SHA-256 over the policy, the trusted roots (`None`: no verification) and the client
/// certificate chain and key, each part length-prefixed.
fn identity(
    policy: TlsPolicy,
    roots: Option<&[CertificateDer<'static>]>,
    client: Option<&ClientAuth>,
) -> Arc<[u8]> {
    let mut parts: Vec<&[u8]> = vec![match policy {
        TlsPolicy::None => b"none",
        TlsPolicy::Opportunistic => b"opportunistic",
        TlsPolicy::Required => b"required",
        TlsPolicy::Verify => b"verify",
        TlsPolicy::MtaSts => b"mta-sts",
        TlsPolicy::Dane => b"dane",
    }];
    match roots {
        Some(roots) => {
            parts.push(b"roots");
            parts.extend(roots.iter().map(|c| c.as_ref()));
        }
        None => parts.push(b"no verification"),
    }
    match client {
        Some((chain, key)) => {
            parts.push(b"client");
            parts.extend(chain.iter().map(|c| c.as_ref()));
            parts.push(key.secret_der());
        }
        None => parts.push(b"no client certificate"),
    }
    sha256(&parts)
}

/// SHA-256 of the length-prefixed `parts` (an identity that never holds the key itself).
fn sha256(parts: &[&[u8]]) -> Arc<[u8]> {
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        h.update(&(p.len() as u64).to_be_bytes());
        h.update(p);
    }
    Arc::from(h.finish().as_ref())
}

fn build(
    verify: bool,
    roots: Option<Vec<CertificateDer<'static>>>,
    client: Option<ClientAuth>,
) -> Result<TlsConnector, TlsError> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if verify {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(roots.unwrap_or_default());
        builder.with_root_certificates(store)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(p)))
    };
    connector(builder, client)
}

/// The connector of a config whose verifier is set, presenting `client` if set.
fn connector(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    client: Option<ClientAuth>,
) -> Result<TlsConnector, TlsError> {
    let config = match client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(TlsError::ClientCert)?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connector that checks certificates with `verifier`, presenting `client` if set.
fn build_with(
    verifier: Arc<dyn ServerCertVerifier>,
    client: Option<ClientAuth>,
) -> Result<TlsConnector, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    connector(builder, client)
}

/// rustls' WebPKI verifier over `roots`.
fn webpki_verifier(
    roots: &[CertificateDer<'static>],
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(roots.to_vec());
    if store.is_empty() {
        // WebPKI refuses an empty store; a store that trusts nothing is what it means.
        return Ok(Arc::new(TrustNothing(provider())));
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map(|v| v as Arc<dyn ServerCertVerifier>)
        .map_err(TlsError::from)
}

/// Refuses every certificate (MTA-STS `enforce` with no trusted roots at all).
#[derive(Debug)]
struct TrustNothing(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustNothing {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }
    provider_signatures!(0);
}

/// Checks like `inner`, but a refused certificate is only logged and counted (MTA-STS
/// `testing`): the session goes on as opportunistic TLS.
#[derive(Debug)]
struct ReportOnly {
    inner: Arc<dyn ServerCertVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ReportOnly {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_server_cert(ee, intermediates, name, ocsp, now)
        {
            metrics::counter!(crate::metrics::MTA_STS_REFUSALS, "mode" => "testing", "reason" => "certificate").increment(1);
            tracing::warn!(server = ?name, error = %e, "MTA-STS (testing): certificate not valid; delivering anyway");
        }
        Ok(ServerCertVerified::assertion())
    }
    provider_signatures!(provider);
}

/// Only reached if rustls refused TLS 1.2/1.3 with aws-lc-rs, which it supports.
fn unverified_fallback() -> TlsConnector {
    TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                    .with_no_client_auth()
            })
            .unwrap_or_else(|e| unreachable!("rustls has no default protocol versions: {e}")),
    ))
}

/// TLS settings of every route of `config`, by route name.
pub fn route_tls(
    config: &crate::config::Config,
) -> Result<std::collections::HashMap<String, RouteTls>, TlsError> {
    config
        .routes
        .iter()
        .map(|(name, r)| RouteTls::from_route(r).map(|t| (name.clone(), t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tls: &str) -> RouteTls {
        let r: RouteConfig =
            toml::from_str(&format!("mx = \"example.org\"\ntls = \"{tls}\"\n")).unwrap();
        RouteTls::from_route(&r).unwrap()
    }

    #[test]
    fn per_hop_settings_have_their_own_identity() {
        let (sts, dane, opp) = (route("mta-sts"), route("dane"), route("opportunistic"));
        assert_eq!(sts.policy, TlsPolicy::MtaSts);
        assert_eq!(dane.policy, TlsPolicy::Dane);
        let tlsa = |b: u8| vec![super::super::dane::Tlsa::usable(3, 1, 1, &[b; 32]).unwrap()];
        let ids = [
            opp.identity().to_vec(),
            sts.identity().to_vec(),
            dane.identity().to_vec(),
            sts.opportunistic().identity().to_vec(),
            dane.opportunistic().identity().to_vec(),
            sts.sts_enforce("example.org").unwrap().identity().to_vec(),
            sts.sts_testing("example.org").identity().to_vec(),
            dane.dane("mx.example.org", tlsa(1))
                .unwrap()
                .identity()
                .to_vec(),
            dane.dane("mx.example.org", tlsa(2))
                .unwrap()
                .identity()
                .to_vec(),
            dane.dane_unauthenticated("mx.example.org")
                .identity()
                .to_vec(),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            sts.sts_enforce("example.org").unwrap().policy,
            TlsPolicy::Verify
        );
        assert!(opp.sts_enforce("example.org").is_none());
        assert_eq!(dane.dane_unauthenticated("x").policy, TlsPolicy::Required);
        assert!(sts
            .sts_enforce("example.org")
            .unwrap()
            .explain("bad certificate".into())
            .starts_with("MTA-STS policy of example.org (enforce): "));
    }
}
