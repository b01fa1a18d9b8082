//! Rolling back a batch through the fleet, also after later bases (imports, LDAP syncs).
//!
//! Every batch commits with its undo entries (for each mailbox it moves: the primary
//! address, the state and origin before, the state after) in the table `batch_undo`, in the
//! same transaction. A rollback is decided by the node that commits it, against the head of
//! the log: the batch's undo entries (from its own change log when the batch logged there
//! has the id PostgreSQL's change has, else from `batch_undo`, else refused),
//! restricted to the mailboxes whose origin is still the batch, become the restore list
//! carried in the rollback change's body; every node applies that list (see
//! [`crate::directory::undo`]). So a base between the batch and its rollback no longer
//! forbids it, and a node that joined after the batch applies the same restore as the rest.
//!
//! What a rollback means then: each mailbox the batch moved goes back to its state before
//! the batch, unless something decided it since: a later batch, or the source (an imported
//! file, an LDAP sync) changing that mailbox's state; those keep the newer decision and are
//! counted as `changed_since`. A base that changed other mailboxes, or only this mailbox's
//! addresses, does not stand in the way.

use super::commit::{blocking, skipped};
use super::sql::{db_err, seq_u32};
use super::{Fleet, FleetError, Inner, Progress};
use crate::directory::store::{ChangeEntry, Stamp};
use crate::directory::undo;
use crate::directory::BatchReport;
use tokio_postgres::Client;
use tracing::info;

/// The table of schema `s` (part of the fleet's DDL; nodes that predate it ignore it).
pub(super) fn ddl(s: &str) -> String {
    format!(
        r#"
CREATE TABLE IF NOT EXISTS "{s}".batch_undo (
    seq bigint PRIMARY KEY,
    body bytea NOT NULL
);
"#
    )
}

/// Inside a batch's commit transaction: keeps its undo `entries` as change `seq`'s.
pub(super) async fn keep_undo(
    inner: &Inner,
    client: &Client,
    seq: u32,
    entries: &[ChangeEntry],
) -> Result<(), FleetError> {
    let s = inner.schema();
    client
        .execute(
            // A row under this number belongs to a change the log lost (a failover to a
            // standby that missed it, a truncated `changes`): this change replaces it.
            &format!(
                r#"INSERT INTO "{s}".batch_undo (seq, body) VALUES ($1, $2)
                   ON CONFLICT (seq) DO UPDATE SET body = excluded.body"#
            ),
            &[&i64::from(seq), &undo::encode_undo(entries)],
        )
        .await
        .map_err(db_err(&inner.pg))?;
    Ok(())
}

