//! The LDAP source of a fleet: one node at a time syncs it and commits what changed to the
//! fleet log, so every node applies the same changes in the same order.
//!
//! Every node with `[directory.ldap]` tries, on a connection of its own, to take a
//! session-level advisory lock; the one that holds it runs the syncs (as a single node does,
//! see `crate::directory::ldap`), and after a sync that changed something imports the
//! source's whole state as a new base (merged like a file reload, the shrink guard applies,
//! the change named `ldap usn N`). That import is not a repair: on a node whose history
//! PostgreSQL's log does not hold it is refused like a batch (and tried again), and it is
//! numbered head + 1, so it never hides a log that moved back from the other nodes. An import that is refused (the
//! shrink guard) or fails is tried again after every sync until it passes, not only when
//! the source changes again. Merging keeps batch states by mailbox, so a batch's move
//! survives its mailbox's primary address being renamed in LDAP, and a batch stays
//! undoable across these bases (see `super::rollback`). If that node stops or loses
//! PostgreSQL, its connection ends, the lock is released, and another node takes over
//! (starting with a full sync). The leader writes whether the source can be read to
//! `meta.ldap_healthy`; every node reads it with its heartbeat, so all of them defer
//! unknown recipients (`451 4.4.3`) while the source is down.

use super::{sql, Fleet};
use crate::config::LdapConfig;
use crate::directory::ldap::{sync, LdapSource};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Runs for the node's life: waits for the lock, then leads until the connection ends.
pub(super) async fn lead(fleet: Fleet, cfg: LdapConfig) {
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
        let source = LdapSource::new(&cfg);
        let mut cursor = sync::Cursor::default();
        let mut last_full = Instant::now();
        // A change the fleet has not taken yet (an import that failed is tried again).
        let mut pending = false;
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
            let full =
                cursor == sync::Cursor::default() || last_full.elapsed() >= cfg.full_sync_interval;
            let (c, cur, known) = (cfg.clone(), cursor.clone(), source.mailboxes());
            let round = tokio::spawn(async move { sync::sync_once(&c, &cur, known, full).await })
                .await
                .unwrap_or_else(|e| Err(format!("sync task failed: {e}")));
            match round {
                Ok((mailboxes, next, was_full)) => {
                    if was_full {
                        last_full = Instant::now();
                    }
                    let mark = next.mark(cfg.flavor);
                    let changed = source.synced(mailboxes, mark.clone());
                    cursor = next;
                    if !health(true).await {
                        break;
                    }
                    pending |= changed;
                    if let (true, Some(csv)) = (pending, source.csv()) {
                        match fleet
                            .import_auto((*csv).clone(), format!("ldap {mark}"), false)
                            .await
                        {
                            Ok(b) => {
                                pending = false;
                                info!(change = ?b.id, mark, changed = b.report.changed, "fleet: LDAP changes committed");
                            }
                            Err(e) => {
                                warn!(error = %e, "fleet: LDAP changes not committed; tried again after the next sync")
                            }
                        }
                    }
                }
                Err(e) => {
                    source.failed(e);
                    if !health(false).await {
                        break;
                    }
                }
            }
            tokio::time::sleep(cfg.sync_interval).await;
        }
        warn!(node = %inner.cfg.node, "fleet: stopped leading the LDAP sync (connection to PostgreSQL ended or stopped answering)");
    }
}
