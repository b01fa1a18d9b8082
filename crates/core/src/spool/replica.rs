//! The spool's redundant copy: a [`Replica`] the composition root may hand the spool
//! (`[shadow]`: `crate::shadow` keeps copies on NATS JetStream). The spool tells it about
//! every message it stores, every state that has final outcomes, and every message it
//! finishes, so the copy lives exactly as long as the message does.

use super::{message_rec, DeliveryState, Envelope, Loc, Spool, SpoolError};
use crate::types::QueueId;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Why a redundant copy could not be made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct CopyFailed {
    /// What failed (no secret in it).
    pub reason: String,
    /// True when the message must be refused for it (`on_failure = "defer"`); false when it
    /// is kept on the local copy only.
    pub refuse: bool,
}

/// The future [`Replica::copy`] returns.
pub type CopyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), CopyFailed>> + Send + 'a>>;

/// Where the spool keeps its redundant copies.
pub trait Replica: Send + Sync {
    /// Stores the copy of a new message; resolves once the copy is durable there.
    fn copy<'a>(&'a self, env: &'a Envelope, body: &'a Arc<Vec<u8>>) -> CopyFuture<'a>;

    /// A message's state as written locally: the copy learns which recipients no longer
    /// need a delivery (the replica keeps what it needs of it). Must not block.
    fn progress(&self, id: &QueueId, state: &DeliveryState);

    /// A message is finished (delivered, bounced, deleted, kept in `failed/`): its copy
    /// goes, or, with `last` (its final state) holding deliveries, may be kept for a while
    /// marked as delivered. Must not block (removals are batched).
    fn forget(&self, id: &QueueId, last: Option<&DeliveryState>);
}

/// Whether a message may be stored without its redundant copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// As the replica says (`shadow.on_failure`).
    AsConfigured,
    /// The copy is required.
    Always,
    /// The local copy is enough.
    Never,
}

/// The replica side of the spool: storing with a copy, telling the replica what became of
/// a message.
impl Spool {
    /// Keeps redundant copies of what this spool stores in `replica` from now on (set once,
    /// at start, before mail is taken).
    pub fn set_replica(&self, replica: Arc<dyn Replica>) {
        let _ = self.replica.set(replica);
    }

    /// [`Spool::store`] for a message the relay made (a DSN, a resubmission): a failed copy
    /// never refuses it, it is kept on the local copy.
    pub async fn store_generated(
        &self,
        env: &Envelope,
        body: Arc<Vec<u8>>,
    ) -> Result<Loc, SpoolError> {
        self.store_copied(env, body, Need::Never).await
    }

    /// [`Spool::store`] for a message taken over from a dead node: without a copy of its
    /// own it is refused whatever `on_failure` says ([`SpoolError::NoCopy`], its local
    /// record ended), so the dead node's copy stays until a copy here exists.
    pub async fn store_replicated(
        &self,
        env: &Envelope,
        body: Arc<Vec<u8>>,
    ) -> Result<Loc, SpoolError> {
        self.store_copied(env, body, Need::Always).await
    }

    pub(super) async fn store_copied(
        &self,
        env: &Envelope,
        body: Arc<Vec<u8>>,
        need: Need,
    ) -> Result<Loc, SpoolError> {
        let rec = message_rec(env, body.clone())?;
        // A message the relay made itself (a DSN, a resubmission) has no client waiting.
        let urgent = need != Need::Never;
        let Some(replica) = self.replica.get() else {
            return Ok(self.append(vec![rec], urgent).await?[0]);
        };
        let (local, copy) = tokio::join!(self.append(vec![rec], urgent), replica.copy(env, &body));
        let loc = match local {
            Ok(l) => l[0],
            Err(e) => {
                // Not acknowledged: the copy (whole or not) goes too.
                replica.forget(&env.id, None);
                return Err(e);
            }
        };
        match copy {
            Ok(()) => Ok(loc),
            Err(f) if need == Need::Always || (f.refuse && need == Need::AsConfigured) => {
                replica.forget(&env.id, None);
                // The client waits for this end before it hears 451.
                if let Err(e) = self.finish_as(&env.id, loc, None, None, urgent).await {
                    // The sender hears 451 and sends again: at worst one duplicate.
                    tracing::error!(qid = %env.id, error = %e, "message refused for want of a redundant copy, but its local record cannot be ended: it will be delivered too");
                }
                Err(SpoolError::NoCopy(f.reason))
            }
            Err(_) => Ok(loc),
        }
    }

    /// Tells the replica a state just written (it keeps what it needs of it).
    pub(super) fn progress(&self, id: &QueueId, state: &DeliveryState) {
        if let Some(r) = self.replica.get() {
            r.progress(id, state);
        }
    }
}
