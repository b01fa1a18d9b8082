//! Per next hop: how many transactions may be in flight, and the throttled state.
//!
//! A next hop here is a host and port as the route names it (`next_hops`, or an MX host):
//! its addresses share one limit and one throttled state, since a server farm behind one
//! name (Exchange Online's MX hosts) throttles a sender as a whole, and pausing one address
//! would only move the load to the next. Connection failures stay per address (the
//! circuit breaker of `pool`).
//!
//! A next hop that answers "slow down" (a reply matching the route's `throttle_replies`,
//! e.g. Exchange Online's `421 4.3.2` or `451 4.7.500`) is *throttled*:
//! - its concurrency limit is halved (at least 1) and it is paused: no delivery starts a
//!   transaction with it until the pause ends. Messages that meet the pause are deferred to
//!   the pause's end: one hop-level schedule, not each message's own backoff;
//! - the first pause is the route's `throttle_pause`; another throttling reply while the hop
//!   is still recovering doubles it, up to `throttle_max_pause`;
//! - after the pause, each run of `limit` successful transactions raises the limit by one
//!   (additive increase, as Postfix's concurrency feedback does) until it is back at
//!   `delivery.hop_concurrency`; then the hop is up again.
//!
//! The limit is a semaphore whose permits are taken away (or, for permits in use, forgotten
//! when they are returned) and added back; tokio's semaphore has no "resize", so [`Gate`]
//! keeps the count of permits still owed.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The transaction slots of one next hop, with a limit that can be lowered and raised.
pub(super) struct Gate {
    sem: Arc<Semaphore>,
    /// (limit now, permits to forget when they come back).
    state: Mutex<(usize, usize)>,
}

impl Gate {
    pub(super) fn new(limit: usize) -> Gate {
        Gate {
            sem: Arc::new(Semaphore::new(limit)),
            state: Mutex::new((limit, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the number of transactions allowed at once.
    pub(super) fn set_limit(&self, new: usize) {
        let mut st = self.lock();
        let (old, owed) = *st;
        if new < old {
            let cut = old - new;
            let gone = self.sem.forget_permits(cut);
            *st = (new, owed + cut - gone);
        } else if new > old {
            let more = new - old;
            let paid = more.min(owed);
            self.sem.add_permits(more - paid);
            *st = (new, owed - paid);
        }
    }

    /// The limit now.
    pub(super) fn lock_limit(&self) -> usize {
        self.lock().0
    }

    /// Waits for a slot (held until the returned value is dropped).
    pub(super) async fn slot(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.sem.clone().acquire_owned().await.ok()?;
        Some(Slot {
            permit: Some(permit),
            gate: self.clone(),
        })
    }
}

/// A transaction slot at a next hop.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else { return };
        let mut st = self.gate.lock();
        if st.1 > 0 {
            st.1 -= 1;
            p.forget();
        }
    }
}

/// The throttled state of one next hop.
#[derive(Debug, Clone)]
struct Throttle {
    /// Transactions allowed at once now.
    limit: usize,
    /// No transaction starts before this.
    paused_until: Instant,
    /// The length of the last pause.
    pause: Duration,
    /// Unix ms when it became throttled.
    since_ms: u64,
    /// The last throttling reply, as displayed.
    last_reply: String,
    /// The route whose delivery got it.
    route: String,
    /// Successful transactions since the limit was last raised.
    successes: usize,
    /// Throttling replies since it became throttled.
    replies: u64,
}

/// What a next hop allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HopCondition {
    /// Deliveries go ahead.
    #[serde(rename = "up")]
    Up,
    /// Connections failed: deliveries skip it until a probe gets through.
    #[serde(rename = "circuit open")]
    CircuitOpen,
    /// The hop asked us to slow down: fewer deliveries in flight for a while.
    #[serde(rename = "throttled")]
    Throttled,
}

/// What a next hop's state is, for `status`, `queue list`, the console and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopView {
    /// The next hop: `host:port` as the route names it (for a circuit open: the address).
    pub next_hop: String,
    /// `up`, `circuit open` or `throttled`.
    pub state: HopCondition,
    /// Transactions it may have in flight now.
    pub limit: usize,
    /// Transactions it may have in flight when up (`delivery.hop_concurrency`).
    pub full_limit: usize,
    /// Seconds until it is tried again (paused or circuit open), else 0.
    pub resumes_in_s: u64,
    /// Throttled or down since (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The last throttling reply or connection error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// The route whose delivery met it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl HopCondition {
    /// The name shown and sent as JSON: `up`, `circuit open`, `throttled`.
    pub fn as_str(self) -> &'static str {
        match self {
            HopCondition::Up => "up",
            HopCondition::CircuitOpen => "circuit open",
            HopCondition::Throttled => "throttled",
        }
    }
}

impl HopView {
    /// For a throttled hop: `N of M transactions at once[, paused for S s more]`.
    pub fn limit_text(&self) -> Option<String> {
        (self.state == HopCondition::Throttled).then(|| {
            let mut t = format!("{} of {} transactions at once", self.limit, self.full_limit);
            if self.resumes_in_s > 0 {
                t.push_str(&format!(", paused for {} s more", self.resumes_in_s));
            }
            t
        })
    }

    /// Why the hop is not up, in words, with its last reply (empty when up).
    pub fn detail(&self) -> String {
        let last = self
            .last_reply
            .as_deref()
            .map(|r| format!("; last reply: {r}"))
            .unwrap_or_default();
        match self.state {
            HopCondition::Up => String::new(),
            HopCondition::Throttled => format!("{}{last}", self.limit_text().unwrap_or_default()),
            HopCondition::CircuitOpen => format!("next probe in {} s{last}", self.resumes_in_s),
        }
    }
}

