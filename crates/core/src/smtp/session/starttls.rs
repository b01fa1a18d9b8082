//! STARTTLS (RFC 3207): the upgrade of a clear-text session to TLS.
//!
//! The session's stream is a [`MaybeTls<S>`]: `Plain(S)` until STARTTLS, then `Tls` over
//! the same `S`. The handshake works over any `S: AsyncRead + AsyncWrite + Unpin`, a TCP
//! socket in production, an in-memory duplex in the tests. Two rules live here: what the
//! client pipelined after STARTTLS in clear text is dropped (CVE-2011-0411), and everything
//! learnt before TLS (HELO name, transaction) is forgotten (RFC 3207 4.2).

use super::{Handler, Next, Session, SessionStream};
use crate::proto::Reply;
use crate::smtp::tls::MaybeTls;
use std::io;
use tracing::info;

impl<S: SessionStream, H: Handler> Session<S, H> {
    /// Answers STARTTLS and runs the handshake; a failed handshake ends the session.
    pub(super) async fn starttls(&mut self) -> io::Result<Next> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            return Ok(self.error(Reply::new(502, "5.5.1", "STARTTLS not available")));
        };
        if self.peer.tls.is_some() {
            return Ok(self.error(Reply::new(503, "5.5.1", "TLS already active")));
        }
        self.conn
            .reply(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.conn.flush().await?;
        // Anything the client pipelined after STARTTLS was sent in clear text before the
        // handshake: it must not be read as if it came over TLS (CVE-2011-0411).
        let injected = self.conn.buffered().len();
        if injected > 0 {
            info!(
                bytes = injected,
                "discarded plaintext pipelined after STARTTLS"
            );
        }
        self.conn.inbuf.clear();
        self.conn.start = 0;
        let plain = match std::mem::replace(&mut self.conn.stream, MaybeTls::Closed) {
            MaybeTls::Plain(s) => s,
            other => {
                self.conn.stream = other;
                return Ok(Next::Close);
            }
        };
        let handshake =
            tokio::time::timeout(self.cfg.command_timeout, acceptor.accept(plain)).await;
        match handshake {
            Ok(Ok(tls)) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "inbound", "result" => "ok").increment(1);
                self.conn.stream = MaybeTls::Tls(Box::new(tls));
                self.peer.tls = self.conn.stream.tls_summary();
                if let Some(tls) = &self.peer.tls {
                    tracing::Span::current().record("tls", tls.as_str());
                }
                // RFC 3207 4.2: forget everything learnt before TLS.
                self.peer.helo.clear();
                self.tx = None;
                Ok(Next::Continue)
            }
            Ok(Err(e)) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "inbound", "result" => "failed").increment(1);
                info!(error = %e, "TLS handshake failed");
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "TLS handshake failed",
                ))
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS handshake timeout",
            )),
        }
    }
}
