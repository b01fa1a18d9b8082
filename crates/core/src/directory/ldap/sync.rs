//! The LDAP source's rounds on a single node: the first one before listening, then a delta
//! every `sync_interval` and a full read every `full_sync_interval`, each taken by the
//! directory as rows ([`super::Plan`]): a round that changed 50 mailboxes writes 50 rows.
//!
//! The cursor moves on only when the directory took the round: a delta refused (the shrink
//! guard) is read again, with whatever changed since, at every round until it passes. A
//! failed round backs off ([`super::retry`]); a bind refused for its credentials is not
//! retried with the same password. Each round runs in a task of its own: a failure (or a
//! panic in the LDAP library's parsing) is a failed round.

use super::read::{self, Cursor, Round, SyncError};
use super::retry::Retry;
use super::{LdapSource, Plan};
use crate::config::LdapConfig;
use crate::directory::{Directory, DirectoryWriter, WriteError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The rounds of one node's LDAP source.
pub struct Syncs {
    pub(super) cfg: LdapConfig,
    pub(super) source: Arc<LdapSource>,
    cursor: Cursor,
    pub(super) retry: Retry,
    /// When the last full read was taken (`None`: none yet in this process).
    last_full: Option<Instant>,
    /// The next round must be a full read.
    need_full: bool,
    /// How long to wait before the next round.
    pub(super) wait: Duration,
}

fn cfg_wait() -> Duration {
    Duration::from_secs(1)
}

impl Syncs {
    /// Rounds starting from `cursor` (empty: a full read first).
    pub fn new(cfg: LdapConfig, source: Arc<LdapSource>, cursor: Cursor) -> Syncs {
        // A cursor from the store: deltas go on from it; the first full read waits for
        // its interval, or for a deletion this process cannot place.
        let last_full = (!cursor.is_empty()).then(Instant::now);
        Syncs {
            cfg,
            source,
            cursor,
            retry: Retry::default(),
            last_full,
            need_full: false,
            wait: cfg_wait(),
        }
    }

    /// The source's health, for status.
    pub fn source(&self) -> Arc<LdapSource> {
        self.source.clone()
    }

    /// Runs one round and hands it to the directory (`writer`, or the directory itself
    /// before the writer exists); returns how long to wait before the next one.
    pub(super) async fn round(
        &mut self,
        directory: &Arc<Directory>,
        writer: Option<&Arc<dyn DirectoryWriter>>,
    ) -> Duration {
        if let Some(left) = self.retry.held(&self.cfg) {
            return left.min(self.cfg.sync_interval);
        }
        let full = self.need_full
            || self
                .last_full
                .is_none_or(|t| t.elapsed() >= self.cfg.full_sync_interval);
        let (c, cur) = (self.cfg.clone(), self.cursor.clone());
        let round = tokio::spawn(async move { read::read(&c, &cur, full).await })
            .await
            .unwrap_or_else(|e| Err(SyncError::from(format!("sync task failed: {e}"))));
        let round = match round {
            Ok(r) => r,
            Err(e) => {
                let kind = if full { "full" } else { "delta" };
                metrics::counter!(crate::metrics::LDAP_SYNCS, "kind" => kind, "result" => "failed")
                    .increment(1);
                let wait = self.retry.failed(&self.cfg, e.credentials);
                self.source.failed(&e, wait, self.retry.failures());
                return wait;
            }
        };
        let kind = match round.found {
            read::Found::Full(_) => "full",
            read::Found::Changes { .. } => "delta",
        };
        metrics::counter!(crate::metrics::LDAP_SYNCS, "kind" => kind, "result" => "ok")
            .increment(1);
        self.retry.succeeded();
        if self.take(directory, writer, &round).await {
            if kind == "full" {
                self.last_full = Some(Instant::now());
            }
            self.need_full = false;
            self.source.advance(&round);
            self.cursor = round.cursor;
        }
        self.cfg.sync_interval
    }

    /// Hands `round` to the directory; true when it took it.
    async fn take(
        &mut self,
        directory: &Arc<Directory>,
        writer: Option<&Arc<dyn DirectoryWriter>>,
        round: &Round,
    ) -> bool {
        let mark = format!("ldap {}", round.cursor.mark(self.cfg.flavor));
        let plan = {
            let (s, d, r) = (self.source.clone(), directory.clone(), round.clone());
            tokio::task::spawn_blocking(move || s.plan(&d, &r)).await
        };
        let result = match plan {
            Err(e) => Err(WriteError::Task(e)),
            Ok(Plan::Nothing) => return true,
            Ok(Plan::NeedFull(why)) => {
                info!(why, "directory: the next LDAP round reads every entry");
                self.need_full = true;
                return false;
            }
            Ok(Plan::Whole) => {
                let r = match writer {
                    Some(w) => w.reload(false).await,
                    None => {
                        let d = directory.clone();
                        tokio::task::spawn_blocking(move || d.reload_file(false))
                            .await
                            .map_err(WriteError::Task)
                            .and_then(|r| r.map_err(WriteError::Directory))
                    }
                };
                self.source.loaded();
                r
            }
            Ok(Plan::Delta(delta)) => match writer {
                Some(w) => w.delta(delta, mark.clone(), false).await,
                None => {
                    let (d, m) = (directory.clone(), mark.clone());
                    tokio::task::spawn_blocking(move || d.apply_delta(&delta, &m, false))
                        .await
                        .map_err(WriteError::Task)
                        .and_then(|r| r.map_err(WriteError::Directory))
                }
            },
        };
        match result {
            Ok(r) => {
                info!(
                    mark,
                    changed = r.changed,
                    added = r.added,
                    removed = r.removed,
                    ms = r.elapsed_ms,
                    "directory: LDAP changes applied"
                );
                true
            }
            Err(e) => {
                // The cursor stays: the same changes are read again next round.
                warn!(error = %e, mark, "directory: LDAP changes not applied; read again at the next round");
                false
            }
        }
    }

    /// Runs rounds until the process ends; `writer` takes what they found.
    pub async fn run(mut self, directory: Arc<Directory>, writer: Arc<dyn DirectoryWriter>) {
        loop {
            tokio::time::sleep(self.wait).await;
            self.wait = self.round(&directory, Some(&writer)).await;
        }
    }
}
