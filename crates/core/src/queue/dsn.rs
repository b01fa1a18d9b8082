//! Ending a message and telling its sender: its end recorded in the spool once every
//! recipient has a final outcome, failure DSNs and one-time delay warnings spooled and queued as new messages.

use super::{Inner, Queue, SpoolTaskError};
use crate::spool::{DeliveryState, Envelope, Loc, RcptStatus};
use crate::types::QueueId;
use std::sync::Arc;
use tracing::{error, info, warn};

/// Sends the sender one "delayed" DSN once the message has waited `queue.delay_warning`
/// (for recipients whose NOTIFY allows it; never for `<>` or for our own DSNs).
pub(super) async fn warn_if_delayed(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    msg: Loc,
    state: &mut DeliveryState,
) {
    let after = inner.config.load().queue.delay_warning;
    if state.warned || after.is_zero() || env.from.is_none() || env.bounce {
        return;
    }
    if inner.clock.now_secs().saturating_sub(env.received_at) < after.as_secs() {
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
    match spool_dsn(
        inner,
        env,
        msg,
        state,
        &delayed,
        crate::bounce::Kind::Delayed,
    )
    .await
    {
        Ok(dsn) => info!(qid = %env.id, dsn = %dsn, "delay warning queued for the sender"),
        Err(e) => {
            state.warned = false;
            warn!(qid = %env.id, error = %e, "cannot queue the delay warning; will try again");
        }
    }
}

/// What became of a message [`finish`] was asked to end.
pub(super) enum End {
    /// Finished in the spool (its DSN, if any, queued first); gone from the queue.
    Gone,
    /// The sender was told (DSN spooled, or the message kept in `failed/`), but the spool
    /// refused its end record: only that record is left to write (no second DSN).
    Unrecorded,
    /// Neither its DSN nor its copy in `failed/` could be written: the whole end is to be
    /// done again.
    Kept,
}

/// Ends a message whose recipients all have a final outcome (DESIGN invariant 2): finished
/// in the spool when all were delivered; with failures, a DSN to the sender is spooled first
/// (then the original is finished), unless the sender is `<>` or asked for no DSN. If the DSN
/// cannot be spooled, the original is kept in `failed/`.
pub(super) async fn finish(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &DeliveryState,
    msg: Loc,
    state_loc: Option<Loc>,
) -> End {
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
        match spool_dsn(inner, env, msg, state, &notify, crate::bounce::Kind::Failed).await {
            Ok(dsn_id) => {
                info!(qid = %env.id, dsn = %dsn_id, failed = failed.len(), "bounced: DSN queued for the sender")
            }
            Err(e) => {
                error!(qid = %env.id, error = %e, "cannot queue the DSN; keeping the message in spool failed/");
                return keep_in_failed(inner, env, state, msg, state_loc).await;
            }
        }
    } else if keep_failed {
        warn!(qid = %env.id, "failed recipients of a message from <> (no bounce of a bounce); kept in spool failed/");
        return keep_in_failed(inner, env, state, msg, state_loc).await;
    } else if !failed.is_empty() {
        info!(qid = %env.id, failed = failed.len(), "failed recipients asked for no DSN (NOTIFY)");
    }
    match inner
        .spool
        .finish_delivered(&env.id, msg, state_loc, state)
        .await
    {
        Ok(()) => {
            info!(qid = %env.id, "removed");
            End::Gone
        }
        Err(e) => {
            error!(qid = %env.id, error = %e, "cannot record the message's end in the spool; it stays queued, and only its end record is written again");
            End::Unrecorded
        }
    }
}

async fn keep_in_failed(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    state: &DeliveryState,
    msg: Loc,
    state_loc: Option<Loc>,
) -> End {
    let (e2, st) = (env.clone(), state.clone());
    let res = inner
        .spool
        .blocking(move |files| {
            // Kept even when its bytes cannot be read back: the envelope and state still say
            // who it was for and what happened.
            let message = files
                .read_message(msg)
                .unwrap_or_else(|e| format!("(message bytes unreadable: {e})\n").into_bytes());
            files.keep_failed(&e2, &message, &st)
        })
        .await;
    let err = match res {
        Ok(()) => match inner
            .spool
            .finish_delivered(&env.id, msg, state_loc, state)
            .await
        {
            Ok(()) => return End::Gone,
            Err(e) => {
                error!(qid = %env.id, error = %e, "kept in spool failed/, but its end record cannot be written; only the end record is written again");
                return End::Unrecorded;
            }
        },
        Err(e) => e.to_string(),
    };
    error!(qid = %env.id, error = %err, "cannot move message to spool failed/; it stays queued");
    End::Kept
}

/// Builds the DSN for recipients `failed` and spools it durably, then queues it.
async fn spool_dsn(
    inner: &Arc<Inner>,
    env: &Arc<Envelope>,
    msg: Loc,
    state: &DeliveryState,
    failed: &[usize],
    kind: crate::bounce::Kind,
) -> Result<QueueId, SpoolTaskError> {
    let sender = env.from.clone().ok_or(SpoolTaskError::NoSender)?;
    let original = inner.spool.read_message(msg).await?;
    let dsn_id = QueueId::generate();
    let (hostname, max_return) = {
        let c = inner.config.load();
        (c.server.hostname.clone(), c.bounce.max_return_size)
    };
    let failures: Vec<crate::bounce::Failure<'_>> = failed
        .iter()
        .map(|&i| crate::bounce::Failure {
            rcpt: &env.rcpts[i],
            orcpt: env.rcpt_dsn.get(i).and_then(|d| d.orcpt.as_deref()),
            reply: state.rcpts[i].last_reply.as_ref().and_then(|l| l.failure()),
        })
        .collect();
    let body = crate::bounce::build(
        &hostname, &dsn_id, env, &original, &failures, kind, max_return,
    );
    let dsn_env = Envelope {
        id: dsn_id.clone(),
        from: None,
        rcpts: vec![sender],
        smtputf8: env.smtputf8,
        body: env.body,
        received_at: inner.clock.now_secs(),
        size: body.len() as u64,
        client: "coexist bounce".into(),
        ret: None,
        envid: None,
        rcpt_dsn: Vec::new(),
        bounce: true,
        returned_from: Vec::new(),
        taken_from: None,
    };
    let body = Arc::new(body);
    let loc = inner.spool.store_generated(&dsn_env, body.clone()).await?;
    inner.outcomes.note(&super::outcomes::Noted {
        time_ms: inner.clock.now_ms(),
        kind: super::outcomes::NotedKind::Dsn,
        queue_id: &env.id,
        related: Some(&dsn_env.id),
        sender: env.from.as_ref(),
    });
    Queue {
        inner: inner.clone(),
    }
    .submit(dsn_env, loc, Some(body));
    Ok(dsn_id)
}
