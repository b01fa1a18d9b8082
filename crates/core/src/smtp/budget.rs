//! The memory budget of messages in transfer (`server.max_inflight_bytes`).
//!
//! Every session holds the message it is receiving in one buffer; this budget bounds the sum
//! of those buffers across sessions. A buffer takes its capacity from the budget before it
//! grows and gives it back when it is dropped. While the budget is spent, MAIL gets
//! `452 4.3.1` and a transfer that cannot grow is read to its end and refused with the same
//! reply, so memory stays bounded however many large messages arrive at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Capacity of a message buffer when its transfer starts, and the smallest step it grows by.
pub const FIRST_BUFFER: u64 = 64 * 1024;

/// Bytes of message buffers held by all sessions, and the most they may hold.
#[derive(Debug)]
pub struct InflightBudget {
    used: AtomicU64,
    max: AtomicU64,
}

impl InflightBudget {
    /// A budget of `max` bytes (0 = unlimited).
    pub fn new(max: u64) -> Arc<InflightBudget> {
        Arc::new(InflightBudget {
            used: AtomicU64::new(0),
            max: AtomicU64::new(max),
        })
    }

    /// Changes the limit (config reload); buffers already held keep their bytes.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// True while no new transaction should start: what is left would not hold a first
    /// message buffer.
    pub fn exhausted(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        max != 0 && self.used().saturating_add(FIRST_BUFFER) > max
    }

    /// Takes `n` bytes if they fit; `false` leaves the budget unchanged.
    fn try_take(&self, n: u64) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if max != 0 && before.saturating_add(n) > max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Bytes one buffer holds from the budget; given back on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<InflightBudget>,
    bytes: u64,
}

impl Charge {
    /// An empty charge against `budget`.
    pub fn new(budget: Arc<InflightBudget>) -> Charge {
        Charge { budget, bytes: 0 }
    }

    /// Adds `n` bytes if the budget allows.
    pub fn grow(&mut self, n: u64) -> bool {
        if self.budget.try_take(n) {
            self.bytes += n;
            true
        } else {
            false
        }
    }

    /// Gives every byte back.
    pub fn release(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_given_back() {
        let b = InflightBudget::new(FIRST_BUFFER * 3);
        let mut a = Charge::new(b.clone());
        assert!(a.grow(FIRST_BUFFER * 2));
        let mut c = Charge::new(b.clone());
        assert!(!c.grow(FIRST_BUFFER * 2));
        assert_eq!(b.used(), FIRST_BUFFER * 2);
        assert!(!b.exhausted());
        assert!(c.grow(1));
        assert!(b.exhausted());
        drop(a);
        assert_eq!(b.used(), 1);
        assert!(!b.exhausted());
        c.release();
        assert_eq!(b.used(), 0);
    }
}
