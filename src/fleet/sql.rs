//! The fleet's tables in PostgreSQL, their migration, and the statements the other files
//! share. Every table lives in the schema `fleet.schema`, created at the first start.
//!
//! - `meta`: `fleet_id` (random, made with the schema: a node's local store names the fleet
//!   it belongs to) and `schema_version`.
//! - `changes`: the ordered change log. `seq` is gap-free (given under an advisory lock, see
//!   the module doc of `fleet`); `kind` is `apply`, `rollback` or `base`; an `apply`'s `body`
//!   holds its rows as `address TAB state` lines; a `rollback` names the batch it undoes.
//! - `base_rows`: the rows of the latest bases (the one in force and the one before it);
//!   `routing_address` is the mailbox's routing address, `''` for none (a column added by
//!   `ALTER TABLE` to schemas made before it).
//! - `nodes`: one row per node, written by its heartbeat; `admin_host` is the host its
//!   `admin` address is valid on (boot id and network namespace, see `fleet::peers`).
//! - `scheduled`: batches scheduled for later (`directory apply --at`), see
//!   [`super::scheduled`].
//! - `batch_undo`: each batch's undo entries, and a `rollback`'s `body` its restore list
//!   (see [`super::rollback`]).

use super::{target, FleetError, CONNECT_TIMEOUT};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The schema version this build creates and understands.
const SCHEMA_VERSION: i64 = 1;

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
    kind text NOT NULL CHECK (kind IN ('apply', 'rollback', 'base')),
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    node text NOT NULL,
    source text NOT NULL,
    rolls_back bigint,
    rows bigint NOT NULL,
    changed bigint NOT NULL,
    body bytea NOT NULL DEFAULT ''
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
-- Schemas made before routing addresses: their bases have none.
ALTER TABLE "{s}".base_rows ADD COLUMN IF NOT EXISTS routing_address text NOT NULL DEFAULT '';
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
    started timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- The host a node's admin address is valid on (see `fleet::peers`).
ALTER TABLE "{s}".nodes ADD COLUMN IF NOT EXISTS admin_host text;
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

fn sql_err(e: tokio_postgres::Error) -> FleetError {
    FleetError::Sql(describe(&e))
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
pub(super) async fn connect(pg: &tokio_postgres::Config) -> Result<Client, FleetError> {
    let (client, _notes) = connect_listening(pg).await?;
    Ok(client)
}

/// Connects and returns the client and a channel that gets one item per notification;
/// the channel closes when the connection ends.
pub(super) async fn connect_listening(
    pg: &tokio_postgres::Config,
) -> Result<(Client, mpsc::UnboundedReceiver<()>), FleetError> {
    let unreachable = |reason: String| FleetError::Unreachable {
        target: target(pg),
        reason,
    };
    let (client, mut conn) = tokio::time::timeout(CONNECT_TIMEOUT * 2, pg.connect(NoTls))
        .await
        .map_err(|_| unreachable("connection timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
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
pub(super) async fn migrate(client: &Client, s: &str) -> Result<String, FleetError> {
    client.batch_execute("BEGIN").await.map_err(sql_err)?;
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&lock_key(s, "migrate")],
        )
        .await
        .map_err(sql_err)?;
    client.batch_execute(&ddl(s)).await.map_err(sql_err)?;
    let version: i64 = client
        .query_one(
            &format!(r#"SELECT value::bigint FROM "{s}".meta WHERE key = 'schema_version'"#),
            &[],
        )
        .await
        .map_err(sql_err)?
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
        .map_err(sql_err)?
        .get(0);
    client.batch_execute("COMMIT").await.map_err(sql_err)?;
    Ok(id)
}

/// The highest sequence in the change log (0 when empty).
pub(super) async fn head(client: &Client, s: &str) -> Result<u32, FleetError> {
    let v: i64 = client
        .query_one(
            &format!(r#"SELECT coalesce(max(seq), 0) FROM "{s}".changes"#),
            &[],
        )
        .await
        .map_err(sql_err)?
        .get(0);
    seq_u32(v)
}

/// A sequence number from PostgreSQL as the directory's change id.
pub(super) fn seq_u32(v: i64) -> Result<u32, FleetError> {
    u32::try_from(v).map_err(|_| FleetError::Sql(format!("sequence {v} out of range")))
}
