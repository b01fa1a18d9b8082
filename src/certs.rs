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
    #[error("{path}: cannot load certificate: {reason}")]
    Cert {
        /// File.
        path: String,
        /// Reason.
        reason: String,
    },
    /// The key file is missing or holds no usable key.
    #[error("{path}: cannot load private key: {reason}")]
    Key {
        /// File.
        path: String,
        /// Reason.
        reason: String,
    },
    /// Certificate and key do not fit together, or rustls refused them.
    #[error("TLS config: {0}")]
    Config(String),
}

/// The crypto provider used everywhere (one provider, so no ambiguity at run time).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The PEM certificates in `path`, in order (a chain: leaf first); a file without any is
/// an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// The first PEM private key (PKCS#8, PKCS#1 or SEC1) in `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A trust store of the PEM certificates in `pem` (a CA bundle already in memory).
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(c.map_err(|e| TlsError::Config(e.to_string()))?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(roots)
}

/// The operating system's trusted CA certificates (those it can read; none if it has no
/// store).
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
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

/// Writes `ca.crt`, `server.crt` and `server.key` (mode 0600) into `dir`.
pub fn write(dir: &Path, hostname: &str) -> anyhow::Result<()> {
    let c = generate(hostname)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), &c.ca_pem)?;
    std::fs::write(dir.join("server.crt"), &c.cert_pem)?;
    let key_path = dir.join("server.key");
    std::fs::write(&key_path, &c.key_pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    }
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
            Err(TlsError::Cert { path, reason }) => {
                assert_eq!(path, key.display().to_string());
                assert!(reason.contains("no PEM certificate"), "{reason}");
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
