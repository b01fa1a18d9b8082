//! Scheduled batches of a fleet (`coexist directory apply FILE --at TIME` on a fleet node):
//! kept in PostgreSQL, so any node lists and cancels them, and whichever node is live at
//! their time applies them, once.
//!
//! The table `scheduled` holds what a single node keeps in `store_dir/scheduled/` (see
//! [`crate::directory::scheduled`]): the batch file's bytes, its time, target state, format
//! and status (`pending`, then `applied` with its change, `failed` with why, or
//! `cancelled`), plus the node that scheduled it and the one that settled it.
//!
//! Every node looks for due batches every second ([`run`]). A due batch that names a state
//! this node has no route for is left pending (with a warning) for a node that has it: a
//! rolling config change must not fail a valid batch for the whole fleet; a batch whose
//! rows are bad for every node (an address, the header) is marked failed. Applying one is the normal
//! fleet commit ([`Fleet::apply`]) with one step more inside its transaction: after the
//! log's lock is taken, the batch's row is locked (`FOR UPDATE`) and must still be
//! `pending`; it is marked `applied` with the change's sequence number, and the change and
//! the mark commit together. A second node that found the same batch due waits for the
//! log's lock, then sees it applied and does nothing; a cancel that races the commit waits
//! for the row and then finds it applied. So a batch becomes exactly one change, whichever
//! nodes are up; a batch due while every node was down is applied by the first node back.
//!
//! Batches a node kept on disk before (a single node that joins a fleet, or a fleet node of
//! an earlier version, which kept them locally) are moved into the table at its first
//! connection ([`run`]) and marked `moved` on disk.

use super::commit::blocking;
use super::follow::TICK;
use super::sql::{self, db_err};
use super::{Fleet, FleetError, Inner};
use crate::directory::batch::{self, BatchFormat};
use crate::directory::scheduled::{ScheduleStore, Scheduled, Status};
use crate::types::RouteName;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_postgres::{Client, Row};
use tracing::{info, warn};

/// The table of schema `s` (part of the fleet's DDL; no schema version change: nodes that
/// predate it ignore it).
pub(super) fn ddl(s: &str) -> String {
    format!(
        r#"
CREATE TABLE IF NOT EXISTS "{s}".scheduled (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    source text NOT NULL,
    state text,
    format text NOT NULL DEFAULT 'auto',
    body bytea NOT NULL,
    node text NOT NULL,
    created timestamptz NOT NULL DEFAULT clock_timestamp(),
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'applied', 'failed', 'cancelled')),
    change bigint,
    error text,
    settled timestamptz,
    settled_by text
);
"#
    )
}

/// The columns [`from_row`] reads.
const COLUMNS: &str = "id, extract(epoch from at)::bigint, source, state, format, \
    extract(epoch from created)::bigint, status, change, error, \
    extract(epoch from settled)::bigint, node";

/// RFC 3339 (UTC, seconds) of Unix time `t`.
fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn from_row(r: &Row) -> Result<Scheduled, FleetError> {
    let id: i64 = r.get(0);
    let at_unix: i64 = r.get(1);
    let time = rfc3339(r.get::<_, Option<i64>>(9).unwrap_or(0));
    let change = r.get::<_, Option<i64>>(7).map(sql::seq_u32).transpose()?;
    let status = match r.get::<_, &str>(6) {
        "pending" => Status::Pending,
        "applied" => Status::Applied { change, time },
        "cancelled" => Status::Cancelled { time },
        _ => Status::Failed {
            error: r.get::<_, Option<String>>(8).unwrap_or_default(),
            time,
        },
    };
    Ok(Scheduled {
        id: u32::try_from(id)
            .map_err(|_| FleetError::Sql(format!("scheduled batch id {id} out of range")))?,
        at: rfc3339(at_unix),
        at_unix,
        source: r.get(2),
        state: r.get(3),
        format: r.get(4),
        created: rfc3339(r.get(5)),
        node: Some(r.get(10)),
        status,
    })
}

