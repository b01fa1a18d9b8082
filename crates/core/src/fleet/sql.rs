//! The fleet's tables in PostgreSQL, their migration, and the statements the other files
//! share. Every table lives in the schema `fleet.schema`, created at the first start.
//!
//! - `meta`: `fleet_id` (random, made with the schema: a node's local store names the fleet
//!   it belongs to) and `schema_version`.
//! - `changes`: the ordered change log. `seq` is given under an advisory lock, see the module
//!   doc of `fleet` (gap-free, except that a base import jumps above every node's applied
//!   change); `kind` is `apply`, `rollback`, `base` or `delta`; an `apply`'s `body` holds
//!   its rows as `address TAB state` lines, a `delta`'s its mailboxes as JSON (see
//!   `fleet::delta`); a `rollback` names the batch it undoes. `uid` (random, made
//!   by PostgreSQL at insert, so builds that do not know it still give one) and
//!   `committed_at` are the change's identity beyond its number: a node keeps both in its
//!   local change log and checks them against this table (a log that moved back reuses
//!   numbers, never ids). `repair` marks a base the admin imported (`coexist directory
//!   import`): only such a base is taken by a node whose history the log does not hold;
//!   the automatic ones (LDAP, seeding) are not (`true` for rows of earlier builds, whose
//!   bases were all numbered as repairs).
//! - `base_rows`: the rows of the latest bases (the one in force and the one before it);
//!   `routing_address` is the mailbox's routing address, `''` for none.
//! - `nodes`: one row per node, written by its heartbeat; `admin_host` is the host its
//!   `admin` address is valid on (boot id and network namespace, see `fleet::peers`). An
//!   admin API served over TLS is written `https://ADDRESS`, with the name its certificate
//!   carries in `admin_tls_name` (builds before it cannot read such an address, and so
//!   never send the token in clear to it).
//! - `scheduled`: batches scheduled for later (`directory apply --at`), see
//!   [`super::scheduled`].
//! - `batch_undo`: each batch's undo entries, and a `rollback`'s `body` its restore list
//!   (see [`super::rollback`]).
//!
//! Migration runs once per process, when a node first reaches PostgreSQL: columns added
//! after a table's first version ([`ADDED`]) are added by `ALTER TABLE` only when missing
//! (an `ALTER` takes an ACCESS EXCLUSIVE lock even when the column exists, and would wait
//! behind any `pg_dump`). Every fleet connection runs with `lock_timeout`,
//! `statement_timeout` and `idle_in_transaction_session_timeout` ([`session_options`]), so
//! no statement waits forever. The schema version stays 1: the additions are compatible
//! (a build before them inserts changes without `uid` and PostgreSQL gives one).

use super::tls::Pg;
use super::{target, FleetError, CONNECT_TIMEOUT, STATEMENT_TIMEOUT};
use crate::directory::Stamp;
use std::time::Duration;
use tokio::sync::mpsc;
#[cfg(test)]
use tokio_postgres::NoTls;
use tokio_postgres::{AsyncMessage, Client};

/// The schema version this build creates and understands.
const SCHEMA_VERSION: i64 = 1;

/// Columns added after their table's first version, added to older schemas when missing:
/// (table, column, definition). Bases made before routing addresses have none; changes made
/// before identities get a random id each; nodes written before hosts were recorded have none.
const ADDED: &[(&str, &str, &str)] = &[
    ("nodes", "admin_host", "text"),
    ("nodes", "admin_tls_name", "text"),
    ("base_rows", "routing_address", "text NOT NULL DEFAULT ''"),
    (
        "changes",
        "uid",
        "text NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text)",
    ),
    // Every base an earlier build made was numbered above every applied change: a repair.
    ("changes", "repair", "boolean NOT NULL DEFAULT true"),
];

