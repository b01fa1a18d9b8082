//! TLS for inbound sessions: the server's acceptor (built from material that
//! [`crate::certs`] loads) and the stream that STARTTLS upgrades.

use crate::certs::{self, provider, TlsError};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Builds the STARTTLS acceptor from PEM files (TLS 1.2 and 1.3 only).
pub fn load_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = certs::load_certs(cert)?;
    let key_der = certs::load_key(key)?;
    acceptor_from(certs, key_der).map_err(|e| match e {
        TlsError::Rustls(e) => TlsError::Key {
            path: format!("{} (with {})", key.display(), cert.display()),
            source: e.into(),
        },
        other => other,
    })
}

/// Builds an acceptor from DER material already in memory.
pub fn acceptor_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An acceptor that requires a client certificate issued by one of `client_cas` (PEM
/// certificates), as a next hop that identifies senders by certificate does (tests, sinks).
pub fn acceptor_requiring_client_cert(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: &[u8],
) -> Result<TlsAcceptor, TlsError> {
    let config = config_with_client_verifier(certs, key, client_verifier(client_cas)?)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A verifier that accepts client certificates issued by one of `client_cas` (PEM).
pub fn client_verifier(
    client_cas: &[u8],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = certs::roots_from_pem(client_cas)?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(TlsError::from)
}

/// A server config (TLS 1.2 and 1.3) that checks client certificates with `verifier`.
pub fn config_with_client_verifier(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(TlsError::from)
}

/// A session's byte stream: clear text until STARTTLS, then TLS over the same stream `S`
/// (a TCP socket in production, an in-memory duplex in tests).
pub enum MaybeTls<S = TcpStream> {
    /// Clear text.
    Plain(S),
    /// After STARTTLS.
    Tls(Box<TlsStream<S>>),
    /// Taken away for the TLS handshake; reads see end of stream, writes fail.
    Closed,
}

impl<S> MaybeTls<S> {
    /// "TLSv1_3 with cipher X" for the Received header and logs, when TLS is on.
    pub fn tls_summary(&self) -> Option<String> {
        match self {
            MaybeTls::Plain(_) | MaybeTls::Closed => None,
            MaybeTls::Tls(s) => {
                let conn = s.get_ref().1;
                let version = conn
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_else(|| "TLS".into());
                let cipher = conn
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_else(|| "unknown".into());
                let client = if conn.peer_certificates().is_some_and(|c| !c.is_empty()) {
                    ", client certificate"
                } else {
                    ""
                };
                Some(format!("{version} with cipher {cipher}{client}"))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Closed => Poll::Ready(Ok(())),
        }
    }
}
