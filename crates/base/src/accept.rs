//! What a listener does when `accept` fails: back off briefly and log once per burst.
//!
//! The usual failure is EMFILE or ENFILE (out of file descriptors): the connection stays in
//! the kernel's backlog, so accepting again at once fails again and the loop would spin
//! and flood the log. A short pause lets other tasks finish and close descriptors; the
//! first failure of a burst is logged at warning with its error, and the end of the burst
//! (the next accepted connection) at info with how many failures it held. The listener
//! itself never stops.

use std::time::Duration;
use tracing::{info, warn};

/// Pause after a failed `accept`.
pub const BACKOFF: Duration = Duration::from_millis(50);

/// The failures of one listener since its last accepted connection.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    burst: u64,
}

impl AcceptErrors {
    /// No failures yet, for the listener named `listener` in the log (`smtp`, `admin`).
    pub fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors { listener, burst: 0 }
    }

    /// Records a failed `accept` (logged if it starts a burst) and waits [`BACKOFF`].
    pub async fn failed(&mut self, error: &std::io::Error) {
        if self.burst == 0 {
            warn!(
                listener = self.listener,
                error = %error,
                backoff_ms = BACKOFF.as_millis() as u64,
                "accept failed (out of file descriptors?); retrying after a pause, logged once until a connection is accepted again"
            );
        }
        self.burst += 1;
        metrics::counter!(crate::metrics::ACCEPT_ERRORS, "listener" => self.listener).increment(1);
        tokio::time::sleep(BACKOFF).await;
    }

    /// Records an accepted connection: ends a burst of failures (logged with its size).
    pub fn accepted(&mut self) {
        if self.burst > 0 {
            info!(
                listener = self.listener,
                failures = self.burst,
                "accepting again after failed accepts"
            );
            self.burst = 0;
        }
    }
}
