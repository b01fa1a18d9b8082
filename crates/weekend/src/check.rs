//! The checker: judges a run's history against what the relay promises. Nothing
//! acknowledged is lost, every recipient reaches the estate its mailbox was in (within the
//! lag the fleet allows), nothing is delivered twice without a fault to explain it, no
//! valid recipient is refused for good, and no node takes mail while routing on a directory
//! older than the lag allows.

use crate::history::{Estate, History, Move, Rules, Sent};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// How many examples each class of violation keeps.
pub const EXAMPLES: usize = 20;

/// The rules when the history carries none.
pub const DEFAULT_RULES: Rules = Rules {
    max_lag_ms: 30_000,
    attempt_ms: 60_000,
    slack_ms: 5_000,
};

/// One class of violation: how many, and the first few as sentences.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Class {
    /// How many were found.
    pub count: u64,
    /// The first [`EXAMPLES`] of them.
    pub examples: Vec<String>,
}

impl Class {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The rules applied (the history's, or [`DEFAULT_RULES`]).
    pub rules: Rules,
    /// The run's span (Unix ms).
    pub span_ms: (i64, i64),
    /// Recipients the load was told were accepted: distinct (queue id, recipient).
    pub acknowledged: u64,
    /// Acknowledged recipients delivered at least once.
    pub delivered: u64,
    /// Acknowledged recipients never delivered.
    pub lost: Class,
    /// Deliveries (records) whose queue id no acknowledgement names: a node died between
    /// its fsync and the `250` reaching the client. Not a violation.
    pub unacknowledged_deliveries: u64,
    /// Delivered recipients judged for routing (known addresses).
    pub routed: u64,
    /// Recipients delivered to an estate their mailbox was not in within the allowed lag.
    pub misrouted: Class,
    /// Recipients delivered whose address the directory never had.
    pub unknown: Class,
    /// The longest a delivery's estate had stopped being its mailbox's before it arrived
    /// (ms; 0 when every delivery went to the current estate).
    pub max_stale_delivery_ms: i64,
    /// (queue id, recipient) delivered more than once, with a fault that may duplicate.
    pub duplicates_explained: u64,
    /// (queue id, recipient) delivered more than once, with no fault to explain it.
    pub duplicates: Class,
    /// (queue id, estate) delivered with different contents (CRCs).
    pub corrupted: Class,
    /// Recipients refused with a 5xx reply.
    pub refused_5xx: Class,
    /// Recipients refused below 500 (the 4xx deferrals), by reply code.
    pub deferred_by_code: BTreeMap<u16, u64>,
    /// Sessions that ended without a final reply.
    pub session_errors: u64,
    /// Samples of a ready node routing on a directory older than the lag allows.
    pub stale: Class,
    /// Stale samples per node.
    pub stale_by_node: BTreeMap<String, u64>,
    /// Mailbox states read from the nodes after the run.
    pub final_checked: u64,
    /// A node whose directory, after the run, routes a mailbox to another estate than the
    /// one its last change put it in (a change lost or never applied).
    pub diverged: Class,
}

impl Verdict {
    /// The violation classes with their names, in report order.
    pub fn classes(&self) -> [(&'static str, &Class); 8] {
        [
            ("lost", &self.lost),
            ("misrouted", &self.misrouted),
            ("unknown address delivered", &self.unknown),
            ("duplicate (unexplained)", &self.duplicates),
            ("corrupted", &self.corrupted),
            ("refused 5xx", &self.refused_5xx),
            ("stale routing", &self.stale),
            ("diverged after the run", &self.diverged),
        ]
    }

    /// All violations.
    pub fn violations(&self) -> u64 {
        self.classes().iter().map(|(_, c)| c.count).sum()
    }

    /// No violations.
    pub fn passed(&self) -> bool {
        self.violations() == 0
    }
}

/// A Unix time (ms) as UTC `HH:MM:SS.mmm`.
pub fn clock(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%H:%M:%S%.3f").to_string(),
        None => format!("{ms} ms"),
    }
}

/// A Unix time (ms) as seconds since `start`: `+123.4s`.
pub fn since(ms: i64, start: i64) -> String {
    format!("{:+.1}s", ms.saturating_sub(start) as f64 / 1000.0)
}

/// A Unix time (ms) both ways: `12:03:04.123 (+123.4s)`.
fn at(ms: i64, start: i64) -> String {
    format!("{} ({})", clock(ms), since(ms, start))
}

/// Milliseconds as seconds: `12.3s`.
fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// (queue id, recipient, time, delivery index): one recipient of one delivery.
type Pair<'a> = (&'a str, &'a str, i64, usize);

/// Judges a history.
pub fn check(h: &History) -> Verdict {
    let mut v = Verdict {
        rules: h.rules.clone().unwrap_or(DEFAULT_RULES),
        span_ms: h.span_ms,
        acknowledged: 0,
        delivered: 0,
        lost: Class::default(),
        unacknowledged_deliveries: 0,
        routed: 0,
        misrouted: Class::default(),
        unknown: Class::default(),
        max_stale_delivery_ms: 0,
        duplicates_explained: 0,
        duplicates: Class::default(),
        corrupted: Class::default(),
        refused_5xx: Class::default(),
        deferred_by_code: BTreeMap::new(),
        session_errors: 0,
        stale: Class::default(),
        stale_by_node: BTreeMap::new(),
        final_checked: 0,
        diverged: Class::default(),
    };
    let mut pairs: Vec<Pair> = h
        .deliveries
        .iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.rcpts
                .iter()
                .map(move |r| (d.qid.as_str(), r.as_str(), d.at_ms, i))
        })
        .collect();
    pairs.sort_unstable();
    lost(h, &pairs, &mut v);
    routing(h, &pairs, &mut v);
    duplicates(h, &pairs, &mut v);
    corrupted(h, &mut v);
    refusals(h, &mut v);
    stale(h, &mut v);
    converged(h, &mut v);
    v
}

