//! One delivery attempt: plans the pending recipients through [`route::plan`], delivers
//! each route's share in parallel (with the message bytes held by [`AttemptBody`]) and
//! records each recipient's outcome: in its state, in the outcome log line and in a report
//! to the queue's outcome sink ([`super::outcomes`]).

use super::outcomes::Reported;
use super::recent::Outcome;
use super::{Inner, SpoolTaskError};
use crate::deliver::hops::PauseRules;
use crate::deliver::{self, Outbound};
use crate::metrics as m;
use crate::policy::delivery;
use crate::proto::BodyType;
use crate::proto::{Failure, LastReply, LocalError, RcptOutcome};
use crate::route;
use crate::spool::{DeliveryState, Envelope, Loc, RcptStatus, Spool};
use crate::types::{Address, RouteName};
use std::net::SocketAddr;
use std::sync::Arc;
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
    /// Unix ms when the throttled next hop that deferred recipients resumes.
    pub(super) throttled_until_ms: Option<u64>,
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
        let b = Arc::new(self.spool.read_message(self.msg).await?);
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
        |a| dir.resolve_routed(a),
        &config,
    );
    let origins = origins(inner, env, &pending);
    let origin = |i: usize| origins.get(i).map(|o| &**o);
    for &i in &plan.unroutable {
        let reply = LastReply::Failed(Failure::Local(LocalError::NoRoute));
        let told = Told::new(None, Outcome::Bounced, Some(&reply));
        log_outcome(inner, env, i, origin(i), &told);
        state.rcpts[i].status = RcptStatus::Failed;
        state.rcpts[i].last_reply = Some(reply);
    }
    for (r, rcpts) in &plan.unconfigured {
        let reply = LastReply::Failed(Failure::Local(LocalError::route_not_configured(r)));
        for &i in rcpts {
            let told = Told::new(Some(r), Outcome::Deferred, Some(&reply));
            log_outcome(inner, env, i, origin(i), &told);
            state.rcpts[i].last_reply = Some(reply.clone());
        }
    }
    let mut tasks = JoinSet::new();
    for d in plan.deliveries {
        // Not sent where it would certainly loop or bounce.
        if let Err(e) = refusal(&d, env) {
            let reply = LastReply::Failed(Failure::Local(e));
            for &i in &d.rcpts {
                let told = Told::new(Some(&d.route), Outcome::Bounced, Some(&reply));
                log_outcome(inner, env, i, origin(i), &told);
                state.rcpts[i].status = RcptStatus::Failed;
                state.rcpts[i].last_reply = Some(reply.clone());
            }
            continue;
        }
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
                    return (d, None, false, vec![RcptOutcome::Deferred(reply); n], None);
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
            let tls = inner.outbound.route_tls(d.route.as_str(), d.tls);
            let target = match &d.target {
                route::Target::Mx(domain, port) => deliver::Target::Mx(domain.as_str(), *port),
                route::Target::Hops(hops) => deliver::Target::Hops(hops),
            };
            let rc = config.routes.get(d.route.as_str());
            let rules = deliver::HopRules {
                route: d.route.as_str(),
                max_rcpts: d.max_rcpts,
                throttle_replies: rc.map_or(&[][..], |r| &r.throttle_replies),
                pause: rc.map_or(deliver::HopRules::none().pause, |r| PauseRules {
                    first: r.throttle_pause,
                    max: r.throttle_max_pause,
                }),
            };
            let hello = deliver::Hello {
                helo: &config.server.hostname,
                tls: &tls,
                timeout: config.delivery.timeout,
            };
            let span = tracing::info_span!("delivery", qid = %env.id, route = %d.route, next_hop = tracing::field::Empty);
            let a = inner
                .outbound
                .deliver(&target, hello, &rules, &out)
                .instrument(span.clone())
                .await;
            if let Some(h) = a.next_hop {
                span.record("next_hop", tracing::field::display(h));
                // (Not for routes to each recipient domain's MX: those are the internet.)
                if !rc.is_some_and(|r| r.recipient_mx) {
                    inner.hop_routes.note(h.ip(), d.route.as_str());
                }
            }
            let hop = a.next_hop.map(|h| h.to_string()).unwrap_or_else(|| "none".into());
            metrics::counter!(m::ATTEMPTS, "route" => d.route.as_str().to_string(), "next_hop" => hop).increment(1);
            // No next hop answered and nobody refused: the route's hops are unreachable.
            // Throttled hops are not unreachable: they answered "slow down".
            // A route to each recipient domain's MX hosts is not down when one domain's are.
            let per_domain = rc.is_some_and(|r| r.recipient_mx);
            let reached = per_domain
                || a.next_hop.is_some()
                || a.throttled_until_ms.is_some()
                || !a.outcomes.iter().all(|o| matches!(o, RcptOutcome::Deferred(_)));
            let report = RouteReport {
                route: d.route.as_str().to_string(),
                reached,
                throttled_until_ms: a.throttled_until_ms,
            };
            (d, a.next_hop, a.tls, a.outcomes, Some(report))
        });
    }
    let grace = config.directory.move_grace;
    let mut reports = Vec::new();
    while let Some(res) = tasks.join_next().await {
        let Ok((d, hop, tls, outcomes, report)) = res else {
            error!(qid = %env.id, "delivery task failed; recipients stay pending");
            continue;
        };
        reports.extend(report);
        let next_hop = hop;
        let hop = hop.map(|h| h.to_string());
        for (((&i, o), to), rule) in d.rcpts.iter().zip(outcomes).zip(&d.to).zip(&d.rules) {
            let o = within_move_grace(inner, env, i, &d.route, *rule, grace, o);
            let text = LastReply::from(&o);
            let (status, outcome) = match o {
                RcptOutcome::Delivered(_) => (RcptStatus::Delivered, Outcome::Delivered),
                RcptOutcome::Deferred(_) => (RcptStatus::Pending, Outcome::Deferred),
                RcptOutcome::Failed(_) => (RcptStatus::Failed, Outcome::Bounced),
            };
            let label = log_label(outcome);
            let told = Told {
                hop: next_hop,
                tls: next_hop.map(|_| tls),
                sent_as: Some(to).filter(|to| **to != env.rcpts[i]),
                ..Told::new(Some(&d.route), outcome, Some(&text))
            };
            log_outcome(inner, env, i, origin(i), &told);
            let route = d.route.as_str().to_string();
            metrics::counter!(m::DELIVERIES, "route" => route.clone(), "next_hop" => hop.clone().unwrap_or_else(|| "none".into()), "outcome" => label)
                .increment(1);
            if status == RcptStatus::Delivered {
                let secs = inner.clock.now_secs_f64() - env.received_at as f64;
                metrics::histogram!(m::DELIVERY_LATENCY, "route" => route).record(secs.max(0.0));
            }
            if status == RcptStatus::Delivered {
                state.rcpts[i].route = Some(d.route.as_str().to_string());
            }
            state.rcpts[i].status = status;
            state.rcpts[i].last_reply = Some(text);
        }
    }
    reports
}

