//! The listener: accepts connections, enforces the connection limit and drain mode, runs one
//! task per session with the session config in force when it connected.

use super::session::{self, Handler, SessionConfig};
use crate::metrics as m;
use crate::proto::reply::{canned, Reply};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
    /// When set, new sessions get `421 4.3.2` too: this node's directory is behind its
    /// fleet's (set by the fleet follower; see `crate::fleet`).
    pub behind: Arc<AtomicBool>,
    /// Session slots; a session holds one permit.
    pub slots: Arc<Semaphore>,
    /// Total slots.
    pub max_sessions: usize,
    per_ip: Mutex<HashMap<IpAddr, ClientCount>>,
}

/// Sessions and recent connects of one client address.
struct ClientCount {
    open: usize,
    window_start: Instant,
    in_window: u32,
}

/// Holds a client's slot in the per-address count; released on drop.
struct ClientSlot {
    control: Arc<ServerControl>,
    ip: Option<IpAddr>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut map = self
            .control
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get_mut(&ip) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 && c.window_start.elapsed() >= RATE_WINDOW {
                map.remove(&ip);
            }
        }
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl ServerControl {
    /// Controls with `max_sessions` slots; `behind` is the fleet's flag, when in a fleet.
    pub fn new(
        session: SessionConfig,
        max_sessions: usize,
        behind: Option<Arc<AtomicBool>>,
    ) -> ServerControl {
        ServerControl {
            session: ArcSwap::from_pointee(session),
            draining: AtomicBool::new(false),
            behind: behind.unwrap_or_default(),
            slots: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new session from `ip` against the per-client limits of `cfg`; `Err` is the
    /// refusal. Trusted networks are not counted.
    fn admit(self: &Arc<Self>, ip: IpAddr, cfg: &SessionConfig) -> Result<ClientSlot, Reply> {
        if crate::policy::is_trusted(&cfg.trusted_networks, ip)
            || (cfg.max_connections_per_ip == 0 && cfg.max_connection_rate_per_ip == 0)
        {
            return Ok(ClientSlot {
                control: self.clone(),
                ip: None,
            });
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, c| c.open > 0 || c.window_start.elapsed() < RATE_WINDOW);
        }
        let c = map.entry(ip).or_insert(ClientCount {
            open: 0,
            window_start: Instant::now(),
            in_window: 0,
        });
        if cfg.max_connections_per_ip > 0 && c.open >= cfg.max_connections_per_ip {
            return Err(Reply::owned(
                421,
                "4.7.0",
                format!(
                    "Too many connections from your address (limit {})",
                    cfg.max_connections_per_ip
                ),
            ));
        }
        if c.window_start.elapsed() >= RATE_WINDOW {
            c.window_start = Instant::now();
            c.in_window = 0;
        }
        if cfg.max_connection_rate_per_ip > 0 && c.in_window >= cfg.max_connection_rate_per_ip {
            return Err(Reply::owned(
                421,
                "4.7.0",
                format!(
                    "Too many connections per minute from your address (limit {})",
                    cfg.max_connection_rate_per_ip
                ),
            ));
        }
        c.in_window += 1;
        c.open += 1;
        Ok(ClientSlot {
            control: self.clone(),
            ip: Some(ip),
        })
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
        if control.behind.load(Ordering::Relaxed) {
            let host = control.session.load().hostname.clone();
            let r = Reply::owned(
                421,
                "4.3.2",
                format!("{host} Directory behind the fleet, try another MX"),
            );
            refuse(stream, r, "behind");
            continue;
        }
        let permit = match control.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                info!(peer = %peer, "connection limit reached, answering 421");
                refuse(stream, canned::TOO_MANY_CONNECTIONS, "limit");
                continue;
            }
        };
        let cfg = control.session.load_full();
        let client = match control.admit(peer.ip(), &cfg) {
            Ok(c) => c,
            Err(r) => {
                info!(peer = %peer, reply = %r, "per-client limit reached");
                refuse(stream, r, "per_client");
                continue;
            }
        };
        let handler = handler.clone();
        metrics::counter!(m::SESSIONS_TOTAL).increment(1);
        metrics::gauge!(m::SESSIONS_OPEN).increment(1.0);
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            session::run(stream, peer, cfg, handler).await;
            metrics::gauge!(m::SESSIONS_OPEN).decrement(1.0);
            drop(client);
            drop(permit);
        });
    }
}
