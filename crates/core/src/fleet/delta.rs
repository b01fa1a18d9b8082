//! Source deltas through the fleet: what the LDAP leader's round changed, committed as one
//! change of kind `delta` whose `body` holds its rows (JSON, as the local change log keeps
//! them), and applied by every node as rows ([`crate::directory::delta`]). A round that
//! changed 50 mailboxes writes one row of `changes` with 50 mailboxes in it, not a base of
//! every address.

use super::commit::{blocking, skipped};
use super::{Fleet, FleetError, Inner};
use crate::directory::delta::Delta;
use crate::directory::{ReloadReport, Stamp};
use tracing::info;

impl Fleet {
    /// Commits source delta `delta` (named `source`, `ldap usn N`) as the log's next change
    /// and applies it here. Refused beyond `directory.max_shrink` unless `force`, like a
    /// file reload; refused like a batch on a node whose history the log does not hold.
    pub async fn commit_delta(
        &self,
        delta: Delta,
        source: String,
        force: bool,
    ) -> Result<ReloadReport, FleetError> {
        let work = self.commit_delta_unbounded(delta, source, force);
        self.inner
            .bounded("directory delta", self.inner.cfg.commit_timeout, work)
            .await
    }

    async fn commit_delta_unbounded(
        &self,
        delta: Delta,
        source: String,
        force: bool,
    ) -> Result<ReloadReport, FleetError> {
        let (client, head, _applying) = self.begin(false).await?;
        let dir = self.inner.directory.clone();
        let preview = {
            let (d, x) = (dir.clone(), delta.clone());
            blocking(move || d.preview_delta(&x, force)).await??
        };
        let seq = head + 1;
        let body = serde_json::to_vec(&delta)
            .map_err(|e| FleetError::Refused(format!("delta not encoded: {e}")))?;
        let at = self
            .insert(
                &client,
                seq,
                "delta",
                &source,
                None,
                delta.entries.len(),
                preview.changed,
                &body,
                false,
            )
            .await?;
        let report = {
            let s = source.clone();
            blocking(move || dir.apply_delta_at(&at, &delta, &s)).await??
        };
        let report = report.ok_or_else(|| skipped(&self.inner, seq))?;
        drop(client);
        info!(
            change = seq,
            source,
            changed = report.changed,
            added = report.added,
            removed = report.removed,
            "fleet: source delta committed"
        );
        Ok(report)
    }
}

/// Applies fleet change `at`, a delta with JSON `body`, on this node.
pub(super) async fn apply_delta(
    inner: &Inner,
    at: Stamp,
    body: Vec<u8>,
    source: String,
) -> Result<(), FleetError> {
    let dir = inner.directory.clone();
    let seq = at.seq;
    blocking(move || {
        let delta: Delta = serde_json::from_slice(&body).map_err(|e| {
            FleetError::Refused(format!("change {seq}: delta body not readable: {e}"))
        })?;
        dir.apply_delta_at(&at, &delta, &source)?;
        Ok(())
    })
    .await?
}
