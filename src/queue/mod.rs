//! The scheduler: small index entries in memory, envelopes, states and bodies in the spool.
//!
//! A dispatcher task takes due messages from the [`index`] (ready ones first, oldest first,
//! then the timer) while fewer than `queue.max_active` attempts run, and starts one task per
//! attempt ([`schedule`]); a message waiting for its next attempt has no task and no body in
//! memory (DESIGN invariant 8). Each attempt plans the route again from the current
//! directory (invariant 3), delivers ([`attempt`]), and appends the new state to the spool
//! before the message is deferred, so a restart resumes the schedule. When a route's next
//! hops could not be reached, the messages deferred for it are released as soon as that
//! route answers again (a fresh message or a probe every `queue.probe_interval`), at the pace
//! the route's concurrency allows.
//!
//! When the spool cannot write what an attempt learned (disk full, I/O error), the outcome
//! is not dropped (DESIGN invariant 11): the new state stays in memory with the message's
//! index entry and is written before anything else is done with it; while that write fails
//! (tried again after 1 s, doubling to a minute) the message is not delivered, so a failed
//! write repeats a write, never a delivery. A message whose sender was told (DSN spooled, or
//! kept in `failed/`) but whose end record could not be written owes only that record: no
//! second delivery, no second DSN. `queue show` shows such a message with the newer state and
//! an `unwritten` note; the `coexist_queue_unwritten_outcomes` gauge counts them. These
//! outcomes live in memory: a restart before they are written resumes from the state on
//! disk (a graceful stop logs how many there are).
//!
//! An admin delete ends a message only once its end record is durable; when the spool cannot
//! write it the delete is refused with an error and the message stays queued as it was, so
//! a restart never brings back a message an admin was told is deleted.
//!
//! This module holds the [`Queue`] handle (submit, restore, hold, release, delete, flush);
//! `dsn` ends messages and spools DSNs, `view` gives listings and counts, and [`recent`]
//! keeps the recent per-recipient outcomes for `coexist trace`.

mod attempt;
mod dsn;
pub mod hops;
mod index;
pub mod rate;
pub mod recent;
mod schedule;
mod view;

pub use view::{
    age_bucket, MessageView, QueueShape, QueueStats, RcptView, RouteShape, AGE_BUCKETS_MIN,
};

use crate::config::Config;
use crate::deliver;
use crate::directory::Directory;
use crate::policy::plain_ip;
use crate::spool::{DeliveryState, Envelope, Loc, Queued, Spool};
use crate::types::{QueueId, QueueKey};
use arc_swap::ArcSwap;
use index::{Asks, Entry, Index, Settle, Slot, NO_ROUTE};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore};
use tracing::{error, info};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The index key of the queue id an admin typed, if it is one.
fn key_of(id: &str) -> Option<QueueKey> {
    QueueId::from_file_stem(id)?.key()
}

/// Where a queued message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Being delivered now, or due and waiting for a delivery slot.
    Active,
    /// Waiting for its next attempt.
    Deferred,
    /// Held by an admin.
    Held,
}

impl From<Slot> for Phase {
    fn from(s: Slot) -> Phase {
        match s {
            Slot::Ready | Slot::Busy => Phase::Active,
            Slot::Deferred => Phase::Deferred,
            Slot::Held => Phase::Held,
        }
    }
}

/// A queue-control call that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No such message in the queue.
    #[error("no message {0} in the queue")]
    NotFound(String),
    /// Outbound TLS material of a route is unusable.
    #[error(transparent)]
    Tls(#[from] crate::certs::TlsError),
    /// The resolver could not be set up.
    #[error("DNS: {0}")]
    Dns(#[source] deliver::dns::SetupError),
    /// The spool could not be read.
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    /// A delete was refused: the spool cannot write the message's end record now (disk
    /// full, I/O error). The message stays queued and is delivered as before.
    #[error("cannot delete {id}: the spool cannot record it ({reason}); the message stays queued")]
    NotDeleted {
        /// Queue id.
        id: String,
        /// The spool's error.
        reason: String,
    },
    /// A delete waits for the message's delivery attempt in progress to end.
    #[error(
        "the delete of {0} waits for its delivery attempt to end; see `coexist queue show {0}`"
    )]
    DeletePending(String),
}