/// Checks that change `batch` is a batch not rolled back yet, and returns its undo entries.
async fn undo_of(
    inner: &Inner,
    client: &Client,
    batch: u32,
) -> Result<Vec<ChangeEntry>, FleetError> {
    let s = inner.schema();
    let err = db_err(&inner.pg);
    let change: Option<(String, String)> = client
        .query_opt(
            &format!(r#"SELECT kind, uid FROM "{s}".changes WHERE seq = $1"#),
            &[&i64::from(batch)],
        )
        .await
        .map_err(&err)?
        .map(|r| (r.get(0), r.get(1)));
    let uid = match change {
        None => return Err(FleetError::Refused(format!("batch {batch} not found"))),
        Some((k, uid)) if k == "apply" => uid,
        Some((k, _)) => {
            return Err(FleetError::Refused(format!(
                "change {batch} is a {k}, not a batch"
            )))
        }
    };
    let done: Option<i64> = client
        .query_opt(
            &format!(
                r#"SELECT min(seq) FROM "{s}".changes WHERE kind = 'rollback' AND rolls_back = $1 HAVING count(*) > 0"#
            ),
            &[&i64::from(batch)],
        )
        .await
        .map_err(&err)?
        .map(|r| r.get(0));
    if let Some(d) = done {
        return Err(FleetError::Refused(format!(
            "batch {batch} was already rolled back (change {})",
            seq_u32(d)?
        )));
    }
    // This node's own record of the batch, if it is PostgreSQL's batch `batch` (its id):
    // after a log that moved back and a repair, the local log may hold another change
    // under that number. One logged without an id is taken when PostgreSQL keeps no
    // undo entries for the batch.
    let dir = inner.directory.clone();
    let mut unnamed = None;
    let mut other = None;
    match blocking(move || dir.logged_batch(batch)).await?? {
        Some((Some(here), entries)) if here == uid => return Ok(entries),
        Some((None, entries)) => unnamed = Some(entries),
        Some((Some(here), _)) => other = Some(here),
        None => {}
    }
    let body: Option<Vec<u8>> = client
        .query_opt(
            &format!(r#"SELECT body FROM "{s}".batch_undo WHERE seq = $1"#),
            &[&i64::from(batch)],
        )
        .await
        .map_err(&err)?
        .map(|r| r.get(0));
    match (body, unnamed, other) {
        (Some(b), _, _) => undo::decode_undo(&b)
            .map_err(|e| FleetError::Sql(format!("batch_undo of batch {batch}: {e}"))),
        (None, Some(entries), _) => Ok(entries),
        (None, None, Some(here)) => Err(FleetError::Refused(format!(
            "batch {batch} in PostgreSQL's log (id {uid}) is not the batch this node logged under that number (id {here}: the log moved back since), and PostgreSQL keeps no undo entries for it: roll it back from a node that applied it"
        ))),
        (None, None, None) => Err(FleetError::Refused(format!(
            "batch {batch} predates the fleet keeping undo data and this node did not apply it (it joined later): roll it back from a node that applied it"
        ))),
    }
}

impl Fleet {
    /// Rolls back batch `batch` through the fleet log (see the module doc for what that
    /// means after later bases).
    /// Bounded by `fleet.commit_timeout`.
    pub async fn rollback(&self, batch: u32) -> Result<(BatchReport, Progress), FleetError> {
        let work = self.rollback_unbounded(batch);
        let what = format!("rollback of batch {batch}");
        self.inner
            .bounded(&what, self.inner.cfg.commit_timeout, work)
            .await
    }

    /// [`Fleet::rollback`] without its bound.
    async fn rollback_unbounded(&self, batch: u32) -> Result<(BatchReport, Progress), FleetError> {
        let (client, head, _applying) = self.begin(false).await?;
        let entries = undo_of(&self.inner, &client, batch).await?;
        let dir = self.inner.directory.clone();
        let (preview, restores) = {
            let d = dir.clone();
            blocking(move || d.restore_plan(batch, &entries)).await?
        };
        let seq = head + 1;
        let source = format!("rollback of {batch}");
        let at = self
            .insert(
                &client,
                seq,
                "rollback",
                &source,
                Some(batch),
                preview.rows,
                preview.changed,
                &undo::encode_restores(&restores),
                false,
            )
            .await?;
        let applied = {
            let s = source.clone();
            blocking(move || dir.restore_at(&at, batch, &s, &restores)).await??
        };
        // The plan is the report (rows, `changed_since`: it was made under the log's lock,
        // on the state the change applies to). A change this node committed and then
        // skipped (it had that number already) is an error, never a success.
        let applied = applied.ok_or_else(|| skipped(&self.inner, seq))?;
        let mut report = preview;
        report.changed = applied.changed;
        report.id = Some(seq);
        let nodes = self.progress(&client, seq).await?;
        info!(
            change = seq,
            batch,
            restored = report.changed,
            changed_since = report.changed_since,
            "fleet: rollback committed"
        );
        Ok((report, nodes))
    }
}

/// Applies rollback change `seq` of batch `batch` with `body` as a follower: its restore
/// list, or for a rollback of an earlier version (no list), the node's own computation.
pub(super) async fn apply_rollback(
    inner: &Inner,
    at: Stamp,
    batch: u32,
    source: String,
    body: Vec<u8>,
) -> Result<(), FleetError> {
    let dir = inner.directory.clone();
    let seq = at.seq;
    blocking(move || {
        match undo::decode_restores(&body)
            .map_err(|e| FleetError::Refused(format!("change {seq}: {e}")))?
        {
            Some(restores) => dir.restore_at(&at, batch, &source, &restores)?,
            None => dir.rollback_at(&at, batch)?,
        };
        Ok::<_, FleetError>(())
    })
    .await?
}
