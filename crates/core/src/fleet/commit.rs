//! Directory changes through the fleet: batches, rollbacks and base imports are committed to
//! PostgreSQL first, then applied here.
//!
//! Each commit is one transaction on a connection of its own: take the log's advisory lock,
//! read the head, bring this node up to it ([`follow::catch_up`]), compute the change against
//! the now current directory (the report the admin sees is exact: no other change can commit
//! meanwhile), insert it as head + 1 with a `NOTIFY`, commit, and apply it here. A node that
//! cannot reach PostgreSQL refuses the change ([`FleetError::Unreachable`]). A batch
//! commits with its undo entries; rollbacks are in [`super::rollback`].
//!
//! Before a change is computed, the catch-up checks that the log holds this node's history
//! (see `fleet`): when it does not, batches and rollbacks are refused
//! ([`FleetError::Diverged`], naming both sides). A base import is the repair: it goes
//! through even then, computed on this node's own state, and takes a number above every
//! `applied` in the nodes table, so that every node, those whose history differs included,
//! takes it. Only the admin's import is that repair: the automatic ones (the LDAP leader's,
//! seeding a new fleet) are refused there like batches and numbered head + 1, so a
//! diverged node never publishes its state as the fleet's truth, and a base no admin asked
//! for never hides a lost change. A change this node committed and its own directory then skips (it has that
//! number already) is an error, never a success.
//!
//! Nothing in a commit waits forever: the log's lock is waited for [`LOG_LOCK_WAIT`] at
//! most, every statement runs under the connection's `statement_timeout`, a base's COPY
//! under [`COPY_TIMEOUT`], and a transaction left idle is ended by PostgreSQL. Those are
//! the server's bounds; a server that does not answer at all (a stalled network, a
//! half-open connection) is bounded here: a whole commit gives up after
//! `fleet.commit_timeout` (a base import after that plus [`COPY_BOUND`]) with
//! [`FleetError::Unreachable`] naming the reason.

use super::follow::{self, encode_rows};
use super::sql::{self, db_err, lock_key};
use super::{Fleet, FleetError};
use crate::directory::{batch::BatchRow, table, BatchReport, Stamp};
use futures_util::SinkExt;
use std::sync::Arc;
use tokio_postgres::Client;
use tracing::info;

pub use crate::directory::writer::{FleetBatch, Progress};

/// Nodes with a heartbeat older than this are counted as silent.
const LIVE: &str = "30 seconds";

/// How long a commit waits for another node's commit to release the log.
const LOG_LOCK_WAIT: &str = "30s";

/// How long a base's rows may take to COPY in (2,000,000 rows take seconds).
const COPY_TIMEOUT: &str = "10min";

/// [`COPY_TIMEOUT`], which a base import may take on top of `fleet.commit_timeout`.
pub(super) const COPY_BOUND: std::time::Duration = std::time::Duration::from_secs(600);

/// The error for a change committed under a number this node had applied already.
pub(super) fn skipped(inner: &super::Inner, seq: u32) -> FleetError {
    let why = super::Divergence::Skipped { seq };
    inner.diverge(&why.to_string());
    FleetError::Diverged(why)
}

impl Fleet {
    /// Applies batch `rows` (from file `source`) through the fleet log.
    pub async fn apply(
        &self,
        rows: Vec<BatchRow>,
        source: String,
    ) -> Result<(BatchReport, Option<Progress>), FleetError> {
        self.apply_with(rows, source, None)
            .await?
            .ok_or_else(|| FleetError::Refused("batch not applied".into()))
    }

    /// [`Fleet::apply`], for scheduled batch `scheduled` when given: in the same
    /// transaction the batch is claimed (still pending, row locked) and recorded as applied
    /// with its change, so it is applied once fleet-wide (see [`super::scheduled`]).
    /// `Ok(None)`: that batch is no longer pending (another node applied it, or it was
    /// cancelled); nothing was done.
    pub(super) async fn apply_with(
        &self,
        rows: Vec<BatchRow>,
        source: String,
        scheduled: Option<u32>,
    ) -> Result<Option<(BatchReport, Option<Progress>)>, FleetError> {
        let work = self.apply_unbounded(rows, source, scheduled);
        let what = match scheduled {
            Some(id) => format!("scheduled batch {id}"),
            None => "directory apply".into(),
        };
        self.inner
            .bounded(&what, self.inner.cfg.commit_timeout, work)
            .await
    }

