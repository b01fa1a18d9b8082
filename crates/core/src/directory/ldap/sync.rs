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
use crate::directory::delta::Delta;
use crate::directory::writer::Write;
use crate::directory::{Directory, DirectoryWriter, ReloadReport, WriteError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Where a round's changes go: the node's directory writer, the directory itself (the
/// first round, before the writer exists), or a fleet's log (the LDAP leader).
pub trait Taker: Send + Sync {
    /// Loads the source's full read whole (an empty directory); `csv` is that read.
    fn whole(&self, csv: Vec<u8>, source: String) -> Write<'_, ReloadReport>;
    /// Applies a round's rows.
    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport>;
}

impl Taker for Arc<dyn DirectoryWriter> {
    fn whole(&self, _csv: Vec<u8>, _source: String) -> Write<'_, ReloadReport> {
        // A single node's directory loads the source's full read itself.
        self.reload(false)
    }
    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
        DirectoryWriter::delta(&**self, delta, source, force)
    }
}

impl Taker for Arc<Directory> {
    fn whole(&self, _csv: Vec<u8>, _source: String) -> Write<'_, ReloadReport> {
        let d = self.clone();
        Box::pin(
            async move { Ok(tokio::task::spawn_blocking(move || d.reload_file(false)).await??) },
        )
    }
    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
        let d = self.clone();
        Box::pin(async move {
            Ok(
                tokio::task::spawn_blocking(move || d.apply_delta(&delta, &source, force))
                    .await??,
            )
        })
    }
}

/// When a full read refused by the shrink guard is tried again (unless forced sooner).
const REFUSED_FULL_AGAIN: Duration = Duration::from_secs(300);

/// The rounds of one node's LDAP source (a single node's, or a fleet leader's).
pub struct Syncs {
    pub(super) cfg: LdapConfig,
    pub(super) source: Arc<LdapSource>,
    cursor: Cursor,
    pub(super) retry: Retry,
    /// When the next full read is due (`None`: now).
    full_due: Option<Instant>,
    /// The next round must be a full read.
    need_full: bool,
    /// How long to wait before the next round.
    pub(super) wait: Duration,
}

impl Syncs {
    /// Rounds starting from `cursor` (empty: a full read first).
    pub fn new(cfg: LdapConfig, source: Arc<LdapSource>, cursor: Cursor) -> Syncs {
        // A cursor from the store: deltas go on from it; the first full read waits for
        // its interval, or for a deletion this process cannot place.
        let full_due = (!cursor.is_empty()).then(|| Instant::now() + cfg.full_sync_interval);
        Syncs {
            cfg,
            source,
            cursor,
            retry: Retry::default(),
            full_due,
            need_full: false,
            wait: Duration::from_secs(1),
        }
    }

    /// Runs one round and hands it to `taker`; returns how long to wait before the next.
    pub async fn round(&mut self, directory: &Arc<Directory>, taker: &dyn Taker) -> Duration {
        let forced = self.source.take_forced();
        if let (Some(left), false) = (self.retry.held(&self.cfg), forced) {
            return left.min(self.cfg.sync_interval);
        }
        let full = forced || self.need_full || self.full_due.is_none_or(|t| Instant::now() >= t);
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
                // A refused password waits for the hold (or a new password), not the back-off.
                let shown = self.retry.held(&self.cfg).unwrap_or(wait);
                self.source.failed(&e, shown, self.retry.failures());
                return wait;
            }
        };
        let is_full = matches!(round.found, read::Found::Full(_));
        let kind = if is_full { "full" } else { "delta" };
        metrics::counter!(crate::metrics::LDAP_SYNCS, "kind" => kind, "result" => "ok")
            .increment(1);
        self.retry.succeeded();
        let took = self.take(directory, taker, &round, forced).await;
        if is_full {
            // A full read the directory refused (the shrink guard) is read again in a few
            // minutes, or at once when an admin forces it; not at every round.
            let again = if took {
                self.cfg.full_sync_interval
            } else {
                REFUSED_FULL_AGAIN.min(self.cfg.full_sync_interval)
            };
            self.full_due = Some(Instant::now() + again);
        }
        if took {
            self.need_full = false;
            self.source.advance(&round);
            self.cursor = round.cursor;
            if is_full {
                let (s, d) = (self.source.clone(), directory.clone());
                let _ = tokio::task::spawn_blocking(move || s.save_ids(&d)).await;
            }
        }
        self.cfg.sync_interval
    }

    /// Hands `round` to `taker`; true when it took it.
    async fn take(
        &mut self,
        directory: &Arc<Directory>,
        taker: &dyn Taker,
        round: &Round,
        force: bool,
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
                let csv = self.source.csv().unwrap_or_default();
                let r = taker.whole(csv, mark.clone()).await;
                self.source.loaded();
                r
            }
            Ok(Plan::Delta(delta)) => taker.delta(delta, mark.clone(), force).await,
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
            self.wait = self.round(&directory, &writer).await;
        }
    }
}
