//! Throughput and latency over time, at a resolution that fits the run's length.
//!
//! The length is known only at the end, so each accepted message is recorded in three
//! tiers at once: 10 ms buckets for the first second, 100 ms buckets for the first ten
//! seconds, and 1 s buckets for the whole run. The finest tier that covers the run is
//! reported (a 0.2 s run gets some twenty points rather than one), and runs of more than
//! 20 minutes are merged into wider buckets, so a chart never has more than about 600
//! points. Memory stays bounded: 100 + 100 small histograms plus one per second.

use crate::report::Point;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::Duration;

/// Buckets per fine tier.
const FINE: u64 = 100;
/// Most points reported.
const MOST_POINTS: u64 = 600;

fn bucket_histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes, 2 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 600_000_000, 2).unwrap_or_else(|_| super::report::histogram())
}

/// Latency histograms per time bucket, in three tiers.
pub(super) struct Buckets {
    ten_ms: BTreeMap<u64, Histogram<u64>>,
    hundred_ms: BTreeMap<u64, Histogram<u64>>,
    second: BTreeMap<u64, Histogram<u64>>,
}

impl Buckets {
    /// No buckets yet.
    pub(super) fn new() -> Buckets {
        Buckets {
            ten_ms: BTreeMap::new(),
            hundred_ms: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// Records a message accepted `at` (since the start) after `us` microseconds.
    pub(super) fn record(&mut self, at: Duration, us: u64) {
        let ms = at.as_millis() as u64;
        for (map, width, limit) in [
            (&mut self.ten_ms, 10, Some(FINE)),
            (&mut self.hundred_ms, 100, Some(FINE)),
            (&mut self.second, 1000, None),
        ] {
            let i = ms / width;
            if limit.is_some_and(|l| i >= l) {
                continue;
            }
            let _ = map.entry(i).or_insert_with(bucket_histogram).record(us);
        }
    }

    /// The points of a run that lasted `elapsed`, and the bucket width (s).
    pub(super) fn points(&self, elapsed: Duration) -> (f64, Vec<Point>) {
        let ms = elapsed.as_millis() as u64;
        let (map, width) = if ms <= 10 * FINE {
            (&self.ten_ms, 10)
        } else if ms <= 100 * FINE {
            (&self.hundred_ms, 100)
        } else {
            (&self.second, 1000)
        };
        // Wider buckets for very long runs: `merge` seconds each.
        let merge = if width == 1000 {
            (ms / 1000).div_ceil(MOST_POINTS).max(1)
        } else {
            1
        };
        let mut merged: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
        for (i, h) in map {
            let _ = merged
                .entry(i / merge)
                .or_insert_with(bucket_histogram)
                .add(h);
        }
        let width_ms = width * merge;
        let points = merged
            .iter()
            .map(|(i, h)| {
                let start = i * width_ms;
                // A last, partial bucket counts only its own length.
                let span = (ms.saturating_sub(start)).clamp(1, width_ms) as f64 / 1000.0;
                let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                Point {
                    t: start as f64 / 1000.0,
                    accepted: h.len(),
                    msg_per_s: h.len() as f64 / span,
                    p50_ms: q(0.5),
                    p99_ms: q(0.99),
                    p99_9_ms: q(0.999),
                }
            })
            .collect();
        (width_ms as f64 / 1000.0, points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seconds: f64, per_ms: u64) -> (f64, Vec<Point>) {
        let mut b = Buckets::new();
        let ms = (seconds * 1000.0) as u64;
        for t in 0..ms {
            for k in 0..per_ms {
                b.record(Duration::from_millis(t), 1000 + k * 100);
            }
        }
        b.points(Duration::from_millis(ms))
    }

    #[test]
    fn short_runs_get_fine_buckets_and_long_runs_few_points() {
        let (w, p) = run(0.2, 1);
        assert_eq!(w, 0.01);
        assert_eq!(p.len(), 20);
        assert_eq!(p[0].accepted, 10);
        assert!((p[0].msg_per_s - 1000.0).abs() < 1e-6);

        let (w, p) = run(3.0, 1);
        assert_eq!((w, p.len()), (0.1, 30));

        let (w, p) = run(30.0, 1);
        assert_eq!((w, p.len()), (1.0, 30));
        assert!(p[29].p99_ms >= p[29].p50_ms);

        let (w, p) = run(1500.0, 1);
        assert_eq!(w, 3.0);
        assert_eq!(p.len(), 500);
    }

    #[test]
    fn a_partial_last_bucket_counts_its_own_length() {
        let mut b = Buckets::new();
        for t in 0..1500 {
            b.record(Duration::from_millis(10_000 + t), 500);
        }
        let (w, p) = b.points(Duration::from_millis(11_500));
        assert_eq!(w, 1.0);
        let last = p.last().unwrap();
        assert_eq!((last.t, last.accepted), (11.0, 500));
        assert!((last.msg_per_s - 1000.0).abs() < 1e-6);
    }
}
