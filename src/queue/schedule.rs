//! A message's life in the queue: the per-message task that runs attempts, applies admin
//! requests between them, expires what waited too long, and waits for the next attempt
//! with exponential backoff.

use super::attempt::{attempt, AttemptBody};
use super::dsn::{finish, warn_if_delayed};
use super::{unix_now, Inner, MsgControl, Phase};
use crate::proto::{Failure, LastReply};
use crate::spool::{DeliveryState, Envelope, RcptStatus};
use crate::types::QueueId;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, warn};

/// Retry delay after `attempts` attempts: min_backoff doubled per attempt, capped.
fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// One queued message's life, from its first attempt to its removal. Every line it logs
/// (attempts, retry waits, DSNs, removal) carries the `message` span with its queue id.
#[tracing::instrument(name = "message", skip_all, fields(qid = %env.id))]
pub(super) async fn run_message(
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