/// After the run every node must route each sampled mailbox to the estate of its last
/// change (or its first estate when it never moved).
fn converged(h: &History, v: &mut Verdict) {
    let wanted: HashSet<&str> = h.finals.iter().map(|f| f.address.as_str()).collect();
    let mut moves: Vec<&Move> = h.moves.iter().collect();
    moves.sort_by_key(|m| m.from_ms);
    let mut last: HashMap<&str, (Estate, &str)> = HashMap::new();
    for m in moves {
        for a in &m.addresses {
            if let Some(&a) = wanted.get(a.as_str()) {
                last.insert(a, (m.state, m.source.as_str()));
            }
        }
    }
    for f in &h.finals {
        v.final_checked += 1;
        let a = f.address.as_str();
        let truth = last
            .get(a)
            .copied()
            .or_else(|| h.initial.get(a).map(|e| (*e, "the start")));
        let Some((estate, why)) = truth else {
            continue;
        };
        if f.state.as_deref() != Some(estate.as_str()) {
            v.diverged.add(|| {
                let got = f.state.as_deref().unwrap_or("nothing");
                format!(
                    "diverged: {} routes {a} to {got} ({}) after the run; its last change ({why}) put it in {}",
                    f.node,
                    f.origin,
                    estate.as_str()
                )
            });
        }
    }
}

/// Every acknowledged (queue id, recipient) must appear in some delivery.
fn lost(h: &History, pairs: &[Pair], v: &mut Verdict) {
    let start = h.span_ms.0;
    let mut acked: Vec<(&str, &str, &Sent)> = h
        .sent
        .iter()
        .filter_map(|s| s.qid.as_deref().map(|q| (q, s)))
        .flat_map(|(q, s)| s.accepted.iter().map(move |r| (q, r.as_str(), s)))
        .collect();
    acked.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    acked.dedup_by(|a, b| (a.0, a.1) == (b.0, b.1));
    for &(q, r, s) in &acked {
        v.acknowledged += 1;
        if pairs.binary_search_by(|p| (p.0, p.1).cmp(&(q, r))).is_ok() {
            v.delivered += 1;
        } else {
            v.lost.add(|| {
                let t = at(s.at_ms, start);
                format!("lost: {r} in queue id {q} (accepted by {} at {t})", s.node)
            });
        }
    }
    let qids: HashSet<&str> = h.sent.iter().filter_map(|s| s.qid.as_deref()).collect();
    v.unacknowledged_deliveries = h
        .deliveries
        .iter()
        .filter(|d| !qids.contains(d.qid.as_str()))
        .count() as u64;
}

