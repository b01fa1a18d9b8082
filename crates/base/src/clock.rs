//! The time of day, for the whole program: one home, so that delivery, the queue, the fleet
//! and the directory do not each read the system clock their own way (or reach into each
//! other for it).
//!
//! Two ways to read it:
//! - a [`Clock`] value, handed to what schedules by time (the queue takes one from the
//!   composition root, `relay::start_with_clock`). It is the system's clock, or a
//!   [`Clock::manual`] one that a test sets and advances, so the queue's retries, expiry and
//!   probes can be driven without waiting;
//! - the free functions ([`now_ms`], [`now_secs`], [`now_secs_f64`], [`now_micros`],
//!   [`now_utc`]), which read the system clock, for code that only stamps what it writes
//!   (queue ids, `Received:` and `Date:` headers, change-log times).
//!
//! Elapsed time (timeouts, latencies) is measured with `std::time::Instant` / tokio's timers,
//! not here: those are not the time of day. A clock set before 1970 reads as 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the time of day: the system clock, or a manual one a test drives. Cheap to
/// clone; clones of a manual clock share its time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None`: the system clock; else the manual clock's milliseconds since the epoch.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that reads `start_ms` (milliseconds since the Unix epoch) until it is
    /// [set](Clock::set_ms) or [advanced](Clock::advance).
    pub fn manual(start_ms: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(start_ms))),
        }
    }

    /// A manual clock that starts at the system's time now.
    pub fn manual_from_now() -> Clock {
        Clock::manual(now_ms())
    }

    /// True for a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// Moves a manual clock forward by `by`; the system clock cannot be moved (returns
    /// false).
    pub fn advance(&self, by: Duration) -> bool {
        match &self.manual {
            Some(ms) => {
                ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Sets a manual clock to `ms` since the Unix epoch; the system clock cannot be set
    /// (returns false).
    pub fn set_ms(&self, ms: u64) -> bool {
        match &self.manual {
            Some(t) => {
                t.store(ms, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => since_epoch().as_millis() as u64,
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Seconds since the Unix epoch, with their fraction.
    pub fn now_secs_f64(&self) -> f64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::SeqCst) as f64 / 1000.0,
            None => since_epoch().as_secs_f64(),
        }
    }
}

/// Milliseconds since the Unix epoch (the system clock).
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Whole seconds since the Unix epoch (the system clock).
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

/// Seconds since the Unix epoch, with their fraction (the system clock).
pub fn now_secs_f64() -> f64 {
    since_epoch().as_secs_f64()
}

/// Microseconds since the Unix epoch (the system clock): what queue ids are made of.
pub fn now_micros() -> u64 {
    since_epoch().as_micros() as u64
}

/// The time now in UTC (the system clock), for dates written as text (RFC 2822 headers,
/// RFC 3339 stamps).
pub fn now_utc() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readings_agree() {
        let (ms, s, f) = (now_ms(), now_secs(), now_secs_f64());
        assert!(
            ms / 1000 >= s.saturating_sub(1) && ms / 1000 <= s + 1,
            "{ms} {s}"
        );
        assert!((f - s as f64).abs() < 2.0, "{f} {s}");
        assert!(s > 1_700_000_000, "{s}");
        let (u, us) = (now_utc().timestamp() as u64, now_micros() / 1_000_000);
        assert!(u + 1 >= s && us + 1 >= s, "{u} {us} {s}");
        let c = Clock::system();
        assert!(!c.is_manual() && !c.advance(Duration::from_secs(1)));
        assert!(c.now_secs() + 1 >= s);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_follow() {
        let c = Clock::manual(1_000_000);
        let d = c.clone();
        assert_eq!((c.now_ms(), c.now_secs()), (1_000_000, 1_000));
        assert!(c.advance(Duration::from_millis(1_500)));
        assert_eq!(d.now_ms(), 1_001_500);
        assert_eq!(d.now_secs_f64(), 1_001.5);
        assert!(d.set_ms(5_000));
        assert_eq!(c.now_secs(), 5);
    }
}
