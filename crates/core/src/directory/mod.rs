//! The migration-state directory: which route (estate) holds each recipient's mailbox now.
//!
//! - [`table`]: the compact in-memory index loaded from the directory file (the embedded
//!   source), with aliases (several addresses, one mailbox).
//! - [`routing`]: each mailbox's routing address (where a rewriting route sends its mail).
//! - [`batch`]: migration batch files (ours or Exchange's `New-MigrationBatch` CSV).
//! - [`report`]: Exchange migration reports (`Get-MigrationUser`, `Get-MoveRequest`
//!   exports) read as batches of their completed users.
//! - [`store`]: snapshot and append-only change log, so a restart keeps applied batches and
//!   does not re-parse the CSV.
//! - [`undo`]: a fleet's rollbacks, decided once and carried as a restore list, so they
//!   stay possible across later bases (LDAP syncs, imports).
//! - [`writer`]: the one way changes are written ([`DirectoryWriter`]): on this node's
//!   directory ([`LocalWriter`]) or, on a fleet node, through the fleet's log; chosen once
//!   at start, used by the admin API, the scheduler, file reloads and the LDAP sync.
//!
//! [`Directory`] itself is split by concern: this module holds the type, its public reports
//! and small accessors; `source` the [`Source`] trait, the file source, [`Directory::open`]
//! and file reloads; `view` the swapped `View` and the lookups on it; `changes` batches,
//! rollbacks and the change-log bookkeeping.
//!
//! The live state is an immutable [`View`] behind an `ArcSwap`: a batch, rollback or file
//! reload builds a new view and swaps it in at once, so a lookup sees a whole change or none
//! of it, and no lookup ever waits for a writer (DESIGN invariant 4).
//!
//! Batches and file edits meet by one rule: loading the file (a live reload, or the first
//! thing after a restart, once the snapshot and the change log have brought back the state
//! of before) gives every mailbox whose row the edit changed the file's state, and leaves the
//! others as batches set them. The restart path calls the same [`Directory::reload_file`] as
//! the watcher, SIGHUP and the API, so an edit and a batch are never ordered differently
//! after a restart. The same call guards against a truncated or half-copied file: a load
//! that would remove more than `directory.max_shrink` of the addresses is refused unless
//! forced, and the directory in force stays.

mod base;
pub mod batch;
mod changes;
pub mod delta;
pub mod generate;
pub mod ldap;
#[allow(clippy::disallowed_methods)] // Start-up: which file the store came from.
pub mod owner;
pub mod report;
pub mod routing;
pub mod scheduled;
mod source;
#[allow(clippy::disallowed_methods)]
// The directory's store: written by the writer on the blocking pool.
pub mod store;
pub mod table;
pub mod undo;
mod view;
pub mod watch;
pub mod writer;

pub use base::{Base, BaseRow};
pub use report::StatusGroup;
pub use source::{FileSource, FleetSource, Source};
pub use store::Stamp;
pub use view::{Lookup, Moved, Resolution, Resolved, Routed};
pub use writer::{DirectoryWriter, LocalWriter, WriteError};

use crate::config::{DirectoryConfig, Percent, Unknown};
use crate::types::RouteName;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use store::{ChangeSummary, Store};
use table::Parsed;
use view::{LookupCache, View};

/// Turns an I/O error on `file` into [`DirectoryError::Io`] naming it (sources and the store).
fn io_err(file: &std::path::Path) -> impl FnOnce(std::io::Error) -> DirectoryError + '_ {
    move |source| DirectoryError::Io {
        file: file.display().to_string(),
        source,
    }
}

