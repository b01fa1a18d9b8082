//! TLS material: the crypto provider, PEM certificates, private keys and CA bundles, and
//! throw-away development certificates.
//!
//! Inbound STARTTLS (`smtp::tls`), outbound connectors (`deliver::tls`), the test sink and
//! the CLI's checks all read the same kinds of files. They read them here, once, so that a
//! bad file is reported the same way wherever it is configured (its path and the reason),
//! and so that both directions use one crypto provider. How the material is then used (a
//! server acceptor, a client connector) stays with the side that uses it; this module does
//! not depend on either.
//!
//! The development certificates (rcgen) serve `coexist gen-certs`, the demo and the tests;
//! never production keys.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing or holds no certificate.
    #[error("{path}: cannot load certificate: {source}")]
    Cert {
        /// File.
        path: String,
        /// What is wrong with it.
        source: PemError,
    },
    /// The key file is missing or holds no usable key.
    #[error("{path}: cannot load private key: {source}")]
    Key {
        /// File.
        path: String,
        /// What is wrong with it.
        source: PemError,
    },
    /// rustls refused the material or the settings (certificate and key do not fit
    /// together, a CA certificate it cannot use).
    #[error("TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls could not build a certificate verifier over the CAs given.
    #[error("TLS config: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
    /// rustls refused the client certificate and key presented to next hops.
    #[error("TLS config: client certificate: {0}")]
    ClientCert(#[source] rustls::Error),
    /// A CA bundle in memory is not PEM.
    #[error("TLS config: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// A certificate's validity could not be read.
    #[error("{path}: cannot read the certificate's validity: {reason}")]
    Expiry {
        /// File.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other refusal, in words.
    #[error("TLS config: {0}")]
    Config(String),
}

/// What is wrong with a PEM file.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// It cannot be read, or is not PEM.
    #[error(transparent)]
    Read(#[from] rustls_pki_types::pem::Error),
    /// It holds no certificate.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// rustls refused what it holds (a key that does not fit the certificate).
    #[error(transparent)]
    Refused(#[from] rustls::Error),
}

/// The crypto provider used everywhere (one provider, so no ambiguity at run time).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The PEM certificates in `path`, in order (a chain: leaf first); a file without any is
/// an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let cert_err = |source: PemError| TlsError::Cert {
        path: path.display().to_string(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_err(e.into()))?;
    if certs.is_empty() {
        return Err(cert_err(PemError::NoCertificate));
    }
    Ok(certs)
}

/// The end of validity (Unix seconds) of the first certificate in a PEM file (the
/// server's own, before its chain), for `coexist_tls_cert_expiry_timestamp_seconds`.
pub fn not_after(path: &Path) -> Result<i64, TlsError> {
    let certs = load_certs(path)?;
    let bad = |reason: String| TlsError::Expiry {
        path: path.display().to_string(),
        reason,
    };
    let first = certs
        .first()
        .ok_or_else(|| bad("no certificate in the file".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref())
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The first PEM private key (PKCS#8, PKCS#1 or SEC1) in `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        source: e.into(),
    })
}

/// A trust store of the PEM certificates in `pem` (a CA bundle already in memory).
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// The operating system's trusted CA certificates (those it can read; none if it has no
/// store).
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// The handshake-signature methods of a `rustls` `ServerCertVerifier`: the crypto provider's own
/// checks (every verifier here checks signatures; they differ in what they trust).
/// `$field` is the verifier's field that holds its `CryptoProvider` (`0`, `provider`).
#[macro_export]
macro_rules! provider_signatures {
    ($field:tt) => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.$field.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.$field.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$field
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub use crate::provider_signatures;

/// Encrypts without checking the certificate: Postfix's `may` and `encrypt` levels for
/// outbound SMTP, libpq's `sslmode=require` without a root certificate for the fleet's
/// PostgreSQL. Handshake signatures are still checked (the server holds the key of the
/// certificate it showed).
#[derive(Debug)]
pub struct NoVerify(pub Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    provider_signatures!(0);
}

/// PEM texts of a generated CA and server certificate.
pub struct DevCerts {
    /// CA certificate (PEM).
    pub ca_pem: String,
    /// Server certificate (PEM).
    pub cert_pem: String,
    /// Server private key (PEM).
    pub key_pem: String,
}

/// Makes a CA and a server certificate for `hostname`, `localhost`, 127.0.0.1 and ::1.
pub fn generate(hostname: &str) -> Result<DevCerts, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "coexist development CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(vec![
        hostname.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params.distinguished_name.push(DnType::CommonName, hostname);
    // Usable as a server certificate and as a client certificate (outbound connectors).
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(DevCerts {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Why the development certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// rcgen could not make them.
    #[error(transparent)]
    Generate(#[from] rcgen::Error),
    /// The folder or a file could not be written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Writes `ca.crt`, `server.crt` and `server.key` (mode 0600) into `dir`.
#[allow(clippy::disallowed_methods)] // `coexist gen-certs` and tests: no server runs.
pub fn write(dir: &Path, hostname: &str) -> Result<(), WriteError> {
    let c = generate(hostname)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), &c.ca_pem)?;
    std::fs::write(dir.join("server.crt"), &c.cert_pem)?;
    let key_path = dir.join("server.key");
    // Owner-only from its creation (no moment when the key is readable by others).
    crate::fsmode::write(&key_path, &c.key_pem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_what_it_generates_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "mx.coexist.test").unwrap();
        let chain = load_certs(&dir.path().join("server.crt")).unwrap();
        assert_eq!(chain.len(), 1);
        load_key(&dir.path().join("server.key")).unwrap();
        let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
        assert_eq!(roots_from_pem(&ca).unwrap().len(), 1);

        // A key file is no certificate file, and the error says which file.
        let key = dir.path().join("server.key");
        match load_certs(&key) {
            Err(TlsError::Cert { path, source }) => {
                assert_eq!(path, key.display().to_string());
                assert!(matches!(source, PemError::NoCertificate), "{source}");
            }
            other => panic!("{other:?}"),
        }
        let missing = dir.path().join("missing.key");
        assert!(
            matches!(load_key(&missing), Err(TlsError::Key { path, .. }) if path.ends_with("missing.key"))
        );
        assert!(roots_from_pem(
            b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
        )
        .is_err());
    }
}