/// Throttle states of all next hops.
#[derive(Default)]
pub(super) struct Throttles {
    map: Mutex<HashMap<String, Throttle>>,
}

/// What a pause is made of: the route's settings.
#[derive(Debug, Clone, Copy)]
pub struct PauseRules {
    /// First pause.
    pub first: Duration,
    /// Longest pause.
    pub max: Duration,
}

impl Throttles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Throttle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The end of `addr`'s pause, while it is paused.
    pub(super) fn paused(&self, hop: &str) -> Option<(Instant, String)> {
        let m = self.lock();
        let t = m.get(hop)?;
        (t.paused_until > Instant::now()).then(|| (t.paused_until, t.last_reply.clone()))
    }

    /// Records a throttling `reply` from `addr` on `route`; returns the new limit and the
    /// end of the pause. Replies that arrive during a pause (from transactions that were
    /// already under way) do not lengthen it.
    pub(super) fn throttled(
        &self,
        hop: &str,
        route: &str,
        reply: &str,
        rules: PauseRules,
        current_limit: usize,
    ) -> (usize, Instant, bool) {
        let now = Instant::now();
        let mut m = self.lock();
        let fresh = !m.contains_key(hop);
        let t = m.entry(hop.to_string()).or_insert_with(|| Throttle {
            limit: current_limit,
            paused_until: now,
            pause: Duration::ZERO,
            since_ms: crate::clock::now_ms(),
            last_reply: String::new(),
            route: route.to_string(),
            successes: 0,
            replies: 0,
        });
        t.replies += 1;
        t.last_reply = reply.chars().take(300).collect();
        t.route = route.to_string();
        if t.paused_until > now {
            return (t.limit, t.paused_until, false);
        }
        t.pause = if fresh || t.pause.is_zero() {
            rules.first
        } else {
            t.pause.saturating_mul(2).min(rules.max)
        };
        t.limit = (t.limit / 2).max(1);
        t.successes = 0;
        t.paused_until = now + t.pause;
        (t.limit, t.paused_until, true)
    }

    /// Records a transaction `addr` took without throttling; returns the new limit when it
    /// was raised, and whether the hop is up again (back at `full`).
    pub(super) fn succeeded(&self, hop: &str, full: usize) -> Option<(usize, bool)> {
        let mut m = self.lock();
        let t = m.get_mut(hop)?;
        if t.paused_until > Instant::now() {
            return None;
        }
        t.successes += 1;
        if t.successes < t.limit {
            return None;
        }
        t.successes = 0;
        t.limit += 1;
        if t.limit >= full {
            m.remove(hop);
            return Some((full, true));
        }
        Some((t.limit, false))
    }

    /// The views of throttled hops.
    pub(super) fn views(&self, full: usize) -> Vec<HopView> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(h, t)| HopView {
                next_hop: h.clone(),
                state: HopCondition::Throttled,
                limit: t.limit,
                full_limit: full,
                resumes_in_s: t.paused_until.saturating_duration_since(now).as_secs(),
                since: Some(t.since_ms / 1000),
                last_reply: Some(t.last_reply.clone()),
                route: Some(t.route.clone()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_conditions_are_named_alike_in_json_and_text() {
        for c in [
            HopCondition::Up,
            HopCondition::CircuitOpen,
            HopCondition::Throttled,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[tokio::test]
    async fn gate_limit_goes_down_with_slots_in_use_and_back_up() {
        let g = Arc::new(Gate::new(4));
        let a = g.slot().await.unwrap();
        let b = g.slot().await.unwrap();
        let c = g.slot().await.unwrap();
        g.set_limit(1);
        // Three in use, one free: the free one is taken away now, two are owed.
        assert_eq!(g.sem.available_permits(), 0);
        drop(a);
        drop(b);
        assert_eq!(
            g.sem.available_permits(),
            0,
            "returned slots paid what was owed"
        );
        drop(c);
        assert_eq!(g.sem.available_permits(), 1);
        g.set_limit(3);
        assert_eq!(g.sem.available_permits(), 3);
    }

    #[test]
    fn throttling_halves_pauses_doubles_and_ramps_back_up() {
        let t = Throttles::default();
        let a = "mx1.tenant.test:25";
        let rules = PauseRules {
            first: Duration::from_millis(1),
            max: Duration::from_millis(3),
        };
        let (limit, _, new) = t.throttled(a, "cloud", "421 4.3.2 busy", rules, 8);
        assert_eq!((limit, new), (4, true));
        // A reply from a transaction under way during the pause changes nothing.
        assert!(!t.throttled(a, "cloud", "421 4.3.2 busy", rules, 8).2);
        std::thread::sleep(Duration::from_millis(2));
        let (limit, _, _) = t.throttled(a, "cloud", "421 4.3.2 busy", rules, 8);
        assert_eq!(limit, 2);
        assert_eq!(t.lock()[a].pause, Duration::from_millis(2), "doubled");
        std::thread::sleep(Duration::from_millis(3));
        // Two successes raise 2 -> 3, three more 3 -> 4 ... up to 8: then up again.
        let mut raised = Vec::new();
        for _ in 0..100 {
            if let Some(r) = t.succeeded(a, 8) {
                raised.push(r);
                if r.1 {
                    break;
                }
            }
        }
        assert_eq!(
            raised,
            vec![
                (3, false),
                (4, false),
                (5, false),
                (6, false),
                (7, false),
                (8, true)
            ]
        );
        assert!(t.views(8).is_empty());
    }
}
