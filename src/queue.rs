//! The scheduler: one lightweight task per queued message that plans, delivers, records
//! and retries with exponential backoff until every recipient has a final outcome or the
//! message expires.
//!
//! The route is planned again at every attempt from the current directory (DESIGN
//! invariant 3), so deferred mail follows a mailbox that moved meanwhile.

use crate::config::Config;
use crate::deliver::{self, Failure, LastReply, LocalError, Outbound, RcptOutcome};
use crate::directory::Directory;
use crate::metrics as m;
use crate::proto::BodyType;
use crate::route;
use crate::spool::{DeliveryState, Envelope, RcptStatus, Spool};
use crate::types::QueueId;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

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

/// A queued message as `coexist queue list/show` presents it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MessageView {
    /// Queue id.
    pub id: String,
    /// Sender (empty for `<>`).
    pub from: String,
    /// Seconds since acceptance.
    pub age_s: u64,
    /// Size in bytes.
    pub size: u64,
    /// active, deferred or held.
    pub phase: String,
    /// Attempts made.
    pub attempts: u32,
    /// Seconds until the next attempt, when deferred.
    pub next_attempt_in_s: Option<u64>,
    /// Every recipient.
    pub recipients: Vec<RcptView>,
}

/// One recipient in a [`MessageView`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RcptView {
    /// Address.
    pub address: String,
    /// pending, deferred, held, delivered or failed.
    pub status: String,
    /// Route it would take now (pending recipients only).
    pub route: Option<String>,
    /// Last reply or error.
    pub last_reply: Option<String>,
}

