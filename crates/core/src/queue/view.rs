//! What admins and metrics see of the queue: the listing form of a message
//! ([`MessageView`]), the route each pending recipient would take now, and per-phase counts.

use super::index::Owed;
use super::{Phase, Queue, QueueEntry};
use crate::route;
use crate::spool::RcptStatus;
use crate::types::QueueKey;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// What the spool could not write yet (disk full, I/O error): the state shown is the
    /// newer one kept in memory, written before the message's next delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwritten: Option<String>,
    /// Where a message taken over from a dead node (`[shadow]`) or resubmitted came from:
    /// `taken over from NODE (queue id ID there) at TIME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_from: Option<String>,
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
    /// Messages whose last outcome the spool could not write yet.
    pub unwritten: usize,
}

impl Queue {
    /// The listing form of a message, with each pending recipient's route now.
    pub fn view(&self, e: &QueueEntry) -> MessageView {
        let now = self.inner.clock.now_secs();
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
            unwritten: e.unwritten.clone(),
            taken_from: e.envelope.taken_from.as_ref().map(|t| {
                let at = chrono::DateTime::from_timestamp(t.at as i64, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                let how = if t.resubmitted {
                    "resubmitted by an admin from the kept copy of"
                } else {
                    "taken over from"
                };
                format!("{how} {} (queue id {} there) at {at}", t.node, t.queue_id)
            }),
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
            // Only the route is shown: no routing address needed.
            |a| self.inner.directory.resolve(a).into(),
            &config,
        );
        pending
            .into_iter()
            .map(|i| (i, plan.route_of(i).map(|r| r.as_str().to_string())))
            .collect()
    }

    /// One queued message, read from the spool.
    pub fn get(&self, id: &str) -> Option<QueueEntry> {
        self.entry(super::key_of(id)?)
    }

    fn entry(&self, key: QueueKey) -> Option<QueueEntry> {
        let (e, newer) = {
            let ix = self.inner.index();
            let e = ix.get(key)?;
            (e, ix.unwritten(key).cloned())
        };
        // Blocking: the callers run on a blocking thread (the admin API's `spawn_blocking`).
        let (env, state) = self.inner.spool.files().read_queued(e.msg, e.state).ok()?;
        let phase = Phase::from(e.slot);
        let unwritten = newer.as_ref().map(|u| match u.owed {
            Owed::State(_) => format!(
                "delivery state not yet written to the spool ({} failed writes)",
                u.failures
            ),
            Owed::End(_) => format!(
                "finished; its end record not yet written to the spool ({} failed writes)",
                u.failures
            ),
        });
        Some(QueueEntry {
            envelope: Arc::new(env),
            state: newer.map_or(state, |u| u.state().clone()),
            phase,
            next_attempt: (phase == Phase::Deferred).then_some(e.due_ms / 1000),
            unwritten,
        })
    }

    /// The messages in the queue, oldest first (each read from the spool).
    pub fn list(&self) -> Vec<QueueEntry> {
        self.select(None, 0, usize::MAX, |_| true)
    }

