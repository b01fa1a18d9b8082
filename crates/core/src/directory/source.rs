//! Where the directory's entries come from, and loading them: the [`Source`] trait and the
//! file source, opening the directory at start-up (snapshot, change log, then the file) and
//! reloading the file on top of what batches did (`merge`), refused when the file is bad or
//! shrinks too much.

use super::changes::{now_rfc3339, replay};
use super::store::{Change, ChangeKind, ChangeSummary, Fingerprint, Store};
use super::table::{self, Parsed};
use super::view::View;
use super::{io_err, Directory, DirectoryError, RefusedReload, ReloadReport};
use crate::config::DirectoryConfig;
use crate::types::RouteName;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, info};

/// Where the directory's entries come from. A source delivers the whole set; the directory
/// diffs it against what it holds, so batches applied since survive a reload.
pub trait Source: Send + Sync {
    /// Name for logs and lookups (the file path for the file source).
    fn name(&self) -> String;
    /// Identifies the current content: equal fingerprints mean nothing to reload.
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError>;
    /// Reads every entry; a bad row fails the whole load.
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError>;
    /// False while the source cannot be read (LDAP down): the directory in force stays, and
    /// recipients it does not know are deferred (`451 4.4.3`) rather than refused.
    fn healthy(&self) -> bool {
        true
    }
    /// True when the mailboxes a load changes should show that load's change (its source
    /// name, e.g. `ldap usn 123456`) as their origin, rather than `file PATH`.
    fn marks_origin(&self) -> bool {
        false
    }
    /// The source sends its changes as deltas ([`Directory::apply_delta`]) and loads
    /// itself whole when the directory is empty: opening the store does not reload it.
    fn follows_deltas(&self) -> bool {
        false
    }
    /// An admin asked to reload a source that sends deltas (`coexist directory reload`):
    /// what it does instead, in words (`None`: the source reloads as a file does).
    fn reload_requested(&self, _force: bool) -> Option<String> {
        None
    }
    /// True when a directory at change 0 has nothing in force yet (a fleet node before
    /// its first base): it knows no recipient, so none is refused as unknown.
    fn empty_until_first_change(&self) -> bool {
        false
    }
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
    #[allow(clippy::disallowed_methods)] // Reloads run on the blocking pool (the writer's).
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
        let text = std::fs::read(&self.path).map_err(io_err(&self.path))?;
        table::parse(&text, &self.name(), states)
    }
}

