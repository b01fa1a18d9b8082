//! The scheduler: one lightweight task per queued message that plans, delivers, records
//! and retries with exponential backoff until every recipient has a final outcome or the
//! message expires.
//!
//! The route is planned again at every attempt from the current directory (DESIGN
//! invariant 3), so deferred mail follows a mailbox that moved meanwhile.
//!
//! This module holds the [`Queue`] handle (submit, hold, release, delete, flush) and the
//! state its tasks share; `schedule` runs each message's loop of attempts and retry waits,
//! `attempt` makes one attempt, `dsn` ends messages and spools DSNs, and `view` gives
//! listings and counts.

mod attempt;
mod dsn;
mod schedule;
mod view;

pub use view::{MessageView, QueueStats, RcptView};

use schedule::run_message;

use crate::config::Config;
use crate::deliver;
use crate::directory::Directory;
use crate::spool::{DeliveryState, Envelope, Spool};
use crate::types::QueueId;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore};
use tracing::info;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a queued message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Being delivered now (or waiting for a delivery slot).
    Active,
    /// Waiting for its next attempt.
    Deferred,
    /// Held by an admin.
    Held,
}

/// Admin requests for one queued message, seen by its task between attempts.
#[derive(Debug, Default)]
pub struct MsgControl {
    wake: Notify,
    held: AtomicBool,
    deleted: AtomicBool,
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
    Dns(#[source] hickory_resolver::net::NetError),
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

/// A message as the queue sees it, for listings and metrics.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    /// Envelope.
    pub envelope: Arc<Envelope>,
    /// Per-recipient state after the last attempt.
    pub state: DeliveryState,
    /// Phase.
    pub phase: Phase,
    /// Unix time of the next attempt, when deferred.
    pub next_attempt: Option<u64>,
    control: Arc<MsgControl>,
}

struct Inner {
    spool: Arc<Spool>,
    directory: Arc<Directory>,
    config: ArcSwap<Config>,
    limits: ArcSwap<HashMap<String, Arc<Semaphore>>>,
    entries: Mutex<HashMap<QueueId, QueueEntry>>,
    pool: deliver::pool::Pool,
    tls: ArcSwap<HashMap<String, deliver::RouteTls>>,
    dns: deliver::dns::Dns,
}

fn route_limits(config: &Config) -> HashMap<String, Arc<Semaphore>> {
    config
        .routes
        .iter()
        .map(|(name, r)| (name.clone(), Arc::new(Semaphore::new(r.concurrency))))
        .collect()
}

impl Inner {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<QueueId, QueueEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(
        &self,
        id: &QueueId,
        state: &DeliveryState,
        phase: Phase,
        next_attempt: Option<u64>,
    ) {
        if let Some(e) = self.entries().get_mut(id) {
            e.state = state.clone();
            e.phase = phase;
            e.next_attempt = next_attempt;
        }
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
    /// checks).
    pub fn new(
        spool: Arc<Spool>,
        directory: Arc<Directory>,
        config: Arc<Config>,
        route_tls: HashMap<String, deliver::RouteTls>,
    ) -> Result<Queue, QueueError> {
        let hop_concurrency = config.delivery.hop_concurrency;
        Ok(Queue {
            inner: Arc::new(Inner {
                spool,
                directory,
                limits: ArcSwap::from_pointee(route_limits(&config)),
                tls: ArcSwap::from_pointee(route_tls),
                dns: deliver::dns::Dns::new(&config.dns.nameservers, config.delivery.timeout)
                    .map_err(QueueError::Dns)?,
                config: ArcSwap::new(config),
                entries: Mutex::new(HashMap::new()),
                pool: deliver::pool::Pool::new(16, hop_concurrency),
            }),
        })
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
        self.inner.config.store(config);
    }

    /// Starts delivering a spooled message. `body` saves re-reading a fresh message.
    pub fn submit(&self, env: Envelope, state: DeliveryState, body: Option<Arc<Vec<u8>>>) {
        let inner = self.inner.clone();
        let env = Arc::new(env);
        let control = Arc::new(MsgControl::default());
        control.held.store(state.held, Ordering::SeqCst);
        inner.entries().insert(
            env.id.clone(),
            QueueEntry {
                envelope: env.clone(),
                state: state.clone(),
                phase: if state.held {
                    Phase::Held
                } else {
                    Phase::Active
                },
                next_attempt: None,
                control: control.clone(),
            },
        );
        tokio::spawn(async move { run_message(inner, env, state, body, control).await });
    }

    /// One queued message.
    pub fn get(&self, id: &str) -> Option<QueueEntry> {
        self.inner
            .entries()
            .values()
            .find(|e| e.envelope.id.as_str() == id)
            .cloned()
    }

    fn control(&self, id: &str) -> Result<Arc<MsgControl>, QueueError> {
        self.get(id)
            .map(|e| e.control)
            .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    /// Holds a message: no attempts until released (kept across restarts).
    pub fn hold(&self, id: &str) -> Result<(), QueueError> {
        let c = self.control(id)?;
        c.held.store(true, Ordering::SeqCst);
        c.wake.notify_one();
        info!(qid = id, "held by admin");
        Ok(())
    }

    /// Releases a held message; it is attempted at once.
    pub fn release(&self, id: &str) -> Result<(), QueueError> {
        let c = self.control(id)?;
        c.held.store(false, Ordering::SeqCst);
        c.wake.notify_one();
        info!(qid = id, "released by admin");
        Ok(())
    }

    /// Deletes a message from the queue and the spool (no bounce), after any attempt in
    /// progress.
    pub fn delete(&self, id: &str) -> Result<(), QueueError> {
        let c = self.control(id)?;
        c.deleted.store(true, Ordering::SeqCst);
        c.wake.notify_one();
        info!(qid = id, "deleted by admin");
        Ok(())
    }

    /// Attempts a deferred message now.
    pub fn flush(&self, id: &str) -> Result<(), QueueError> {
        self.control(id)?.wake.notify_one();
        info!(qid = id, "flushed by admin");
        Ok(())
    }

    /// Attempts now every deferred message for which `pick` is true; returns how many.
    pub fn flush_where(&self, pick: impl Fn(&QueueEntry) -> bool) -> usize {
        let picked: Vec<Arc<MsgControl>> = self
            .inner
            .entries()
            .values()
            .filter(|e| e.phase == Phase::Deferred && pick(e))
            .map(|e| e.control.clone())
            .collect();
        for c in &picked {
            c.wake.notify_one();
        }
        picked.len()
    }
}
