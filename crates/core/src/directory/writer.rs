//! One directory writer: every change to the directory (a batch now or later, a rollback,
//! a reload of the source, a base import) goes through a [`DirectoryWriter`], chosen once at
//! start by the composition root (`relay`):
//!
//! - [`LocalWriter`] on a single node: the change is made on this node's [`Directory`]
//!   (its store keeps it), and batches for later are kept in `store_dir/scheduled/`
//!   ([`ScheduleStore`]) and applied by [`scheduled::run`] through this same writer;
//! - the fleet's writer (`crate::fleet::FleetWriter`) on a fleet node: the change is
//!   committed to the fleet's log in PostgreSQL first and then applied by every node, and
//!   batches for later are kept in PostgreSQL and applied once by whichever node is live.
//!
//! The admin API, the scheduler, the file watch, SIGHUP and the LDAP sync of a single node
//! hold an `Arc<dyn DirectoryWriter>` and never ask which one it is. (A fleet's LDAP sync
//! runs only on the node that leads it, inside `crate::fleet`, and commits through the
//! fleet's log as its writer does.)
//!
//! The directory's own methods ([`Directory::apply`], [`Directory::rollback`],
//! [`Directory::reload_file`]) are blocking and change this node only: outside this module
//! and the fleet they are for tests, benches and start-up.

use super::batch::BatchRow;
use super::delta::Delta;
use super::scheduled::{self, ScheduleStore, Scheduled, Status};
use super::{BatchReport, Directory, DirectoryError, ReloadReport};
use crate::types::RouteName;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A write in progress: the future every [`DirectoryWriter`] method returns.
pub type Write<'a, T> = Pin<Box<dyn Future<Output = Result<T, WriteError>> + Send + 'a>>;

/// Why a directory change was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The directory refused it (a bad row, the shrink guard, no such batch) or its store
    /// failed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The shared store (a fleet's PostgreSQL) cannot be reached: try again later.
    #[error(transparent)]
    Unreachable(Box<dyn std::error::Error + Send + Sync>),
    /// The shared store refused it (its rules, a log that does not hold this node's
    /// history, a failed statement).
    #[error(transparent)]
    Refused(Box<dyn std::error::Error + Send + Sync>),
    /// Only a fleet node does this (`what`: the operation, as the admin asked for it).
    #[error("{0} needs a fleet: this node has no [fleet] section")]
    NeedsFleet(&'static str),
    /// The blocking task that made the change on this node failed.
    #[error("directory task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How far a committed fleet change has spread: nodes that have applied it, of the nodes
/// whose heartbeat is recent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// The change's sequence number.
    pub seq: u32,
    /// Live nodes that have applied it (this one included).
    pub applied: usize,
    /// Nodes with a heartbeat in the last 30 s that have not stopped.
    pub live: usize,
    /// Nodes known to the fleet that stopped or have no recent heartbeat (cut off): they
    /// apply the change when they come back.
    pub silent: Vec<String>,
}

/// What a base import did (`coexist directory import`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetBatch {
    /// The merge of the file into the fleet's directory (changed, added, removed).
    #[serde(flatten)]
    pub report: ReloadReport,
    /// Its change id, `None` when refused or empty.
    pub id: Option<u32>,
    /// How far it has spread.
    pub nodes: Progress,
}

/// A batch or rollback as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// What it changed on this node's directory.
    pub report: BatchReport,
    /// In a fleet, how far the change has spread (`None` on a single node, for a preview,
    /// and for a batch that changed nothing).
    pub progress: Option<Progress>,
}

/// A batch to keep and apply later (`coexist directory apply FILE --at TIME`), checked by
/// the caller.
#[derive(Debug, Clone)]
pub struct LaterBatch {
    /// The batch file as uploaded.
    pub body: Vec<u8>,
    /// Its name.
    pub source: String,
    /// Target state, when the file has no `state` column.
    pub state: Option<String>,
    /// Its format (`auto`, or an Exchange report format).
    pub format: String,
    /// When to apply it: Unix seconds and RFC 3339 text.
    pub at: (i64, String),
}

