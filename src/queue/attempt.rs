//! One delivery attempt: plans the pending recipients through [`route::plan`], delivers
//! each route's share in parallel (with the message bytes held by [`AttemptBody`]) and
//! records each recipient's outcome.

use super::{unix_now, Inner, SpoolTaskError};
use crate::deliver::{self, Outbound};
use crate::metrics as m;
use crate::proto::BodyType;
use crate::proto::{Failure, LastReply, LocalError, RcptOutcome};
use crate::route;
use crate::spool::{DeliveryState, Envelope, Loc, RcptStatus, Spool};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tracing::{error, info, Instrument};

/// A message's bytes during one attempt: the copy handed over at acceptance if there is
/// one, else read from the spool when a delivery gets its route slot. A delivery that must
/// wait for a slot lets the copy go first, so messages waiting behind a slow or dead next hop
/// hold no body in memory: bodies in memory are bounded by the deliveries in flight
/// (DESIGN invariant 8).
pub(super) struct AttemptBody {
    spool: Arc<Spool>,
    msg: Loc,
    slot: tokio::sync::Mutex<Option<Arc<Vec<u8>>>>,
}

/// What one route's delivery in an attempt learned about its next hops.
pub(super) struct RouteReport {
    /// The route.
    pub(super) route: String,
    /// A next hop answered (false: none could be reached).
    pub(super) reached: bool,
}

impl AttemptBody {
    /// The bytes of the message at `msg`, starting from `first` when the caller has them.
    pub(super) fn new(spool: Arc<Spool>, msg: Loc, first: Option<Arc<Vec<u8>>>) -> AttemptBody {
        AttemptBody {
            spool,
            msg,
            slot: tokio::sync::Mutex::new(first),
        }
    }

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
        let (spool, msg) = (self.spool.clone(), self.msg);
        let b = Arc::new(tokio::task::spawn_blocking(move || spool.read_message(msg)).await??);
        *slot = Some(b.clone());
        Ok(b)
    }
}

/// One delivery attempt for all pending recipients, one delivery per route, in parallel.
/// Runs in an `attempt` span with the queue id; each route's delivery in a `delivery` span
/// with the queue id, the route and (once known) the next hop. Returns, per route
/// delivered to, whether a next hop answered.
#[tracing::instrument(name = "attempt", skip_all, fields(qid = %env.id))]
pub(super) async fn attempt(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &mut DeliveryState,
    body: Arc<AttemptBody>,
) -> Vec<RouteReport> {
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
                    // Says nothing about the route's next hops.
                    return (d, None, vec![RcptOutcome::Deferred(reply); n], None);
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
            // No next hop answered and nobody refused: the route's hops are unreachable.
            let reached = a.next_hop.is_some()
                || !a.outcomes.iter().all(|o| matches!(o, RcptOutcome::Deferred(_)));
            (d, a.next_hop, a.outcomes, Some(reached))
        });
    }
    let mut reports = Vec::new();
    while let Some(res) = tasks.join_next().await {
        let Ok((d, hop, outcomes, reached)) = res else {
            error!(qid = %env.id, "delivery task failed; recipients stay pending");
            continue;
        };
        if let Some(reached) = reached {
            reports.push(RouteReport {
                route: d.route.as_str().to_string(),
                reached,
            });
        }
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
    reports
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
