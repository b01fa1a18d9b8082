//! TLS to PostgreSQL: the rustls connector for a parsed `fleet.postgres`
//! ([`crate::config::postgres`] says what each `sslmode` means).
//!
//! One connector serves every mode; the driver's own `sslmode` (set by the parser) decides
//! whether it is used at all (`disable`: never; `prefer`: when the server offers TLS). What
//! is trusted differs:
//!
//! - `verify-full`: rustls' WebPKI verifier over `sslrootcert`: the chain, and the host name
//!   (or IP address) of the connection in the certificate.
//! - `verify-ca`, and `require`/`prefer` with `sslrootcert`: the same chain check, but a
//!   certificate for another name is accepted ([`ChainOnly`]), as libpq does.
//! - `require`/`prefer` without `sslrootcert`: encrypted, the certificate not checked
//!   ([`NoVerify`], libpq's behaviour; handshake signatures are still checked).

use crate::certs::{load_certs, provider, system_roots, NoVerify};
use crate::config::postgres::{PgConn, RootCert, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why the TLS connector for the fleet's PostgreSQL could not be made. The errors name
/// `sslrootcert`'s file, never the connection string.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// `sslrootcert`'s file could not be read, or holds no certificate.
    #[error("fleet.postgres sslrootcert: {0}")]
    RootCert(#[source] crate::certs::TlsError),
    /// `sslrootcert` holds no certificate rustls can use as a CA.
    #[error("fleet.postgres sslrootcert: no usable CA certificate")]
    NoUsableCa,
    /// rustls refused to build a verifier over those CAs.
    #[error("fleet.postgres sslrootcert: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    /// rustls refused the client configuration.
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
}

/// The connector for `conn`; the error names `sslrootcert`'s file, never the string.
pub fn connector(conn: &PgConn) -> Result<MakeRustlsConnect, PgTlsError> {
    let roots = match &conn.sslrootcert {
        None => None,
        Some(RootCert::System) => Some(system_roots()),
        Some(RootCert::File(p)) => Some(load_certs(p).map_err(PgTlsError::RootCert)?),
    };
    let p = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(NoVerify(p.clone())),
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(roots);
            if store.is_empty() {
                return Err(PgTlsError::NoUsableCa);
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                p.clone(),
            )
            .build()
            .map_err(PgTlsError::Verifier)?;
            if conn.sslmode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(PgTlsError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Words a connection error for the log and `fleet status`: the driver's text, and for a
/// refused certificate what the mode checked. `err` is the driver's error text (which never
/// holds the connection string).
pub fn explain(conn: &PgConn, err: String) -> String {
    if !err.contains("invalid peer certificate") {
        return err;
    }
    let root = match &conn.sslrootcert {
        Some(RootCert::File(p)) => p.display().to_string(),
        Some(RootCert::System) => "the system's CAs".into(),
        None => "(none)".into(),
    };
    let what = if conn.sslmode == SslMode::VerifyFull {
        "be signed by a CA in sslrootcert and name the host connected to"
    } else {
        "be signed by a CA in sslrootcert"
    };
    format!(
        "{err} (sslmode={}: the server's certificate must {what}; sslrootcert: {root})",
        conn.sslmode.name()
    )
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // WebPKI checks the chain (and validity) before the name: a name error means the
        // chain passed.
        match self
            .0
            .verify_server_cert(ee, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The fleet's PostgreSQL: the driver's settings (what the fleet's statements and errors
/// read, through `Deref`), and the TLS connector its connections use.
#[derive(Clone)]
pub struct Pg {
    conn: PgConn,
    tls: MakeRustlsConnect,
}

impl Pg {
    /// The settings and connector for `conn` (see [`connector`]).
    pub fn new(conn: PgConn) -> Result<Pg, PgTlsError> {
        let tls = connector(&conn)?;
        Ok(Pg { conn, tls })
    }

    /// The connector for a new connection.
    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// A connection error worded with what the TLS mode checked (see [`explain`]).
    pub fn explain(&self, err: String) -> String {
        explain(&self.conn, err)
    }
}

impl std::ops::Deref for Pg {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.conn.config
    }
}

impl std::ops::DerefMut for Pg {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.conn.config
    }
}
