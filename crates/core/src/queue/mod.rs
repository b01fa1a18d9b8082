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
//! The queue schedules and nothing else. What it works with is built by the composition
//! root (`relay::start`) and handed to it ([`QueueParts`]): the outbound side that delivers
//! (`deliver::Transport`: pool, resolver, TLS, next-hop states), the sink it reports each
//! recipient's outcome to ([`outcomes::OutcomeSink`]; the relay's is the [`recorder`], which
//! keeps the [`recent`] outcomes and the per-minute [`rate`]s), the loop guard's memory of
//! the next hops deliveries reached (`deliver::HopRoutes`), and the clock it schedules by
//! (`clock::Clock`, which tests can drive).
//!
//! This module holds the [`Queue`] handle (submit, restore, hold, release, delete, flush);
//! `dsn` ends messages and spools DSNs, `view` gives listings and counts.

mod attempt;
mod dsn;
pub mod gate;
mod index;
pub mod outcomes;
pub mod rate;
pub mod recent;
pub mod recorder;
mod schedule;
mod view;

pub use view::{
    age_bucket, MessageView, QueueShape, QueueStats, RcptView, RouteShape, AGE_BUCKETS_MIN,
};

use crate::clock::Clock;
use crate::config::Config;
use crate::deliver::{HopRoutes, Transport};
use crate::directory::Directory;
use crate::spool::{DeliveryState, Envelope, Loc, Queued, Spool};
use crate::types::{QueueId, QueueKey};
use arc_swap::ArcSwap;
use index::{Asks, Entry, Index, Settle, Slot, NO_ROUTE};
use outcomes::OutcomeSink;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, Semaphore};
use tracing::{error, info};

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
    /// The spool could not be read.
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    /// A delete was refused: the spool cannot write the message's end record now (disk
    /// full, I/O error). The message stays queued and is delivered as before.
    #[error("cannot delete {id}: the spool cannot record it ({reason}); the message stays queued")]
    NotDeleted {
        /// Queue id.
        id: String,
        /// The spool's error (shared: every admin waiting for the delete gets it).
        reason: Arc<crate::spool::SpoolError>,
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
    /// The outbound side: delivers each route's share of an attempt.
    outbound: Arc<Transport>,
    /// Where each recipient's outcome is reported.
    outcomes: Arc<dyn OutcomeSink>,
    /// The loop guard's memory: next-hop addresses deliveries reached are noted here.
    hop_routes: Arc<HopRoutes>,
    /// The time the schedule is kept by.
    clock: Clock,
    /// Whether attempts may start (closed while the node is fenced).
    gate: Arc<gate::Gate>,
    /// Admins waiting for a delete to be written, by message.
    deleters: Mutex<HashMap<QueueKey, Vec<Deleter>>>,
}

/// Where an admin's delete hears whether the end record was written.
type Deleter = tokio::sync::oneshot::Sender<Result<(), Arc<crate::spool::SpoolError>>>;

/// How long [`Queue::delete`] waits for the delete of a message whose attempt is in progress.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
}

/// What the queue works with, built by the composition root.
pub struct QueueParts {
    /// Where messages, states and DSNs are written.
    pub spool: Arc<Spool>,
    /// The directory each attempt routes with.
    pub directory: Arc<Directory>,
    /// The outbound side (pool, resolver, route TLS).
    pub outbound: Arc<Transport>,
    /// Where each recipient's outcome is reported.
    pub outcomes: Arc<dyn OutcomeSink>,
    /// The loop guard's memory of next hops reached.
    pub hop_routes: Arc<HopRoutes>,
    /// The clock the schedule is kept by.
    pub clock: Clock,
    /// Whether attempts may start: closed while the node is fenced (`[shadow]`); an open
    /// [`gate::Gate`] otherwise.
    pub gate: Arc<gate::Gate>,
}

