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
use crate::directory::ldap::read::{self, Cursor, Found, SyncError};
use crate::directory::ldap::retry::Retry;
use crate::directory::ldap::{LdapSource, Plan};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};

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
        // node committed it): a new leader does not read every entry before its first
        // round. A deletion it cannot place makes the next round a full read.
        let mut cursor = inner
            .directory
            .last_source_cursor()
            .and_then(|c| Cursor::decode(&c))
            .unwrap_or_default();
        let mut last_full = (!cursor.is_empty()).then(Instant::now);
        let mut need_full = false;
        let mut retry = Retry::default();
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
            if let Some(left) = retry.held(&cfg) {
                tokio::time::sleep(left.min(cfg.sync_interval)).await;
                continue;
            }
            let full = need_full || last_full.is_none_or(|t| t.elapsed() >= cfg.full_sync_interval);
            let (c, cur) = (cfg.clone(), cursor.clone());
            let round = tokio::spawn(async move { read::read(&c, &cur, full).await })
                .await
                .unwrap_or_else(|e| Err(SyncError::from(format!("sync task failed: {e}"))));
            let wait = match round {
                Ok(round) => {
                    retry.succeeded();
                    if !health(true).await {
                        break;
                    }
                    let mark = format!("ldap {}", round.cursor.mark(cfg.flavor));
                    let plan = {
                        let (s, d, r) = (source.clone(), inner.directory.clone(), round.clone());
                        tokio::task::spawn_blocking(move || s.plan(&d, &r)).await
                    };
                    let took = match plan {
                        Ok(Plan::Nothing) => true,
                        Ok(Plan::NeedFull(why)) => {
                            info!(why, "fleet: the next LDAP round reads every entry");
                            need_full = true;
                            false
                        }
                        Ok(Plan::Whole) => match source.csv() {
                            Some(csv) => {
                                let r = fleet.import_auto(csv, mark.clone(), false).await;
                                source.loaded();
                                match r {
                                    Ok(b) => {
                                        info!(change = ?b.id, mark, changed = b.report.changed, "fleet: LDAP source committed whole (an empty directory)");
                                        true
                                    }
                                    Err(e) => {
                                        warn!(error = %e, "fleet: LDAP changes not committed; read again at the next round");
                                        false
                                    }
                                }
                            }
                            None => false,
                        },
                        Ok(Plan::Delta(delta)) => {
                            match fleet.commit_delta(delta, mark.clone(), false).await {
                                Ok(r) => {
                                    info!(
                                        mark,
                                        changed = r.changed,
                                        added = r.added,
                                        removed = r.removed,
                                        "fleet: LDAP changes committed"
                                    );
                                    true
                                }
                                Err(e) => {
                                    warn!(error = %e, "fleet: LDAP changes not committed; read again at the next round");
                                    false
                                }
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "fleet: LDAP round not planned");
                            false
                        }
                    };
                    if took {
                        if matches!(round.found, Found::Full(_)) {
                            last_full = Some(Instant::now());
                        }
                        need_full = false;
                        source.advance(&round);
                        cursor = round.cursor;
                    }
                    cfg.sync_interval
                }
                Err(e) => {
                    let wait = retry.failed(&cfg, e.credentials);
                    source.failed(&e, wait, retry.failures());
                    if !health(false).await {
                        break;
                    }
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
        warn!(node = %inner.cfg.node, "fleet: stopped leading the LDAP sync (connection to PostgreSQL ended or stopped answering)");
    }
}