/// Each delivered recipient must reach an estate its mailbox was in within
/// [t - (max_lag + attempt), t].
fn routing(h: &History, pairs: &[Pair], v: &mut Verdict) {
    let start = h.span_ms.0;
    let bound = v.rules.max_lag_ms + v.rules.attempt_ms;
    let wanted: HashSet<&str> = pairs.iter().map(|p| p.1).collect();
    let mut moved: HashMap<&str, Vec<&Move>> = HashMap::new();
    for m in &h.moves {
        for a in &m.addresses {
            if let Some(&a) = wanted.get(a.as_str()) {
                moved.entry(a).or_default().push(m);
            }
        }
    }
    for list in moved.values_mut() {
        list.sort_by_key(|m| m.from_ms);
    }
    for d in &h.deliveries {
        for r in &d.rcpts {
            let init = h.initial.get(r.as_str()).copied();
            let mv = moved.get(r.as_str()).map_or(&[][..], Vec::as_slice);
            let what = || {
                let (e, t) = (d.estate.as_str(), at(d.at_ms, start));
                format!("{r} delivered to {e} at {t} in queue id {}", d.qid)
            };
            if init.is_none() && mv.is_empty() {
                v.unknown.add(|| format!("unknown address: {}", what()));
                continue;
            }
            v.routed += 1;
            match valid_until(init, mv, d.estate, d.at_ms) {
                Some(end) if end >= d.at_ms => {}
                Some(end) => {
                    let age = d.at_ms - end;
                    v.max_stale_delivery_ms = v.max_stale_delivery_ms.max(age);
                    if age > bound {
                        v.misrouted.add(|| {
                            let (e, age, b) = (d.estate.as_str(), secs(age), secs(bound));
                            format!(
                                "misrouted: {}: it had left {e} {age} before (bound {b})",
                                what()
                            )
                        });
                    }
                }
                None => v.misrouted.add(|| {
                    let e = d.estate.as_str();
                    format!("misrouted: {}: it had not been in {e} by then", what())
                }),
            }
        }
    }
}

/// The latest end of a span, begun by `t`, in which the mailbox's state counts as `e`.
/// The initial state lasts until the first move is certainly in force (its `to_ms`); each
/// move's state counts from its `from_ms` until the next move's `to_ms`.
fn valid_until(init: Option<Estate>, mv: &[&Move], e: Estate, t: i64) -> Option<i64> {
    let mut cur = init.map(|s| (s, i64::MIN));
    let mut best = None;
    for m in mv {
        if let Some((s, from)) = cur {
            if s == e && from <= t {
                best = best.max(Some(m.to_ms));
            }
        }
        cur = Some((m.state, m.from_ms));
    }
    match cur {
        Some((s, from)) if s == e && from <= t => Some(i64::MAX),
        _ => best,
    }
}

/// A (queue id, recipient) delivered twice must have a fault that may duplicate
/// overlapping [first - attempt, last].
fn duplicates(h: &History, pairs: &[Pair], v: &mut Verdict) {
    let start = h.span_ms.0;
    for g in pairs.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let [first, .., last] = g else {
            continue;
        };
        let lo = first.2.saturating_sub(v.rules.attempt_ms);
        let hi = last.2;
        let explained = h
            .faults
            .iter()
            .any(|f| f.kind.may_duplicate() && f.start_ms <= hi && f.end_ms >= lo);
        if explained {
            v.duplicates_explained += 1;
            continue;
        }
        v.duplicates.add(|| {
            let at: Vec<String> = g
                .iter()
                .map(|p| (h.deliveries[p.3].estate.as_str(), since(p.2, start)))
                .map(|(e, t)| format!("{e} {t}"))
                .collect();
            let (r, q, n, at) = (first.1, first.0, g.len(), at.join(", "));
            let (lo, hi) = (since(lo, start), since(hi, start));
            format!(
                "duplicate: {r} in queue id {q} delivered {n} times ({at}) with no fault that \
                 may duplicate between {lo} and {hi}"
            )
        });
    }
}