/// The source of a fleet node: the directory comes from the fleet's change log in
/// PostgreSQL (see `crate::fleet`), never from a local file, so there is nothing to reload.
/// `up` is false while the fleet's LDAP source is down (as its sync leader reports it).
pub struct FleetSource {
    /// The fleet's own source (LDAP) can be read.
    pub up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for FleetSource {
    fn default() -> FleetSource {
        FleetSource {
            up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }
}

impl Source for FleetSource {
    fn healthy(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn empty_until_first_change(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        "fleet".into()
    }
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError> {
        Ok(Fingerprint::default())
    }
    fn load(&self, _states: &[RouteName]) -> Result<Parsed, DirectoryError> {
        Err(DirectoryError::Batch(
            "this node is in a fleet: its directory comes from PostgreSQL; load a new base with `coexist directory import FILE`".into(),
        ))
    }
}

impl Directory {
    /// Opens a fleet node's directory from its local store alone (snapshot and change log
    /// under `store_dir`, ids being the fleet's sequence numbers); empty when there is none.
    /// The fleet brings it up to date from PostgreSQL.
    pub fn open_local(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
        store_dir: &std::path::Path,
        source: FleetSource,
    ) -> Result<Directory, DirectoryError> {
        let store = Store::open(store_dir)?;
        let snapshot = store.read_snapshot()?.and_then(|s| s.renumber(&states));
        let mut view = match snapshot {
            Some(s) => View::from_stored(s),
            None => View::of_parsed(Parsed {
                table: table::Table::default(),
                states: Vec::new(),
                routing: Default::default(),
            }),
        };
        let (history, tail) = store.read_log(view.last_change)?;
        for change in &tail {
            // A base's rows are not in the local log: a base logged but not yet in the
            // snapshot (a crash between the two) is fetched again from the fleet.
            if change.head.kind == ChangeKind::Base {
                break;
            }
            replay(&mut view, change, &states);
        }
        let replayed = view.last_change;
        let history = history.into_iter().filter(|h| h.id <= replayed).collect();
        Ok(Directory::build(
            cfg,
            states,
            view,
            Some(store),
            history,
            Box::new(source),
        ))
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
        let path = cfg
            .file
            .clone()
            .ok_or_else(|| DirectoryError::Batch("directory.file is not set".into()))?;
        super::owner::other_source(&cfg.store_dir, &path);
        let source = FileSource { path: path.clone() };
        let dir = Directory::open_with(cfg, states, Box::new(source))?;
        // The store now holds this file's state, unless loading it was refused.
        if dir.reload_status().last_result.is_none_or(|r| r == "ok") {
            super::owner::record(&cfg.store_dir, &path);
        }
        Ok(dir)
    }

    /// [`Directory::open`] with another source (the LDAP source). A source that marks
    /// origins is loaded at the first start through a reload, so its change is logged; one
    /// that is unhealthy at the first start leaves the directory empty until it is back.
    pub fn open_with(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
        source: Box<dyn Source>,
    ) -> Result<Directory, DirectoryError> {
        let store = Store::open(&cfg.store_dir)?;
        // State numbers follow the route names; a snapshot written under other routes is
        // renumbered by name (or dropped if a state is no longer a route).
        let snapshot = store.read_snapshot()?.and_then(|s| s.renumber(&states));
        let Some(s) = snapshot else {
            if source.marks_origin() || !source.healthy() || source.follows_deltas() {
                let empty = View::of_parsed(Parsed {
                    table: table::Table::default(),
                    states: Vec::new(),
                    routing: Default::default(),
                });
                let (history, _) = store.read_log(0)?;
                let deltas = source.follows_deltas();
                let dir = Directory::build(cfg, states, empty, Some(store), history, source);
                if deltas {
                    // Its first round loads it.
                    return Ok(dir);
                }
                if let Err(e) = dir.reload_file(false) {
                    error!(error = %e, "at first start: the directory source could not be read; the directory is empty until it can");
                }
                return Ok(dir);
            }
            let fp = source.fingerprint()?;
            let parsed = source.load(&states)?;
            let mut view = merge(None, parsed, fp, 0).0;
            let (history, tail) = store.read_log(0)?;
            for change in &tail {
                replay(&mut view, change, &states);
            }
            let dir = Directory::build(cfg, states, view, Some(store), history, source);
            dir.persist_snapshot()?;
            return Ok(dir);
        };
        let mut view = View::from_stored(s);
        let (history, tail) = store.read_log(view.last_change)?;
        for change in &tail {
            replay(&mut view, change, &states);
        }
        let file_changed = !source.follows_deltas()
            && source
                .fingerprint()
                .map_or(true, |fp| fp != view.fingerprint);
        let dir = Directory::build(cfg, states, view, Some(store), history, source);
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

    /// Re-reads the source (file watch, SIGHUP, `coexist directory reload`, start-up after
    /// an edit). Rows the file changed since it was last loaded take the file's state; rows
    /// it did not change keep the state batches gave them. Refused, with the current
    /// directory left in force: a file with a bad row, and (unless `force`) a file that
    /// removes more than `directory.max_shrink` of the addresses. Every outcome is logged,
    /// counted in `coexist_directory_reloads_total{result}` and kept for [`Self::reload_status`].
    pub fn reload_file(&self, force: bool) -> Result<ReloadReport, DirectoryError> {
        if !self.is_empty() {
            if let Some(what) = self.source.reload_requested(force) {
                info!(what, "directory reload asked of a source that sends deltas");
                return Ok(ReloadReport::of(
                    self.len(),
                    self.view.load().table.live_mailboxes(),
                ));
            }
        }
        let (res, result) = match self.reload_inner(force) {
            Ok(r) => (Ok(r), "ok"),
            Err((stage, e)) => (Err(e), stage),
        };
        self.record_load(result, res.as_ref().err());
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
                error!(result, error = %e, "directory file refused; the previous directory stays in force")
            }
        }
        res
    }

    /// Counts and keeps for status the outcome of a load of the source (a reload, or a
    /// source delta): `result` is `ok`, `refused_shrink`, `refused_invalid` or `failed`.
    pub(super) fn record_load(&self, result: &str, err: Option<&DirectoryError>) {
        metrics::counter!(crate::metrics::DIRECTORY_RELOADS, "result" => result.to_string())
            .increment(1);
        let time = now_rfc3339();
        let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
        st.last_result = Some(result.to_string());
        st.last_time = Some(time.clone());
        if let (Some(e), true) = (err, result != "failed") {
            st.last_refused = Some(RefusedReload {
                time,
                result: result.to_string(),
                reason: e.to_string(),
            });
        }
    }

    /// The reload; on error also the `result` label: `refused_invalid` (the file cannot be
    /// read or has a bad row), `refused_shrink`, or `failed` (the store could not record it).
    pub(super) fn reload_inner(
        &self,
        force: bool,
    ) -> Result<ReloadReport, (&'static str, DirectoryError)> {
        let invalid = |e| ("refused_invalid", e);
        let failed = |e| ("failed", e);
        let t0 = std::time::Instant::now();
        let fp = self.source.fingerprint().map_err(invalid)?;
        let parsed = self.source.load(&self.states).map_err(invalid)?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        let id = self.next_id(&view);
        let fresh = if self.source.marks_origin() { id } else { 0 };
        let (mut next, mut report) = merge(Some(&view), parsed, fp, fresh);
        let (removed, forced) = self
            .check_shrink(&view, &next, &self.source.name(), force)
            .map_err(|e| ("refused_shrink", e))?;
        report.removed_addresses = removed;
        report.forced = forced;
        next.generation = view.generation + 1;
        next.last_change = id;
        let change = Change {
            head: ChangeSummary {
                id,
                time: now_rfc3339(),
                kind: ChangeKind::Reload,
                source: self.source.name(),
                rolls_back: None,
                count: report.changed,
                uid: None,
                committed: None,
            },
            not_found: 0,
            already: 0,
            entries: Vec::new(),
            delta: None,
        };
        self.log(&change).map_err(failed)?;
        self.view.store(Arc::new(next));
        self.persist_snapshot().map_err(failed)?;
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        Ok(report)
    }
}

/// For every mailbox of `parsed`, the mailbox of `old` it is: the one holding its primary
/// address, else (its primary address was renamed at the source) the one holding another
/// of its addresses, unless that old mailbox is already some other mailbox's by primary
/// address. So what batches decided is kept by mailbox, not by one address.
fn same_mailboxes(old: &View, parsed: &Parsed) -> Vec<Option<usize>> {
    let n = parsed.states.len();
    let mut before: Vec<Option<usize>> = (0..n)
        .map(|m| {
            old.table
                .mailbox(parsed.table.primary_address(m).as_bytes())
        })
        .collect();
    if before.iter().all(Option::is_some) {
        return before;
    }
    let mut taken = vec![false; old.table.mailboxes()];
    for om in before.iter().flatten() {
        taken[*om] = true;
    }
    for (key, m) in parsed.table.entries() {
        if before.get(m).is_some_and(Option::is_none) {
            if let Some(om) = old.table.mailbox(key).filter(|om| !taken[*om]) {
                taken[om] = true;
                before[m] = Some(om);
            }
        }
    }
    before
}

/// Builds the view for a newly parsed file on top of `old`: a mailbox whose file state is
/// unchanged keeps its current state and origin (so batches survive); others take the file,
/// with `fresh` as their origin (0: the file itself). A mailbox is found in `old` by its
/// primary address, or when that was renamed, by another of its addresses
/// ([`same_mailboxes`]). Routing addresses are the file's for every mailbox (batches change
/// states only).
pub(super) fn merge(
    old: Option<&View>,
    parsed: Parsed,
    fp: Fingerprint,
    fresh: u32,
) -> (View, ReloadReport) {
    let n = parsed.states.len();
    let mut states = parsed.states.clone();
    let mut origin = vec![fresh; n];
    let mut report = ReloadReport::of(parsed.table.len(), n);
    let mut kept = 0usize;
    if let Some(old) = old {
        let before = same_mailboxes(old, &parsed);
        for (m, state) in states.iter_mut().enumerate() {
            match before[m] {
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
        // The file's routing addresses, for every mailbox: batches never set them.
        routing: Arc::new(parsed.routing),
        states,
        origin,
        last_change: old.map(|v| v.last_change).unwrap_or(0),
        fingerprint: fp,
    };
    (view, report)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{a, cfg, rows, states};
    use super::*;
    use crate::directory::Resolution;
    use crate::types::RouteName;

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

    /// Routing addresses come from the file for every mailbox: a reload gives each mailbox
    /// the new file's (also when only they changed), batches keep states but never touch
    /// them, and a restart finds them in the snapshot.
    #[test]
    fn a_reload_takes_the_file_routing_addresses_and_batches_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.csv");
        std::fs::write(
            &file,
            "address,state,mailbox,routing_address\n\
             a@nhs.test,onprem,m1,a@tenant.test\n\
             alias@other.test,onprem,m1,\n\
             b@nhs.test,onprem,,b@tenant.test\n\
             c@nhs.test,onprem,,\n",
        )
        .unwrap();
        let d = Directory::open(&cfg(dir.path(), "onprem"), states()).unwrap();
        let routed = |d: &Directory, s: &str| {
            let r = d.resolve_routed(&a(s));
            let ra = r.routing_address.map(|ra| ra.to_string());
            (r.resolution.route().unwrap().as_str().to_string(), ra)
        };
        let pair = |r: &str, ra: Option<&str>| (r.to_string(), ra.map(str::to_string));
        assert_eq!(
            routed(&d, "ALIAS@other.test"),
            pair("onprem", Some("a@tenant.test"))
        );
        assert_eq!(routed(&d, "c@nhs.test"), pair("onprem", None));
        assert_eq!(
            d.lookup(&a("alias@other.test")).routing_address.as_deref(),
            Some("a@tenant.test")
        );
        d.apply(
            &rows("EmailAddress\nalias@other.test\nb@nhs.test\n", "cloud"),
            "b.csv",
            false,
        )
        .unwrap();
        assert_eq!(
            routed(&d, "alias@other.test"),
            pair("cloud", Some("a@tenant.test")),
            "a batch changes the state, not the routing address"
        );
        // Only routing addresses change: a's goes, b's changes, c gets one.
        std::fs::write(
            &file,
            "address,state,mailbox,routing_address\n\
             a@nhs.test,onprem,m1,\n\
             alias@other.test,onprem,m1,\n\
             b@nhs.test,onprem,,b2@tenant.test\n\
             c@nhs.test,onprem,,c@tenant.test\n",
        )
        .unwrap();
        let r = d.reload_file(false).unwrap();
        assert_eq!((r.changed, r.added, r.removed), (0, 0, 0));
        assert_eq!(
            routed(&d, "alias@other.test"),
            pair("cloud", None),
            "batch kept, routing address gone"
        );
        assert_eq!(
            routed(&d, "b@nhs.test"),
            pair("cloud", Some("b2@tenant.test"))
        );
        assert_eq!(
            routed(&d, "c@nhs.test"),
            pair("onprem", Some("c@tenant.test"))
        );
        // A file without the column: no mailbox has one any more.
        std::fs::write(
            &file,
            "address,state,mailbox\na@nhs.test,onprem,m1\nalias@other.test,onprem,m1\nb@nhs.test,onprem,\nc@nhs.test,onprem,\n",
        )
        .unwrap();
        d.reload_file(false).unwrap();
        assert_eq!(routed(&d, "b@nhs.test"), pair("cloud", None));
        std::fs::write(
            &file,
            "address,state,routing_address\na@nhs.test,onprem,\nalias@other.test,onprem,\nb@nhs.test,onprem,b3@tenant.test\nc@nhs.test,onprem,\n",
        )
        .unwrap();
        d.reload_file(false).unwrap();
        drop(d);
        let d = Directory::open(&cfg(dir.path(), "onprem"), states()).unwrap();
        assert_eq!(
            routed(&d, "b@nhs.test"),
            pair("cloud", Some("b3@tenant.test")),
            "after a restart (snapshot)"
        );
    }

    /// Issue 23 item 6a: a mailbox whose primary address the source renames (the old one
    /// kept as an alias, as Exchange does) is the same mailbox: the batch that moved it
    /// stays in force, and it can still be rolled back.
    #[test]
    fn a_batch_survives_its_mailbox_primary_address_being_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.csv");
        std::fs::write(
            &f,
            "address,state,mailbox\na@nhs.test,onprem,\nold@nhs.test,onprem,m\nalias@nhs.test,onprem,m\n",
        )
        .unwrap();
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        let id = d
            .apply(
                &rows("EmailAddress\nalias@nhs.test\n", "cloud"),
                "b.csv",
                false,
            )
            .unwrap()
            .id
            .unwrap();
        std::fs::write(
            &f,
            "address,state,mailbox\na@nhs.test,onprem,\nnew@nhs.test,onprem,m\nold@nhs.test,onprem,m\nalias@nhs.test,onprem,m\n",
        )
        .unwrap();
        let r = d.reload_file(false).unwrap();
        assert_eq!((r.changed, r.added, r.removed), (0, 0, 0), "{r:?}");
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        assert_eq!(d.resolve(&a("new@nhs.test")), cloud);
        assert_eq!(d.lookup(&a("new@nhs.test")).origin, format!("batch {id}"));
        assert_eq!(d.rollback(id).unwrap().changed, 1);
        assert_eq!(
            d.resolve(&a("new@nhs.test")),
            Resolution::Listed(RouteName("onprem".into()))
        );
    }
}