/// A directory problem; row errors name file, line and reason.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// A file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// File.
        file: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// A row is malformed; nothing was changed.
    #[error("{file}:{line}: {reason}")]
    Row {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A batch id that does not exist or cannot be rolled back.
    #[error("{0}")]
    Batch(String),
    /// A reload would remove more of the addresses than `directory.max_shrink` allows.
    #[error("{file}: refused: the new file removes {removed} of {before} addresses ({share:.1}%), more than directory.max_shrink ({limit}); the previous directory stays in force (if the removal is intended: coexist directory reload --force)")]
    Shrink {
        /// The directory file.
        file: String,
        /// Addresses listed now and missing from the new file.
        removed: usize,
        /// Addresses listed now.
        before: usize,
        /// `removed` as a percentage of `before`.
        share: f64,
        /// The limit in force.
        limit: Percent,
    },
    /// The change log is damaged where no crash can damage it (before its last record).
    #[error("{file}: change log damaged at offset {offset}: {reason}")]
    Corrupt {
        /// The change log.
        file: String,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// A state: an index into the route names ([`Directory::states`]), stored as one byte per
/// mailbox in the tables and snapshots. Made only by the checked [`StateId::find`] and
/// [`StateId::from_index`], so no index is ever truncated into another state (the
/// configuration refuses more than [`StateId::MAX_STATES`] routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId(u8);

impl StateId {
    /// Most states (routes) a directory can tell apart.
    pub const MAX_STATES: usize = crate::config::MAX_ROUTES;

    /// The state at `index` of the route names, if it fits.
    pub fn from_index(index: usize) -> Option<StateId> {
        u8::try_from(index).ok().map(StateId)
    }

    /// The state named `name` among `states`.
    pub fn find(states: &[RouteName], name: &str) -> Option<StateId> {
        states
            .iter()
            .position(|r| r.as_str() == name)
            .and_then(StateId::from_index)
    }

    /// The index into the route names.
    pub fn index(self) -> usize {
        self.0.into()
    }

    /// The stored byte.
    pub fn raw(self) -> u8 {
        self.0
    }
}

/// Outcome of applying (or previewing) a batch or rollback.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct BatchReport {
    /// Change id given to it (`None` for a preview or a no-op).
    pub id: Option<u32>,
    /// Rows in the batch (for a migration report: its completed users).
    pub rows: usize,
    /// Mailboxes whose state changes.
    pub changed: usize,
    /// Mailboxes already in the target state.
    pub already: usize,
    /// Addresses not in the directory (skipped); at most 100 listed.
    pub not_found: Vec<String>,
    /// Number of such addresses.
    pub not_found_count: usize,
    /// Rollback only: mailboxes changed again since the batch, left as they are.
    pub changed_since: usize,
    /// Time taken, in milliseconds.
    pub elapsed_ms: u64,
    /// Migration report only (`--format migration-users`): its users that have not
    /// completed, by status, left as they are. Absent for other batches and from servers
    /// that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_completed: Option<Vec<StatusGroup>>,
}

/// Outcome of a directory file reload.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Addresses now listed.
    pub entries: usize,
    /// Mailboxes now listed.
    pub mailboxes: usize,
    /// Mailboxes whose state changed because the file changed.
    pub changed: usize,
    /// Mailboxes new in the file.
    pub added: usize,
    /// Mailboxes gone from the file.
    pub removed: usize,
    /// Addresses gone from the file (what `directory.max_shrink` limits).
    pub removed_addresses: usize,
    /// Applied with `force` although it removed more than `directory.max_shrink`.
    pub forced: bool,
    /// Time taken, in milliseconds.
    pub elapsed_ms: u64,
}

impl ReloadReport {
    /// A report of a load of `entries` addresses in `mailboxes` mailboxes that changed
    /// nothing yet.
    pub fn of(entries: usize, mailboxes: usize) -> ReloadReport {
        ReloadReport {
            entries,
            mailboxes,
            changed: 0,
            added: 0,
            removed: 0,
            removed_addresses: 0,
            forced: false,
            elapsed_ms: 0,
        }
    }
}

/// A reload of the directory file that was refused, for status.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RefusedReload {
    /// RFC 3339 time.
    pub time: String,
    /// `refused_shrink` or `refused_invalid`.
    pub result: String,
    /// Why, naming the file.
    pub reason: String,
}

/// Outcome of the directory file reloads since start, for `coexist status` and `/v1/ready`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Result of the last attempt: `ok`, `refused_shrink`, `refused_invalid` or `failed`.
    pub last_result: Option<String>,
    /// Time of the last attempt.
    pub last_time: Option<String>,
    /// The last refused reload and why (kept after later successful reloads).
    pub last_refused: Option<RefusedReload>,
}

/// The live directory.
pub struct Directory {
    states: Vec<RouteName>,
    view: ArcSwap<View>,
    cache: Option<LookupCache>,
    unknown: arc_swap::ArcSwapOption<RouteName>,
    source: Box<dyn Source>,
    store: Option<Mutex<Store>>,
    history: Mutex<Vec<ChangeSummary>>,
    writer: Mutex<()>,
    /// `directory.max_shrink` (config reloads change it).
    max_shrink: Mutex<Percent>,
    reload_status: Mutex<ReloadStatus>,
    /// The LDAP source feeding this directory (on a fleet node: the one it would lead
    /// with), for its health in status.
    ldap: std::sync::OnceLock<Arc<ldap::LdapSource>>,
    /// Source deltas applied since the snapshot was last written (see
    /// [`delta::SNAPSHOT_EVERY`]).
    deltas_since_snapshot: std::sync::atomic::AtomicU32,
}