/// Handle to the scheduler; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl Queue {
    /// A scheduler over `parts.spool` that routes with `parts.directory` and `config` and
    /// delivers through `parts.outbound`. Starts the dispatcher task (call inside the
    /// runtime).
    pub fn new(config: Arc<Config>, parts: QueueParts) -> Queue {
        let inner = Arc::new(Inner {
            spool: parts.spool,
            directory: parts.directory,
            limits: ArcSwap::from_pointee(route_limits(&config)),
            outbound: parts.outbound,
            outcomes: parts.outcomes,
            hop_routes: parts.hop_routes,
            clock: parts.clock,
            gate: parts.gate,
            active: Arc::new(Semaphore::new(config.queue.max_active)),
            deleters: Mutex::new(HashMap::new()),
            config: ArcSwap::new(config),
            index: Mutex::new(Index::default()),
            routes: Mutex::new(Routes::default()),
            wake: Notify::new(),
            stopped: Default::default(),
        });
        tokio::spawn(schedule::dispatch(inner.clone()));
        Queue { inner }
    }

    /// Uses `config` from the next attempt on (routes, retry policy, limits); the outbound
    /// side takes the new config from the composition root.
    pub fn set_config(&self, config: Arc<Config>) {
        let old = self.inner.config.load();
        if old
            .routes
            .iter()
            .map(|(n, r)| (n, r.concurrency))
            .ne(config.routes.iter().map(|(n, r)| (n, r.concurrency)))
        {
            self.inner.limits.store(Arc::new(route_limits(&config)));
        }
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
            .filter(|_| self.inner.gate.is_open())
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

    /// Queues a message taken over from a dead node (`[shadow]`), just written to the
    /// spool at `msg`: each recipient's outcome sink entry says where it came from.
    pub fn submit_taken(&self, env: Envelope, msg: Loc, body: Arc<Vec<u8>>) {
        if let Some(t) = &env.taken_from {
            let how = if t.resubmitted {
                "resubmitted from"
            } else {
                "from"
            };
            let origin = format!("{how} {} (queue id {} there)", t.node, t.queue_id);
            for rcpt in &env.rcpts {
                let now_ms = self.inner.clock.now_ms();
                self.inner.outcomes.report(&outcomes::Reported {
                    time: now_ms / 1000,
                    time_ms: now_ms,
                    queue_id: &env.id,
                    sender: env.from.as_ref(),
                    rcpt,
                    sent_as: None,
                    route: None,
                    next_hop: None,
                    tls: None,
                    outcome: recent::Outcome::TakenOver,
                    reply: None,
                    origin: &origin,
                });
            }
        }
        self.submit(env, msg, Some(body));
    }

    /// Queues the messages found in the spool at start-up, resuming their schedule: held ones
    /// stay held, deferred ones keep their next attempt, the rest are due now.
    pub fn restore(&self, queued: impl IntoIterator<Item = Queued>) {
        let now = self.inner.clock.now_ms();
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

    /// Reports an admin's hold or release of `id` to the outcome sink.
    fn note_admin(&self, id: &str, kind: outcomes::NotedKind) {
        if let Some(qid) = crate::types::QueueId::from_file_stem(id) {
            self.inner.outcomes.note(&outcomes::Noted {
                time_ms: self.inner.clock.now_ms(),
                kind,
                queue_id: &qid,
                related: None,
                sender: None,
            });
        }
    }

    /// Holds a message: no attempts until released (kept across restarts).
    pub fn hold(&self, id: &str) -> Result<(), QueueError> {
        self.ask(id, Asks::HOLD)?;
        info!(qid = id, "held by admin");
        self.note_admin(id, outcomes::NotedKind::Held);
        Ok(())
    }

    /// Releases a held message; it is attempted at once.
    pub fn release(&self, id: &str) -> Result<(), QueueError> {
        self.ask(id, Asks::RELEASE)?;
        info!(qid = id, "released by admin");
        self.note_admin(id, outcomes::NotedKind::Released);
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
