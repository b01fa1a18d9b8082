//! Outcomes per minute over the last hour, and the deferral reasons among them, for the
//! console's overview: a ring of 60 per-minute slots fed where each per-recipient outcome is
//! recorded ([`super::attempt`]).
//!
//! Bounded by construction: 60 slots, each with three counters and at most
//! [`MAX_CODES`] distinct enhanced status codes (later codes in the same minute count under
//! `other`); one sample reply text per code, at most [`MAX_CODES`] of them, each cut to
//! [`SAMPLE_TEXT`] bytes. Recording is a short critical section (an index and an add).

use super::recent::{cut, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// Minutes kept (the last hour).
pub const MINUTES: usize = 60;

/// Distinct enhanced status codes counted per minute (and sample texts kept).
pub const MAX_CODES: usize = 32;

/// Longest sample reply text kept per code, in bytes.
pub const SAMPLE_TEXT: usize = 160;

/// The code deferrals without an enhanced status code, or past [`MAX_CODES`], count under.
pub const OTHER: &str = "other";

#[derive(Default, Clone)]
struct Slot {
    /// Unix minute this slot holds (slots of older minutes are stale).
    minute: u64,
    delivered: u64,
    deferred: u64,
    bounced: u64,
    reasons: Vec<(Box<str>, u64)>,
}

/// One minute's outcomes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MinuteCounts {
    /// Unix time (seconds) of the minute's start.
    pub minute: u64,
    /// Recipients delivered.
    pub delivered: u64,
    /// Recipients deferred.
    pub deferred: u64,
    /// Recipients bounced or expired.
    pub bounced: u64,
}

/// A deferral reason over the last hour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonCount {
    /// Enhanced status code (`4.4.1`), or `other`.
    pub status: String,
    /// Deferrals with it in the last hour.
    pub count: u64,
    /// The last reply text seen with it.
    pub sample: String,
}

/// The last reply text seen per enhanced status code.
type Samples = HashMap<Box<str>, Box<str>>;

/// The ring (see the module docs).
#[derive(Default)]
pub struct Rates {
    inner: Mutex<(Vec<Slot>, Samples)>,
}

impl Rates {
    /// Counts one recipient's outcome at Unix time `now`; `status` and `text` are its
    /// reply's enhanced status code and text (used for deferrals).
    pub fn record(&self, now: u64, outcome: Outcome, status: Option<&str>, text: &str) {
        let minute = now / 60;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (slots, samples) = &mut *g;
        if slots.is_empty() {
            slots.resize(MINUTES, Slot::default());
        }
        let s = &mut slots[(minute % MINUTES as u64) as usize];
        if s.minute != minute {
            *s = Slot {
                minute,
                ..Slot::default()
            };
        }
        match outcome {
            Outcome::Delivered => s.delivered += 1,
            Outcome::Bounced | Outcome::Expired => s.bounced += 1,
            Outcome::Deleted | Outcome::TakenOver => {}
            Outcome::Deferred => {
                s.deferred += 1;
                let mut code = status.unwrap_or(OTHER);
                if !s.reasons.iter().any(|(c, _)| &**c == code) && s.reasons.len() >= MAX_CODES {
                    code = OTHER;
                }
                match s.reasons.iter_mut().find(|(c, _)| &**c == code) {
                    Some((_, n)) => *n += 1,
                    None => s.reasons.push((code.into(), 1)),
                }
                if samples.len() >= MAX_CODES && !samples.contains_key(code) {
                    // Full of codes from before: keep those still counted this minute.
                    samples.retain(|c, _| s.reasons.iter().any(|(r, _)| r == c));
                }
                if samples.len() < MAX_CODES || samples.contains_key(code) {
                    samples.insert(code.into(), cut(text, SAMPLE_TEXT));
                }
            }
        }
    }

    /// The last [`MINUTES`] minutes up to Unix time `now`, oldest first (minutes without
    /// outcomes count zero).
    pub fn minutes(&self, now: u64) -> Vec<MinuteCounts> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let last = now / 60;
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let minute = last.saturating_sub(back);
                let s =
                    g.0.get((minute % MINUTES as u64) as usize)
                        .filter(|s| s.minute == minute);
                MinuteCounts {
                    minute: minute * 60,
                    delivered: s.map_or(0, |s| s.delivered),
                    deferred: s.map_or(0, |s| s.deferred),
                    bounced: s.map_or(0, |s| s.bounced),
                }
            })
            .collect()
    }

    /// The deferral reasons of the last hour up to Unix time `now`, most frequent first, at
    /// most `top`.
    pub fn top_deferrals(&self, now: u64, top: usize) -> Vec<ReasonCount> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let last = now / 60;
        let mut sums: HashMap<&str, u64> = HashMap::new();
        for s in g.0.iter().filter(|s| s.minute + MINUTES as u64 > last) {
            for (c, n) in &s.reasons {
                *sums.entry(c).or_default() += n;
            }
        }
        let mut out: Vec<ReasonCount> = sums
            .into_iter()
            .map(|(c, n)| ReasonCount {
                status: c.to_string(),
                count: n,
                sample: g.1.get(c).map(|t| t.to_string()).unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then(a.status.cmp(&b.status)));
        out.truncate(top);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_minute_and_forgets_after_an_hour() {
        let r = Rates::default();
        let t0 = 1_000_020;
        r.record(t0, Outcome::Delivered, None, "");
        r.record(t0, Outcome::Delivered, None, "");
        r.record(t0 + 60, Outcome::Deferred, Some("4.4.1"), "no answer");
        r.record(t0 + 60, Outcome::Expired, None, "");
        let m = r.minutes(t0 + 60);
        assert_eq!(m.len(), MINUTES);
        let last = &m[MINUTES - 1];
        let prev = &m[MINUTES - 2];
        assert_eq!((prev.delivered, prev.deferred), (2, 0));
        assert_eq!((last.deferred, last.bounced), (1, 1));
        assert_eq!(last.minute, (t0 + 60) / 60 * 60);
        // An hour later the same slots are stale.
        let later = r.minutes(t0 + 60 + 3600);
        assert!(later
            .iter()
            .all(|m| m.delivered + m.deferred + m.bounced == 0));
        assert!(r.top_deferrals(t0 + 60 + 3600, 5).is_empty());
    }

    #[test]
    fn top_deferrals_by_status_with_a_sample_and_bounded_codes() {
        let r = Rates::default();
        let t = 2_000_000;
        for _ in 0..3 {
            r.record(t, Outcome::Deferred, Some("4.7.0"), "try later");
        }
        r.record(t, Outcome::Deferred, Some("4.4.1"), "connection refused");
        r.record(t, Outcome::Deferred, None, "odd");
        let top = r.top_deferrals(t, 2);
        assert_eq!(top[0].status, "4.7.0");
        assert_eq!(top[0].count, 3);
        assert_eq!(top[0].sample, "try later");
        assert_eq!(top.len(), 2);
        for i in 0..100 {
            r.record(t, Outcome::Deferred, Some(&format!("4.9.{i}")), "x");
        }
        let all = r.top_deferrals(t, 1000);
        assert!(all.len() <= MAX_CODES + 1, "{}", all.len());
        assert!(all.iter().any(|c| c.status == OTHER));
    }
}