/// How long a fleet statement may wait for a lock (a `pg_dump`, a stuck transaction).
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a transaction may sit idle (a node that hangs mid-commit holds the log's lock).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(60);

/// The server settings of every fleet connection (appended to the configured `options`).
pub(super) fn session_options(configured: Option<&str>) -> String {
    let ms = |d: Duration| d.as_millis();
    let ours = format!(
        "-c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        ms(LOCK_TIMEOUT),
        ms(STATEMENT_TIMEOUT),
        ms(IDLE_IN_TRANSACTION)
    );
    match configured {
        Some(c) if !c.trim().is_empty() => format!("{c} {ours}"),
        _ => ours,
    }
}

/// A change's identity columns, as a [`Stamp`] reads them (`uid`, commit time in RFC 3339).
pub(super) const STAMP_COLUMNS: &str =
    r#"uid, to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

/// The [`Stamp`] of change `seq` from the two [`STAMP_COLUMNS`] at `at` in `row`.
pub(super) fn stamp(seq: u32, row: &tokio_postgres::Row, at: usize) -> Stamp {
    Stamp {
        seq,
        uid: row.get(at),
        committed: row.get(at + 1),
    }
}

/// The tables of schema `s` (quoted by the caller's format).
fn ddl(s: &str) -> String {
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS "{s}";
CREATE TABLE IF NOT EXISTS "{s}".meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO "{s}".meta VALUES
    ('fleet_id', md5(random()::text || clock_timestamp()::text)),
    ('schema_version', '{SCHEMA_VERSION}')
    ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS "{s}".changes (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    kind text NOT NULL CONSTRAINT changes_kind_check CHECK (kind IN ('apply', 'rollback', 'base', 'delta')),
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    node text NOT NULL,
    source text NOT NULL,
    rolls_back bigint,
    rows bigint NOT NULL,
    changed bigint NOT NULL,
    body bytea NOT NULL DEFAULT '',
    uid text NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text),
    repair boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS "{s}".base_rows (
    seq bigint NOT NULL,
    address text NOT NULL,
    mailbox text NOT NULL,
    state text NOT NULL,
    file_state text NOT NULL,
    origin bigint NOT NULL,
    routing_address text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS "{s}".nodes (
    name text PRIMARY KEY,
    admin text,
    applied bigint NOT NULL DEFAULT 0,
    heartbeat timestamptz NOT NULL DEFAULT clock_timestamp(),
    draining boolean NOT NULL DEFAULT false,
    behind boolean NOT NULL DEFAULT false,
    queue bigint NOT NULL DEFAULT 0,
    stopped boolean NOT NULL DEFAULT false,
    version text NOT NULL,
    started timestamptz NOT NULL DEFAULT clock_timestamp(),
    admin_host text,
    admin_tls_name text
);
{scheduled}{undo}"#,
        scheduled = super::scheduled::ddl(s),
        undo = super::rollback::ddl(s)
    )
}

/// Advisory lock keys: one for migrations, one for the change log, per schema.
pub(super) fn lock_key(schema: &str, what: &str) -> String {
    format!("coexist:{schema}:{what}")
}

/// The LISTEN/NOTIFY channel of schema `s`.
pub(super) fn channel(s: &str) -> String {
    format!("coexist_{s}")
}

/// The error text, with PostgreSQL's own message when the server sent one (the driver's
/// `Display` says only "db error").
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// A connection error with its causes (the driver's `Display` of a TLS failure says only
/// "error performing TLS handshake"; rustls' reason is in the source chain).
fn describe_connect(e: &tokio_postgres::Error) -> String {
    if e.as_db_error().is_some() {
        return describe(e);
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn sql_err(e: tokio_postgres::Error) -> FleetError {
    FleetError::Statement(e)
}

/// A statement error, or, when the connection itself broke, [`FleetError::Unreachable`].
pub(super) fn db_err(
    pg: &tokio_postgres::Config,
) -> impl Fn(tokio_postgres::Error) -> FleetError + '_ {
    move |e| {
        if e.is_closed() || e.code().is_none() {
            FleetError::Unreachable {
                target: target(pg),
                reason: describe(&e),
            }
        } else {
            sql_err(e)
        }
    }
}

/// Connects, with the connection driven by a task of its own.
pub(super) async fn connect(pg: &Pg) -> Result<Client, FleetError> {
    let (client, _notes) = connect_listening(pg).await?;
    Ok(client)
}

/// Connects and returns the client and a channel that gets one item per notification;
/// the channel closes when the connection ends.
pub(super) async fn connect_listening(
    pg: &Pg,
) -> Result<(Client, mpsc::UnboundedReceiver<()>), FleetError> {
    let unreachable = |reason: String| FleetError::Unreachable {
        target: target(pg),
        reason,
    };
    let (client, mut conn) = tokio::time::timeout(CONNECT_TIMEOUT * 2, pg.connect(pg.tls()))
        .await
        .map_err(|_| unreachable("connection timed out".into()))?
        .map_err(|e| unreachable(pg.explain(describe_connect(&e))))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "fleet: PostgreSQL connection ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Creates or migrates the schema (under an advisory lock, so nodes starting together do
/// not race) and returns the fleet's id.
pub(super) async fn migrate(
    client: &Client,
    s: &str,
    pg: &tokio_postgres::Config,
) -> Result<String, FleetError> {
    let err = db_err(pg);
    client.batch_execute("BEGIN").await.map_err(&err)?;
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&lock_key(s, "migrate")],
        )
        .await
        .map_err(&err)?;
    client.batch_execute(&ddl(s)).await.map_err(&err)?;
    for (table, column, definition) in ADDED {
        let missing = client
            .query_opt(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
                &[&s, table, column],
            )
            .await
            .map_err(&err)?
            .is_none();
        if missing {
            tracing::info!(
                schema = s,
                table,
                column,
                "fleet: adding a column to an older schema"
            );
            client
                .batch_execute(&format!(
                    r#"ALTER TABLE "{s}".{table} ADD COLUMN IF NOT EXISTS {column} {definition}"#
                ))
                .await
                .map_err(&err)?;
        }
    }
    // Kinds added after the first version (`delta`): the check is replaced only when it
    // does not take them yet (a schema of an earlier build).
    let kinds_ok = client
        .query_opt(
            "SELECT 1 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE n.nspname = $1 AND c.conrelid = format('%I.changes', $1::text)::regclass
               AND c.contype = 'c' AND pg_get_constraintdef(c.oid) LIKE '%delta%'",
            &[&s],
        )
        .await
        .map_err(&err)?
        .is_some();
    if !kinds_ok {
        tracing::info!(
            schema = s,
            "fleet: letting an older schema's change log take deltas"
        );
        let old: Vec<String> = client
            .query(
                "SELECT c.conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                 WHERE n.nspname = $1 AND c.conrelid = format('%I.changes', $1::text)::regclass
                   AND c.contype = 'c' AND pg_get_constraintdef(c.oid) LIKE '%kind%'",
                &[&s],
            )
            .await
            .map_err(&err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in old {
            client
                .batch_execute(&format!(
                    r#"ALTER TABLE "{s}".changes DROP CONSTRAINT "{name}""#
                ))
                .await
                .map_err(&err)?;
        }
        client
            .batch_execute(&format!(
                r#"ALTER TABLE "{s}".changes ADD CONSTRAINT changes_kind_check CHECK (kind IN ('apply', 'rollback', 'base', 'delta'))"#
            ))
            .await
            .map_err(&err)?;
    }
    let version: i64 = client
        .query_one(
            &format!(r#"SELECT value::bigint FROM "{s}".meta WHERE key = 'schema_version'"#),
            &[],
        )
        .await
        .map_err(&err)?
        .get(0);
    if version > SCHEMA_VERSION {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(FleetError::Refused(format!(
            "schema {s:?} is at version {version}, newer than this build understands ({SCHEMA_VERSION}): upgrade this node"
        )));
    }
    let id: String = client
        .query_one(
            &format!(r#"SELECT value FROM "{s}".meta WHERE key = 'fleet_id'"#),
            &[],
        )
        .await
        .map_err(&err)?
        .get(0);
    client.batch_execute("COMMIT").await.map_err(&err)?;
    Ok(id)
}

/// The fleet's id (`meta.fleet_id`), read without migrating.
pub(super) async fn fleet_id(
    client: &Client,
    s: &str,
    pg: &tokio_postgres::Config,
) -> Result<String, FleetError> {
    Ok(client
        .query_one(
            &format!(r#"SELECT value FROM "{s}".meta WHERE key = 'fleet_id'"#),
            &[],
        )
        .await
        .map_err(db_err(pg))?
        .get(0))
}

/// The head of the log and the identity of change `seq` in it (`None` when it has no
/// change `seq`), read in one statement.
pub(super) async fn head_and(
    client: &Client,
    s: &str,
    seq: u32,
    pg: &tokio_postgres::Config,
) -> Result<(u32, Option<Stamp>), FleetError> {
    let row = client
        .query_one(
            &format!(
                r#"SELECT (SELECT coalesce(max(seq), 0) FROM "{s}".changes), c.seq, {STAMP_COLUMNS}
                   FROM (SELECT 1) one LEFT JOIN "{s}".changes c ON c.seq = $1"#
            ),
            &[&i64::from(seq)],
        )
        .await
        .map_err(db_err(pg))?;
    let head = seq_u32(row.get(0))?;
    let at = row.get::<_, Option<i64>>(1).map(|_| stamp(seq, &row, 2));
    Ok((head, at))
}

/// The highest sequence in the change log (0 when empty).
pub(super) async fn head(
    client: &Client,
    s: &str,
    pg: &tokio_postgres::Config,
) -> Result<u32, FleetError> {
    let v: i64 = client
        .query_one(
            &format!(r#"SELECT coalesce(max(seq), 0) FROM "{s}".changes"#),
            &[],
        )
        .await
        .map_err(db_err(pg))?
        .get(0);
    seq_u32(v)
}

/// A sequence number from PostgreSQL as the directory's change id.
pub(super) fn seq_u32(v: i64) -> Result<u32, FleetError> {
    u32::try_from(v).map_err(|_| FleetError::Sql(format!("sequence {v} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that ended is [`FleetError::Unreachable`] in every shared statement (the
    /// follower reconnects), never a statement error (which it takes for a change it cannot
    /// apply). Needs the test PostgreSQL (`COEXIST_TEST_POSTGRES`, else 127.0.0.1:5432).
    #[tokio::test]
    async fn a_closed_connection_is_unreachable_in_every_shared_statement() {
        let url = std::env::var("COEXIST_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
        let pg: tokio_postgres::Config = url.parse().unwrap();
        let (client, conn) = pg.connect(NoTls).await.unwrap();
        // The connection's task ends: the client's every statement fails as closed.
        drop(conn);
        let s = "t_closed_never_created";
        let e = head_and(&client, s, 1, &pg).await.unwrap_err();
        assert!(e.is_unreachable(), "head_and: {e:?}");
        let e = head(&client, s, &pg).await.unwrap_err();
        assert!(e.is_unreachable(), "head: {e:?}");
        let e = fleet_id(&client, s, &pg).await.unwrap_err();
        assert!(e.is_unreachable(), "fleet_id: {e:?}");
        let e = migrate(&client, s, &pg).await.unwrap_err();
        assert!(e.is_unreachable(), "migrate: {e:?}");
    }
}