/// Why the spool could not give a message's bytes or take a DSN.
#[derive(Debug, thiserror::Error)]
pub enum SpoolTaskError {
    /// A DSN was asked for a message from `<>`.
    #[error("no sender to return the message to")]
    NoSender,
    /// The spool refused the read or write.
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    /// The blocking task that did the I/O failed.
    #[error("spool task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A message as the queue shows it (read from the spool for listings and `queue show`).
#[derive(Debug, Clone)]
pub struct QueueEntry {
    /// Envelope.
    pub envelope: Arc<Envelope>,
    /// Per-recipient state: as last written to the spool, or as learned since when the spool
    /// could not write it ([`QueueEntry::unwritten`]).
    pub state: DeliveryState,
    /// Phase.
    pub phase: Phase,
    /// Unix time of the next attempt, when deferred.
    pub next_attempt: Option<u64>,
    /// What the spool could not write yet (`state` is then the newer state in memory): it
    /// is written before anything else is done with the message.
    pub unwritten: Option<String>,
}

/// Route health as the scheduler tracks it, by route tag.
#[derive(Debug, Default)]
struct Routes {
    /// Route names; an entry's tag is an index here.
    names: Vec<String>,
    /// Per tag: since when (Unix ms) its next hops could not be reached, if they cannot.
    down_since: Vec<Option<u64>>,
    /// Per tag: when to probe it next.
    next_probe: Vec<u64>,
    /// Per tag: when (Unix ms) its next hops last answered again after being unreachable.
    up_since: Vec<u64>,
    /// Routes that answered again, with where their release has got to.
    releasing: Vec<(u16, Option<QueueKey>)>,
}

impl Routes {
    fn tag(&mut self, name: &str) -> u16 {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i as u16;
        }
        if self.names.len() >= NO_ROUTE as usize {
            return NO_ROUTE;
        }
        self.names.push(name.to_string());
        self.down_since.push(None);
        self.next_probe.push(0);
        self.up_since.push(0);
        (self.names.len() - 1) as u16
    }
}

struct Inner {
    spool: Arc<Spool>,
    directory: Arc<Directory>,
    config: ArcSwap<Config>,
    limits: ArcSwap<HashMap<String, Arc<Semaphore>>>,
    index: Mutex<Index>,
    routes: Mutex<Routes>,
    /// Attempts running (at most `queue.max_active`).
    active: Arc<Semaphore>,
    /// Wakes the dispatcher (new ready message, flush, release, route up).
    wake: Notify,
    /// Set by [`Queue::stop`]: the dispatcher starts no more attempts.
    stopped: std::sync::atomic::AtomicBool,
    pool: deliver::pool::Pool,
    tls: ArcSwap<HashMap<String, deliver::RouteTls>>,
    dns: deliver::dns::Dns,
    /// The recent per-recipient outcomes (`queue.recent_outcomes`, read at start).
    recent: recent::Recent,
    /// Next-hop addresses deliveries reached, with their routes (for the loop guard).
    hop_routes: Mutex<HashMap<std::net::IpAddr, Vec<String>>>,
    /// Outcomes per minute over the last hour, and deferral reasons.
    rates: rate::Rates,
    /// Admins waiting for a delete to be written, by message.
    deleters: Mutex<HashMap<QueueKey, Vec<Deleter>>>,
}

/// Where an admin's delete hears whether the end record was written.
type Deleter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// How long [`Queue::delete`] waits for the delete of a message whose attempt is in progress.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Most next-hop addresses remembered for the loop guard (an MX route to the internet
/// meets many; the map starts over when full).
const MAX_HOP_ROUTES: usize = 10_000;

fn route_limits(config: &Config) -> HashMap<String, Arc<Semaphore>> {
    config
        .routes
        .iter()
        .map(|(name, r)| (name.clone(), Arc::new(Semaphore::new(r.concurrency))))
        .collect()
}

impl Inner {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deleters(&self) -> std::sync::MutexGuard<'_, HashMap<QueueKey, Vec<Deleter>>> {
        self.deleters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that a delivery on `route` reached the next hop at `ip` (loop guard).
    fn note_hop(&self, ip: std::net::IpAddr, route: &str) {
        let ip = plain_ip(ip);
        let mut m = self.hop_routes.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&ip).is_some_and(|r| r.iter().any(|x| x == route)) {
            return;
        }
        if m.len() >= MAX_HOP_ROUTES {
            m.clear();
        }
        m.entry(ip).or_default().push(route.to_string());
    }
}

