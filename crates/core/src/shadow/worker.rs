//! The store's worker: publishes message states and delivered marks and removes finished
//! messages' copies, in the order the spool wrote them, in batches (states first, their
//! acknowledgements awaited together, then the removals, many at a time). A removal that
//! fails is tried again (after 1 s, up to a minute apart) while the store lives.

use super::store::Store;
use super::wire;
use crate::metrics as m;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// What the worker does in order: publish a state, mark a copy delivered (kept), remove a
/// copy.
pub(super) enum Work {
    /// A message's state record (queue id, JSON).
    State(String, Vec<u8>),
    /// A delivered message's mark, its copy kept (queue id, JSON).
    Keep(String, Vec<u8>),
    /// A finished message's copy to remove (queue id).
    Forget(String),
}

/// Runs the worker until the store is dropped or the channel closes.
pub(super) async fn run(store: std::sync::Weak<Store>, mut rx: mpsc::UnboundedReceiver<Work>) {
    use futures_util::StreamExt;
    let mut retry: Vec<String> = Vec::new();
    let mut wait = Duration::from_secs(1);
    loop {
        let mut batch = Vec::new();
        if retry.is_empty() {
            match rx.recv().await {
                Some(w) => batch.push(w),
                None => return,
            }
        } else {
            tokio::select! {
                w = rx.recv() => match w { Some(w) => batch.push(w), None => return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else { return };
        let (stream, node) = (store.cfg.stream.clone(), store.node().to_string());
        let mut acks = Vec::new();
        let mut forget = std::mem::take(&mut retry);
        for w in batch {
            match w {
                Work::Keep(qid, json) => {
                    let subject = wire::kept(&stream, &node, &qid);
                    match store.js.publish(subject, json.into()).await {
                        Ok(a) => acks.push((a, Some(qid))),
                        // Not kept then: removed like any finished message.
                        Err(_) => forget.push(qid),
                    }
                }
                Work::State(qid, json) => {
                    let subject = wire::state(&stream, &node, &qid);
                    if let Ok(a) = store.js.publish(subject, json.into()).await {
                        acks.push((a, None));
                    }
                }
                Work::Forget(qid) => forget.push(qid),
            }
        }
        // All acknowledgements awaited together, under one deadline.
        let waits = acks
            .into_iter()
            .map(|(a, kept)| async move { (a.await.is_ok(), kept) });
        if let Ok(done) = tokio::time::timeout(
            store.cfg.publish_timeout,
            futures_util::future::join_all(waits),
        )
        .await
        {
            forget.extend(
                done.into_iter()
                    .filter(|(ok, _)| !ok)
                    .filter_map(|(_, k)| k),
            );
        }
        if forget.is_empty() {
            continue;
        }
        let results: Vec<(String, bool)> = futures_util::stream::iter(forget)
            .map(|qid| {
                let store = store.clone();
                async move {
                    let ok = store.remove(store.node(), &qid).await.is_ok();
                    (qid, ok)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        // Bounded: while NATS stays down, the oldest removals are given up (their copies
        // stay in the stream until an admin purges it; a takeover would deliver them again).
        const MAX_RETRY: usize = 1_000_000;
        let (mut ok, mut failed) = (0u64, 0u64);
        for (qid, done) in results {
            if done {
                ok += 1;
            } else {
                failed += 1;
                retry.push(qid);
            }
        }
        if retry.len() > MAX_RETRY {
            let gone = retry.len() - MAX_RETRY;
            retry.drain(..gone);
            warn!(copies = gone, "shadow: gave up removing the copies of finished messages (NATS unreachable too long); they stay in the stream");
        }
        metrics::counter!(m::SHADOW_REMOVALS, "result" => "ok").increment(ok);
        if failed > 0 {
            metrics::counter!(m::SHADOW_REMOVALS, "result" => "failed").increment(failed);
            warn!(
                copies = failed,
                "shadow: cannot remove the copies of finished messages now; trying again"
            );
            wait = (wait * 2).min(Duration::from_secs(60));
        } else {
            wait = Duration::from_secs(1);
        }
    }
}
