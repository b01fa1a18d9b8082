//! The safety net (`shadow.keep_delivered`): copies of delivered messages kept for a while,
//! marked with the routes their recipients went through, so that an admin can deliver again
//! what went to one route in a window (after that estate lost mail, such as an on-premises
//! database restored from backup): `coexist queue resubmit`. Expired copies are removed
//! every [`SWEEP`] by every node (whoever's they are).

use super::node::Shadowing;
use super::ShadowError;
use crate::clock::now_secs;
use crate::spool::TakenFrom;
use crate::types::QueueId;
use std::time::Duration;
use tracing::{info, warn};

/// How often a node removes its own kept copies older than `keep_delivered`.
pub const SWEEP: Duration = Duration::from_secs(600);

/// What a resubmission found (and did).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resubmitted {
    /// Kept messages delivered through the route in the window.
    pub messages: u64,
    /// Their recipients that went through that route.
    pub recipients: u64,
    /// True when they were queued again (false: a preview).
    pub queued: bool,
    /// The new queue ids (when queued).
    #[serde(default)]
    pub queue_ids: Vec<String>,
}

impl Shadowing {
    /// Removes the kept copies (any node's) of messages delivered more than
    /// `keep_delivered` ago. Returns how many went.
    pub async fn sweep_kept(&self) -> Result<u64, ShadowError> {
        let Some(keep) = self.cfg.keep_delivered else {
            return Ok(0);
        };
        let horizon = now_secs().saturating_sub(keep.as_secs());
        // Every node's: a node that never comes back leaves its kept copies to the others.
        let (mut from, mut n) = (1u64, 0u64);
        while let Some((node, qid, seq, d)) = self.store.next_kept(from).await? {
            from = seq + 1;
            if d.at < horizon {
                self.store.remove(&node, &qid).await?;
                n += 1;
            }
        }
        if n > 0 {
            info!(
                copies = n,
                "shadow: removed kept copies of messages delivered before keep_delivered"
            );
        }
        Ok(n)
    }

    /// Finds the kept copies (of every node) of messages that finished in `[since, until)`
    /// (Unix seconds) with recipients delivered through `route`, and, unless `preview`,
    /// queues each again here for exactly those recipients.
    pub async fn resubmit(
        &self,
        route: &str,
        since: u64,
        until: u64,
        preview: bool,
    ) -> Result<Resubmitted, ShadowError> {
        let mut out = Resubmitted {
            queued: !preview,
            ..Default::default()
        };
        // Only what was kept before this call: the messages queued again here are kept in
        // turn once delivered, and must not be found again.
        let upto = self.store.last_sequence().await?;
        let mut from = 1u64;
        while let Some((node, qid, seq, d)) = self.store.next_kept(from).await? {
            if seq > upto {
                break;
            }
            from = seq + 1;
            let Some(rcpts) = d.routes.get(route) else {
                continue;
            };
            if d.at < since || d.at >= until || rcpts.is_empty() {
                continue;
            }
            out.messages += 1;
            out.recipients += rcpts.len() as u64;
            if preview {
                continue;
            }
            let Some(copy) = self.store.read_copy(&node, &qid, true).await? else {
                warn!(
                    node,
                    qid, "shadow: a kept copy went before it could be resubmitted"
                );
                continue;
            };
            let mut env = copy.env.clone();
            env.rcpts = rcpts
                .iter()
                .filter_map(|&i| copy.env.rcpts.get(i).cloned())
                .collect();
            if !copy.env.rcpt_dsn.is_empty() {
                env.rcpt_dsn = rcpts.iter().map(|&i| copy.env.dsn(i)).collect();
            }
            env.id = QueueId::generate();
            env.taken_from = Some(TakenFrom {
                node: node.clone(),
                queue_id: qid.clone(),
                at: now_secs(),
                resubmitted: true,
            });
            let body = std::sync::Arc::new(copy.body);
            let loc = self.spool.store_generated(&env, body.clone()).await?;
            warn!(qid = %env.id, from_node = node, from_qid = qid, route, nrcpt = env.rcpts.len(), "shadow: resubmitted by an admin (delivered before, through this route)");
            out.queue_ids.push(env.id.as_str().to_string());
            self.queue.submit_taken(env, loc, body);
        }
        Ok(out)
    }
}