/// Handle to the scheduler; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl Queue {
    /// A scheduler over `spool` that routes with `directory` and `config`, with each route's
    /// outbound TLS settings already loaded (`deliver::tls::route_tls`, run by the start-up
    /// checks). Starts the dispatcher task (call inside the runtime).
    pub fn new(
        spool: Arc<Spool>,
        directory: Arc<Directory>,
        config: Arc<Config>,
        route_tls: HashMap<String, deliver::RouteTls>,
    ) -> Result<Queue, QueueError> {
        let hop_concurrency = config.delivery.hop_concurrency;
        let inner = Arc::new(Inner {
            spool,
            directory,
            limits: ArcSwap::from_pointee(route_limits(&config)),
            tls: ArcSwap::from_pointee(route_tls),
            dns: deliver::dns::Dns::for_config(&config).map_err(QueueError::Dns)?,
            active: Arc::new(Semaphore::new(config.queue.max_active)),
            recent: recent::Recent::new(config.queue.recent_outcomes),
            hop_routes: Mutex::new(HashMap::new()),
            rates: rate::Rates::default(),
            deleters: Mutex::new(HashMap::new()),
            config: ArcSwap::new(config),
            index: Mutex::new(Index::default()),
            routes: Mutex::new(Routes::default()),
            wake: Notify::new(),
            stopped: Default::default(),
            pool: deliver::pool::Pool::new(16, hop_concurrency),
        });
        inner
            .pool
            .set_max_down(inner.config.load().queue.probe_interval);
        tokio::spawn(schedule::dispatch(inner.clone()));
        Ok(Queue { inner })
    }

    /// Uses `config` from the next attempt on (routes, next hops, TLS, retry policy).
    pub fn set_config(&self, config: Arc<Config>, tls: HashMap<String, deliver::RouteTls>) {
        self.inner.tls.store(Arc::new(tls));
        let old = self.inner.config.load();
        if old
            .routes
            .iter()
            .map(|(n, r)| (n, r.concurrency))
            .ne(config.routes.iter().map(|(n, r)| (n, r.concurrency)))
        {
            self.inner.limits.store(Arc::new(route_limits(&config)));
        }
        self.inner.pool.set_max_down(config.queue.probe_interval);
        self.inner.config.store(config);
    }

    /// Queues a message just written to the spool at `msg`. With its `body` and a free
    /// attempt slot it is attempted at once without reading it back.
    pub fn submit(&self, env: Envelope, msg: Loc, body: Option<Arc<Vec<u8>>>) {
        let Some(key) = env.id.key() else {
            error!(qid = %env.id, "queue id not in the generated form; the message stays in the spool until a restart");
            return;
        };
        let entry = |slot| Entry {
            msg,
            state: None,
            due_ms: 0,
            attempts: 0,
            route: NO_ROUTE,
            slot,
            asks: Asks::default(),
        };
        let permit = body
            .as_ref()
            .and_then(|_| self.inner.active.clone().try_acquire_owned().ok());
        match (permit, body) {
            (Some(permit), Some(body)) => {
                let e = entry(Slot::Busy);
                self.inner.index().insert(key, e);
                let fresh = schedule::Fresh {
                    env: Arc::new(env),
                    body,
                };
                tokio::spawn(schedule::run(
                    self.inner.clone(),
                    key,
                    e,
                    Some(fresh),
                    permit,
                ));
            }
            _ => {
                self.inner.index().insert(key, entry(Slot::Ready));
                self.inner.wake.notify_one();
            }
        }
    }

    /// Queues the messages found in the spool at start-up, resuming their schedule: held ones
    /// stay held, deferred ones keep their next attempt, the rest are due now.
    pub fn restore(&self, queued: Vec<Queued>) {
        let now = now_ms();
        let mut routes = self.inner.routes();
        let mut ix = self.inner.index();
        for q in queued {
            let Some(key) = q.id.key() else {
                error!(qid = %q.id, "queue id not in the generated form; left in the spool");
                continue;
            };
            let (slot, due_ms) = match (q.held, q.next_attempt_ms) {
                (true, _) => (Slot::Held, 0),
                (false, Some(t)) => (Slot::Deferred, t),
                (false, None) => (Slot::Ready, 0),
            };
            // Waiting for a route that was down before the restart: probe it at once, and
            // release its mail when it answers.
            let route = match &q.unreachable {
                Some(name) => {
                    let tag = routes.tag(name);
                    if tag != NO_ROUTE && routes.down_since[tag as usize].is_none() {
                        routes.down_since[tag as usize] = Some(now);
                        routes.next_probe[tag as usize] = now;
                    }
                    tag
                }
                None => NO_ROUTE,
            };
            ix.insert(
                key,
                Entry {
                    msg: q.msg,
                    state: q.state,
                    due_ms,
                    attempts: q.attempts,
                    route,
                    slot,
                    asks: Asks::default(),
                },
            );
        }
        drop(ix);
        drop(routes);
        self.inner.wake.notify_one();
    }

    /// Stops the dispatcher: no new attempts start (those running finish). For a relay
    /// that is being shut down.
    pub fn stop(&self) {
        self.inner
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.active.close();
        self.inner.wake.notify_one();
    }

    /// Each route the scheduler has delivered to, and whether its next hops are unreachable
    /// now.
    pub fn routes_down(&self) -> Vec<(String, bool)> {
        let r = self.inner.routes();
        r.names
            .iter()
            .zip(&r.down_since)
            .map(|(n, d)| (n.clone(), d.is_some()))
            .collect()
    }

    /// The routes whose next hops send mail from `ip`: a route's `returns_from` networks,
    /// its next hops given as IP addresses, and the addresses its deliveries reached.
    pub fn routes_sending_from(&self, ip: std::net::IpAddr) -> Vec<String> {
        let ip = plain_ip(ip);
        let config = self.inner.config.load();
        let mut out: std::collections::BTreeSet<String> = config
            .routes
            .iter()
            .filter(|(_, r)| {
                r.returns_from.iter().any(|n| n.contains(&ip))
                    || r.next_hops.iter().any(|h| {
                        h.host
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|a| plain_ip(a) == ip)
                    })
            })
            .map(|(n, _)| n.clone())
            .collect();
        let seen = self
            .inner
            .hop_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(routes) = seen.get(&ip) {
            out.extend(routes.iter().cloned());
        }
        out.into_iter().collect()
    }

    /// Every next hop delivered to so far, with its state (up, circuit open, throttled).
    pub fn hops(&self) -> Vec<deliver::hops::HopView> {
        self.inner.pool.hop_views()
    }

    /// The record of recent per-recipient outcomes (for `coexist trace`).
    pub fn recent(&self) -> &recent::Recent {
        &self.inner.recent
    }

    /// Outcomes per minute over the last hour, and deferral reasons (for the console).
    pub fn rates(&self) -> &rate::Rates {
        &self.inner.rates
    }

    /// The spool's commit counters (syncs, records) and segment files.
    pub fn spool_stats(&self) -> (u64, u64, usize) {
        let (syncs, records) = self.inner.spool.commit_stats();
        (syncs, records, self.inner.spool.segment_count())
    }

    /// Test hook: see [`Spool::inject_faults`].
    #[doc(hidden)]
    pub fn inject_spool_faults(&self, faults: crate::spool::InjectedFaults) {
        self.inner.spool.inject_faults(faults);
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.inner.index().len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.index().is_empty()
    }

    fn ask(&self, id: &str, a: Asks) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(id.to_string());
        let key = key_of(id).ok_or_else(not_found)?;
        let (res, back) = {
            let mut ix = self.inner.index();
            let back = ix.get(key).map(|e| match e.slot {
                Slot::Held => Settle::Held,
                Slot::Deferred => Settle::Deferred(e.due_ms),
                Slot::Ready | Slot::Busy => Settle::Ready,
            });
            (ix.ask(key, a), back.unwrap_or(Settle::Ready))
        };
        match res {
            Err(()) => return Err(not_found()),
            Ok(Some(e)) => {
                // Idle and the request changes what is on disk: a task writes it.
                tokio::spawn(schedule::apply_asks(self.inner.clone(), key, e, a, back));
            }
            Ok(None) => self.inner.wake.notify_one(),
        }
        Ok(())
    }

    /// Holds a message: no attempts until released (kept across restarts).
    pub fn hold(&self, id: &str) -> Result<(), QueueError> {
        self.ask(id, Asks::HOLD)?;
        info!(qid = id, "held by admin");
        Ok(())
    }

    /// Releases a held message; it is attempted at once.
    pub fn release(&self, id: &str) -> Result<(), QueueError> {
        self.ask(id, Asks::RELEASE)?;
        info!(qid = id, "released by admin");
        Ok(())
    }

    /// Deletes a message from the queue and the spool (no bounce), after any attempt in
    /// progress, and returns once its end record is durable. When the spool cannot write
    /// that record the delete is refused ([`QueueError::NotDeleted`]) and the message stays
    /// queued; when an attempt in progress has not ended within a minute,
    /// [`QueueError::DeletePending`] (the delete is still done when it ends).
    pub async fn delete(&self, id: &str) -> Result<(), QueueError> {
        let key = key_of(id).ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.deleters().entry(key).or_default().push(tx);
        if let Err(e) = self.ask(id, Asks::DELETE) {
            self.inner.deleters().remove(&key);
            return Err(e);
        }
        info!(qid = id, "delete asked by admin");
        match tokio::time::timeout(DELETE_WAIT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) => Err(QueueError::NotDeleted {
                id: id.to_string(),
                reason,
            }),
            // Gone without an answer (removed by its own end meanwhile).
            Ok(Err(_)) => Err(QueueError::NotFound(id.to_string())),
            Err(_) => Err(QueueError::DeletePending(id.to_string())),
        }
    }

    /// Attempts a deferred message now.
    pub fn flush(&self, id: &str) -> Result<(), QueueError> {
        self.ask(id, Asks::FLUSH)?;
        info!(qid = id, "flushed by admin");
        Ok(())
    }
}
