//! The scheduler: one lightweight task per queued message that plans, delivers, records
//! and retries with exponential backoff until every recipient has a final outcome or the
//! message expires.
//!
//! The route is planned again at every attempt from the current directory (DESIGN
//! invariant 3), so deferred mail follows a mailbox that moved meanwhile.

use crate::config::Config;
use crate::deliver::{self, Outbound, RcptOutcome};
use crate::directory::Directory;
use crate::metrics as m;
use crate::route;
use crate::smtp::command::BodyType;
use crate::spool::{DeliveryState, Envelope, RcptStatus, Spool};
use crate::types::{Address, QueueId};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a queued message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Being delivered now (or waiting for a delivery slot).
    Active,
    /// Waiting for its next attempt.
    Deferred,
}

/// A message as the queue sees it, for listings and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueEntry {
    /// Envelope.
    pub envelope: Arc<Envelope>,
    /// Per-recipient state after the last attempt.
    pub state: DeliveryState,
    /// Phase.
    pub phase: Phase,
    /// Unix time of the next attempt, when deferred.
    pub next_attempt: Option<u64>,
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
}

struct Inner {
    spool: Arc<Spool>,
    directory: Arc<Directory>,
    config: ArcSwap<Config>,
    limits: ArcSwap<HashMap<String, Arc<Semaphore>>>,
    entries: Mutex<HashMap<QueueId, QueueEntry>>,
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
    pub fn new(spool: Arc<Spool>, directory: Arc<Directory>, config: Arc<Config>) -> Queue {
        Queue {
            inner: Arc::new(Inner {
                spool,
                directory,
                limits: ArcSwap::from_pointee(route_limits(&config)),
                config: ArcSwap::new(config),
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Uses `config` from the next attempt on (routes, next hops, TLS, retry policy).
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

    /// Starts delivering a spooled message. `body` saves re-reading a fresh message.
    pub fn submit(&self, env: Envelope, state: DeliveryState, body: Option<Arc<Vec<u8>>>) {
        let inner = self.inner.clone();
        let env = Arc::new(env);
        inner.entries().insert(
            env.id.clone(),
            QueueEntry {
                envelope: env.clone(),
                state: state.clone(),
                phase: Phase::Active,
                next_attempt: None,
            },
        );
        tokio::spawn(async move { run_message(inner, env, state, body).await });
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
) {
    let id = env.id.clone();
    loop {
        state.attempts += 1;
        let message = match body.take() {
            Some(b) => b,
            None => {
                let spool = inner.spool.clone();
                let qid = id.clone();
                match tokio::task::spawn_blocking(move || spool.load_message(&qid)).await {
                    Ok(Ok(b)) => Arc::new(b),
                    Ok(Err(e)) => {
                        error!(qid = %id, error = %e, "cannot read queued message; will retry");
                        sleep_backoff(&inner, state.attempts).await;
                        continue;
                    }
                    Err(e) => {
                        error!(qid = %id, error = %e, "spool reader task failed; will retry");
                        sleep_backoff(&inner, state.attempts).await;
                        continue;
                    }
                }
            }
        };
        attempt(&inner, &env, &mut state, &message).await;

        let pending = state.pending();
        let expired = unix_now().saturating_sub(env.received_at)
            >= inner.config.load().queue.max_lifetime.as_secs();
        if !pending.is_empty() && expired {
            for i in pending {
                let r = &mut state.rcpts[i];
                r.status = RcptStatus::Failed;
                let last = r.last_reply.clone().unwrap_or_default();
                r.last_reply = Some(format!("message expired in queue; last reply: {last}"));
                warn!(qid = %id, to = %env.rcpts[i], status = "expired", reply = %last, "delivery expired");
            }
        }
        if state.pending().is_empty() {
            finish(&inner, &env, state).await;
            inner.entries().remove(&id);
            return;
        }
        let spool = inner.spool.clone();
        let (qid, st) = (id.clone(), state.clone());
        match tokio::task::spawn_blocking(move || spool.save_state(&qid, &st)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(qid = %id, error = %e, "cannot save delivery state"),
            Err(e) => error!(qid = %id, error = %e, "state writer task failed"),
        }
        let delay = retry_delay(&inner, state.attempts);
        inner.set_phase(
            &id,
            &state,
            Phase::Deferred,
            Some(unix_now() + delay.as_secs()),
        );
        tokio::time::sleep(delay).await;
    }
}

fn retry_delay(inner: &Inner, attempts: u32) -> Duration {
    let cfg = inner.config.load();
    backoff(attempts, cfg.queue.min_backoff, cfg.queue.max_backoff)
}

async fn sleep_backoff(inner: &Inner, attempts: u32) {
    tokio::time::sleep(retry_delay(inner, attempts)).await;
}

/// One delivery attempt for all pending recipients, one delivery per route, in parallel.
async fn attempt(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &mut DeliveryState,
    message: &Arc<Vec<u8>>,
) {
    let pending = state.pending();
    let dir = &inner.directory;
    let plan = route::plan(pending.iter().map(|&i| (i, &env.rcpts[i])), |a| {
        dir.resolve(a)
    });
    for &i in &plan.unroutable {
        let reply = "550 5.1.1 recipient is no longer in the directory".to_string();
        log_outcome(env, i, "-", None, "bounced", &reply);
        state.rcpts[i].status = RcptStatus::Failed;
        state.rcpts[i].last_reply = Some(reply);
    }
    let mut tasks = JoinSet::new();
    let config = inner.config.load_full();
    for d in plan.deliveries {
        let (inner, env, message, config) =
            (inner.clone(), env.clone(), message.clone(), config.clone());
        tasks.spawn(async move {
            let Some(route) = config.routes.get(d.route.as_str()) else {
                let reply = format!("451 4.3.5 route {} is not configured", d.route);
                let n = d.rcpts.len();
                return (d, None, vec![RcptOutcome::Deferred(reply); n]);
            };
            let limit = inner.limits.load().get(d.route.as_str()).cloned();
            let _permit = match limit {
                Some(s) => s.acquire_owned().await.ok(),
                None => None,
            };
            let rewritten: Option<Vec<Address>> = route
                .rewrite_domain
                .as_ref()
                .map(|dom| d.rcpts.iter().map(|&i| env.rcpts[i].with_domain(dom)).collect());
            let out = Outbound {
                from: env.from.as_ref(),
                rcpts: match &rewritten {
                    Some(v) => v.iter().collect(),
                    None => d.rcpts.iter().map(|&i| &env.rcpts[i]).collect(),
                },
                message: &message,
                eight_bit: env.body == BodyType::EightBitMime,
            };
            let a = deliver::deliver(
                &route.next_hops,
                &config.server.hostname,
                route.tls,
                config.delivery.timeout,
                &out,
            )
            .await;
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
            let (status, text, label) = match o {
                RcptOutcome::Delivered(t) => (RcptStatus::Delivered, t, "sent"),
                RcptOutcome::Deferred(t) => (RcptStatus::Pending, t, "deferred"),
                RcptOutcome::Failed(t) => (RcptStatus::Failed, t, "bounced"),
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
    reply: &str,
) {
    let delay = unix_now().saturating_sub(env.received_at);
    info!(
        qid = %env.id,
        to = %env.rcpts[i],
        route,
        relay = hop.unwrap_or("none"),
        delay_s = delay,
        status,
        reply,
        "delivery"
    );
}

async fn finish(inner: &Arc<Inner>, env: &Arc<Envelope>, state: DeliveryState) {
    let failed = state.rcpts.iter().any(|r| r.status == RcptStatus::Failed);
    let spool = inner.spool.clone();
    let id = env.id.clone();
    let res = tokio::task::spawn_blocking(move || {
        if failed {
            spool.save_state(&id, &state)?;
            spool.move_to_failed(&id)
        } else {
            spool.remove(&id)
        }
    })
    .await;
    match res {
        Ok(Ok(())) if failed => {
            warn!(qid = %env.id, "message has failed recipients; kept in spool failed/")
        }
        Ok(Ok(())) => info!(qid = %env.id, "removed"),
        Ok(Err(e)) => error!(qid = %env.id, error = %e, "cannot finish message in spool"),
        Err(e) => error!(qid = %env.id, error = %e, "spool task failed"),
    }
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