impl Fleet {
    /// Keeps batch file `body` (named `source`, checked by the caller) to be applied at
    /// `at` by whichever node is live then; returns its record.
    pub async fn schedule(
        &self,
        body: Vec<u8>,
        source: String,
        state: Option<String>,
        format: String,
        (at_unix, _at): (i64, String),
    ) -> Result<Scheduled, FleetError> {
        let inner = &self.inner;
        let work = async {
            let client = sql::connect(&inner.pg).await?;
            let s = inner.schema();
            let row = client
                .query_one(
                    &format!(
                        r#"INSERT INTO "{s}".scheduled (at, source, state, format, body, node)
                       VALUES (to_timestamp($1), $2, $3, $4, $5, $6) RETURNING {COLUMNS}"#
                    ),
                    &[
                        &(at_unix as f64),
                        &source,
                        &state,
                        &format,
                        &body,
                        &inner.cfg.node,
                    ],
                )
                .await
                .map_err(db_err(&inner.pg))?;
            from_row(&row)
        };
        inner
            .bounded("scheduling a batch", inner.cfg.commit_timeout, work)
            .await
    }

    /// Every scheduled batch of the fleet, by id.
    pub async fn scheduled(&self) -> Result<Vec<Scheduled>, FleetError> {
        let inner = &self.inner;
        let work = async {
            let client = sql::connect(&inner.pg).await?;
            let s = inner.schema();
            client
                .query(
                    &format!(r#"SELECT {COLUMNS} FROM "{s}".scheduled ORDER BY id"#),
                    &[],
                )
                .await
                .map_err(db_err(&inner.pg))?
                .iter()
                .map(from_row)
                .collect()
        };
        inner
            .bounded("listing scheduled batches", inner.cfg.commit_timeout, work)
            .await
    }

    /// Cancels scheduled batch `id`; refused unless it is still pending (a batch being
    /// applied right now is waited for, and then is no longer pending).
    pub async fn cancel_scheduled(&self, id: u32) -> Result<Scheduled, FleetError> {
        let inner = &self.inner;
        let work = async {
            let client = sql::connect(&inner.pg).await?;
            let s = inner.schema();
            let err = db_err(&inner.pg);
            let row = client
                .query_opt(
                    &format!(
                        r#"UPDATE "{s}".scheduled
                       SET status = 'cancelled', settled = clock_timestamp(), settled_by = $2
                       WHERE id = $1 AND status = 'pending' RETURNING {COLUMNS}"#
                    ),
                    &[&i64::from(id), &inner.cfg.node],
                )
                .await
                .map_err(&err)?;
            if let Some(r) = row {
                info!(scheduled = id, "fleet: scheduled batch cancelled");
                return from_row(&r);
            }
            let status: Option<String> = client
                .query_opt(
                    &format!(r#"SELECT status FROM "{s}".scheduled WHERE id = $1"#),
                    &[&i64::from(id)],
                )
                .await
                .map_err(&err)?
                .map(|r| r.get(0));
            Err(FleetError::Refused(match status {
                None => format!("no scheduled batch {id}"),
                Some(st) => format!("scheduled batch {id} is not pending ({st})"),
            }))
        };
        let what = format!("cancelling scheduled batch {id}");
        inner.bounded(&what, inner.cfg.commit_timeout, work).await
    }
}

/// Inside a commit's transaction: locks scheduled batch `id` and says whether it is still
/// pending (false: applied by another node or cancelled meanwhile).
pub(super) async fn claim(inner: &Inner, client: &Client, id: u32) -> Result<bool, FleetError> {
    let s = inner.schema();
    Ok(client
        .query_opt(
            &format!(
                r#"SELECT 1 FROM "{s}".scheduled WHERE id = $1 AND status = 'pending' FOR UPDATE"#
            ),
            &[&i64::from(id)],
        )
        .await
        .map_err(db_err(&inner.pg))?
        .is_some())
}

/// Inside a commit's transaction: records scheduled batch `id` as applied as change
/// `change` (`None`: it changed nothing) by this node.
pub(super) async fn settle_applied(
    inner: &Inner,
    client: &Client,
    id: u32,
    change: Option<u32>,
) -> Result<(), FleetError> {
    let s = inner.schema();
    client
        .execute(
            &format!(
                r#"UPDATE "{s}".scheduled
                   SET status = 'applied', change = $2, settled = clock_timestamp(), settled_by = $3
                   WHERE id = $1"#
            ),
            &[&i64::from(id), &change.map(i64::from), &inner.cfg.node],
        )
        .await
        .map_err(db_err(&inner.pg))?;
    Ok(())
}

/// Records scheduled batch `id` as failed (a row no longer valid), unless it is no longer
/// pending.
async fn fail(inner: &Inner, client: &Client, id: u32, error: &str) -> Result<(), FleetError> {
    let s = inner.schema();
    client
        .execute(
            &format!(
                r#"UPDATE "{s}".scheduled
                   SET status = 'failed', error = $2, settled = clock_timestamp(), settled_by = $3
                   WHERE id = $1 AND status = 'pending'"#
            ),
            &[&i64::from(id), &error, &inner.cfg.node],
        )
        .await
        .map_err(db_err(&inner.pg))?;
    Ok(())
}

/// A due batch as read for applying.
struct Due {
    id: u32,
    source: String,
    state: Option<String>,
    format: String,
    body: Vec<u8>,
    /// Seconds since its time, by PostgreSQL's clock.
    overdue: f64,
}

/// Pending batches whose time has come (by PostgreSQL's clock, the same for every node),
/// oldest first, a few at a time.
async fn due(inner: &Inner, client: &Client) -> Result<Vec<Due>, FleetError> {
    let s = inner.schema();
    let rows = client
        .query(
            &format!(
                r#"SELECT id, source, state, format, body,
                          extract(epoch FROM clock_timestamp() - at)::float8 FROM "{s}".scheduled
                   WHERE status = 'pending' AND at <= clock_timestamp()
                   ORDER BY at, id LIMIT 16"#
            ),
            &[],
        )
        .await
        .map_err(db_err(&inner.pg))?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.get(0);
            Ok(Due {
                id: u32::try_from(id).map_err(|_| {
                    FleetError::Sql(format!("scheduled batch id {id} out of range"))
                })?,
                source: r.get(1),
                state: r.get(2),
                format: r.get(3),
                body: r.get(4),
                overdue: r.get(5),
            })
        })
        .collect()
}

