//! The LDAP source of a fleet: one node at a time syncs it and commits what changed to the
//! fleet log, so every node applies the same changes in the same order.
//!
//! Every node with `[directory.ldap]` tries, on a connection of its own, to take a
//! session-level advisory lock; the one that holds it runs the syncs (as a single node does,
//! see `crate::directory::ldap`), and after a sync that changed something imports the
//! source's whole state as a new base ([`Fleet::import`]: merged like a file reload, the
//! shrink guard applies, the change named `ldap usn N`). An import that is refused (the
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
        let got = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
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
        let health = |up: bool| {
            let c = &client;
            let s = inner.schema().to_string();
            async move {
                c.execute(
                    &format!(
                        r#"INSERT INTO "{s}".meta (key, value) VALUES ('ldap_healthy', $1)
                           ON CONFLICT (key) DO UPDATE SET value = excluded.value"#
                    ),
                    &[&up.to_string()],
                )
                .await
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
                    let _ = health(true).await;
                    pending |= changed;
                    if let (true, Some(csv)) = (pending, source.csv()) {
                        match fleet
                            .import((*csv).clone(), format!("ldap {mark}"), false)
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
                    let _ = health(false).await;
                }
            }
            tokio::time::sleep(cfg.sync_interval).await;
        }
        warn!(node = %inner.cfg.node, "fleet: stopped leading the LDAP sync (connection to PostgreSQL ended)");
    }
}
