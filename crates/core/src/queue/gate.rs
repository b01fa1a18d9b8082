//! The delivery gate: whether the queue may start delivery attempts now. Open unless the
//! node is fenced: with `[shadow]` a node opens it only up to the end of its lease's
//! validity (half of `takeover_after` after the renewal was sent), so a node whose renewal
//! hangs closes by itself, before any survivor may take its queue, and it stays closed
//! while what a survivor took from this node is dropped (DESIGN invariant 13). Messages
//! stay queued; attempts already running end as they do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Whether delivery attempts may start; shared by the queue and whoever fences it.
#[derive(Debug)]
pub struct Gate {
    open: AtomicBool,
    /// Milliseconds after `base` until which an open gate stays open (`u64::MAX`: no end).
    until_ms: AtomicU64,
    base: Instant,
    opened: Notify,
}

impl Gate {
    /// A gate that starts open (`true`, with no end) or closed.
    pub fn new(open: bool) -> Gate {
        Gate {
            open: AtomicBool::new(open),
            until_ms: AtomicU64::new(u64::MAX),
            base: Instant::now(),
            opened: Notify::new(),
        }
    }

    /// True when attempts may start.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
            && (self.base.elapsed().as_millis() as u64) < self.until_ms.load(Ordering::SeqCst)
    }

    /// Opens (with no end) or closes the gate; opening wakes the dispatcher.
    pub fn set(&self, open: bool) {
        self.until_ms.store(u64::MAX, Ordering::SeqCst);
        self.switch(open);
    }

    /// Opens the gate until `until` (it closes by itself then, unless opened again).
    pub fn open_until(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.until_ms.store(ms, Ordering::SeqCst);
        self.switch(true);
    }

    fn switch(&self, open: bool) {
        let was = self.open.swap(open, Ordering::SeqCst);
        if open && !was {
            self.opened.notify_waiters();
        }
    }

    /// Waits until the gate is open (checked at least every second, since an open gate
    /// may have reached its end).
    pub async fn wait_open(&self) {
        loop {
            let n = self.opened.notified();
            if self.is_open() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), n).await;
        }
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_opened_until_a_time_closes_by_itself() {
        let g = Gate::new(false);
        assert!(!g.is_open());
        g.open_until(Instant::now() + Duration::from_millis(50));
        assert!(g.is_open());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!g.is_open(), "closed at its end without being told");
        g.set(true);
        assert!(g.is_open());
        g.set(false);
        assert!(!g.is_open());
    }
}