/// Where directory changes go: this node's directory, or the fleet's log. Chosen once at
/// start; every writer of the directory holds one (see the module doc).
pub trait DirectoryWriter: Send + Sync + 'static {
    /// Applies batch `rows` (from file `source`) now; with `dry_run`, only says what it would
    /// change on this node's directory.
    fn apply(&self, rows: Vec<BatchRow>, source: String, dry_run: bool) -> Write<'_, Written>;

    /// Undoes batch `id`.
    fn rollback(&self, id: u32) -> Write<'_, Written>;

    /// Re-reads the directory's source (the file or, on a single node, what the LDAP sync
    /// found), merged over what batches did; refused beyond `directory.max_shrink` unless
    /// `force` (file watch, SIGHUP, `coexist directory reload`, the LDAP sync). A fleet node
    /// has no source of its own and refuses, naming `coexist directory import`.
    fn reload(&self, force: bool) -> Write<'_, ReloadReport>;

    /// Applies a source delta (what an LDAP round changed, named `source`, `ldap usn N`) as
    /// rows; refused beyond `directory.max_shrink` unless `force`.
    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport>;

    /// Loads directory file `text` (named `source`) as a new base, merged like a reload
    /// (`coexist directory import`; a fleet only).
    fn import(&self, text: Vec<u8>, source: String, force: bool) -> Write<'_, FleetBatch>;

    /// Keeps `batch` to be applied at its time; returns its record.
    fn schedule(&self, batch: LaterBatch) -> Write<'_, Scheduled>;

    /// Every batch kept for later, by id.
    fn scheduled(&self) -> Write<'_, Vec<Scheduled>>;

    /// Cancels pending scheduled batch `id`.
    fn cancel_scheduled(&self, id: u32) -> Write<'_, Scheduled>;

    /// The scheduler: applies the batches kept for later when they are due, for as long as
    /// the process runs (route names `states` read the batch files). Spawn it once.
    fn run_scheduler(
        self: Arc<Self>,
        states: Vec<RouteName>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The writer of a single node: changes are made on its directory, batches for later kept
/// in its [`ScheduleStore`]. Every change runs on the blocking pool (the directory's store
/// writes and fsyncs files).
pub struct LocalWriter {
    directory: Arc<Directory>,
    store: Arc<ScheduleStore>,
}

impl LocalWriter {
    /// The writer of `directory`, keeping scheduled batches in `store`.
    pub fn new(directory: Arc<Directory>, store: Arc<ScheduleStore>) -> LocalWriter {
        LocalWriter { directory, store }
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DirectoryError> + Send + 'static,
) -> Result<T, WriteError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

impl DirectoryWriter for LocalWriter {
    fn apply(&self, rows: Vec<BatchRow>, source: String, dry_run: bool) -> Write<'_, Written> {
        let d = self.directory.clone();
        Box::pin(async move {
            let report = blocking(move || d.apply(&rows, &source, dry_run)).await?;
            Ok(Written {
                report,
                progress: None,
            })
        })
    }

    fn rollback(&self, id: u32) -> Write<'_, Written> {
        let d = self.directory.clone();
        Box::pin(async move {
            let report = blocking(move || d.rollback(id)).await?;
            Ok(Written {
                report,
                progress: None,
            })
        })
    }

    fn reload(&self, force: bool) -> Write<'_, ReloadReport> {
        let d = self.directory.clone();
        Box::pin(blocking(move || d.reload_file(force)))
    }

    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
        let d = self.directory.clone();
        Box::pin(blocking(move || d.apply_delta(&delta, &source, force)))
    }

    fn import(&self, _text: Vec<u8>, _source: String, _force: bool) -> Write<'_, FleetBatch> {
        Box::pin(async { Err(WriteError::NeedsFleet("directory import")) })
    }

    fn schedule(&self, b: LaterBatch) -> Write<'_, Scheduled> {
        let st = self.store.clone();
        Box::pin(blocking(move || {
            st.add(&b.body, &b.source, b.state.as_deref(), &b.format, b.at)
        }))
    }

    fn scheduled(&self) -> Write<'_, Vec<Scheduled>> {
        let st = self.store.clone();
        Box::pin(blocking(move || st.list()))
    }

    fn cancel_scheduled(&self, id: u32) -> Write<'_, Scheduled> {
        let st = self.store.clone();
        let time = super::changes::now_rfc3339();
        Box::pin(blocking(move || st.settle(id, Status::Cancelled { time })))
    }

    fn run_scheduler(
        self: Arc<Self>,
        states: Vec<RouteName>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let store = self.store.clone();
        Box::pin(scheduled::run(store, states, self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::tests::{a, cfg, rows, states};
    use crate::directory::Resolution;

    fn on(d: &Directory, addr: &str) -> Resolution {
        d.resolve(&a(addr))
    }

    fn listed(route: &str) -> Resolution {
        Resolution::Listed(RouteName(route.into()))
    }

    fn writer(dir: &std::path::Path) -> (Arc<Directory>, LocalWriter) {
        std::fs::write(
            dir.join("d.csv"),
            "address,state\nx@nhs.test,onprem\ny@nhs.test,onprem\n",
        )
        .unwrap();
        let d = Arc::new(Directory::open(&cfg(dir, "reject"), states()).unwrap());
        let st = Arc::new(ScheduleStore::open(&dir.join("scheduled")).unwrap());
        (d.clone(), LocalWriter::new(d, st))
    }

    #[tokio::test]
    async fn a_single_node_writes_on_its_own_directory_and_refuses_an_import() {
        let tmp = tempfile::tempdir().unwrap();
        let (d, w) = writer(tmp.path());
        let r = w
            .apply(
                rows("EmailAddress\nx@nhs.test\n", "cloud"),
                "b".into(),
                true,
            )
            .await
            .unwrap();
        assert_eq!((r.report.changed, r.report.id, r.progress), (1, None, None));
        assert_eq!(on(&d, "x@nhs.test"), listed("onprem"));
        let r = w
            .apply(
                rows("EmailAddress\nx@nhs.test\n", "cloud"),
                "b".into(),
                false,
            )
            .await
            .unwrap();
        assert_eq!(on(&d, "x@nhs.test"), listed("cloud"));
        let id = r.report.id.unwrap();
        w.rollback(id).await.unwrap();
        assert_eq!(on(&d, "x@nhs.test"), listed("onprem"));
        let e = w.import(Vec::new(), "i".into(), false).await.unwrap_err();
        assert!(matches!(e, WriteError::NeedsFleet(_)), "{e}");
    }

    #[tokio::test]
    async fn a_scheduled_batch_is_kept_listed_and_cancelled_through_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, w) = writer(tmp.path());
        let s = w
            .schedule(LaterBatch {
                body: b"EmailAddress\nx@nhs.test\n".to_vec(),
                source: "b.csv".into(),
                state: Some("cloud".into()),
                format: "auto".into(),
                at: scheduled::parse_at("2099-01-01T00:00Z").unwrap(),
            })
            .await
            .unwrap();
        assert_eq!(w.scheduled().await.unwrap(), vec![s.clone()]);
        let c = w.cancel_scheduled(s.id).await.unwrap();
        assert!(matches!(c.status, Status::Cancelled { .. }));
        assert!(w.cancel_scheduled(s.id).await.is_err(), "only once");
    }

    /// A writer that records what it is asked, for the callers' tests.
    struct Recorder(tokio::sync::mpsc::UnboundedSender<String>);

    impl DirectoryWriter for Recorder {
        fn apply(&self, rows: Vec<BatchRow>, source: String, dry_run: bool) -> Write<'_, Written> {
            let _ = self.0.send(format!(
                "apply {source} rows={} dry_run={dry_run}",
                rows.len()
            ));
            Box::pin(async {
                Ok(Written {
                    report: BatchReport {
                        id: Some(7),
                        ..Default::default()
                    },
                    progress: None,
                })
            })
        }
        fn rollback(&self, id: u32) -> Write<'_, Written> {
            let _ = self.0.send(format!("rollback {id}"));
            Box::pin(async { Err(WriteError::NeedsFleet("a rollback in this test")) })
        }
        fn reload(&self, force: bool) -> Write<'_, ReloadReport> {
            let _ = self.0.send(format!("reload force={force}"));
            Box::pin(async { Ok(ReloadReport::of(0, 0)) })
        }
        fn delta(&self, d: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
            let _ = self.0.send(format!(
                "delta {source} mailboxes={} force={force}",
                d.entries.len()
            ));
            Box::pin(async { Ok(ReloadReport::of(0, 0)) })
        }
        fn import(&self, _: Vec<u8>, _: String, _: bool) -> Write<'_, FleetBatch> {
            Box::pin(async { Err(WriteError::NeedsFleet("directory import")) })
        }
        fn schedule(&self, _: LaterBatch) -> Write<'_, Scheduled> {
            Box::pin(async { Err(WriteError::NeedsFleet("scheduling in this test")) })
        }
        fn scheduled(&self) -> Write<'_, Vec<Scheduled>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn cancel_scheduled(&self, _: u32) -> Write<'_, Scheduled> {
            Box::pin(async { Err(WriteError::NeedsFleet("cancelling in this test")) })
        }
        fn run_scheduler(
            self: Arc<Self>,
            _: Vec<RouteName>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn the_scheduler_applies_a_due_batch_through_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(ScheduleStore::open(tmp.path()).unwrap());
        let at = scheduled::parse_at("2020-01-01T00:00Z").unwrap();
        store
            .add(
                b"EmailAddress\nx@nhs.test\n",
                "b.csv",
                Some("cloud"),
                "auto",
                at,
            )
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(scheduled::run(store, states(), Arc::new(Recorder(tx))));
        assert_eq!(
            rx.recv().await.as_deref(),
            Some("apply b.csv rows=1 dry_run=false")
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_new_directory_file_is_reloaded_through_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let (d, _) = writer(tmp.path());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let file = tmp.path().join("d.csv");
        let _watch = super::super::watch::spawn(d, Arc::new(Recorder(tx)), &file).unwrap();
        let new = tmp.path().join("d.csv.new");
        std::fs::write(&new, "address,state\nx@nhs.test,cloud\n").unwrap();
        std::fs::rename(&new, &file).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some("reload force=false"));
    }
}
