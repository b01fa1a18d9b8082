//! The migration-state directory: which route (estate) holds each recipient's mailbox now.
//!
//! - [`table`]: the compact in-memory index loaded from the directory file (the embedded
//!   source), with aliases (several addresses, one mailbox).
//! - [`batch`]: migration batch files (ours or Exchange's `New-MigrationBatch` CSV).
//! - [`store`]: snapshot and append-only change log, so a restart keeps applied batches and
//!   does not re-parse the CSV.
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

pub mod batch;
pub mod generate;
pub mod store;
pub mod table;
pub mod watch;

use crate::config::{DirectoryConfig, Percent, Unknown};
use crate::types::{Address, RouteName};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use store::{Change, ChangeEntry, ChangeKind, ChangeSummary, Fingerprint, Store, Stored};
use table::{Parsed, Table};
use tracing::{error, info, warn};

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

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> DirectoryError + '_ {
    move |source| DirectoryError::Io {
        file: file.display().to_string(),
        source,
    }
}

/// Where the directory's entries come from. A source delivers the whole set; the directory
/// diffs it against what it holds, so batches applied since survive a reload.
pub trait Source: Send + Sync {
    /// Name for logs and lookups (the file path for the file source).
    fn name(&self) -> String;
    /// Identifies the current content: equal fingerprints mean nothing to reload.
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError>;
    /// Reads every entry; a bad row fails the whole load.
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError>;
}

/// The embedded default source: the CSV file `directory.file`.
pub struct FileSource {
    /// The CSV file.
    pub path: PathBuf,
}

impl Source for FileSource {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError> {
        Fingerprint::of(&self.path).map_err(io_err(&self.path))
    }
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
        let text = std::fs::read(&self.path).map_err(io_err(&self.path))?;
        table::parse(&text, &self.name(), states)
    }
}

/// How an address resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Listed in the directory with this state.
    Listed(RouteName),
    /// Not listed; `directory.unknown` sends it to this route.
    Unlisted(RouteName),
    /// Not listed and `directory.unknown = "reject"`.
    Reject,
}

impl Resolution {
    /// The route, unless rejected.
    pub fn route(&self) -> Option<&RouteName> {
        match self {
            Resolution::Listed(r) | Resolution::Unlisted(r) => Some(r),
            Resolution::Reject => None,
        }
    }
}

/// A state: an index into the route names ([`Directory::states`]), stored as one byte per
/// mailbox in the tables and snapshots. Made only by the checked [`StateId::find`] and
/// [`StateId::from_index`], so no index is ever truncated into another state (the
/// configuration refuses more than [`StateId::MAX_STATES`] routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId(u8);