    /// Up to `limit` messages in `phase` (all phases: `None`) at least `min_age_s` old for
    /// which `pick` is true, oldest first. Costs the messages looked at, not the queue: the
    /// index gives the candidates in order and only those are read from the spool.
    pub fn select(
        &self,
        phase: Option<Phase>,
        min_age_s: u64,
        limit: usize,
        pick: impl Fn(&QueueEntry) -> bool,
    ) -> Vec<QueueEntry> {
        use super::index::Slot;
        let slots: &[Slot] = match phase {
            None => &[Slot::Ready, Slot::Busy, Slot::Deferred, Slot::Held],
            Some(Phase::Active) => &[Slot::Ready, Slot::Busy],
            Some(Phase::Deferred) => &[Slot::Deferred],
            Some(Phase::Held) => &[Slot::Held],
        };
        let newest_ms = self
            .inner
            .clock
            .now_ms()
            .saturating_sub(min_age_s.saturating_mul(1000));
        let mut out = Vec::new();
        let mut after = None;
        'pages: loop {
            let keys = self.inner.index().keys(slots, after, 1000);
            let Some(&last) = keys.last() else { break };
            after = Some(last);
            for k in keys {
                if k.made_at_ms() > newest_ms {
                    // Ids are in time order: every later one is younger too.
                    break 'pages;
                }
                if let Some(e) = self.entry(k).filter(|e| pick(e)) {
                    out.push(e);
                    if out.len() >= limit {
                        break 'pages;
                    }
                }
            }
        }
        out
    }

    /// Attempts now every deferred message for which `pick` is true; returns how many.
    pub fn flush_where(&self, pick: impl Fn(&QueueEntry) -> bool) -> usize {
        let picked = self.select(Some(Phase::Deferred), 0, usize::MAX, pick);
        picked
            .iter()
            .filter(|e| self.flush(e.envelope.id.as_str()).is_ok())
            .count()
    }

    /// Counts per phase and oldest ages, from the index alone.
    pub fn stats(&self) -> QueueStats {
        use super::index::Slot;
        let (c, unwritten) = {
            let ix = self.inner.index();
            (ix.census(), ix.unwritten_count())
        };
        let now = self.inner.clock.now_ms();
        let age = |s: &[Slot]| {
            s.iter()
                .filter_map(|&s| c.oldest[s as usize])
                .map(|k| now.saturating_sub(k.made_at_ms()) / 1000)
                .max()
                .unwrap_or(0)
        };
        QueueStats {
            active: c.count[Slot::Ready as usize] + c.count[Slot::Busy as usize],
            deferred: c.count[Slot::Deferred as usize],
            held: c.count[Slot::Held as usize],
            oldest_active: age(&[Slot::Ready, Slot::Busy]),
            oldest_deferred: age(&[Slot::Deferred]),
            unwritten,
        }
    }
}

/// Upper ends, in minutes, of the age buckets of [`RouteShape::buckets`] (the last bucket,
/// over 80 minutes, has none): the buckets of Postfix's `qshape`.
pub const AGE_BUCKETS_MIN: [u64; 5] = [5, 10, 20, 40, 80];

/// The queue of one route, as `qshape` shows a destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteShape {
    /// The route pending recipients would take now (`None`: no route).
    pub route: Option<String>,
    /// Messages with a pending recipient on it.
    pub messages: u64,
    /// Its pending recipients.
    pub recipients: u64,
    /// Those messages by age: 0–5 min, 5–10, 10–20, 20–40, 40–80, over 80.
    pub buckets: [u64; 6],
}

/// The queue by route and age ([`Queue::shape`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueShape {
    /// One row per route, by route name.
    pub routes: Vec<RouteShape>,
    /// Messages looked at (the oldest first).
    pub scanned: usize,
    /// Messages in the queue.
    pub total: usize,
}

/// The bucket of an age in seconds.
pub fn age_bucket(age_s: u64) -> usize {
    AGE_BUCKETS_MIN
        .iter()
        .position(|&m| age_s < m * 60)
        .unwrap_or(AGE_BUCKETS_MIN.len())
}

impl Queue {
    /// The queue by route and age bucket, over at most `limit` messages, the oldest first
    /// (each is read from the spool and routed as an attempt would route it now, so the
    /// cost is bounded by `limit`, not by the queue).
    pub fn shape(&self, limit: usize) -> QueueShape {
        let now = self.inner.clock.now_secs();
        let total = self.len();
        let mut rows: std::collections::BTreeMap<Option<String>, RouteShape> = Default::default();
        let picked = self.select(None, 0, limit, |_| true);
        for e in &picked {
            let bucket = age_bucket(now.saturating_sub(e.envelope.received_at));
            let mut per_route: HashMap<Option<String>, u64> = HashMap::new();
            for (_, r) in self.pending_routes(e) {
                *per_route.entry(r).or_default() += 1;
            }
            for (route, n) in per_route {
                let row = rows.entry(route.clone()).or_insert_with(|| RouteShape {
                    route,
                    messages: 0,
                    recipients: 0,
                    buckets: [0; 6],
                });
                row.messages += 1;
                row.recipients += n;
                row.buckets[bucket] += 1;
            }
        }
        QueueShape {
            routes: rows.into_values().collect(),
            scanned: picked.len(),
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_fall_into_qshape_buckets() {
        let min = 60;
        assert_eq!(age_bucket(0), 0);
        assert_eq!(age_bucket(5 * min - 1), 0);
        assert_eq!(age_bucket(5 * min), 1);
        assert_eq!(age_bucket(19 * min), 2);
        assert_eq!(age_bucket(39 * min), 3);
        assert_eq!(age_bucket(79 * min), 4);
        assert_eq!(age_bucket(80 * min), 5);
        assert_eq!(age_bucket(100_000), 5);
    }
}
