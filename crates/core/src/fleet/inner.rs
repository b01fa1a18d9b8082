//! The follower state's own bookkeeping: health marks, bounded PostgreSQL work, the applied
//! sequence published to waiters.

use super::{target, FleetError, Health, Inner};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

impl Inner {
    pub(super) fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that this node is behind, from now on unless already noted.
    pub(super) fn mark_behind(&self, why: &str) {
        let mut h = self.lock_health();
        if h.behind_since.is_none() {
            h.behind_since = Some(Instant::now());
        }
        h.behind_why = Some(why.to_string());
    }

    /// Notes that PostgreSQL's log does not hold this node's history: logged once, shown,
    /// counted as behind (drains after `max_lag`), and every commit refused with `why`.
    pub(super) fn diverge(&self, why: &str) {
        let first = {
            let mut h = self.lock_health();
            let first = h.diverged.is_none();
            h.diverged = Some(why.to_string());
            first
        };
        self.mark_behind(why);
        if first {
            error!(why, "fleet: the change log in PostgreSQL does not hold this node's history; directory changes refused and this node counts as behind (repair: `coexist directory import` of a known-good file)");
        }
    }

    /// The log holds this node's history (again).
    pub(super) fn converged(&self) {
        let was = self.lock_health().diverged.take();
        if let Some(why) = was {
            info!(
                was = why,
                "fleet: the change log holds this node's history again"
            );
        }
    }

    /// Runs `work` (`what`, for the error) for `limit` at most: past it the work is dropped
    /// (its connection closes, PostgreSQL rolls back what did not commit) and PostgreSQL
    /// counts as unreachable. The server's `statement_timeout` cannot end a wait for a
    /// server that does not answer at all (a stalled proxy, a half-open connection).
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl std::future::Future<Output = Result<T, FleetError>>,
    ) -> Result<T, FleetError> {
        tokio::time::timeout(limit, work).await.map_err(|_| {
            let reason = format!(
                "{what}: no answer from PostgreSQL within {} s (fleet.commit_timeout); a change may or may not have committed, `coexist fleet status` shows the log",
                limit.as_secs()
            );
            warn!(reason, "fleet: gave up waiting for PostgreSQL");
            FleetError::Unreachable {
                target: target(&self.pg),
                reason,
            }
        })?
    }

    /// The schema, quoted for SQL.
    pub(super) fn schema(&self) -> &str {
        &self.cfg.schema
    }

    /// Publishes the applied sequence to waiters.
    pub(super) fn published(&self) {
        let a = self.directory.applied();
        self.applied.send_if_modified(|v| {
            let changed = *v != a;
            *v = a;
            changed
        });
        metrics::gauge!(crate::metrics::FLEET_APPLIED).set(f64::from(a));
    }
}
