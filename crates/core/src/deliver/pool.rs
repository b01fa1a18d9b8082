//! Connection reuse and a circuit breaker per next hop.
//!
//! - Reuse: after a transaction the connection goes back to an idle list for its
//!   [`SessionKey`]; the next delivery with the same key reuses it, saving the TCP and TLS
//!   handshakes and EHLO. A session back for less than [`QUICK_REUSE`], whose last
//!   transaction ended with its message taken and whose socket shows nothing (no end, no
//!   unasked bytes), is used as it is; any other is checked with `RSET` first (as Postfix
//!   does with its cached sessions). One used unchecked that turns out closed before it
//!   answered anything is replaced by a new session in the same attempt (see
//!   [`super::deliver`]), as a deferral would have resent the message later. The key holds
//!   everything that shapes a session: the address, the EHLO name, the TLS policy, the name
//!   presented and checked (SNI), and the route's TLS identity (trusted roots, client
//!   certificate and key). So a session opened with one route's client certificate or CA
//!   bundle never carries another route's mail, even to the same next hop. Idle connections
//!   older than `IDLE_TIMEOUT` are closed.
//! - Circuit: a next hop that refuses connections is marked down for a growing time
//!   (1 s, 2 s, ... up to 60 s). While it is down deliveries skip it (failing over to the
//!   next hop, or deferring); when the time is up exactly one delivery probes it, the others
//!   keep skipping until the probe succeeds. A hop that is down costs no message: the
//!   recipients are deferred and retried.
//! - Slots and throttling: at most `delivery.hop_concurrency` transactions per next-hop
//!   address, fewer while the hop is throttled (see [`super::hops`]).

use super::connection::Looks;
use super::hops::{Gate, HopCondition, HopView, PauseRules, Slot, Throttles};
use super::{Connection, HopError, RouteTls};
use crate::config::TlsPolicy;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a connection may sit idle before it is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A clean session (see [`Connection::is_clean`]) idle for less than this is reused without
/// an `RSET` round trip: few servers drop a session within seconds of a reply, and one that
/// did is caught by the retry.
pub const QUICK_REUSE: Duration = Duration::from_secs(2);
/// Longest time a failing next hop is skipped before the next probe, unless the pool is
/// given a shorter one (the queue's `probe_interval`, so a route's probe is never skipped
/// for longer than the interval it is made at).
const MAX_DOWN: Duration = Duration::from_secs(60);

/// Most next hops whose slots or health are kept (beyond it, idle and expired entries go).
const MAX_HOPS: usize = 4096;

/// What a pooled session may be reused for: sessions are shared only between deliveries
/// with equal keys.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    addr: SocketAddr,
    helo: String,
    tls: TlsPolicy,
    /// The name presented (SNI) and, for `verify`, checked.
    server_name: String,
    /// [`RouteTls::identity`]: roots, client certificate and key.
    identity: Arc<[u8]>,
}

impl std::fmt::Debug for SessionKey {
    /// Everything but the identity digest (derived from the client key: kept out of logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("addr", &self.addr)
            .field("helo", &self.helo)
            .field("tls", &self.tls)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl SessionKey {
    /// The key of a session to `addr` (the next hop `host`) saying EHLO `helo`, with `tls`.
    pub fn new(addr: SocketAddr, host: &str, helo: &str, tls: &RouteTls) -> SessionKey {
        SessionKey {
            addr,
            helo: helo.to_string(),
            tls: tls.policy,
            server_name: tls.server_name(host),
            identity: Arc::from(tls.identity()),
        }
    }

    /// The next hop's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

struct Idle {
    conn: Connection,
    since: Instant,
}

#[derive(Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
    probing: bool,
    /// The error that opened the circuit.
    last_error: Option<String>,
}

/// Where a checked-out session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Opened for this delivery.
    New,
    /// Reused after an `RSET` it answered.
    Checked,
    /// Reused as it was, back for less than [`QUICK_REUSE`]: it may turn out closed.
    Unchecked,
}

/// What the circuit allows for a next hop now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Healthy: go ahead.
    Go,
    /// Down, and this caller is the one probe.
    Probe,
    /// Down: skip it; the next probe is due in this long.
    Skip(Duration),
}