/// Counts for metrics: per phase, messages and the oldest message's age.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueStats {
    /// Active messages.
    pub active: usize,
    /// Deferred messages.
    pub deferred: usize,
    /// Age in seconds of the oldest active message.
    pub oldest_active: u64,
    /// Age in seconds of the oldest deferred message.
    pub oldest_deferred: u64,
    /// Held messages.
    pub held: usize,
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
    /// A scheduler over `spool` that routes with `directory` and `config`.
    pub fn new(
        spool: Arc<Spool>,
        directory: Arc<Directory>,
        config: Arc<Config>,
    ) -> Result<Queue, QueueError> {
        let hop_concurrency = config.delivery.hop_concurrency;
        Ok(Queue {
            inner: Arc::new(Inner {
                spool,
                directory,
                limits: ArcSwap::from_pointee(route_limits(&config)),
                tls: ArcSwap::from_pointee(deliver::tls::route_tls(&config)?),
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

    /// The listing form of a message, with each pending recipient's route now.
    pub fn view(&self, e: &QueueEntry) -> MessageView {
        let now = unix_now();
        let routes: HashMap<usize, Option<String>> = self.pending_routes(e).into_iter().collect();
        let phase = match e.phase {
            Phase::Active => "active",
            Phase::Deferred => "deferred",
            Phase::Held => "held",
        };
        MessageView {
            id: e.envelope.id.to_string(),
            from: e
                .envelope
                .from
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            age_s: now.saturating_sub(e.envelope.received_at),
            size: e.envelope.size,
            phase: phase.to_string(),
            attempts: e.state.attempts,
            next_attempt_in_s: e.next_attempt.map(|t| t.saturating_sub(now)),
            recipients: e
                .envelope
                .rcpts
                .iter()
                .zip(&e.state.rcpts)
                .enumerate()
                .map(|(i, (a, r))| RcptView {
                    address: a.to_string(),
                    status: match r.status {
                        RcptStatus::Delivered => "delivered".into(),
                        RcptStatus::Failed => "failed".into(),
                        RcptStatus::Pending if e.phase == Phase::Active => "pending".into(),
                        RcptStatus::Pending => phase.to_string(),
                    },
                    route: routes.get(&i).cloned().flatten(),
                    last_reply: r.last_reply.as_ref().map(|l| l.to_string()),
                })
                .collect(),
        }
    }

    /// The route each pending recipient of `e` would take now (`None`: no route): the
    /// same [`route::plan`] an attempt makes now, so a listing shows the route delivery takes.
    pub fn pending_routes(&self, e: &QueueEntry) -> Vec<(usize, Option<String>)> {
        let pending = e.state.pending();
        let config = self.inner.config.load();
        let plan = route::plan(
            pending.iter().map(|&i| (i, &e.envelope.rcpts[i])),
            route::Kind::of(e.envelope.bounce),
            |a| self.inner.directory.resolve(a),
            &config,
        );
        pending
            .into_iter()
            .map(|i| (i, plan.route_of(i).map(|r| r.as_str().to_string())))
            .collect()
    }

    /// The messages in the queue, oldest first.
    pub fn list(&self) -> Vec<QueueEntry> {
        let mut v: Vec<QueueEntry> = self.inner.entries().values().cloned().collect();
        v.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
        v
    }

    /// Counts per phase and oldest ages.
    pub fn stats(&self) -> QueueStats {
        let now = unix_now();
        let mut s = QueueStats::default();
        for e in self.inner.entries().values() {
            let age = now.saturating_sub(e.envelope.received_at);
            match e.phase {
                Phase::Active => {
                    s.active += 1;
                    s.oldest_active = s.oldest_active.max(age);
                }
                Phase::Deferred => {
                    s.deferred += 1;
                    s.oldest_deferred = s.oldest_deferred.max(age);
                }
                Phase::Held => s.held += 1,
            }
        }
        s
    }
}

/// Retry delay after `attempts` attempts: min_backoff doubled per attempt, capped.
pub fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

async fn run_message(
    inner: Arc<Inner>,
    env: Arc<Envelope>,
    mut state: DeliveryState,
    mut body: Option<Arc<Vec<u8>>>,
    ctl: Arc<MsgControl>,
) {
    let id = env.id.clone();
    loop {
        // Admin requests take effect between attempts.
        if ctl.deleted.load(Ordering::SeqCst) {
            let spool = inner.spool.clone();
            let qid = id.clone();
            match tokio::task::spawn_blocking(move || spool.remove(&qid)).await {
                Ok(Ok(())) => warn!(qid = %id, "deleted from the queue by an admin (no bounce)"),
                Ok(Err(e)) => error!(qid = %id, error = %e, "cannot delete message"),
                Err(e) => error!(qid = %id, error = %e, "delete task failed"),
            }
            inner.entries().remove(&id);
            return;
        }
        let held = ctl.held.load(Ordering::SeqCst);
        if held != state.held {
            state.held = held;
            save_state(&inner, &id, &state).await;
        }
        if held {
            inner.set_phase(&id, &state, Phase::Held, None);
            ctl.wake.notified().await;
            continue;
        }
        state.attempts += 1;
        inner.set_phase(&id, &state, Phase::Active, None);
        // The body lives for this attempt only: never across the wait for the next one.
        let message = AttemptBody {
            id: id.clone(),
            spool: inner.spool.clone(),
            slot: tokio::sync::Mutex::new(body.take()),
        };
        attempt(&inner, &env, &mut state, Arc::new(message)).await;

        let pending = state.pending();
        let expired = unix_now().saturating_sub(env.received_at)
            >= inner.config.load().queue.max_lifetime.as_secs();
        if !pending.is_empty() && expired {
            for i in pending {
                let r = &mut state.rcpts[i];
                r.status = RcptStatus::Failed;
                let last = r.last_reply.as_ref().and_then(|l| l.failure()).cloned();
                let shown = last.as_ref().map(|l| l.to_string()).unwrap_or_default();
                r.last_reply = Some(LastReply::Failed(Failure::Expired(last.map(Box::new))));
                warn!(qid = %id, to = %env.rcpts[i], status = "expired", reply = %shown, "delivery expired");
            }
        }
        if state.pending().is_empty() {
            finish(&inner, &env, state).await;
            inner.entries().remove(&id);
            return;
        }
        warn_if_delayed(&inner, &env, &mut state).await;
        save_state(&inner, &id, &state).await;
        wait_for_retry(&inner, &id, &state, &ctl).await;
    }
}

/// Sends the sender one "delayed" DSN once the message has waited `queue.delay_warning`
/// (for recipients whose NOTIFY allows it; never for `<>` or for our own DSNs).
async fn warn_if_delayed(inner: &Arc<Inner>, env: &Arc<Envelope>, state: &mut DeliveryState) {
    let after = inner.config.load().queue.delay_warning;
    if state.warned || after.is_zero() || env.from.is_none() || env.bounce {
        return;
    }
    if unix_now().saturating_sub(env.received_at) < after.as_secs() {
        return;
    }
    let delayed: Vec<usize> = state
        .pending()
        .into_iter()
        .filter(|&i| env.dsn(i).wants_delay())
        .collect();
    state.warned = true;
    if delayed.is_empty() {
        return;
    }
    match spool_dsn(inner, env, state, &delayed, crate::bounce::Kind::Delayed).await {
        Ok(dsn) => info!(qid = %env.id, dsn = %dsn, "delay warning queued for the sender"),
        Err(e) => {
            state.warned = false;
            warn!(qid = %env.id, error = %e, "cannot queue the delay warning; will try again");
        }
    }
}

async fn save_state(inner: &Inner, id: &QueueId, state: &DeliveryState) {
    let spool = inner.spool.clone();
    let (qid, st) = (id.clone(), state.clone());
    match tokio::task::spawn_blocking(move || spool.save_state(&qid, &st)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(qid = %id, error = %e, "cannot save delivery state"),
        Err(e) => error!(qid = %id, error = %e, "state writer task failed"),
    }
}

/// Sleeps until the next attempt is due, or until an admin flushes, holds or deletes it.
async fn wait_for_retry(inner: &Inner, id: &QueueId, state: &DeliveryState, ctl: &MsgControl) {
    let delay = retry_delay(inner, state.attempts);
    inner.set_phase(
        id,
        state,
        Phase::Deferred,
        Some(unix_now() + delay.as_secs()),
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = ctl.wake.notified() => {}
    }
}

fn retry_delay(inner: &Inner, attempts: u32) -> Duration {
    let cfg = inner.config.load();
    backoff(attempts, cfg.queue.min_backoff, cfg.queue.max_backoff)
}

/// A message's bytes during one attempt: the copy handed over at acceptance if there is
/// one, else read from the spool when a delivery gets its route slot. A delivery that must
/// wait for a slot lets the copy go first, so messages waiting behind a slow or dead next hop
/// hold no body in memory: bodies in memory are bounded by the deliveries in flight
/// (DESIGN invariant 8).
struct AttemptBody {
    id: QueueId,
    spool: Arc<Spool>,
    slot: tokio::sync::Mutex<Option<Arc<Vec<u8>>>>,
}

impl AttemptBody {
    /// Drops the shared copy (deliveries already sending keep theirs).
    async fn release(&self) {
        *self.slot.lock().await = None;
    }

    /// The bytes, read from the spool if no copy is held.
    async fn get(&self) -> Result<Arc<Vec<u8>>, SpoolTaskError> {
        let mut slot = self.slot.lock().await;
        if let Some(b) = slot.as_ref() {
            return Ok(b.clone());
        }
        let (spool, id) = (self.spool.clone(), self.id.clone());
        let b = Arc::new(tokio::task::spawn_blocking(move || spool.load_message(&id)).await??);
        *slot = Some(b.clone());
        Ok(b)
    }
}

/// One delivery attempt for all pending recipients, one delivery per route, in parallel.
/// Runs in an `attempt` span with the queue id; each route's delivery in a `delivery` span
/// with the queue id, the route and (once known) the next hop.
#[tracing::instrument(name = "attempt", skip_all, fields(qid = %env.id))]
async fn attempt(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &mut DeliveryState,
    body: Arc<AttemptBody>,
) {
    let pending = state.pending();
    let dir = &inner.directory;
    let config = inner.config.load_full();
    let plan = route::plan(
        pending.iter().map(|&i| (i, &env.rcpts[i])),
        route::Kind::of(env.bounce),
        |a| dir.resolve(a),
        &config,
    );
    for &i in &plan.unroutable {
        let reply = LastReply::Failed(Failure::Local(LocalError::NoRoute));
        log_outcome(env, i, "-", None, "bounced", &reply);
        state.rcpts[i].status = RcptStatus::Failed;
        state.rcpts[i].last_reply = Some(reply);
    }
    for (r, rcpts) in &plan.unconfigured {
        let reply = LastReply::Failed(Failure::Local(LocalError::route_not_configured(r)));
        for &i in rcpts {
            log_outcome(env, i, r.as_str(), None, "deferred", &reply);
            state.rcpts[i].last_reply = Some(reply.clone());
        }
    }
    let mut tasks = JoinSet::new();
    for d in plan.deliveries {
        let (inner, env, body, config) = (inner.clone(), env.clone(), body.clone(), config.clone());
        tasks.spawn(async move {
            let limit = inner.limits.load().get(d.route.as_str()).cloned();
            let _permit = match limit {
                Some(s) => match s.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        body.release().await;
                        s.acquire_owned().await.ok()
                    }
                },
                None => None,
            };
            let message = match body.get().await {
                Ok(m) => m,
                Err(e) => {
                    error!(qid = %env.id, error = %e, "cannot read queued message; will retry");
                    let reply = Failure::Local(LocalError::Unreadable(e.to_string()));
                    let n = d.rcpts.len();
                    return (d, None, vec![RcptOutcome::Deferred(reply); n]);
                }
            };
            let out = Outbound {
                from: env.from.as_ref(),
                rcpts: d.to.iter().collect(),
                message: &message,
                eight_bit: env.body == BodyType::EightBitMime,
                ret: env.ret,
                envid: env.envid.as_deref(),
                rcpt_dsn: d.rcpts.iter().map(|&i| env.dsn(i)).collect(),
                smtputf8: env.smtputf8,
            };
            let tls = inner
                .tls
                .load()
                .get(d.route.as_str())
                .cloned()
                .unwrap_or_else(|| deliver::RouteTls::plain(d.tls));
            let target = match &d.target {
                route::Target::Mx(domain, port) => deliver::Target::Mx(domain.as_str(), *port),
                route::Target::Hops(hops) => deliver::Target::Hops(hops),
            };
            let span = tracing::info_span!("delivery", qid = %env.id, route = %d.route, next_hop = tracing::field::Empty);
            let a = deliver::deliver(
                &inner.pool,
                &inner.dns,
                &target,
                &config.server.hostname,
                &tls,
                config.delivery.timeout,
                &out,
            )
            .instrument(span.clone())
            .await;
            if let Some(h) = a.next_hop {
                span.record("next_hop", tracing::field::display(h));
            }
            let hop = a.next_hop.map(|h| h.to_string()).unwrap_or_else(|| "none".into());
            metrics::counter!(m::ATTEMPTS, "route" => d.route.as_str().to_string(), "next_hop" => hop).increment(1);
            (d, a.next_hop, a.outcomes)
        });
    }
    while let Some(res) = tasks.join_next().await {
        let Ok((d, hop, outcomes)) = res else {
            error!(qid = %env.id, "delivery task failed; recipients stay pending");
            continue;
        };
        let hop = hop.map(|h| h.to_string());
        for (&i, o) in d.rcpts.iter().zip(outcomes) {
            let text = LastReply::from(&o);
            let (status, label) = match o {
                RcptOutcome::Delivered(_) => (RcptStatus::Delivered, "sent"),
                RcptOutcome::Deferred(_) => (RcptStatus::Pending, "deferred"),
                RcptOutcome::Failed(_) => (RcptStatus::Failed, "bounced"),
            };
            log_outcome(env, i, d.route.as_str(), hop.as_deref(), label, &text);
            let route = d.route.as_str().to_string();
            metrics::counter!(m::DELIVERIES, "route" => route.clone(), "next_hop" => hop.clone().unwrap_or_else(|| "none".into()), "outcome" => label)
                .increment(1);
            if status == RcptStatus::Delivered {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
                    - env.received_at as f64;
                metrics::histogram!(m::DELIVERY_LATENCY, "route" => route).record(secs.max(0.0));
            }
            state.rcpts[i].status = status;
            state.rcpts[i].last_reply = Some(text);
        }
    }
}

/// The per-recipient outcome line, like Postfix's `status=sent` lines.
fn log_outcome(
    env: &Envelope,
    i: usize,
    route: &str,
    hop: Option<&str>,
    status: &str,
    reply: &LastReply,
) {
    let delay = unix_now().saturating_sub(env.received_at);
    info!(
        qid = %env.id,
        to = %env.rcpts[i],
        route,
        relay = hop.unwrap_or("none"),
        delay_s = delay,
        status,
        %reply,
        "delivery"
    );
}

/// Ends a message whose recipients all have a final outcome (DESIGN invariant 2): removed
/// when all were delivered; with failures, a DSN to the sender is spooled first (then the
/// original is removed), unless the sender is `<>` or asked for no DSN. If the DSN cannot be
/// spooled, the original is kept in `failed/`.
async fn finish(inner: &Arc<Inner>, env: &Arc<Envelope>, state: DeliveryState) {
    let failed: Vec<usize> = (0..state.rcpts.len())
        .filter(|&i| state.rcpts[i].status == RcptStatus::Failed)
        .collect();
    let notify: Vec<usize> = failed
        .iter()
        .copied()
        .filter(|&i| env.dsn(i).wants_failure())
        .collect();
    let keep_failed = !failed.is_empty() && env.from.is_none();
    if !notify.is_empty() && env.from.is_some() {
        match spool_dsn(inner, env, &state, &notify, crate::bounce::Kind::Failed).await {
            Ok(dsn_id) => {
                info!(qid = %env.id, dsn = %dsn_id, failed = failed.len(), "bounced: DSN queued for the sender")
            }
            Err(e) => {
                error!(qid = %env.id, error = %e, "cannot queue the DSN; keeping the message in spool failed/");
                return keep_in_failed(inner, env, state).await;
            }
        }
    } else if keep_failed {
        warn!(qid = %env.id, "failed recipients of a message from <> (no bounce of a bounce); kept in spool failed/");
        return keep_in_failed(inner, env, state).await;
    } else if !failed.is_empty() {
        info!(qid = %env.id, failed = failed.len(), "failed recipients asked for no DSN (NOTIFY)");
    }
    let spool = inner.spool.clone();
    let id = env.id.clone();
    match tokio::task::spawn_blocking(move || spool.remove(&id)).await {
        Ok(Ok(())) => info!(qid = %env.id, "removed"),
        Ok(Err(e)) => error!(qid = %env.id, error = %e, "cannot remove message from the spool"),
        Err(e) => error!(qid = %env.id, error = %e, "spool task failed"),
    }
}

async fn keep_in_failed(inner: &Arc<Inner>, env: &Arc<Envelope>, state: DeliveryState) {
    let spool = inner.spool.clone();
    let id = env.id.clone();
    let res = tokio::task::spawn_blocking(move || {
        spool.save_state(&id, &state)?;
        spool.move_to_failed(&id)
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(qid = %env.id, error = %e, "cannot move message to spool failed/"),
        Err(e) => error!(qid = %env.id, error = %e, "spool task failed"),
    }
}

/// Builds the DSN for recipients `failed` and spools it durably, then queues it.
async fn spool_dsn(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &DeliveryState,
    failed: &[usize],
    kind: crate::bounce::Kind,
) -> Result<QueueId, SpoolTaskError> {
    let sender = env.from.clone().ok_or(SpoolTaskError::NoSender)?;
    let spool = inner.spool.clone();
    let id = env.id.clone();
    let original = tokio::task::spawn_blocking(move || spool.load_message(&id)).await??;
    let dsn_id = QueueId::generate();
    let hostname = inner.config.load().server.hostname.clone();
    let failures: Vec<crate::bounce::Failure<'_>> = failed
        .iter()
        .map(|&i| crate::bounce::Failure {
            rcpt: &env.rcpts[i],
            orcpt: env.rcpt_dsn.get(i).and_then(|d| d.orcpt.as_deref()),
            reply: state.rcpts[i].last_reply.as_ref().and_then(|l| l.failure()),
        })
        .collect();
    let body = crate::bounce::build(&hostname, &dsn_id, env, &original, &failures, kind);
    let dsn_env = Envelope {
        id: dsn_id.clone(),
        from: None,
        rcpts: vec![sender],
        smtputf8: env.smtputf8,
        body: env.body,
        received_at: unix_now(),
        size: body.len() as u64,
        client: "coexist bounce".into(),
        ret: None,
        envid: None,
        rcpt_dsn: Vec::new(),
        bounce: true,
    };
    let body = Arc::new(body);
    let (spool, e2, b2) = (inner.spool.clone(), dsn_env.clone(), body.clone());
    tokio::task::spawn_blocking(move || spool.store(&e2, &b2)).await??;
    Queue {
        inner: inner.clone(),
    }
    .submit(dsn_env, DeliveryState::new(1), Some(body));
    Ok(dsn_id)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        let (min, max) = (Duration::from_secs(300), Duration::from_secs(4000));
        assert_eq!(backoff(1, min, max), min);
        assert_eq!(backoff(2, min, max), Duration::from_secs(600));
        assert_eq!(backoff(5, min, max), max);
        assert_eq!(backoff(100, min, max), max);
    }
}
