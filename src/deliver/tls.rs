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
use crate::config::{RouteConfig, TlsPolicy};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::DigitallySignedStruct;
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
}

impl RouteTls {
    /// Settings without certificate checks or client certificate (load client, tests).
    pub fn plain(policy: TlsPolicy) -> RouteTls {
        RouteTls {
            policy,
            connector: build(false, None, None).unwrap_or_else(|_| unverified_fallback()),
            name: None,
            identity: identity(policy, None, None),
        }
    }

    /// Settings of a route; CA and client certificate files are read now, so a bad file is
    /// reported at start-up or reload with its path.
    pub fn from_route(r: &RouteConfig) -> Result<RouteTls, TlsError> {
        let client = match (&r.client_cert, &r.client_key) {
            (Some(c), Some(k)) => Some((load_certs(c)?, load_key(k)?)),
            _ => None,
        };
        let roots = if r.tls == TlsPolicy::Verify {
            Some(match &r.tls_ca_file {
                Some(f) => load_certs(f)?,
                None => crate::certs::system_roots(),
            })
        } else {
            None
        };
        let identity = identity(r.tls, roots.as_deref(), client.as_ref());
        Ok(RouteTls {
            policy: r.tls,
            connector: build(r.tls == TlsPolicy::Verify, roots, client)?,
            name: r.tls_name.clone(),
            identity,
        })
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
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if verify {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(roots.unwrap_or_default());
        builder.with_root_certificates(store)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(p)))
    };
    let config = match client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
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

/// Encrypts without checking the certificate, as Postfix's `may` and `encrypt` levels do.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
