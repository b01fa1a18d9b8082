//! The listener: accepts connections, enforces the connection limit, runs one task per session.

use super::reply::canned;
use super::session::{self, Handler, SessionConfig};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

/// Accepts sessions on `listener` until the task is dropped. Beyond `limit` concurrent
/// sessions a new client gets `421 4.7.0` and is closed.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    cfg: Arc<SessionConfig>,
    handler: Arc<H>,
    limit: Arc<Semaphore>,
) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                info!(peer = %peer, "connection limit reached, answering 421");
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    canned::TOO_MANY_CONNECTIONS.write_to(&mut out);
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        stream.write_all(&out),
                    )
                    .await;
                });
                continue;
            }
        };
        let cfg = cfg.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            session::run(stream, peer, cfg, handler).await;
            drop(permit);
        });
    }
}
