//! The listener: accepts connections, enforces the connection limits and drain mode, runs
//! one task per session with the session config in force when it connected.
//!
//! The decisions are [`crate::policy::connection`]'s; this file keeps the counts they are
//! made on. A new session needs, in order: a slot of `server.max_connections`; when the client is
//! not in `policy.trusted_networks`, a slot outside the `server.reserved_connections` kept
//! for trusted clients (so on-premises Exchange gets in while the internet holds the rest);
//! and, again only for untrusted clients, room under the per-client limits, where a client
//! is its network of `policy.ipv4_client_prefix` / `ipv6_client_prefix` bits.

use super::session::{self, Handler, SessionConfig};
use crate::metrics as m;
use crate::policy::connection::{self, ClientLimits, Refusal};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::info;

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
    per_client: Mutex<HashMap<IpNet, ClientCount>>,
}

/// Sessions and recent connects of one client address.
struct ClientCount {
    open: usize,
    window_start: Instant,
    in_window: u32,
}

/// Holds a client's slot in the per-client count; released on drop.
struct ClientSlot {
    control: Arc<ServerControl>,
    group: Option<IpNet>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(group) = self.group else { return };
        let mut map = self
            .control
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get_mut(&group) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 && c.window_start.elapsed() >= RATE_WINDOW {
                map.remove(&group);
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
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a new session from `ip` (its global slot already taken) under the reserve
    /// for trusted networks and the per-client limits of `cfg` (the decisions are
    /// [`connection`]'s; this keeps the counts); `Err` is the refusal. Trusted networks
    /// use the reserve and are not counted per client.
    fn admit(self: &Arc<Self>, ip: IpAddr, cfg: &SessionConfig) -> Result<ClientSlot, Refusal> {
        let slot = |group| ClientSlot {
            control: self.clone(),
            group,
        };
        if connection::is_trusted(&cfg.trusted_networks, ip) {
            return Ok(slot(None));
        }
        // This session's slot is counted in `open_sessions`.
        connection::reserve(
            self.open_sessions(),
            self.max_sessions,
            cfg.reserved_connections,
        )?;
        let limits = ClientLimits {
            open: cfg.max_connections_per_ip,
            per_minute: cfg.max_connection_rate_per_ip,
        };
        if limits.off() {
            return Ok(slot(None));
        }
        let (v4, v6) = cfg.client_prefix;
        let group = connection::client_group(ip, v4, v6);
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, c| c.open > 0 || c.window_start.elapsed() < RATE_WINDOW);
        }
        let c = map.entry(group).or_insert(ClientCount {
            open: 0,
            window_start: Instant::now(),
            in_window: 0,
        });
        let new_window = c.window_start.elapsed() >= RATE_WINDOW;
        let in_window = if new_window { 0 } else { c.in_window };
        connection::per_client(&group, c.open, in_window, limits)?;
        if new_window {
            c.window_start = Instant::now();
        }
        c.in_window = in_window + 1;
        c.open += 1;
        Ok(slot(Some(group)))
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.max_sessions - self.slots.available_permits()
    }
}

/// Answers a client we will not serve, then closes.
fn refuse(mut stream: tokio::net::TcpStream, refusal: Refusal) {
    let Refusal { reply, reason } = refusal;
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
    let mut errors = crate::accept::AcceptErrors::new("smtp");
    // Replies go out as soon as they are written (no Nagle delay). On Linux an accepted
    // socket inherits TCP_NODELAY from its listener, which saves a `setsockopt` per
    // connection; elsewhere, or if the listener refused it, each socket gets it itself.
    let inherited =
        cfg!(target_os = "linux") && rustix::net::sockopt::set_tcp_nodelay(&listener, true).is_ok();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin, logged once a burst.
                errors.failed(&e).await;
                continue;
            }
        };
        errors.accepted();
        let closed = connection::closed(
            &control.session.load().hostname,
            control.draining.load(Ordering::Relaxed),
            control.behind.load(Ordering::Relaxed),
        );
        if let Some(r) = closed {
            refuse(stream, r);
            continue;
        }
        let permit = match control.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                info!(peer = %peer, "connection limit reached, answering 421");
                refuse(stream, connection::no_slot());
                continue;
            }
        };
        let cfg = control.session.load_full();
        let client = match control.admit(peer.ip(), &cfg) {
            Ok(c) => c,
            Err(r) => {
                info!(peer = %peer, reply = %r.reply, reason = r.reason, "session refused");
                refuse(stream, r);
                continue;
            }
        };
        let handler = handler.clone();
        metrics::counter!(m::SESSIONS_TOTAL).increment(1);
        metrics::gauge!(m::SESSIONS_OPEN).increment(1.0);
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
        tokio::spawn(async move {
            session::run(stream, peer, cfg, handler).await;
            metrics::gauge!(m::SESSIONS_OPEN).decrement(1.0);
            drop(client);
            drop(permit);
        });
    }
}