/// Why a delivery must not be sent at all, if it must not ([`delivery::refusal`]: the
/// loop guard, the route size limit); counted.
fn refusal(d: &route::Delivery, env: &Envelope) -> Result<(), LocalError> {
    let route = d.route.as_str();
    let res = delivery::refusal(route, d.max_message_size, env.size, &env.returned_from);
    let counter = match &res {
        Ok(()) => return res,
        Err(LocalError::RoutingLoop(_)) => m::ROUTING_LOOPS,
        Err(_) => m::ROUTE_TOO_BIG,
    };
    metrics::counter!(counter, "route" => route.to_string()).increment(d.rcpts.len() as u64);
    res
}

/// `o`, or the deferral the move grace makes of it ([`delivery::move_grace`]), counted
/// and logged with the change that moved the mailbox.
fn within_move_grace(
    inner: &Inner,
    env: &Envelope,
    i: usize,
    route: &RouteName,
    rule: route::Rule,
    grace: std::time::Duration,
    o: RcptOutcome,
) -> RcptOutcome {
    let moved = || inner.directory.moved(&env.rcpts[i]);
    let Some(d) = delivery::move_grace(&o, rule, grace, inner.clock.now_secs(), moved) else {
        return o;
    };
    if let RcptOutcome::Deferred(Failure::Local(LocalError::MoveGrace {
        reply,
        origin,
        moved,
        ..
    })) = &d
    {
        metrics::counter!(m::MOVE_GRACE_DEFERRALS, "route" => route.as_str().to_string())
            .increment(1);
        info!(qid = %env.id, to = %env.rcpts[i], route = %route, origin = %origin, moved_at = %moved, reply = %reply, "recipient unknown on the side it just moved to: deferred within the move grace");
    }
    d
}