    /// [`Fleet::apply_with`] without its bound.
    async fn apply_unbounded(
        &self,
        rows: Vec<BatchRow>,
        source: String,
        scheduled: Option<u32>,
    ) -> Result<Option<(BatchReport, Option<Progress>)>, FleetError> {
        let (client, head, _applying) = self.begin(false).await?;
        if let Some(id) = scheduled {
            if !super::scheduled::claim(&self.inner, &client, id).await? {
                return Ok(None);
            }
        }
        let dir = self.inner.directory.clone();
        let preview = {
            let (d, r, s) = (dir.clone(), rows.clone(), source.clone());
            blocking(move || d.apply(&r, &s, true)).await??
        };
        if preview.changed == 0 {
            if let Some(id) = scheduled {
                super::scheduled::settle_applied(&self.inner, &client, id, None).await?;
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(db_err(&self.inner.pg))?;
            }
            return Ok(Some((preview, None)));
        }
        let seq = head + 1;
        if let Some(id) = scheduled {
            super::scheduled::settle_applied(&self.inner, &client, id, Some(seq)).await?;
        }
        // What a rollback needs, even on a node that never applies this batch itself.
        let undo = {
            let (d, r) = (dir.clone(), rows.clone());
            blocking(move || d.undo_entries(&r)).await?
        };
        super::rollback::keep_undo(&self.inner, &client, seq, &undo).await?;
        let body = encode_rows(&rows, dir.states());
        let at = self
            .insert(
                &client,
                seq,
                "apply",
                &source,
                None,
                rows.len(),
                preview.changed,
                &body,
                false,
            )
            .await?;
        let report = {
            let s = source.clone();
            blocking(move || dir.apply_at(&at, &rows, &s)).await??
        };
        let mut report = report.ok_or_else(|| skipped(&self.inner, seq))?;
        report.id = Some(seq);
        let nodes = self.progress(&client, seq).await?;
        info!(
            change = seq,
            source,
            changed = report.changed,
            "fleet: batch committed"
        );
        Ok(Some((report, Some(nodes))))
    }

    /// Imports a directory file (`text`, named `source`) as a new base: merged into the
    /// fleet's directory as a file reload is, refused beyond `directory.max_shrink` unless
    /// `force`; its rows go to PostgreSQL with COPY.
    ///
    /// This is the admin's import (`coexist directory import`), the repair of a log that
    /// moved back: it goes through on a node whose history the log does not hold, and its
    /// number jumps above every node's `applied`, so every node takes it.
    pub async fn import(
        &self,
        text: Vec<u8>,
        source: String,
        force: bool,
    ) -> Result<FleetBatch, FleetError> {
        self.import_with(text, source, force, true).await
    }

    /// [`Fleet::import`] for an automatic caller (the LDAP leader, seeding a new fleet):
    /// never a repair. Like a batch it is refused on a node whose history the log does not
    /// hold, and it is numbered head + 1, so a node whose history differs does not take it
    /// for the fleet's truth: the mismatch stays shown until an admin repairs it.
    pub(super) async fn import_auto(
        &self,
        text: Vec<u8>,
        source: String,
        force: bool,
    ) -> Result<FleetBatch, FleetError> {
        self.import_with(text, source, force, false).await
    }

    /// A base import; `repair`: the admin's (see [`Fleet::import`]). Bounded by
    /// `fleet.commit_timeout` plus the COPY's own bound.
    async fn import_with(
        &self,
        text: Vec<u8>,
        source: String,
        force: bool,
        repair: bool,
    ) -> Result<FleetBatch, FleetError> {
        let work = self.import_unbounded(text, source, force, repair);
        let limit = self.inner.cfg.commit_timeout + COPY_BOUND;
        self.inner.bounded("base import", limit, work).await
    }

