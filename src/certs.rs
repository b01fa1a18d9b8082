//! Development certificates: a throw-away CA and a server certificate signed by it (rcgen).
//! Used by `coexist gen-certs`, the demo and the tests; never for production keys.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::Path;

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