/// What became of one recipient: what its outcome line logs and the outcome sink is told.
pub(super) struct Told<'a> {
    /// The route it took (`None`: no route).
    pub(super) route: Option<&'a RouteName>,
    /// The next hop that answered.
    pub(super) hop: Option<SocketAddr>,
    /// Whether the session with it used TLS (`None`: no next hop answered).
    pub(super) tls: Option<bool>,
    /// The recipient as sent, when the route rewrote it.
    pub(super) sent_as: Option<&'a Address>,
    /// What became of it.
    pub(super) outcome: Outcome,
    /// The reply or error behind it (`None` for a delete).
    pub(super) reply: Option<&'a LastReply>,
}

impl<'a> Told<'a> {
    /// An outcome on `route` without a next hop or rewrite.
    pub(super) fn new(
        route: Option<&'a RouteName>,
        outcome: Outcome,
        reply: Option<&'a LastReply>,
    ) -> Told<'a> {
        Told {
            route,
            hop: None,
            tls: None,
            sent_as: None,
            outcome,
            reply,
        }
    }
}

/// The `status` of an outcome line: Postfix's `sent` for a delivery.
fn log_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "sent",
        o => o.as_str(),
    }
}

/// Per recipient index, where the directory state behind its route comes from (`file …`,
/// `batch N`, `unlisted`), read right after planning, for the outcome sink (empty when the
/// sink wants no detail). Read by a second lookup after [`route::plan`]'s: a batch applied
/// between the two (microseconds apart) could make them disagree for one attempt.
fn origins(inner: &Inner, env: &Envelope, pending: &[usize]) -> Vec<String> {
    if !inner.outcomes.wants_detail() {
        return Vec::new();
    }
    let mut out = vec![String::new(); env.rcpts.len()];
    for &i in pending {
        out[i] = inner.directory.lookup(&env.rcpts[i]).origin;
    }
    out
}

/// The per-recipient outcome line, like Postfix's `status=sent` lines; the same outcome is
/// reported to the outcome sink, with `origin` (see [`record`]).
fn log_outcome(inner: &Inner, env: &Envelope, i: usize, origin: Option<&str>, told: &Told<'_>) {
    use std::fmt::Display;
    let delay = inner.clock.now_secs().saturating_sub(env.received_at);
    let relay: &dyn Display = match &told.hop {
        Some(h) => h,
        None => &"none",
    };
    let reply: &dyn Display = match told.reply {
        Some(r) => r,
        None => &"",
    };
    info!(
        qid = %env.id,
        to = %env.rcpts[i],
        route = told.route.map_or("-", |r| r.as_str()),
        %relay,
        delay_s = delay,
        status = log_label(told.outcome),
        %reply,
        "delivery"
    );
    record(inner, env, i, origin, told);
}

/// Reports recipient `i`'s outcome to the outcome sink. `origin` is the directory's origin
/// of its route when the route was decided; `None` reads it now (when the sink wants it).
pub(super) fn record(
    inner: &Inner,
    env: &Envelope,
    i: usize,
    origin: Option<&str>,
    told: &Told<'_>,
) {
    let rcpt = &env.rcpts[i];
    let looked_up;
    let origin = match origin {
        Some(o) => o,
        None if inner.outcomes.wants_detail() => {
            looked_up = inner.directory.lookup(rcpt).origin;
            looked_up.as_str()
        }
        None => "",
    };
    let now_ms = inner.clock.now_ms();
    inner.outcomes.report(&Reported {
        time: now_ms / 1000,
        time_ms: now_ms,
        queue_id: &env.id,
        sender: env.from.as_ref(),
        rcpt,
        sent_as: told.sent_as,
        route: told.route,
        next_hop: told.hop,
        tls: told.tls,
        outcome: told.outcome,
        reply: told.reply,
        origin,
    });
}
