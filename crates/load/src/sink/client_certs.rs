//! Client certificates seen by the sink, per session: a next hop that requires one (as
//! Exchange Online's partner connectors do) and records which certificate each session
//! presented, so tests can check which client identity delivered which message.

use crate::certs::TlsError;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The client certificate each sink session presented, by session.
///
/// A session runs in one tokio task from greeting to QUIT, and its TLS handshake (and so
/// the certificate check) runs in that task too: the verifier files the certificate under
/// the task's id, and the message handler, later in the same task, looks it up. Entries
/// stay for the sink's life (a test's), one per TLS session.
#[derive(Debug, Default)]
pub struct ClientCerts {
    by_session: Mutex<HashMap<tokio::task::Id, Vec<u8>>>,
}

impl ClientCerts {
    fn record(&self, cert: &[u8]) {
        if let Some(id) = tokio::task::try_id() {
            self.by_session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, cert.to_vec());
        }
    }

    /// The certificate (DER) presented in the session running in the current task.
    pub(super) fn current(&self) -> Option<Vec<u8>> {
        let id = tokio::task::try_id()?;
        self.by_session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
}

/// Checks client certificates like `inner` and records the ones that pass.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    seen: Arc<ClientCerts>,
}

impl ClientCertVerifier for RecordingVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.seen.record(end_entity.as_ref());
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A STARTTLS acceptor for a sink that requires a client certificate issued by one of
/// `client_cas` (PEM) and records, per session, the certificate presented: put the
/// acceptor in [`SinkOptions::tls`] and the record in [`SinkOptions::client_certs`]; each
/// [`SinkMessage::client_cert`] then says which certificate its session presented.
pub fn client_cert_acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: &[u8],
) -> Result<(tokio_rustls::TlsAcceptor, Arc<ClientCerts>), TlsError> {
    let seen = Arc::new(ClientCerts::default());
    let verifier = Arc::new(RecordingVerifier {
        inner: crate::smtp::tls::client_verifier(client_cas)?,
        seen: seen.clone(),
    });
    let config = crate::smtp::tls::config_with_client_verifier(certs, key, verifier)?;
    // Every handshake a full one: a resumed session presents no certificate to record.
    let mut config = config;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), seen))
}