    /// [`Fleet::import_with`] without its bound.
    async fn import_unbounded(
        &self,
        text: Vec<u8>,
        source: String,
        force: bool,
        repair: bool,
    ) -> Result<FleetBatch, FleetError> {
        let t0 = std::time::Instant::now();
        let names = self.inner.directory.states().to_vec();
        let parsed = {
            let s = source.clone();
            blocking(move || table::parse(&text, &s, &names)).await??
        };
        let (client, head, _applying) = self.begin(repair).await?;
        let s = self.inner.schema().to_string();
        let err = db_err(&self.inner.pg);
        let seq = if repair {
            // Above every node's applied change (and this node's), so that a node whose
            // history PostgreSQL lost takes it too: the repair of a log that moved back.
            let top: i64 = client
                .query_one(
                    &format!(r#"SELECT coalesce(max(applied), 0) FROM "{s}".nodes"#),
                    &[],
                )
                .await
                .map_err(&err)?
                .get(0);
            head.max(sql::seq_u32(top)?)
                .max(self.inner.directory.applied())
                + 1
        } else {
            // This node holds the log's history up to its head (`begin`): the next number.
            head + 1
        };
        let dir = self.inner.directory.clone();
        let base = {
            let (d, s) = (dir.clone(), source.clone());
            blocking(move || d.merge_base(parsed, seq, &s, force)).await??
        };
        if base.is_empty() {
            return Err(FleetError::Refused(format!(
                "{source}: no addresses; a fleet's base needs at least one"
            )));
        }
        let mut report = base.report.clone();
        let merged = t0.elapsed();
        let base = Arc::new(base);
        // Rows a lost history may have left under this number (a restored `changes`).
        client
            .execute(
                &format!(r#"DELETE FROM "{s}".base_rows WHERE seq >= $1"#),
                &[&i64::from(seq)],
            )
            .await
            .map_err(&err)?;
        client
            .batch_execute(&format!("SET LOCAL statement_timeout = '{COPY_TIMEOUT}'"))
            .await
            .map_err(&err)?;
        self.copy_base(&client, seq, base.clone()).await?;
        let copied = t0.elapsed();
        let rows = base.len();
        let base = Arc::try_unwrap(base)
            .map_err(|_| FleetError::Refused("base still shared after COPY".into()))?;
        client
            .execute(
                &format!(
                    r#"DELETE FROM "{s}".base_rows WHERE seq < coalesce((SELECT max(seq) FROM "{s}".changes WHERE kind = 'base' AND seq < $1), 0)"#
                ),
                &[&i64::from(seq)],
            )
            .await
            .map_err(&err)?;
        let at = self
            .insert(
                &client,
                seq,
                "base",
                &source,
                None,
                rows,
                report.changed,
                &[],
                repair,
            )
            .await?;
        let installed = {
            let s = source.clone();
            blocking(move || dir.install_base(&at, base, &s)).await??
        };
        if !installed {
            return Err(skipped(&self.inner, seq));
        }
        self.inner.converged();
        self.inner.published();
        let nodes = self.progress(&client, seq).await?;
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            change = seq,
            source,
            entries = report.entries,
            changed = report.changed,
            ms = report.elapsed_ms,
            parse_merge_ms = merged.as_millis() as u64,
            copy_ms = (copied - merged).as_millis() as u64,
            "fleet: base imported"
        );
        Ok(FleetBatch {
            report,
            id: Some(seq),
            nodes,
        })
    }

    /// Opens a transaction holding the log's lock, with this node caught up to the head;
    /// the guard keeps the follower from applying until the commit has applied its change.
    /// A log that does not hold this node's history refuses the commit, unless `repair` (a
    /// base import, which goes on from this node's own state).
    pub(super) async fn begin(
        &self,
        repair: bool,
    ) -> Result<(Client, u32, tokio::sync::MutexGuard<'_, ()>), FleetError> {
        let inner = &self.inner;
        let guard = tokio::time::timeout(super::STATEMENT_TIMEOUT, inner.applying.lock())
            .await
            .map_err(|_| {
                FleetError::Refused(
                    "this node has been applying the fleet's log for over a minute; try again"
                        .into(),
                )
            })?;
        let client = sql::connect(&inner.pg).await?;
        let err = db_err(&inner.pg);
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{LOG_LOCK_WAIT}'"
            ))
            .await
            .map_err(&err)?;
        client
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&lock_key(inner.schema(), "log")],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE => {
                    FleetError::Refused(format!(
                        "another directory change has held the fleet's log for {LOG_LOCK_WAIT}; try again"
                    ))
                }
                _ => err(e),
            })?;
        let head = sql::head(&client, inner.schema(), &inner.pg).await?;
        let applied = match follow::catch_up_locked(inner, &client, true).await {
            Err(FleetError::Diverged(why)) if repair => {
                tracing::warn!(why = %why, "fleet: importing a base over a log that does not hold this node's history (the repair)");
                return Ok((client, head, guard));
            }
            other => other?,
        };
        if applied < head {
            return Err(FleetError::Refused(format!(
                "this node could not catch up with the fleet (applied {applied}, head {head})"
            )));
        }
        if !repair {
            Self::refuse_over_a_lost_change(inner, &client, head).await?;
        }
        Ok((client, head, guard))
    }

    /// Refuses a change while another node has applied one above the log's head: the log moved
    /// back (a failover to a standby that missed commits, a restore) and that node holds a
    /// change PostgreSQL lost. A change committed now would take a number that node already
    /// used for other contents, and the admin's repair (an import through a node that has the
    /// lost change, keeping its batch states) would then drop it without a word: an
    /// acknowledged batch undone (found by the weekend run, issue 28). So no node commits until
    /// the import, which numbers its base above every node's applied change, has repaired the
    /// log. (A node's row shows what it applied from its first heartbeat to the promoted
    /// server on, a second or so after it reconnects.)
    async fn refuse_over_a_lost_change(
        inner: &super::Inner,
        client: &Client,
        head: u32,
    ) -> Result<(), FleetError> {
        let s = inner.schema();
        let sql = format!(
            r#"SELECT name, applied FROM "{s}".nodes WHERE applied > $1 ORDER BY applied DESC, name"#
        );
        let rows = client
            .query(&sql, &[&i64::from(head)])
            .await
            .map_err(db_err(&inner.pg))?;
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let (name, applied): (String, i64) = (first.get(0), first.get(1));
        let also = match rows.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} other node(s))"),
        };
        Err(FleetError::Refused(format!(
            "the fleet's change log moved back: node {name}{also} applied change {applied}, \
             and PostgreSQL's log ends at change {head}; directory changes are refused on \
             every node until an admin imports a known-good directory file (`coexist \
             directory import`) through a node that holds the changes to keep, so that no \
             change committed meanwhile is dropped by that repair"
        )))
    }

    /// Inserts change `seq`, notifies the nodes and commits; returns the change's identity
    /// (PostgreSQL gives its id and commit time).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn insert(
        &self,
        client: &Client,
        seq: u32,
        kind: &str,
        source: &str,
        rolls_back: Option<u32>,
        rows: usize,
        changed: usize,
        body: &[u8],
        repair: bool,
    ) -> Result<Stamp, FleetError> {
        let s = self.inner.schema();
        let err = db_err(&self.inner.pg);
        let row = client
            .query_one(
                &format!(
                    r#"INSERT INTO "{s}".changes (seq, kind, node, source, rolls_back, rows, changed, body, repair)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {}"#,
                    sql::STAMP_COLUMNS
                ),
                &[
                    &i64::from(seq),
                    &kind,
                    &self.inner.cfg.node,
                    &source,
                    &rolls_back.map(i64::from),
                    &(rows as i64),
                    &(changed as i64),
                    &body,
                    &repair,
                ],
            )
            .await
            .map_err(&err)?;
        let at = sql::stamp(seq, &row, 0);
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&sql::channel(s), &seq.to_string()],
            )
            .await
            .map_err(&err)?;
        client.batch_execute("COMMIT").await.map_err(&err)?;
        Ok(at)
    }

    /// Writes the rows of `base` as base `seq` (COPY, CSV, in chunks of about 1 MiB). The
    /// rows are encoded on a blocking thread while PostgreSQL takes the chunks before them.
    /// An empty routing address is an empty field, which CSV COPY reads as NULL unless told
    /// otherwise (`FORCE_NOT_NULL`).
    async fn copy_base(
        &self,
        client: &Client,
        seq: u32,
        base: Arc<crate::directory::Base>,
    ) -> Result<(), FleetError> {
        let err = db_err(&self.inner.pg);
        let sink = client
            .copy_in(&format!(
                r#"COPY "{}".base_rows (seq, address, mailbox, state, file_state, origin, routing_address) FROM STDIN (FORMAT csv, FORCE_NOT_NULL (routing_address))"#,
                self.inner.schema()
            ))
            .await
            .map_err(&err)?;
        let mut sink = std::pin::pin!(sink);
        let names = self.inner.directory.states().to_vec();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
        let encoder = tokio::task::spawn_blocking(move || {
            const CHUNK: usize = 1 << 20;
            let writer = || {
                csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(Vec::with_capacity(CHUNK + 4096))
            };
            let mut w = writer();
            let seq_text = seq.to_string();
            for r in base.rows(&names) {
                let origin = r.origin.to_string();
                let record = [
                    seq_text.as_str(),
                    &r.address,
                    &r.mailbox,
                    &r.state,
                    &r.file_state,
                    &origin,
                    &r.routing_address,
                ];
                if let Err(e) = w.write_record(record) {
                    let _ = tx.blocking_send(Err(e.to_string()));
                    return;
                }
                if w.get_ref().len() >= CHUNK {
                    let chunk = std::mem::replace(&mut w, writer())
                        .into_inner()
                        .map_err(|e| e.to_string());
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.blocking_send(w.into_inner().map_err(|e| e.to_string()));
        });
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(|e| FleetError::Sql(format!("encoding base rows: {e}")))?;
            if !chunk.is_empty() {
                sink.send(bytes::Bytes::from(chunk)).await.map_err(&err)?;
            }
        }
        encoder
            .await
            .map_err(|e| FleetError::Refused(format!("encoding base rows: {e}")))?;
        sink.as_mut().finish().await.map_err(&err)?;
        Ok(())
    }

    /// Records that this node has `seq` and counts the live nodes that have it.
    pub(super) async fn progress(&self, client: &Client, seq: u32) -> Result<Progress, FleetError> {
        let s = self.inner.schema();
        let err = db_err(&self.inner.pg);
        client
            .execute(
                &format!(
                    r#"UPDATE "{s}".nodes SET applied = greatest(applied, $1) WHERE name = $2"#
                ),
                &[
                    &i64::from(self.inner.directory.applied()),
                    &self.inner.cfg.node,
                ],
            )
            .await
            .map_err(&err)?;
        let rows = client
            .query(
                &format!(
                    r#"SELECT name, applied >= $1, NOT stopped AND heartbeat > clock_timestamp() - interval '{LIVE}' FROM "{s}".nodes ORDER BY name"#
                ),
                &[&i64::from(seq)],
            )
            .await
            .map_err(&err)?;
        let mut p = Progress {
            seq,
            ..Progress::default()
        };
        for r in rows {
            let (name, has, live): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
            if live {
                p.live += 1;
                p.applied += usize::from(has);
            } else {
                p.silent.push(name);
            }
        }
        Ok(p)
    }
}

/// Runs blocking directory work off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FleetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FleetError::Refused(format!("directory task failed: {e}")))
}