/// Applies the fleet's due batches until the fleet stops: looks every second, applies
/// what is due (oldest first) through the fleet log, and records the outcome. While
/// PostgreSQL cannot be reached nothing is applied; a batch is applied when it (or another
/// node) can, never dropped.
pub async fn run(fleet: Fleet, states: Vec<RouteName>, local: Arc<ScheduleStore>) {
    let inner = fleet.inner.clone();
    let mut client: Option<Client> = None;
    // Logged once per spell of failures.
    let mut retrying = false;
    let mut adopted = false;
    let mut warned = std::collections::HashSet::new();
    while !inner.stop.load(Ordering::SeqCst) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = sql::connect(&inner.pg).await.ok();
        }
        if let (Some(_), false) = (&client, adopted) {
            match adopt(&fleet, &local).await {
                Ok(()) => adopted = true,
                Err(e) => {
                    warn!(error = %e, "fleet: this node's own scheduled batches not moved to the fleet yet; retrying")
                }
            }
        }
        if let Some(c) = &client {
            match round(&fleet, c, &states, &mut warned).await {
                Ok(()) => retrying = false,
                Err(e) => {
                    if !retrying {
                        warn!(error = %e, "fleet: scheduled batches due cannot be applied now; retrying");
                        retrying = true;
                    }
                    if e.is_unreachable() {
                        client = None;
                    }
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Moves the pending batches this node kept on disk (before it joined the fleet, or with a
/// version that kept them there) into the fleet's schedule, each marked `moved` on disk. A
/// crash between the two moves one again at the next start: applied twice, a batch changes
/// nothing the second time.
async fn adopt(fleet: &Fleet, local: &Arc<ScheduleStore>) -> Result<(), FleetError> {
    let pending: Vec<Scheduled> = {
        let l = local.clone();
        blocking(move || l.list()).await??
    }
    .into_iter()
    .filter(|s| s.status == Status::Pending)
    .collect();
    for s in pending {
        let body = {
            let (l, id) = (local.clone(), s.id);
            blocking(move || l.body(id)).await??
        };
        let moved = fleet
            .schedule(
                body,
                s.source.clone(),
                s.state.clone(),
                s.format.clone(),
                (s.at_unix, s.at.clone()),
            )
            .await?;
        let (l, id, to) = (local.clone(), s.id, moved.id);
        let time = crate::fleet::now_rfc3339();
        blocking(move || l.settle(id, Status::Moved { to, time })).await??;
        info!(local = s.id, fleet = moved.id, at = %s.at, source = %s.source, "fleet: a batch scheduled on this node moved to the fleet's schedule");
    }
    Ok(())
}

/// One look: applies every due batch in order, and stops at the first that cannot be
/// applied now (so a later batch never overtakes an earlier one).
/// `warned`: the batches said to name a state this node has no route for (said once).
async fn round(
    fleet: &Fleet,
    client: &Client,
    states: &[RouteName],
    warned: &mut std::collections::HashSet<u32>,
) -> Result<(), FleetError> {
    let inner = &fleet.inner;
    let limit = inner.cfg.commit_timeout;
    let due = inner
        .bounded("reading due scheduled batches", limit, due(inner, client))
        .await?;
    for d in due {
        let (rows, routes_only) = {
            let (st, format, state, source) =
                (states.to_vec(), d.format, d.state, d.source.clone());
            let body = d.body;
            blocking(move || {
                let format = format
                    .parse::<BatchFormat>()
                    .map_err(|e| crate::directory::DirectoryError::Batch(e.to_string()))?;
                let rows = batch::read(format, &body, &source, &st, state.as_deref());
                let routes_only = rows.is_err() && only_states_fail(format, &body, &source, &st);
                Ok::<_, FleetError>((rows.map(|b| b.rows), routes_only))
            })
            .await??
        };
        let rows = match rows {
            Ok(rows) => rows,
            // A state this node has no route for: another node (its config changed first,
            // during a rolling change) may know it. Left pending, said once, and the round
            // ends here so that the batches after it wait (their order is the schedule's).
            // No node took it within `max_lag` of its time: no node has the route; failed.
            Err(e) if routes_only && d.overdue <= inner.cfg.max_lag.as_secs_f64() => {
                if warned.insert(d.id) {
                    warn!(scheduled = d.id, error = %e, "fleet: scheduled batch due names a state this node has no route for; left pending for a node that has it (every node of a fleet needs the same routes); the batches after it wait");
                }
                return Ok(());
            }
            // The batch itself is wrong (a row no longer valid): it never will apply.
            Err(e) => {
                warn!(scheduled = d.id, error = %e, "fleet: scheduled batch failed");
                let what = format!("recording scheduled batch {} as failed", d.id);
                let error = e.to_string();
                let failed = fail(inner, client, d.id, &error);
                inner.bounded(&what, limit, failed).await?;
                continue;
            }
        };
        // Any other failure (PostgreSQL, this node's store) is this node's, not the
        // batch's: the batch stays pending and is tried again.
        // `None`: applied by another node, or cancelled, meanwhile.
        if let Some((r, _)) = fleet.apply_with(rows, d.source.clone(), Some(d.id)).await? {
            info!(scheduled = d.id, change = ?r.id, changed = r.changed, source = %d.source, "fleet: scheduled batch applied");
        }
    }
    Ok(())
}

/// Whether batch `body` fails on this node's routes `states` only: read with every row sent
/// to a state this node has (its state column and target set aside) it passes, so what
/// failed is a state name, which a node with other routes may know. Bad rows (addresses,
/// the header) fail either way: every node sees those.
fn only_states_fail(format: BatchFormat, body: &[u8], source: &str, states: &[RouteName]) -> bool {
    match states.first() {
        Some(known) => batch::read(format, body, source, states, Some(known.as_str())).is_ok(),
        None => true,
    }
}
