//! The listener: accepts connections, enforces the connection limit and drain mode, runs one
//! task per session with the session config in force when it connected.

use super::reply::Reply;
use super::session::{self, Handler, SessionConfig};
use crate::metrics as m;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

/// Runtime switches shared by the listeners and the admin API.
pub struct ServerControl {
    /// Session config for new sessions (swapped on reload).
    pub session: ArcSwap<SessionConfig>,
    /// When set, new sessions get `421 4.3.2` (drain before maintenance).
    pub draining: AtomicBool,
    /// Session slots; a session holds one permit.
    pub slots: Arc<Semaphore>,
    /// Total slots.
    pub max_sessions: usize,
}

impl ServerControl {
    /// Controls with `max_sessions` slots.
    pub fn new(session: SessionConfig, max_sessions: usize) -> ServerControl {
        ServerControl {
            session: ArcSwap::from_pointee(session),
            draining: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.max_sessions - self.slots.available_permits()
    }
}

/// Answers a client we will not serve, then closes.
fn refuse(mut stream: tokio::net::TcpStream, reply: Reply, reason: &'static str) {
    metrics::counter!(m::SESSIONS_REFUSED, "reason" => reason).increment(1);
    tokio::spawn(async move {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
    });
}

/// Accepts sessions on `listener` until the task is dropped.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    control: Arc<ServerControl>,
    handler: Arc<H>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if control.draining.load(Ordering::Relaxed) {
            let host = control.session.load().hostname.clone();
            let r = Reply::owned(
                421,
                "4.3.2",
                format!("{host} Service not available (draining), try another MX"),
            );
            refuse(stream, r, "draining");
            continue;
        }
        let permit = match control.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                info!(peer = %peer, "connection limit reached, answering 421");
                refuse(stream, super::reply::canned::TOO_MANY_CONNECTIONS, "limit");
                continue;
            }
        };
        let cfg = control.session.load_full();
        let handler = handler.clone();
        metrics::counter!(m::SESSIONS_TOTAL).increment(1);
        metrics::gauge!(m::SESSIONS_OPEN).increment(1.0);
        tokio::spawn(async move {
            session::run(stream, peer, cfg, handler).await;
            metrics::gauge!(m::SESSIONS_OPEN).decrement(1.0);
            drop(permit);
        });
    }
}