/// Idle connections and health, per next hop.
pub struct Pool {
    idle: Mutex<HashMap<SessionKey, Vec<Idle>>>,
    health: Mutex<HashMap<SocketAddr, Health>>,
    slots: Mutex<HashMap<String, Arc<Gate>>>,
    throttles: Throttles,
    max_idle: usize,
    per_hop: usize,
    /// Longest skip of a failing hop, in milliseconds (at most [`MAX_DOWN`]).
    max_down_ms: std::sync::atomic::AtomicU64,
}

impl Pool {
    /// A pool keeping at most `max_idle` idle connections per next hop.
    /// A pool keeping at most `max_idle` idle connections per next hop and allowing at most
    /// `per_hop` transactions in flight per next-hop address (across routes).
    pub fn new(max_idle: usize, per_hop: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            throttles: Throttles::default(),
            max_idle,
            per_hop: per_hop.max(1),
            max_down_ms: std::sync::atomic::AtomicU64::new(MAX_DOWN.as_millis() as u64),
        }
    }

    /// A failing hop is skipped for at most `d` (capped at 60 s) before it is probed again.
    pub fn set_max_down(&self, d: Duration) {
        let ms = d.min(MAX_DOWN).as_millis().max(1) as u64;
        self.max_down_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The slots of next hop `hop` (`host:port`). Idle gates of hops that are up are
    /// dropped when there are many (a route to each recipient domain's MX meets many hosts).
    fn gate(&self, hop: &str) -> Arc<Gate> {
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = map.get(hop) {
            return g.clone();
        }
        if map.len() >= MAX_HOPS {
            map.retain(|h, g| {
                Arc::strong_count(g) > 1
                    || self.throttles.paused(h).is_some()
                    || g.lock_limit() < self.per_hop
            });
        }
        let g = Arc::new(Gate::new(self.per_hop));
        map.insert(hop.to_string(), g.clone());
        g
    }

    /// Waits for a transaction slot at next hop `hop` (`host:port`; held until dropped).
    pub async fn slot(&self, hop: &str) -> Option<Slot> {
        self.gate(hop).slot().await
    }

    /// The end of `hop`'s throttling pause and its last throttling reply, while paused.
    pub fn paused(&self, hop: &str) -> Option<(Instant, String)> {
        self.throttles.paused(hop)
    }

    /// Records a throttling `reply` from next hop `hop` (`host:port`) met on `route`:
    /// lowers its limit and pauses it (see [`super::hops`]). Returns the end of the pause.
    pub fn throttle(&self, hop: &str, route: &str, reply: &str, rules: PauseRules) -> Instant {
        let gate = self.gate(hop);
        let current = gate.lock_limit();
        let (limit, until, new) = self.throttles.throttled(hop, route, reply, rules, current);
        gate.set_limit(limit);
        metrics::counter!(crate::metrics::HOP_THROTTLE_REPLIES, "route" => route.to_string(), "next_hop" => hop.to_string()).increment(1);
        metrics::gauge!(crate::metrics::HOP_THROTTLED, "next_hop" => hop.to_string()).set(1.0);
        metrics::gauge!(crate::metrics::HOP_CONCURRENCY, "next_hop" => hop.to_string())
            .set(limit as f64);
        if new {
            let pause = until.saturating_duration_since(Instant::now());
            warn!(
                next_hop = hop,
                route,
                limit,
                pause_s = pause.as_secs_f64().round(),
                reply,
                "next hop throttles: fewer transactions at once, paused"
            );
        }
        until
    }

    /// Records a transaction next hop `hop` took without a throttling reply: a throttled
    /// hop ramps back up.
    pub fn succeeded(&self, hop: &str) {
        let Some((limit, up)) = self.throttles.succeeded(hop, self.per_hop) else {
            return;
        };
        self.gate(hop).set_limit(limit);
        metrics::gauge!(crate::metrics::HOP_CONCURRENCY, "next_hop" => hop.to_string())
            .set(limit as f64);
        if up {
            metrics::gauge!(crate::metrics::HOP_THROTTLED, "next_hop" => hop.to_string()).set(0.0);
            info!(next_hop = hop, limit, "next hop no longer throttled");
        }
    }

    /// Every next hop met so far: up, circuit open (by address) or throttled (by host and
    /// port), with its limit.
    pub fn hop_views(&self) -> Vec<HopView> {
        let mut views = self.throttles.views(self.per_hop);
        let mut seen: std::collections::HashSet<String> =
            views.iter().map(|v| v.next_hop.clone()).collect();
        let now = Instant::now();
        {
            let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            for (a, e) in h.iter() {
                let (Some(t), true) = (e.down_until, seen.insert(a.to_string())) else {
                    continue;
                };
                views.push(HopView {
                    next_hop: a.to_string(),
                    state: HopCondition::CircuitOpen,
                    limit: self.per_hop,
                    full_limit: self.per_hop,
                    resumes_in_s: t.saturating_duration_since(now).as_secs(),
                    since: None,
                    last_reply: e.last_error.clone(),
                    route: None,
                });
            }
        }
        let known: Vec<String> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for hop in known {
            if seen.insert(hop.clone()) {
                views.push(HopView {
                    next_hop: hop,
                    state: HopCondition::Up,
                    limit: self.per_hop,
                    full_limit: self.per_hop,
                    resumes_in_s: 0,
                    since: None,
                    last_reply: None,
                    route: None,
                });
            }
        }
        views.sort_by(|a, b| a.next_hop.cmp(&b.next_hop));
        views
    }

    /// Asks the circuit whether `addr` may be tried now.
    pub fn admit(&self, addr: SocketAddr) -> Admission {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = h.get_mut(&addr) else {
            return Admission::Go;
        };
        match e.down_until {
            None => Admission::Go,
            Some(t) if Instant::now() < t => Admission::Skip(t - Instant::now()),
            Some(_) if e.probing => Admission::Skip(Duration::ZERO),
            Some(_) => {
                e.probing = true;
                Admission::Probe
            }
        }
    }

    /// Records whether a connection to `addr` could be set up (`error`: why not).
    pub fn report(&self, addr: SocketAddr, error: Option<&str>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some(error) = error else {
            h.remove(&addr);
            return;
        };
        if h.len() >= MAX_HOPS && !h.contains_key(&addr) {
            // Many dead hosts (DSNs to made-up sender domains): forget those due for a probe.
            let now = Instant::now();
            h.retain(|_, e| e.down_until.is_some_and(|t| t > now));
        }
        let e = h.entry(addr).or_default();
        e.last_error = Some(error.chars().take(300).collect());
        e.failures = e.failures.saturating_add(1);
        e.probing = false;
        let secs = 1u64
            .checked_shl(e.failures.saturating_sub(1).min(6))
            .unwrap_or(64);
        let max =
            Duration::from_millis(self.max_down_ms.load(std::sync::atomic::Ordering::Relaxed));
        e.down_until = Some(Instant::now() + Duration::from_secs(secs).min(max));
    }

    /// A ready connection for `key` (to the next hop `host`, saying EHLO `helo`, with
    /// `tls`, from which `key` was made): a reused one (see the module docs), or a new one.
    pub async fn checkout(
        &self,
        key: &SessionKey,
        host: &str,
        helo: &str,
        tls: &RouteTls,
        timeout: Duration,
    ) -> Result<(Connection, Reuse), HopError> {
        loop {
            let idle = {
                let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                map.get_mut(key).and_then(Vec::pop)
            };
            let Some(idle) = idle else { break };
            let idled = idle.since.elapsed();
            if idled > IDLE_TIMEOUT {
                idle.conn.quit().await;
                continue;
            }
            let mut conn = idle.conn;
            match conn.look() {
                // Gone: nothing to say to it.
                Looks::Closed => continue,
                Looks::Quiet if idled < QUICK_REUSE && conn.is_clean() => {
                    return Ok((conn, Reuse::Unchecked))
                }
                // Older, not clean, or with something to read first (a 421?): RSET.
                Looks::Quiet | Looks::Unread => {
                    if conn.reset().await {
                        return Ok((conn, Reuse::Checked));
                    }
                }
            }
        }
        Connection::open(key.addr, host, helo, tls, timeout)
            .await
            .map(|c| (c, Reuse::New))
    }

    /// Returns a connection checked out for `key`, after a completed transaction, for reuse.
    pub fn checkin(&self, key: SessionKey, conn: Connection) {
        let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Close what has idled too long under any key (keys of settings replaced by a
        // reload are never checked out again).
        map.retain(|_, list| {
            list.retain(|i| i.since.elapsed() <= IDLE_TIMEOUT);
            !list.is_empty()
        });
        let list = map.entry(key).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_differ_with_anything_that_shapes_the_session() {
        let a: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let c = crate::certs::generate(name).unwrap();
            let (cert, key, ca) = (
                dir.path().join(format!("{name}.crt")),
                dir.path().join(format!("{name}.key")),
                dir.path().join(format!("{name}.ca")),
            );
            std::fs::write(&cert, c.cert_pem).unwrap();
            std::fs::write(&key, c.key_pem).unwrap();
            std::fs::write(&ca, c.ca_pem).unwrap();
            (cert, key, ca)
        };
        let (cert1, key1, ca1) = write("one.test");
        let (cert2, key2, ca2) = write("two.test");
        let route = |cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path| {
            let r: crate::config::RouteConfig = toml::from_str(&format!(
                "next_hops = [\"127.0.0.1:25\"]\ntls = \"verify\"\n\
                 client_cert = {cert:?}\nclient_key = {key:?}\ntls_ca_file = {ca:?}\n"
            ))
            .unwrap();
            RouteTls::from_route(&r).unwrap()
        };
        let base = route(&cert1, &key1, &ca1);
        let k = |tls: &RouteTls, host: &str, helo: &str| SessionKey::new(a, host, helo, tls);
        let key = k(&base, "hop.test", "mx1");
        // Same settings read again (a reload): the same key, so sessions are still reused.
        assert_eq!(key, k(&route(&cert1, &key1, &ca1), "hop.test", "mx1"));
        // Another client certificate, another CA bundle, name, EHLO name or policy: not.
        assert_ne!(key, k(&route(&cert2, &key2, &ca1), "hop.test", "mx1"));
        assert_ne!(key, k(&route(&cert1, &key1, &ca2), "hop.test", "mx1"));
        assert_ne!(key, k(&base, "other.test", "mx1"));
        assert_ne!(key, k(&base, "hop.test", "mx2"));
        assert_ne!(
            key,
            k(&RouteTls::plain(TlsPolicy::Verify), "hop.test", "mx1")
        );
        assert_ne!(
            k(&RouteTls::plain(TlsPolicy::Required), "hop.test", "mx1"),
            k(
                &RouteTls::plain(TlsPolicy::Opportunistic),
                "hop.test",
                "mx1"
            )
        );
    }

    #[test]
    fn hop_views_list_open_circuits_and_throttled_hops() {
        let pool = Pool::new(4, 4);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:10".parse().unwrap(),
        );
        assert!(pool.hop_views().is_empty());
        pool.report(a, Some("connection refused"));
        pool.report(b, None);
        let v = pool.hop_views();
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].next_hop.as_str(), v[0].state),
            ("127.0.0.1:9", HopCondition::CircuitOpen)
        );
        assert_eq!(v[0].last_reply.as_deref(), Some("connection refused"));
        let rules = PauseRules {
            first: Duration::from_secs(30),
            max: Duration::from_secs(60),
        };
        pool.throttle("127.0.0.1:10", "cloud", "451 4.7.500 busy", rules);
        pool.report(a, None);
        // a answers again (and had no transaction: not listed); b is throttled.
        let v = pool.hop_views();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(
            (v[0].next_hop.as_str(), v[0].state, v[0].limit),
            ("127.0.0.1:10", HopCondition::Throttled, 2)
        );
        assert!(pool.paused("127.0.0.1:10").is_some());
        assert_eq!(
            pool.admit(b),
            Admission::Go,
            "the circuit is another matter"
        );
    }

    #[test]
    fn circuit_opens_then_allows_one_probe() {
        let pool = Pool::new(4, 4);
        let a: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(pool.admit(a), Admission::Go);
        pool.report(a, Some("refused"));
        assert!(matches!(pool.admit(a), Admission::Skip(d) if d > Duration::ZERO));
        // Time is up: one probe, everyone else skips.
        pool.health.lock().unwrap().get_mut(&a).unwrap().down_until = Some(Instant::now());
        assert_eq!(pool.admit(a), Admission::Probe);
        assert_eq!(pool.admit(a), Admission::Skip(Duration::ZERO));
        pool.report(a, None);
        assert_eq!(pool.admit(a), Admission::Go);
    }
}
