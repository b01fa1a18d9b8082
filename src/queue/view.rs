//! What admins and metrics see of the queue: the listing form of a message
//! ([`MessageView`]), the route each pending recipient would take now, and per-phase counts.

use super::{unix_now, Phase, Queue, QueueEntry};
use crate::route;
use crate::spool::RcptStatus;
use std::collections::HashMap;

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

impl Queue {
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
