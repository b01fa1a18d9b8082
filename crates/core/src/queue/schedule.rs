//! Running the queue: the dispatcher that starts attempts for due messages, the task of one
//! attempt (write what an earlier attempt could not, deliver, expire, record, defer), admin
//! changes to idle messages, and route release and probes.

use super::attempt::{attempt, record, AttemptBody, RouteReport, Told};
use super::dsn::{finish, warn_if_delayed, End};
use super::index::{Asks, Entry, Owed, Settle, NO_ROUTE};
use super::recent::Outcome;
use super::{Inner, SpoolTaskError};
use crate::proto::{Failure, LastReply};
use crate::spool::{DeliveryState, Envelope, RcptStatus};
use crate::types::QueueKey;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info, warn};

/// Retry delay after `attempts` attempts: min_backoff doubled per attempt, capped.
fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// How many deferred messages one release step makes ready (bounds how long the index lock
/// is held while a route that answered again releases its mail).
const RELEASE_STEP: usize = 20_000;

/// The dispatcher: starts an attempt for each due message while attempt slots are free, runs
/// route releases and probes, and sleeps until the next message is due or it is woken.
pub(super) async fn dispatch(inner: Arc<Inner>) {
    use std::sync::atomic::Ordering::SeqCst;
    while !inner.stopped.load(SeqCst) {
        if !inner.gate.is_open() {
            // Fenced: no attempt starts until the gate opens (or the queue stops).
            tokio::select! {
                _ = inner.gate.wait_open() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        release_and_probe(&inner);
        // Routes met later in this round (new tags) have no limit until the next round.
        let caps = route_caps(&inner);
        let cap = |tag: u16| caps.get(tag as usize).copied().unwrap_or(usize::MAX);
        loop {
            let permit = match inner.active.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => match inner.active.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            if !inner.gate.is_open() {
                break;
            }
            let next = inner.index().next(inner.clock.now_ms(), cap);
            let Some((key, entry)) = next else { break };
            tokio::spawn(run(inner.clone(), key, entry, None, permit));
        }
        let wait = {
            let due = inner.index().next_due();
            let until = due.map_or(1000, |d| d.saturating_sub(inner.clock.now_ms()));
            let releasing = !inner.routes().releasing.is_empty();
            Duration::from_millis(if releasing { 0 } else { until.clamp(1, 1000) })
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

/// Per route tag, how many of the messages waiting for that route may be in attempts at
/// once: twice the route's `concurrency` (one sending, one ready behind it), so a released
/// backlog goes out at the pace the route takes and leaves attempt slots to other routes.
fn route_caps(inner: &Inner) -> Vec<usize> {
    let config = inner.config.load();
    inner
        .routes()
        .names
        .iter()
        .map(|n| {
            config
                .routes
                .get(n)
                .map_or(usize::MAX, |r| r.concurrency.saturating_mul(2))
        })
        .collect()
}

/// One step of each route release, and a probe of each route that is down and due for one.
fn release_and_probe(inner: &Inner) {
    let now = inner.clock.now_ms();
    let probe_every = inner.config.load().queue.probe_interval.as_millis() as u64;
    let mut routes = inner.routes();
    let mut released = 0;
    let releasing = std::mem::take(&mut routes.releasing);
    for (tag, from) in releasing {
        // A route down again keeps the rest for its next return (which releases it all).
        if routes.down_since[tag as usize].is_some() {
            continue;
        }
        let (n, next) = inner.index().release_route(tag, from, RELEASE_STEP);
        released += n;
        if next.is_some() {
            routes.releasing.push((tag, next));
        }
    }
    for tag in 0..routes.names.len() {
        if routes.down_since[tag].is_some() && routes.next_probe[tag] <= now {
            routes.next_probe[tag] = now + probe_every;
            if let Some(k) = inner.index().probe_route(tag as u16) {
                info!(route = %routes.names[tag], qid = %k.id(), "next hops unreachable: probing with the oldest deferred message");
            }
        }
    }
    drop(routes);
    if released > 0 {
        inner.wake.notify_one();
    }
}

/// What an attempt's route reports mean for its message.
struct RouteNews {
    /// The first route whose next hops could not be reached ([`NO_ROUTE`]: none).
    down: u16,
    /// Its name.
    down_name: Option<String>,
    /// A route that failed this attempt has answered again since the attempt began (the
    /// failure is stale): try again at once rather than after a backoff.
    retry_now: bool,
    /// Unix ms when the earliest throttled next hop that deferred recipients resumes: the
    /// message's next attempt (the hop's pause, not the message's own backoff).
    throttled_until: Option<u64>,
}

/// Records what an attempt that began at `started_ms` learned about each route's next hops:
/// a route that answers again after being unreachable has its deferred mail released at once.
fn report_routes(inner: &Inner, reports: &[RouteReport], started_ms: u64) -> RouteNews {
    let now = inner.clock.now_ms();
    let probe_every = inner.config.load().queue.probe_interval.as_millis() as u64;
    let mut routes = inner.routes();
    let mut news = RouteNews {
        down: NO_ROUTE,
        down_name: None,
        retry_now: false,
        throttled_until: reports.iter().filter_map(|r| r.throttled_until_ms).min(),
    };
    for r in reports {
        let tag = routes.tag(&r.route);
        if tag == NO_ROUTE {
            continue;
        }
        let t = tag as usize;
        if r.reached {
            if let Some(since) = routes.down_since[t].take() {
                info!(route = %r.route, down_s = now.saturating_sub(since) / 1000, "next hops answer again: releasing the mail deferred for them");
                routes.up_since[t] = now;
                // A new release from the oldest (one still under way starts over).
                routes.releasing.retain(|(t, _)| *t != tag);
                routes.releasing.push((tag, None));
                inner.wake.notify_one();
            }
        } else if routes.down_since[t].is_none() && routes.up_since[t] >= started_ms {
            // Began while the route was down (skipped an open circuit, say), ended after it
            // came back: not news of a new outage.
            news.retry_now = true;
        } else {
            if routes.down_since[t].is_none() {
                routes.down_since[t] = Some(now);
                routes.next_probe[t] = now + probe_every;
            }
            if news.down == NO_ROUTE {
                news.down = tag;
                news.down_name = Some(r.route.clone());
            }
        }
    }
    news
}

/// A message just accepted: its envelope and bytes, so its first attempt reads nothing back.
pub(super) struct Fresh {
    pub(super) env: Arc<Envelope>,
    pub(super) body: Arc<Vec<u8>>,
}

/// Reads a message's envelope and state from the spool.
async fn load(
    inner: &Inner,
    e: &Entry,
) -> Result<(Arc<Envelope>, DeliveryState), crate::spool::SpoolError> {
    let (env, st) = inner.spool.read_queued(e.msg, e.state).await?;
    Ok((Arc::new(env), st))
}

/// One attempt of one message, then its next place in the queue; the dispatcher is woken
/// after it (an attempt slot and a slot of the message's route are free again).
pub(super) async fn run(
    inner: Arc<Inner>,
    key: QueueKey,
    e: Entry,
    fresh: Option<Fresh>,
    permit: OwnedSemaphorePermit,
) {
    attempt_and_place(&inner, key, e, fresh).await;
    drop(permit);
    inner.wake.notify_one();
}

/// The message's envelope and state to go on from: what an earlier attempt learned and could
/// not write is written first (DESIGN invariant 11); `None` when that write failed again
/// or the message ended (it is placed then).
async fn current(
    inner: &Arc<Inner>,
    key: QueueKey,
    e: &mut Entry,
) -> Option<(Arc<Envelope>, DeliveryState)> {
    let owed = inner.index().unwritten(key).map(|u| u.owed.clone());
    let state = match owed {
        None => {
            return match load(inner, e).await {
                Ok(x) => Some(x),
                Err(err) => {
                    error!(qid = %key.id(), error = %err, "cannot read the queued message; will try again");
                    unreadable(inner, key, *e).await;
                    None
                }
            };
        }
        Some(Owed::End(state)) => {
            write_end(inner, key, *e, *state).await;
            return None;
        }
        Some(Owed::State(state)) => *state,
    };
    let env = match inner.spool.read_envelope(e.msg).await {
        Ok(env) => Arc::new(env),
        Err(err) => {
            error!(qid = %key.id(), error = %err, "cannot read the queued message; will try again");
            unreadable(inner, key, *e).await;
            return None;
        }
    };
    match save(inner, key, e, &env, &state).await {
        Ok(()) => {
            inner.index().paid(key);
            info!(qid = %key.id(), attempts = state.attempts, "delivery state written now (an earlier write had failed)");
            Some((env, state))
        }
        Err(err) => {
            let failures = inner.index().owe(key, Owed::State(Box::new(state)));
            error!(qid = %key.id(), error = %err, failures, "still cannot write the delivery state: no delivery until it is written");
            let retry = write_retry(inner, failures);
            settle_unwritten(inner, key, *e, Settle::Deferred(retry)).await;
            None
        }
    }
}

/// Every line it logs carries the `message` span with the queue id.
#[tracing::instrument(name = "message", skip_all, fields(qid = %key.id()))]
async fn attempt_and_place(inner: &Arc<Inner>, key: QueueKey, e: Entry, fresh: Option<Fresh>) {
    let mut e = e;
    let (env, mut state, first_body) = match fresh {
        Some(f) => {
            let n = f.env.rcpts.len();
            (f.env, DeliveryState::new(n), Some(f.body))
        }
        None => match current(inner, key, &mut e).await {
            Some((env, st)) => (env, st, None),
            None => return,
        },
    };
    if state.pending().is_empty() {
        // Every outcome is known (the end could not be written before): end it, deliver nothing.
        return end(inner, key, e, &env, state).await;
    }
    state.attempts += 1;
    state.next_attempt_ms = None;
    let started_ms = inner.clock.now_ms();
    let body = AttemptBody::new(inner.spool.clone(), e.msg, first_body);
    let reports = attempt(inner, &env, &mut state, Arc::new(body)).await;
    let news = report_routes(inner, &reports, started_ms);

    let pending = state.pending();
    let expired = inner.clock.now_secs().saturating_sub(env.received_at)
        >= inner.config.load().queue.max_lifetime.as_secs();
    if !pending.is_empty() && expired {
        for i in pending {
            let r = &mut state.rcpts[i];
            r.status = RcptStatus::Failed;
            let last = r.last_reply.as_ref().and_then(|l| l.failure()).cloned();
            let shown = last.as_ref().map(|l| l.to_string()).unwrap_or_default();
            let reply = LastReply::Failed(Failure::Expired(last.map(Box::new)));
            warn!(qid = %env.id, to = %env.rcpts[i], status = "expired", reply = %shown, "delivery expired");
            record(
                inner,
                &env,
                i,
                None,
                &Told::new(None, Outcome::Expired, Some(&reply)),
            );
            r.last_reply = Some(reply);
        }
    }
    if state.pending().is_empty() {
        return end(inner, key, e, &env, state).await;
    }
    warn_if_delayed(inner, &env, e.msg, &mut state).await;
    let how = if news.retry_now {
        Settle::Ready
    } else if let Some(t) = news.throttled_until {
        // The hop's pause end, spread over a tenth of the pause (at most 5 s) so the
        // messages waiting for it do not all wake in the same millisecond.
        let now = inner.clock.now_ms();
        let spread = (t.saturating_sub(now) / 10).min(5_000);
        Settle::Deferred(t.max(now + 1) + fastrand::u64(0..=spread))
    } else {
        Settle::Deferred(due_after(inner, state.attempts))
    };
    e.route = news.down;
    state.unreachable = news.down_name;
    defer(inner, key, e, &env, state, how).await;
}

/// Ends a message whose recipients all have their final outcome (DSN, end record). What the
/// spool could not write is kept with its entry and written first at its next turn: the end
/// record alone when the sender was told, else the final state (the DSN is tried again).
async fn end(
    inner: &Arc<Inner>,
    key: QueueKey,
    e: Entry,
    env: &Arc<Envelope>,
    state: DeliveryState,
) {
    let attempts = state.attempts;
    let owed = match finish(inner, env, &state, e.msg, e.state).await {
        End::Gone => return gone(inner, key),
        End::Unrecorded => Owed::End(Box::new(state)),
        End::Kept => Owed::State(Box::new(state)),
    };
    let failures = inner.index().owe(key, owed);
    let kept = Entry {
        attempts,
        route: NO_ROUTE,
        ..e
    };
    settle_unwritten(
        inner,
        key,
        kept,
        Settle::Deferred(write_retry(inner, failures)),
    )
    .await;
}

/// A message ended (delivered or bounced): out of the index; an admin waiting to delete it
/// hears it is no longer queued.
fn gone(inner: &Inner, key: QueueKey) {
    inner.index().remove(key);
    inner.deleters().remove(&key);
}

/// Writes the end record of a finished message that could not be written before (its
/// sender was told already); on failure it waits for the next try.
async fn write_end(inner: &Arc<Inner>, key: QueueKey, e: Entry, state: DeliveryState) {
    let id = key.id();
    match inner
        .spool
        .finish_delivered(&id, e.msg, e.state, &state)
        .await
    {
        Ok(()) => {
            info!(qid = %id, "end record written now (an earlier write had failed); removed");
            gone(inner, key);
        }
        Err(err) => {
            let failures = inner.index().owe(key, Owed::End(Box::new(state)));
            error!(qid = %id, error = %err, failures, "still cannot write the message's end record; it stays queued (nothing is delivered again)");
            settle_unwritten(
                inner,
                key,
                e,
                Settle::Deferred(write_retry(inner, failures)),
            )
            .await;
        }
    }
}

/// When (Unix ms) a write that failed `failures` times is tried again: after 1 s, doubled
/// per failure, at most a minute apart.
fn write_retry(inner: &Inner, failures: u32) -> u64 {
    inner.clock.now_ms() + backoff(failures, WRITE_RETRY_MIN, WRITE_RETRY_MAX).as_millis() as u64
}

/// First wait before a failed spool write of an outcome is tried again.
const WRITE_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a failed spool write of an outcome.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(60);

/// A message whose records could not be read: tried again after the first backoff; an
/// admin's delete still ends it.
async fn unreadable(inner: &Inner, key: QueueKey, e: Entry) {
    settle_unwritten(inner, key, e, Settle::Deferred(due_after(inner, 1))).await;
}

/// Places a busy message whose state cannot be written now (its records could not be read,
/// or the spool refused its state or end), applying admin requests that came in meanwhile:
/// a delete still ends it (if its end record can be written); a hold or release holds only
/// until the next restart.
async fn settle_unwritten(inner: &Inner, key: QueueKey, e: Entry, mut how: Settle) {
    loop {
        let res = inner.index().settle(key, e.state, e.attempts, e.route, how);
        let asks = match res {
            Ok(()) => return,
            Err(asks) if asks.is_empty() => return,
            Err(asks) => asks,
        };
        if asks.has(Asks::DELETE) {
            return delete(inner, key, e, how).await;
        }
        if asks.has(Asks::HOLD) {
            warn!(qid = %key.id(), "held, but its state cannot be written now: the hold lasts until a restart");
        }
        how = next_settle(asks, how, inner, e.attempts);
    }
}

/// Writes the message's state and places it in the queue (`how`), applying any admin
/// requests that came in meanwhile. A state the spool refuses is kept with the message's
/// entry and written before its next delivery.
async fn defer(
    inner: &Inner,
    key: QueueKey,
    mut e: Entry,
    env: &Envelope,
    mut state: DeliveryState,
    mut how: Settle,
) {
    loop {
        if let Settle::Deferred(t) = how {
            state.next_attempt_ms = Some(t);
        } else {
            state.next_attempt_ms = None;
        }
        state.held = matches!(how, Settle::Held);
        match save(inner, key, &mut e, env, &state).await {
            Ok(()) => inner.index().paid(key),
            Err(err) => {
                let failures = inner.index().owe(key, Owed::State(Box::new(state.clone())));
                error!(qid = %env.id, error = %err, failures, "cannot save delivery state: kept in memory and written before the next delivery");
            }
        }
        let (res, placed) = settle_for_route(inner, key, &e, state.attempts, how);
        how = placed;
        let asks = match res {
            Ok(()) => {
                if matches!(how, Settle::Ready) {
                    inner.wake.notify_one();
                }
                return;
            }
            Err(asks) if asks.is_empty() => return, // no longer in the index
            Err(asks) => asks,
        };
        if asks.has(Asks::DELETE) {
            return delete(inner, key, e, how).await;
        }
        how = next_settle(asks, how, inner, state.attempts);
    }
}

/// Settles a busy message as `how`, unless it is to wait for a route (`e.route`) that has
/// answered again since its attempt found it down: then it is ready at once. The route's
/// state is read and the message placed under the routes lock, which a release holds while
/// it scans, so a release never passes over a message that is still writing the state of an
/// attempt that failed just before it (the write and a delay warning take a while).
/// Returns what `Index::settle` returns and where the message went.
fn settle_for_route(
    inner: &Inner,
    key: QueueKey,
    e: &Entry,
    attempts: u32,
    how: Settle,
) -> (Result<(), Asks>, Settle) {
    let routes = inner.routes();
    let back = e.route != NO_ROUTE
        && matches!(how, Settle::Deferred(_))
        && routes
            .down_since
            .get(e.route as usize)
            .is_some_and(|d| d.is_none());
    let how = if back { Settle::Ready } else { how };
    let res = inner.index().settle(key, e.state, attempts, e.route, how);
    drop(routes);
    if back && res.is_ok() {
        info!(qid = %key.id(), route = %inner.routes().names[e.route as usize], "its route answered again while its state was written: tried again at once");
    }
    (res, how)
}

/// Appends the message's new state; when its message record keeps a mostly dead segment
/// alive, copies the message forward with it (compaction) so that segment can be deleted.
async fn save(
    inner: &Inner,
    key: QueueKey,
    e: &mut Entry,
    env: &Envelope,
    state: &DeliveryState,
) -> Result<(), SpoolTaskError> {
    let spool = &inner.spool;
    if spool.should_relocate(e.msg) {
        let body = Arc::new(spool.read_message(e.msg).await?);
        let (msg, st) = spool.relocate(env, body, state, e.msg, e.state).await?;
        e.msg = msg;
        e.state = Some(st);
        inner.index().moved(key, msg);
        info!(qid = %env.id, segment = msg.seg, "copied forward out of a mostly dead spool segment");
    } else {
        e.state = Some(spool.save_state(&env.id, state, e.state).await?);
    }
    Ok(())
}

/// Where admin requests move a message that would otherwise settle as `how`. A flush never
/// undoes a hold (as a flush of a held message does nothing).
fn next_settle(asks: Asks, how: Settle, inner: &Inner, attempts: u32) -> Settle {
    let held = matches!(how, Settle::Held);
    if asks.has(Asks::HOLD) || (held && !asks.has(Asks::RELEASE)) {
        Settle::Held
    } else if asks.has(Asks::RELEASE) || asks.has(Asks::FLUSH) {
        Settle::Ready
    } else {
        match how {
            Settle::Deferred(t) => Settle::Deferred(t),
            _ => Settle::Deferred(
                inner.clock.now_ms() + retry_delay(inner, attempts.max(1)).as_millis() as u64,
            ),
        }
    }
}

/// An admin's delete: the message ends once its end record is durable. When the spool
/// cannot write that record, the delete is refused (the admin who asked is told) and the
/// message stays queued as it was (`back`), so a restart never brings back a message an
/// admin was told is deleted.
async fn delete(inner: &Inner, key: QueueKey, e: Entry, back: Settle) {
    let id = key.id();
    // Each recipient still pending is reported to the outcome sink as deleted; that needs
    // the envelope and state, read before the spool lets them go (a message that cannot be
    // read is deleted unreported), when the sink wants the detail.
    let shown = match inner.outcomes.wants_detail() {
        true => load(inner, &e).await.ok(),
        false => None,
    };
    match inner.spool.finish(&id, e.msg, e.state).await {
        Ok(()) => {
            if let Some((env, state)) = shown {
                let state = inner
                    .index()
                    .unwritten(key)
                    .map_or(state, |u| u.state().clone());
                for i in state.pending() {
                    let told = Told::new(None, Outcome::Deleted, None);
                    record(inner, &env, i, None, &told);
                }
            }
            warn!(qid = %id, "deleted from the queue by an admin (no bounce)");
            inner.index().remove(key);
            tell_deleters(inner, key, Ok(()));
        }
        Err(err) => {
            error!(qid = %id, error = %err, "cannot delete the message: its end record cannot be written; the delete is refused and the message stays queued");
            tell_deleters(inner, key, Err(Arc::new(err)));
            let mut how = back;
            // Requests that came in meanwhile (a second delete was answered above).
            loop {
                let res = inner.index().settle(key, e.state, e.attempts, e.route, how);
                match res {
                    Ok(()) => break,
                    Err(asks) if asks.is_empty() => break,
                    Err(asks) => how = next_settle(asks, how, inner, e.attempts),
                }
            }
            inner.wake.notify_one();
        }
    }
}

/// Answers the admins waiting for the delete of `key`.
fn tell_deleters(inner: &Inner, key: QueueKey, res: Result<(), Arc<crate::spool::SpoolError>>) {
    let waiting = inner.deleters().remove(&key).unwrap_or_default();
    for w in waiting {
        let _ = w.send(res.clone());
    }
}

/// Applies an admin request to a message that was idle (ready, deferred or held as `back`)
/// and is now busy: writes the change to the spool, then places it.
pub(super) async fn apply_asks(inner: Arc<Inner>, key: QueueKey, e: Entry, a: Asks, back: Settle) {
    apply(&inner, key, e, a, back).await;
    inner.wake.notify_one();
}

async fn apply(inner: &Arc<Inner>, key: QueueKey, e: Entry, a: Asks, back: Settle) {
    if a.has(Asks::DELETE) {
        return delete(inner, key, e, back).await;
    }
    let owed = inner.index().unwritten(key).map(|u| u.owed.clone());
    let (env, state) = match owed {
        // Finished: only its end record is left, which a hold or release does not change.
        Some(Owed::End(state)) => return write_end(inner, key, e, *state).await,
        // Its newest state, not yet written: the change is written with it.
        Some(Owed::State(state)) => match inner.spool.read_envelope(e.msg).await {
            Ok(env) => (Arc::new(env), *state),
            _ => {
                error!(qid = %key.id(), "cannot read the queued message for an admin request");
                return unreadable(inner, key, e).await;
            }
        },
        None => match load(inner, &e).await {
            Ok(x) => x,
            Err(err) => {
                error!(qid = %key.id(), error = %err, "cannot read the queued message for an admin request");
                return unreadable(inner, key, e).await;
            }
        },
    };
    let how = if a.has(Asks::HOLD) {
        Settle::Held
    } else {
        Settle::Ready
    };
    defer(inner, key, e, &env, state, how).await;
}

/// When (Unix ms) a message with `attempts` attempts made is tried next.
fn due_after(inner: &Inner, attempts: u32) -> u64 {
    inner.clock.now_ms() + retry_delay(inner, attempts).as_millis() as u64
}

fn retry_delay(inner: &Inner, attempts: u32) -> Duration {
    let cfg = inner.config.load();
    backoff(attempts, cfg.queue.min_backoff, cfg.queue.max_backoff)
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