impl Directory {
    fn build(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
        view: View,
        store: Option<Store>,
        history: Vec<ChangeSummary>,
        source: Box<dyn Source>,
    ) -> Directory {
        let cache = (cfg.cache_capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(cfg.cache_ttl)
                .build()
        });
        Directory {
            states,
            view: ArcSwap::from_pointee(view),
            cache,
            unknown: arc_swap::ArcSwapOption::new(unknown_route(&cfg.unknown)),
            source,
            store: store.map(Mutex::new),
            history: Mutex::new(history),
            writer: Mutex::new(()),
            max_shrink: Mutex::new(cfg.max_shrink),
            reload_status: Mutex::new(ReloadStatus::default()),
            ldap: std::sync::OnceLock::new(),
            deltas_since_snapshot: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The source's name (the directory file).
    pub fn source_name(&self) -> String {
        self.source.name()
    }

    /// True while the source cannot be read (LDAP down), or while a fleet node has no base
    /// yet (a new fleet before its first LDAP sync is committed, a new node before it has
    /// loaded the base): recipients the directory does not know are then deferred, not
    /// refused (found by the weekend run: a node listening on an empty directory refused
    /// valid mailboxes with 550 5.1.1).
    pub fn source_down(&self) -> bool {
        !self.source.healthy() || (self.source.empty_until_first_change() && self.applied() == 0)
    }

    /// Records the LDAP source that feeds this directory (its health shows in status).
    pub fn attach_ldap(&self, source: Arc<ldap::LdapSource>) {
        let _ = self.ldap.set(source);
    }

    /// The LDAP source's health: the current reason while it fails, the last good round and
    /// its cursor (`None` without `[directory.ldap]`).
    pub fn ldap_health(&self) -> Option<ldap::LdapHealth> {
        self.ldap.get().map(|s| s.health())
    }

    /// True when the source changed since it was last loaded (never for a source that
    /// sends deltas: its changes are applied as they come).
    pub fn source_changed(&self) -> bool {
        !self.source.follows_deltas()
            && self
                .source
                .fingerprint()
                .is_ok_and(|fp| fp != self.view.load().fingerprint)
    }

    /// A directory from parsed data, without persistence (tests, benches).
    pub fn in_memory(parsed: Parsed, states: Vec<RouteName>, cfg: &DirectoryConfig) -> Directory {
        let view = View::of_parsed(parsed);
        let source: Box<dyn Source> = match &cfg.file {
            Some(path) => Box::new(FileSource { path: path.clone() }),
            None => Box::new(FleetSource::default()),
        };
        Directory::build(cfg, states, view, None, Vec::new(), source)
    }

    /// Applies a new `directory.unknown` (config reload).
    pub fn set_unknown(&self, unknown: &Unknown) {
        self.unknown.store(unknown_route(unknown));
    }

    /// Applies a new `directory.max_shrink` (config reload).
    pub fn set_max_shrink(&self, max_shrink: Percent) {
        *self.max_shrink.lock().unwrap_or_else(|p| p.into_inner()) = max_shrink;
    }

    fn max_shrink(&self) -> Percent {
        *self.max_shrink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the reloads of the directory file went (last result, last refusal and why).
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The route names (state index = position).
    pub fn states(&self) -> &[RouteName] {
        &self.states
    }

    /// The id of the last change in force (in a fleet: the fleet sequence applied here).
    pub fn applied(&self) -> u32 {
        self.view.load().last_change
    }

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.view.load().table.len()
    }

    /// True when no addresses are listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unknown_route(unknown: &Unknown) -> Option<Arc<RouteName>> {
    unknown.route().map(|r| Arc::new(r.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Address;
    use std::path::Path;

    pub(super) fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    pub(super) fn cfg(dir: &Path, unknown: &str) -> DirectoryConfig {
        DirectoryConfig {
            file: Some(dir.join("d.csv")),
            unknown: unknown.into(),
            cache_capacity: 100,
            cache_ttl: std::time::Duration::from_secs(60),
            store_dir: dir.join("store"),
            watch: false,
            max_shrink: Percent::parse("10%").unwrap(),
            ldap: None,
            move_grace: std::time::Duration::from_secs(7200),
        }
    }

    pub(super) fn a(s: &str) -> Address {
        Address::parse(s, false).unwrap()
    }

    pub(super) fn rows(text: &str, state: &str) -> Vec<batch::BatchRow> {
        batch::parse(text.as_bytes(), "b.csv", &states(), Some(state)).unwrap()
    }

    #[test]
    fn state_ids_are_checked() {
        assert_eq!(StateId::from_index(255).map(StateId::raw), Some(255));
        assert_eq!(StateId::from_index(256), None);
        let names: Vec<RouteName> = (0..300)
            .map(|i| RouteName(format!("r{i}").into()))
            .collect();
        assert_eq!(StateId::find(&names, "r255").map(StateId::index), Some(255));
        assert_eq!(StateId::find(&names, "r256"), None, "not truncated into r0");
        assert_eq!(StateId::find(&names, "nope"), None);
    }
}