impl StateId {
    /// Most states (routes) a directory can tell apart.
    pub const MAX_STATES: usize = u8::MAX as usize + 1;

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

/// One immutable version of the directory.
struct View {
    generation: u64,
    table: Arc<Table>,
    file_states: Arc<Vec<u8>>,
    states: Vec<u8>,
    origin: Vec<u32>,
    last_change: u32,
    fingerprint: Fingerprint,
}

impl View {
    fn stored(&self, names: &[RouteName]) -> Stored {
        Stored {
            fingerprint: self.fingerprint,
            last_change: self.last_change,
            state_names: names.iter().map(|r| r.as_str().to_string()).collect(),
            table: (*self.table).clone(),
            file_states: (*self.file_states).clone(),
            states: self.states.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// Everything known about one address, for `directory lookup` and `route explain`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Lookup {
    /// The address asked about.
    pub address: String,
    /// Primary address of its mailbox, when listed.
    pub mailbox: Option<String>,
    /// Current state, when listed.
    pub state: Option<String>,
    /// Where the state comes from: `file`, `batch N`, or `unlisted`.
    pub origin: String,
    /// The route a message would take now (`None` = rejected).
    pub route: Option<String>,
}

/// Outcome of applying (or previewing) a batch or rollback.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct BatchReport {
    /// Change id given to it (`None` for a preview or a no-op).
    pub id: Option<u32>,
    /// Rows in the file.
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

/// Cached lookups: key to (view generation, state). An entry from an older generation is
/// ignored, so a lookup racing with a batch can never pin a stale state in the cache.
type LookupCache = moka::sync::Cache<Box<str>, (u64, Option<u8>)>;

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
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Directory {
    fn build(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
        view: View,
        store: Option<Store>,
        history: Vec<ChangeSummary>,
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
            source: Box::new(FileSource {
                path: cfg.file.clone(),
            }),
            store: store.map(Mutex::new),
            history: Mutex::new(history),
            writer: Mutex::new(()),
            max_shrink: Mutex::new(cfg.max_shrink),
            reload_status: Mutex::new(ReloadStatus::default()),
        }
    }

    /// The source's name (the directory file).
    pub fn source_name(&self) -> String {
        self.source.name()
    }

    /// True when the source changed since it was last loaded.
    pub fn source_changed(&self) -> bool {
        self.source
            .fingerprint()
            .is_ok_and(|fp| fp != self.view.load().fingerprint)
    }

    /// A directory from parsed data, without persistence (tests, benches).
    pub fn in_memory(parsed: Parsed, states: Vec<RouteName>, cfg: &DirectoryConfig) -> Directory {
        let n = parsed.states.len();
        let view = View {
            generation: 1,
            table: Arc::new(parsed.table),
            file_states: Arc::new(parsed.states.clone()),
            states: parsed.states,
            origin: vec![0; n],
            last_change: 0,
            fingerprint: Fingerprint::default(),
        };
        Directory::build(cfg, states, view, None, Vec::new())
    }

    /// Opens the directory.
    ///
    /// With a snapshot, the directory is first brought back to what it was before the restart
    /// (the snapshot, then the change log's newer records); then, if the file changed, it is
    /// loaded exactly as a live reload loads it ([`Directory::reload_file`]): rows the edit
    /// changed take the file's state, the others keep what batches gave them, and a file that
    /// is invalid or removes more than `directory.max_shrink` of the addresses is refused
    /// (logged, counted, shown in status) while the directory of before the restart stays in
    /// force. So a restart never orders a file edit and a batch differently from a running
    /// server.
    ///
    /// Without a usable snapshot (first start, or the routes changed) the file is parsed
    /// and every change in the log is replayed over it.
    pub fn open(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
    ) -> Result<Directory, DirectoryError> {
        let store = Store::open(&cfg.store_dir)?;
        let source = FileSource {
            path: cfg.file.clone(),
        };
        // State numbers follow the route names; a snapshot written under other routes is
        // renumbered by name (or dropped if a state is no longer a route).
        let snapshot = store.read_snapshot()?.and_then(|s| s.renumber(&states));
        let Some(s) = snapshot else {
            let fp = source.fingerprint()?;
            let parsed = source.load(&states)?;
            let mut view = merge(None, parsed, fp).0;
            let (history, tail) = store.read_log(0)?;
            for change in &tail {
                replay(&mut view, change, &states);
            }
            let dir = Directory::build(cfg, states, view, Some(store), history);
            dir.persist_snapshot()?;
            return Ok(dir);
        };
        let mut view = View {
            generation: 1,
            table: Arc::new(s.table),
            file_states: Arc::new(s.file_states),
            states: s.states,
            origin: s.origin,
            last_change: s.last_change,
            fingerprint: s.fingerprint,
        };
        let (history, tail) = store.read_log(view.last_change)?;
        for change in &tail {
            replay(&mut view, change, &states);
        }
        let file_changed = source
            .fingerprint()
            .map_or(true, |fp| fp != view.fingerprint);
        let dir = Directory::build(cfg, states, view, Some(store), history);
        if file_changed {
            match dir.reload_file(false) {
                // The reload wrote the snapshot.
                Ok(_) => return Ok(dir),
                Err(e) => error!(
                    error = %e,
                    "at start-up: the directory file was not loaded; serving the directory as it was before the restart (snapshot and change log)"
                ),
            }
        }
        if !tail.is_empty() {
            dir.persist_snapshot()?;
        }
        Ok(dir)
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

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.view.load().table.len()
    }

    /// True when no addresses are listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current state of an address (case-insensitive). Never blocks on writers.
    pub fn resolve(&self, addr: &Address) -> Resolution {
        let view = self.view.load();
        let state = match &self.cache {
            Some(cache) => {
                let key = addr.key();
                match cache.get(key.as_str()) {
                    Some((generation, s)) if generation == view.generation => s,
                    _ => {
                        let s = lookup_state(&view, key.as_bytes());
                        cache.insert(key.into_boxed_str(), (view.generation, s));
                        s
                    }
                }
            }
            None => addr.with_key(|k| lookup_state(&view, k)),
        };
        self.resolution(state)
    }

    fn resolution(&self, state: Option<u8>) -> Resolution {
        match state.and_then(|s| self.states.get(s as usize)) {
            Some(route) => Resolution::Listed(route.clone()),
            None => match &*self.unknown.load() {
                Some(r) => Resolution::Unlisted((**r).clone()),
                None => Resolution::Reject,
            },
        }
    }

    /// State, mailbox and provenance of an address.
    pub fn lookup(&self, addr: &Address) -> Lookup {
        let view = self.view.load();
        let m = view.table.mailbox(addr.key().as_bytes());
        let state = m.map(|m| view.states[m]);
        Lookup {
            address: addr.to_string(),
            mailbox: m.map(|m| view.table.primary_address(m).to_string()),
            state: state
                .and_then(|s| self.states.get(s as usize))
                .map(|r| r.as_str().to_string()),
            origin: match m.map(|m| view.origin[m]) {
                None => "unlisted".into(),
                Some(0) => format!("file {}", self.source.name()),
                Some(id) => format!("batch {id}"),
            },
            route: self
                .resolution(state)
                .route()
                .map(|r| r.as_str().to_string()),
        }
    }

    /// Applies (or with `dry_run`, previews) a batch atomically; recorded in the change log
    /// before it takes effect. Addresses not in the directory are reported and skipped.
    pub fn apply(
        &self,
        rows: &[batch::BatchRow],
        source: &str,
        dry_run: bool,
    ) -> Result<BatchReport, DirectoryError> {
        let t0 = std::time::Instant::now();
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        let mut report = BatchReport {
            rows: rows.len(),
            ..BatchReport::default()
        };
        let mut target: Vec<(usize, u8)> = Vec::new();
        let mut touched = vec![false; view.table.mailboxes()];
        for r in rows {
            match view.table.mailbox(r.key.as_bytes()) {
                None => {
                    report.not_found_count += 1;
                    if report.not_found.len() < 100 {
                        report.not_found.push(r.address.clone());
                    }
                }
                Some(m) if touched[m] => {}
                Some(m) => {
                    touched[m] = true;
                    if view.states[m] == r.state.raw() {
                        report.already += 1;
                    } else {
                        target.push((m, r.state.raw()));
                    }
                }
            }
        }
        report.changed = target.len();
        if dry_run || target.is_empty() {
            report.elapsed_ms = t0.elapsed().as_millis() as u64;
            return Ok(report);
        }
        let id = self.next_id(&view);
        let entries = target
            .iter()
            .map(|&(m, s)| ChangeEntry {
                address: view.table.primary_address(m).to_string(),
                from: self.states[view.states[m] as usize].as_str().to_string(),
                from_origin: view.origin[m],
                to: self.states[s as usize].as_str().to_string(),
            })
            .collect();
        let change = Change {
            head: ChangeSummary {
                id,
                time: now_rfc3339(),
                kind: ChangeKind::Apply,
                source: source.to_string(),
                rolls_back: None,
                count: report.changed,
            },
            not_found: report.not_found_count,
            already: report.already,
            entries,
        };
        self.commit(&view, change, |states, origin| {
            for &(m, s) in &target {
                states[m] = s;
                origin[m] = id;
            }
        })?;
        report.id = Some(id);
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            batch = id,
            source,
            changed = report.changed,
            already = report.already,
            not_found = report.not_found_count,
            ms = report.elapsed_ms,
            "directory batch applied"
        );
        Ok(report)
    }

