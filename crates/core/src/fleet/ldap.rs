//! The LDAP source of a fleet: one node at a time runs the rounds and commits what they
//! changed to the fleet log, so every node applies the same changes in the same order.
//!
//! Every node with `[directory.ldap]` tries, on a connection of its own, to take a
//! session-level advisory lock; the one that holds it runs the rounds as a single node does
//! ([`crate::directory::ldap::Syncs`]), and commits each round's rows as one change of
//! kind `delta` ([`super::delta`]); only a fleet whose directory is empty takes a full read
//! whole, as a base. Neither is a repair: on a node whose history PostgreSQL's log does
//! not hold they are refused like a batch (and the round read again), and they are
//! numbered head + 1, so they never hide a log that moved back from the other nodes. A
//! round refused (the shrink guard) or failed is read again. A new leader goes on from the
//! cursor of the last delta its own directory applied, whichever node committed it. If
//! the leader stops or loses PostgreSQL, its connection ends, the lock is released, and
//! another node takes over. The leader writes whether the source can be read to
//! `meta.ldap_healthy`; every node reads it with its heartbeat, so all of them defer
//! unknown recipients (`451 4.4.3`) while the source is down.

use super::{sql, Fleet};
use crate::config::LdapConfig;
use crate::directory::delta::Delta;
use crate::directory::ldap::read::Cursor;
use crate::directory::ldap::sync::{Syncs, Taker};
use crate::directory::ldap::LdapSource;
use crate::directory::writer::Write;
use crate::directory::ReloadReport;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{info, warn};

/// A round's changes through the fleet's log: rows as a `delta` change, a full read of an
/// empty directory as a base (never a repair).
struct FleetTaker(Fleet);

impl Taker for FleetTaker {
    fn whole(&self, csv: Vec<u8>, source: String) -> Write<'_, ReloadReport> {
        Box::pin(async move { Ok(self.0.import_auto(csv, source, false).await?.report) })
    }
    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
        Box::pin(async move { Ok(self.0.commit_delta(delta, source, force).await?) })
    }
}

/// Runs for the node's life: waits for the lock, then leads until the connection ends.
pub(super) async fn lead(fleet: Fleet, cfg: LdapConfig, source: std::sync::Arc<LdapSource>) {
    let inner = fleet.inner.clone();
    let retry = cfg.sync_interval.max(Duration::from_secs(2));
    while !inner.stop.load(Ordering::SeqCst) {
        let Ok(client) = sql::connect(&inner.pg).await else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let key = sql::lock_key(inner.schema(), "ldap");
        let limit = inner.cfg.commit_timeout;
        let got = tokio::time::timeout(
            limit,
            client.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key]),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .is_some_and(|r| r.get::<_, bool>(0));
        if !got {
            drop(client);
            tokio::time::sleep(retry).await;
            continue;
        }
        info!(node = %inner.cfg.node, "fleet: this node runs the LDAP sync");
        // Deltas go on from the cursor of the last delta this node applied (whichever
        // node committed it); an empty directory is read whole.
        let cursor = match inner.directory.is_empty() {
            true => Cursor::default(),
            false => inner
                .directory
                .last_source_cursor()
                .and_then(|c| Cursor::decode(&c))
                .unwrap_or_default(),
        };
        if !cursor.is_empty() {
            let (s, d) = (source.clone(), inner.directory.clone());
            let _ = tokio::task::spawn_blocking(move || s.restore_ids(&d)).await;
        }
        let mut syncs = Syncs::new(cfg.clone(), source.clone(), cursor);
        let taker = FleetTaker(fleet.clone());
        // Written within `fleet.commit_timeout`; false when it was not (a server that
        // does not answer: the leader lets go of this connection, and of the lock).
        let health = |up: bool| {
            let c = &client;
            let s = inner.schema().to_string();
            async move {
                let (sql, value) = (
                    format!(
                        r#"INSERT INTO "{s}".meta (key, value) VALUES ('ldap_healthy', $1)
                           ON CONFLICT (key) DO UPDATE SET value = excluded.value"#
                    ),
                    up.to_string(),
                );
                let write = async { c.execute(&sql, &[&value]).await };
                tokio::time::timeout(limit, write).await.is_ok()
            }
        };
        while !inner.stop.load(Ordering::SeqCst) && !client.is_closed() {
            let wait = syncs.round(&inner.directory, &taker).await;
            if !health(source.healthy()).await {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        warn!(node = %inner.cfg.node, "fleet: stopped leading the LDAP sync (connection to PostgreSQL ended or stopped answering)");
    }
}