/// Deliveries of one message to one estate must carry the same bytes.
fn corrupted(h: &History, v: &mut Verdict) {
    let start = h.span_ms.0;
    let mut by: Vec<(&str, Estate, u32, i64)> = h
        .deliveries
        .iter()
        .map(|d| (d.qid.as_str(), d.estate, d.crc, d.at_ms))
        .collect();
    by.sort_unstable();
    for g in by.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        if g.windows(2).all(|w| w[0].2 == w[1].2) {
            continue;
        }
        v.corrupted.add(|| {
            let seen: Vec<String> = g
                .iter()
                .map(|x| format!("{:08x} {}", x.2, since(x.3, start)))
                .collect();
            let (q, e, seen) = (g[0].0, g[0].1.as_str(), seen.join(", "));
            format!("corrupted: queue id {q} reached {e} with different contents ({seen})")
        });
    }
}

/// 5xx refusals are violations; the rest are counted by code; so are failed sessions.
fn refusals(h: &History, v: &mut Verdict) {
    let start = h.span_ms.0;
    for s in &h.sent {
        if s.error.is_some() {
            v.session_errors += 1;
        }
        for r in &s.refused {
            if r.code >= 500 {
                v.refused_5xx.add(|| {
                    let t = at(s.at_ms, start);
                    format!("refused: {} by {} at {t}: {}", r.rcpt, s.node, r.reply)
                });
            } else {
                *v.deferred_by_code.entry(r.code).or_default() += 1;
            }
        }
    }
}

/// A ready node's sample is stale when a change after the one it applied had been seen
/// somewhere for longer than max_lag + slack.
fn stale(h: &History, v: &mut Verdict) {
    let start = h.span_ms.0;
    let bound = v.rules.max_lag_ms + v.rules.slack_ms;
    let mut first: BTreeMap<u32, i64> = BTreeMap::new();
    for s in &h.samples {
        if let Some(a) = s.applied {
            let t = first.entry(a).or_insert(s.at_ms);
            *t = (*t).min(s.at_ms);
        }
    }
    let changes: Vec<(u32, i64)> = first.into_iter().collect();
    // suffix[i]: the earliest time any change >= changes[i] was seen, and that change.
    let mut suffix = vec![(i64::MAX, 0u32); changes.len()];
    let mut best = (i64::MAX, 0u32);
    for (i, &(c, t)) in changes.iter().enumerate().rev() {
        if t <= best.0 {
            best = (t, c);
        }
        suffix[i] = best;
    }
    // Between a failover that lost a commit and the admin's repair (and `max_lag` after
    // it), the nodes that follow PostgreSQL lack the lost change by design: PostgreSQL's log
    // is the fleet's, and the nodes that hold the lost change drain (README, Failure
    // modes). Their deliveries are still judged by the misrouting rule.
    let lost: Vec<(i64, i64)> = h
        .faults
        .iter()
        .filter(|f| f.kind == crate::history::FaultKind::PgFailoverLost)
        .map(|f| (f.start_ms, f.end_ms.saturating_add(bound)))
        .collect();
    for s in &h.samples {
        let (true, true, Some(a)) = (s.up, s.ready, s.applied) else {
            continue;
        };
        if lost
            .iter()
            .any(|&(from, to)| (from..=to).contains(&s.at_ms))
        {
            continue;
        }
        let i = changes.partition_point(|&(c, _)| c <= a);
        let Some(&(seen, c)) = suffix.get(i) else {
            continue;
        };
        if seen >= s.at_ms.saturating_sub(bound) {
            continue;
        }
        *v.stale_by_node.entry(s.node.clone()).or_default() += 1;
        v.stale.add(|| {
            let (n, t, out, b) = (
                &s.node,
                at(s.at_ms, start),
                secs(s.at_ms - seen),
                secs(bound),
            );
            format!(
                "stale: {n} ready at {t} on change {a} while change {c} had been out {out} \
                 (bound {b})"
            )
        });
    }
}

#[cfg(test)]
mod tests;