    /// Undoes batch `id`: mailboxes it moved and nothing moved since go back to their state
    /// before it. Recorded as a change of its own.
    pub fn rollback(&self, id: u32) -> Result<BatchReport, DirectoryError> {
        let t0 = std::time::Instant::now();
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let record = {
            let store = self
                .store
                .as_ref()
                .ok_or_else(|| DirectoryError::Batch("no change log".into()))?;
            let store = store.lock().unwrap_or_else(|p| p.into_inner());
            store.find(id)?
        };
        let record =
            record.ok_or_else(|| DirectoryError::Batch(format!("batch {id} not found")))?;
        if record.head.kind != ChangeKind::Apply {
            return Err(DirectoryError::Batch(format!(
                "change {id} is a {:?}, not a batch",
                record.head.kind
            )));
        }
        if self
            .history_snapshot()
            .iter()
            .any(|c| c.rolls_back == Some(id))
        {
            return Err(DirectoryError::Batch(format!(
                "batch {id} was already rolled back"
            )));
        }
        let view = self.view.load_full();
        let mut report = BatchReport {
            rows: record.entries.len(),
            ..BatchReport::default()
        };
        let mut target = Vec::new();
        for e in &record.entries {
            let Some(m) = view.table.mailbox(e.address.as_bytes()) else {
                report.not_found_count += 1;
                continue;
            };
            let Some(s) = StateId::find(&self.states, &e.from) else {
                report.not_found_count += 1;
                continue;
            };
            if view.origin[m] != id {
                report.changed_since += 1;
                continue;
            }
            target.push((m, s.raw(), e.from_origin, e));
        }
        report.changed = target.len();
        let new_id = self.next_id(&view);
        let change = Change {
            head: ChangeSummary {
                id: new_id,
                time: now_rfc3339(),
                kind: ChangeKind::Rollback,
                source: record.head.source.clone(),
                rolls_back: Some(id),
                count: report.changed,
            },
            not_found: report.not_found_count,
            already: report.changed_since,
            entries: target
                .iter()
                .map(|(m, _, origin, e)| ChangeEntry {
                    address: e.address.clone(),
                    from: self.states[view.states[*m] as usize].as_str().to_string(),
                    from_origin: *origin,
                    to: e.from.clone(),
                })
                .collect(),
        };
        self.commit(&view, change, |states, origin| {
            for &(m, s, o, _) in &target {
                states[m] = s;
                origin[m] = o;
            }
        })?;
        report.id = Some(new_id);
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            batch = id,
            rollback = new_id,
            restored = report.changed,
            changed_since = report.changed_since,
            "directory batch rolled back"
        );
        Ok(report)
    }

    /// Re-reads the source (file watch, SIGHUP, `coexist directory reload`, start-up after
    /// an edit). Rows the file changed since it was last loaded take the file's state; rows
    /// it did not change keep the state batches gave them. Refused, with the current
    /// directory left in force: a file with a bad row, and (unless `force`) a file that
    /// removes more than `directory.max_shrink` of the addresses. Every outcome is logged,
    /// counted in `coexist_directory_reloads_total{result}` and kept for [`Self::reload_status`].
    pub fn reload_file(&self, force: bool) -> Result<ReloadReport, DirectoryError> {
        let (res, result) = match self.reload_inner(force) {
            Ok(r) => (Ok(r), "ok"),
            Err((stage, e)) => (Err(e), stage),
        };
        metrics::counter!(crate::metrics::DIRECTORY_RELOADS, "result" => result).increment(1);
        let time = now_rfc3339();
        let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
        st.last_result = Some(result.to_string());
        st.last_time = Some(time.clone());
        match &res {
            Ok(r) => info!(
                source = %self.source.name(),
                entries = r.entries,
                changed = r.changed,
                added = r.added,
                removed = r.removed,
                removed_addresses = r.removed_addresses,
                forced = r.forced,
                ms = r.elapsed_ms,
                "directory file reloaded"
            ),
            Err(e) => {
                error!(result, error = %e, "directory file refused; the previous directory stays in force");
                if result != "failed" {
                    st.last_refused = Some(RefusedReload {
                        time,
                        result: result.to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        res
    }

    /// The reload; on error also the `result` label: `refused_invalid` (the file cannot be
    /// read or has a bad row), `refused_shrink`, or `failed` (the store could not record it).
    fn reload_inner(&self, force: bool) -> Result<ReloadReport, (&'static str, DirectoryError)> {
        let invalid = |e| ("refused_invalid", e);
        let failed = |e| ("failed", e);
        let t0 = std::time::Instant::now();
        let fp = self.source.fingerprint().map_err(invalid)?;
        let parsed = self.source.load(&self.states).map_err(invalid)?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        let (mut next, mut report) = merge(Some(&view), parsed, fp);
        let before = view.table.len();
        let removed = view
            .table
            .keys()
            .filter(|k| next.table.mailbox(k).is_none())
            .count();
        report.removed_addresses = removed;
        let limit = self.max_shrink();
        if removed as f64 > limit.fraction() * before as f64 {
            if !force {
                return Err((
                    "refused_shrink",
                    DirectoryError::Shrink {
                        file: self.source.name(),
                        removed,
                        before,
                        share: removed as f64 * 100.0 / before as f64,
                        limit,
                    },
                ));
            }
            report.forced = true;
            warn!(source = %self.source.name(), removed, before, "directory reload forced although it removes more than directory.max_shrink");
        }
        next.generation = view.generation + 1;
        let id = self.next_id(&view);
        next.last_change = id;
        let change = Change {
            head: ChangeSummary {
                id,
                time: now_rfc3339(),
                kind: ChangeKind::Reload,
                source: self.source.name(),
                rolls_back: None,
                count: report.changed,
            },
            not_found: 0,
            already: 0,
            entries: Vec::new(),
        };
        self.log(&change).map_err(failed)?;
        self.view.store(Arc::new(next));
        self.persist_snapshot().map_err(failed)?;
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// The change history (batches, rollbacks, reloads), oldest first.
    pub fn history_snapshot(&self) -> Vec<ChangeSummary> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn next_id(&self, view: &View) -> u32 {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter()
            .map(|c| c.id)
            .max()
            .unwrap_or(0)
            .max(view.last_change)
            + 1
    }

    fn log(&self, change: &Change) -> Result<(), DirectoryError> {
        if let Some(store) = &self.store {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            store.append(change)?;
        }
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change.head.clone());
        Ok(())
    }

    /// Logs `change` durably, then swaps in a view with `edit` applied to copies of the
    /// state arrays (a few MB at 2M mailboxes: milliseconds).
    fn commit(
        &self,
        view: &View,
        change: Change,
        edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u32>),
    ) -> Result<(), DirectoryError> {
        let mut states = view.states.clone();
        let mut origin = view.origin.clone();
        edit(&mut states, &mut origin);
        self.log(&change)?;
        self.view.store(Arc::new(View {
            generation: view.generation + 1,
            table: view.table.clone(),
            file_states: view.file_states.clone(),
            states,
            origin,
            last_change: change.head.id,
            fingerprint: view.fingerprint,
        }));
        Ok(())
    }

    /// Writes the current view as the snapshot (after reloads and at start-up).
    pub fn persist_snapshot(&self) -> Result<(), DirectoryError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let stored = self.view.load().stored(&self.states);
        let store = store.lock().unwrap_or_else(|p| p.into_inner());
        store.write_snapshot(&stored)
    }
}

fn unknown_route(unknown: &Unknown) -> Option<Arc<RouteName>> {
    unknown.route().map(|r| Arc::new(r.clone()))
}

fn lookup_state(view: &View, key: &[u8]) -> Option<u8> {
    view.table.mailbox(key).map(|m| view.states[m])
}

/// Builds the view for a newly parsed file on top of `old`: a mailbox whose file state is
/// unchanged keeps its current state and origin (so batches survive); others take the file.
fn merge(old: Option<&View>, parsed: Parsed, fp: Fingerprint) -> (View, ReloadReport) {
    let n = parsed.states.len();
    let mut states = parsed.states.clone();
    let mut origin = vec![0u32; n];
    let mut report = ReloadReport {
        entries: parsed.table.len(),
        mailboxes: n,
        changed: 0,
        added: 0,
        removed: 0,
        removed_addresses: 0,
        forced: false,
        elapsed_ms: 0,
    };
    let mut kept = 0usize;
    if let Some(old) = old {
        for (m, state) in states.iter_mut().enumerate() {
            match old
                .table
                .mailbox(parsed.table.primary_address(m).as_bytes())
            {
                Some(om) if old.file_states[om] == parsed.states[m] => {
                    *state = old.states[om];
                    origin[m] = old.origin[om];
                    kept += 1;
                }
                Some(_) => {
                    report.changed += 1;
                    kept += 1;
                }
                None => report.added += 1,
            }
        }
        report.removed = old.table.mailboxes().saturating_sub(kept);
    }
    let view = View {
        generation: old.map(|v| v.generation + 1).unwrap_or(1),
        table: Arc::new(parsed.table),
        file_states: Arc::new(parsed.states),
        states,
        origin,
        last_change: old.map(|v| v.last_change).unwrap_or(0),
        fingerprint: fp,
    };
    (view, report)
}

/// Re-applies a logged change at start-up.
fn replay(view: &mut View, change: &Change, states: &[RouteName]) {
    if change.head.kind == ChangeKind::Reload {
        view.last_change = view.last_change.max(change.head.id);
        return;
    }
    for e in &change.entries {
        let (Some(m), Some(s)) = (
            view.table.mailbox(e.address.as_bytes()),
            StateId::find(states, &e.to),
        ) else {
            warn!(change = change.head.id, address = %e.address, "change log entry no longer applies");
            continue;
        };
        view.states[m] = s.raw();
        view.origin[m] = if change.head.kind == ChangeKind::Apply {
            change.head.id
        } else {
            e.from_origin
        };
    }
    view.last_change = view.last_change.max(change.head.id);
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    fn cfg(dir: &Path, unknown: &str) -> DirectoryConfig {
        DirectoryConfig {
            file: dir.join("d.csv"),
            unknown: unknown.into(),
            cache_capacity: 100,
            cache_ttl: std::time::Duration::from_secs(60),
            store_dir: dir.join("store"),
            watch: false,
            max_shrink: Percent::parse("10%").unwrap(),
        }
    }

    fn a(s: &str) -> Address {
        Address::parse(s, false).unwrap()
    }

    fn rows(text: &str, state: &str) -> Vec<batch::BatchRow> {
        batch::parse(text.as_bytes(), "b.csv", &states(), Some(state)).unwrap()
    }

    #[test]
    fn batches_apply_roll_back_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), "address,state,mailbox\na@nhs.test,onprem,m1\nalias@nhs.test,onprem,m1\nb@nhs.test,onprem,\nc@nhs.test,cloud,\n").unwrap();
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        assert_eq!(d.resolve(&a("ALIAS@nhs.test")), onprem);
        let preview = d
            .apply(
                &rows(
                    "EmailAddress\na@nhs.test\nc@nhs.test\nz@nhs.test\n",
                    "cloud",
                ),
                "b.csv",
                true,
            )
            .unwrap();
        assert_eq!(
            (
                preview.id,
                preview.changed,
                preview.already,
                preview.not_found_count
            ),
            (None, 1, 1, 1)
        );
        assert_eq!(
            d.resolve(&a("a@nhs.test")),
            onprem,
            "dry run changes nothing"
        );
        let r = d
            .apply(
                &rows(
                    "EmailAddress\na@nhs.test\nc@nhs.test\nz@nhs.test\n",
                    "cloud",
                ),
                "b.csv",
                false,
            )
            .unwrap();
        assert_eq!(r.id, Some(1));
        assert_eq!(
            d.resolve(&a("alias@nhs.test")),
            cloud,
            "aliases move with their mailbox"
        );
        assert_eq!(d.lookup(&a("a@nhs.test")).origin, "batch 1");
        assert_eq!(d.resolve(&a("z@nhs.test")), Resolution::Reject);
        drop(d);

        // Restart: snapshot unchanged, batch replayed from the log.
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        let rb = d.rollback(1).unwrap();
        assert_eq!((rb.id, rb.changed), (Some(2), 1));
        assert_eq!(d.resolve(&a("alias@nhs.test")), onprem);
        assert_eq!(
            d.lookup(&a("a@nhs.test")).origin,
            format!("file {}", dir.path().join("d.csv").display())
        );
        assert!(d.rollback(1).is_err(), "a batch is rolled back once");
        drop(d);
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), onprem);
        assert_eq!(d.history_snapshot().len(), 2);
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "b2.csv",
            false,
        )
        .unwrap();
        drop(d);

        // A route added that sorts first shifts the state numbers: the snapshot is renumbered.
        let more = vec![
            RouteName("archive".into()),
            RouteName("cloud".into()),
            RouteName("onprem".into()),
        ];
        let d = Directory::open(&cfg(dir.path(), "reject"), more).unwrap();
        assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
        assert_eq!(d.resolve(&a("a@nhs.test")), onprem);
    }

    #[test]
    fn file_reload_diffs_and_keeps_batches_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.csv");
        std::fs::write(
            &file,
            "address,state\na@nhs.test,onprem\nb@nhs.test,onprem\n",
        )
        .unwrap();
        let d = Directory::open(&cfg(dir.path(), "onprem"), states()).unwrap();
        d.apply(&rows("EmailAddress\na@nhs.test\n", "cloud"), "b.csv", false)
            .unwrap();
        std::fs::write(
            &file,
            "address,state\na@nhs.test,onprem\nb@nhs.test,cloud\nc@nhs.test,cloud\n",
        )
        .unwrap();
        let r = d.reload_file(false).unwrap();
        assert_eq!((r.changed, r.added, r.removed), (1, 1, 0));
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        assert_eq!(
            d.resolve(&a("a@nhs.test")),
            cloud,
            "batch kept: the file did not change this row"
        );
        assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
        assert_eq!(d.resolve(&a("c@nhs.test")), cloud);
        std::fs::write(&file, "address,state\na@nhs.test,onprem\nb@nhs.test,mars\n").unwrap();
        let e = d.reload_file(false).unwrap_err().to_string();
        assert!(
            e.ends_with("d.csv:3: unknown state \"mars\" (routes: cloud, onprem)"),
            "{e}"
        );
        assert_eq!(
            d.resolve(&a("c@nhs.test")),
            cloud,
            "old state stays in force"
        );
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("store").join("changes.log")
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(log_file(dir)).unwrap().len()
    }

    /// Writes `bytes` as the change log, fsynced, as a crash would have left it.
    fn put_log(dir: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::File::create(log_file(dir)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }

    const ABC: &str = "address,state\na@nhs.test,onprem\nb@nhs.test,onprem\nc@nhs.test,onprem\n";

    /// Item 7: an append cut short by a crash leaves a torn record at the end of the log. At
    /// the next start it is cut off (the file shrinks back to the last whole record), and a
    /// batch applied after that survives the following restart and can be rolled back.
    #[test]
    fn torn_log_tail_is_cut_at_start_and_later_batches_survive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let c = cfg(dir.path(), "reject");
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        let d = Directory::open(&c, states()).unwrap();
        d.apply(
            &rows("EmailAddress\na@nhs.test\n", "cloud"),
            "one.csv",
            false,
        )
        .unwrap();
        let after_one = log_len(dir.path());
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "two.csv",
            false,
        )
        .unwrap();
        drop(d);
        // The crash: batch two's record lost its last bytes.
        let bytes = std::fs::read(log_file(dir.path())).unwrap();
        put_log(dir.path(), &bytes[..bytes.len() - 5]);

        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(
            log_len(dir.path()),
            after_one,
            "the torn record is cut off at start"
        );
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud, "batch one is whole");
        assert_eq!(d.resolve(&a("b@nhs.test")), onprem, "batch two was torn");
        let three = d
            .apply(
                &rows("EmailAddress\nc@nhs.test\n", "cloud"),
                "three.csv",
                false,
            )
            .unwrap()
            .id
            .unwrap();
        drop(d);

        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        assert_eq!(
            d.resolve(&a("c@nhs.test")),
            cloud,
            "a batch applied after the torn one survives a restart"
        );
        let rb = d.rollback(three).unwrap();
        assert_eq!(rb.changed, 1, "and rollback finds it");
        assert_eq!(d.resolve(&a("c@nhs.test")), onprem);
    }

    /// Item 7: damage inside the log (not at its end) stops the start with the file and the
    /// offset of the damaged record, instead of skipping a change silently.
    #[test]
    fn damage_in_the_middle_of_the_log_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let c = cfg(dir.path(), "reject");
        let d = Directory::open(&c, states()).unwrap();
        for (who, name) in [("a", "one.csv"), ("b", "two.csv"), ("c", "three.csv")] {
            d.apply(
                &rows(&format!("EmailAddress\n{who}@nhs.test\n"), "cloud"),
                name,
                false,
            )
            .unwrap();
        }
        drop(d);
        let mut bytes = std::fs::read(log_file(dir.path())).unwrap();
        let mid = bytes.len() / 6; // inside the first of three records
        bytes[mid] = if bytes[mid] == b'~' { b'!' } else { b'~' };
        put_log(dir.path(), &bytes);
        let e = match Directory::open(&c, states()) {
            Ok(_) => panic!("a damaged change log was accepted"),
            Err(e) => e.to_string(),
        };
        let file = log_file(dir.path()).display().to_string();
        // The first record starts right after the 8-byte file header.
        assert!(
            e.contains(&file) && e.contains("offset 8"),
            "error names the file and the record's offset: {e}"
        );
    }

    /// Item 7: a log in the line format of earlier versions is read, not lost: converted to
    /// framed records (the old file kept), its torn last line dropped, and a batch that the
    /// old code glued onto a torn line recovered.
    #[test]
    fn line_format_log_is_converted_and_a_glued_batch_recovered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let change = |id: u32, who: &str| {
            format!(
                r#"{{"id":{id},"time":"2026-11-01T10:00:00Z","kind":"apply","source":"b{id}.csv","count":1,"not_found":0,"already":0,"entries":[{{"address":"{who}@nhs.test","from":"onprem","from_origin":0,"to":"cloud"}}]}}"#
            )
        };
        let two = change(2, "b");
        let four = change(4, "a");
        let v1 = format!(
            "{}\n{}{}\n{}",
            change(1, "a"),
            &two[..40],
            change(3, "c"),
            &four[..30]
        );
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        put_log(dir.path(), v1.as_bytes());
        let c = cfg(dir.path(), "reject");
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        assert_eq!(d.resolve(&a("b@nhs.test")), onprem, "batch 2 was torn");
        assert_eq!(
            d.lookup(&a("c@nhs.test")).origin,
            "batch 3",
            "glued batch recovered"
        );
        let ids: Vec<u32> = d.history_snapshot().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 3]);
        let old = dir.path().join("store").join("changes.log.v1");
        assert_eq!(std::fs::read(&old).unwrap(), v1.as_bytes(), "old file kept");
        assert!(std::fs::read(log_file(dir.path()))
            .unwrap()
            .starts_with(b"COEXLOG2"));
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "b5.csv",
            false,
        )
        .unwrap();
        drop(d);
        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
        assert_eq!(d.rollback(3).unwrap().changed, 1);
        assert_eq!(d.resolve(&a("c@nhs.test")), onprem);
        drop(d);

        // A damaged line in the middle of an old log is an error with its offset.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let first = change(1, "a");
        put_log(
            dir.path(),
            format!("{first}\n{{\"id\":2,garbage\n{}\n", change(3, "c")).as_bytes(),
        );
        let e = match Directory::open(&cfg(dir.path(), "reject"), states()) {
            Ok(_) => panic!("a damaged old log was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&format!(
                "changes.log: change log damaged at offset {}",
                first.len() + 1
            )),
            "{e}"
        );
    }
}
