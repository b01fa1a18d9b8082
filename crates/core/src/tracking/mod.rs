//! The message tracking log: every receive, route decision, delivery outcome, DSN, expiry,
//! admin action and takeover of this node, on disk for `tracking.max_age` (30 days by
//! default), searched by address, Message-ID or queue id through an index per file. It is
//! what `coexist trace`, the console's address search and message view, and the batch
//! preview's traffic figures read.
//!
//! Data flow: the SMTP handler ([`Tracking::log`]) and the queue (through its outcome sink,
//! [`sink::Tee`]) hand events over a bounded channel to one writer thread ([`writer`]),
//! so no reply waits for the log's disk; when the channel is full, events are dropped and
//! counted (`coexist_tracking_lost_total{reason="full"}`), never waited for. The writer
//! appends them in batches to framed files ([`files`], the rules of
//! [`crate::spool::framed`]: a torn tail is cut at the next start, nothing else is lost),
//! one file per UTC day or `max_file` bytes, and writes each file's index when it seals it.
//! Retention deletes whole files, oldest first, by age and by total size.

pub mod event;
#[allow(clippy::disallowed_methods)]
// Blocking file work: the writer thread, start-up and searches (spawn_blocking).
pub mod files;
#[allow(clippy::disallowed_methods)] // Searches: run with spawn_blocking by their callers.
pub mod search;
pub mod sink;
#[allow(clippy::disallowed_methods)] // The writer: a thread of its own, never an async worker.
mod writer;

pub use event::{Event, EventReply, Kind, Role};
pub use search::{Found, Query};

use crate::config::TrackingConfig;
use crate::metrics as m;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// Events the channel to the writer holds; more are dropped (and counted). Each waits in a
/// box: the channel's slots are allocated whole when it is made, so slots of the event's
/// own size (about 430 bytes) would hold 28 MB from the first busy minute on.
const CHANNEL: usize = 65_536;

/// What the writer and the searches share.
pub(crate) struct Shared {
    dir: PathBuf,
    max_age: Duration,
    max_size: u64,
    max_file: u64,
    /// The file being written and where its whole records end.
    open: Mutex<Option<(PathBuf, u64)>>,
}

impl Shared {
    fn set_open(&self, open: Option<(PathBuf, u64)>) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = open;
    }

    fn open(&self) -> Option<(PathBuf, u64)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Deletes the files past `max_age`, then the oldest while the log is over `max_size`
    /// (never the open file).
    fn retain(&self) {
        let now = crate::clock::now_ms();
        match retain(
            &self.dir,
            self.open().map(|o| o.0),
            now,
            self.max_age,
            self.max_size,
        ) {
            Ok(r) => {
                metrics::gauge!(m::TRACKING_BYTES).set(r.kept_bytes as f64);
                if r.deleted > 0 {
                    info!(
                        dir = %self.dir.display(),
                        files = r.deleted,
                        bytes = r.deleted_bytes,
                        "tracking log: deleted files past tracking.max_age or over tracking.max_size"
                    );
                }
            }
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "tracking log: retention could not run")
            }
        }
    }
}

/// What a retention pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retained {
    /// Files deleted.
    pub deleted: usize,
    /// Bytes they took.
    pub deleted_bytes: u64,
    /// Bytes the log takes after it.
    pub kept_bytes: u64,
}

#[allow(clippy::disallowed_methods)] // The writer thread and start-up.
/// Deletes the files of `dir` whose newest event is older than `max_age` at `now_ms`, then
/// the oldest ones while all of them take more than `max_size` (`open` is never deleted),
/// and the torn tails kept in `damaged/` older than `max_age`.
pub fn retain(
    dir: &Path,
    open: Option<PathBuf>,
    now_ms: u64,
    max_age: Duration,
    max_size: u64,
) -> io::Result<Retained> {
    let cutoff = now_ms.saturating_sub(max_age.as_millis() as u64);
    let all = files::list(dir)?;
    let mut total: u64 = all.iter().map(|f| f.bytes).sum();
    let mut r = Retained::default();
    for f in &all {
        if Some(&f.path) == open.as_ref() {
            continue;
        }
        let newest = f.index.map_or(f.start_ms, |h| h.last_ms.max(f.start_ms));
        if newest < cutoff || total > max_size {
            std::fs::remove_file(&f.path)?;
            let _ = std::fs::remove_file(files::idx_path(&f.path));
            total -= f.bytes;
            r.deleted += 1;
            r.deleted_bytes += f.bytes;
        }
    }
    // Torn tails kept aside at start-ups hold events too: same age limit.
    if let Ok(rd) = std::fs::read_dir(dir.join("damaged")) {
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .is_some_and(|t| (t.as_millis() as u64) < cutoff);
            if old && std::fs::remove_file(e.path()).is_ok() {
                r.deleted += 1;
            }
        }
    }
    r.kept_bytes = total;
    Ok(r)
}

/// The tracking log of this node: where events are sent and what searches read.
pub struct Tracking {
    /// The writer's channel; `None` once closed. Read for every event: an `ArcSwapOption`
    /// costs no lock.
    tx: arc_swap::ArcSwapOption<SyncSender<Box<Event>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Events are being dropped (logged once per burst).
    dropping: AtomicBool,
}

impl Tracking {
    /// Opens the log in `dir` (created owner-only when missing): indexes a file left without
    /// an index (cutting a torn tail), applies the retention and starts the writer thread.
    /// Blocking: call it from a blocking context.
    pub fn open(dir: &Path, c: &TrackingConfig) -> io::Result<Tracking> {
        crate::fsmode::create_dir_all(dir)?;
        files::clean(dir)?;
        for f in files::list(dir)?.into_iter().filter(|f| f.index.is_none()) {
            let (h, damaged) = files::seal_unindexed(&f.path)?;
            for d in damaged {
                warn!(file = %d.path.display(), offset = d.offset, bytes = d.len, torn = d.torn, reason = %d.reason, "tracking log: damaged bytes skipped (a torn end is cut: it was being written at a stop)");
            }
            info!(file = %f.path.display(), events = h.events, "tracking log: indexed a file left open at the last stop");
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            max_age: c.max_age,
            max_size: c.max_size,
            max_file: c.max_file,
            open: Mutex::new(None),
        });
        shared.retain();
        let (tx, rx) = sync_channel(CHANNEL);
        let w = writer::Writer::new(shared.clone());
        let thread = std::thread::Builder::new()
            .name("tracking".into())
            .spawn(move || w.run(rx))?;
        Ok(Tracking {
            tx: arc_swap::ArcSwapOption::from_pointee(tx),
            shared,
            thread: Mutex::new(Some(thread)),
            dropping: AtomicBool::new(false),
        })
    }

    /// The folder of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Hands `e` to the writer; never blocks (a full channel drops it, counted).
    pub fn log(&self, e: Event) {
        let tx = self.tx.load();
        let Some(tx) = tx.as_deref() else {
            metrics::counter!(m::TRACKING_LOST, "reason" => "closed").increment(1);
            return;
        };
        match tx.try_send(Box::new(e)) {
            Ok(()) => {
                if self.dropping.swap(false, Ordering::Relaxed) {
                    info!("tracking log: taking events again");
                }
            }
            Err(TrySendError::Full(_)) => {
                metrics::counter!(m::TRACKING_LOST, "reason" => "full").increment(1);
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    warn!("tracking log: the writer is behind (its disk is slow); events are dropped until it catches up");
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Writes what was sent, seals the open file and stops the writer (at shutdown).
    /// Blocking.
    pub fn close(&self) {
        self.tx.store(None);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// The events matching `q`, oldest first. Blocking (reads files).
    pub fn search(&self, q: &Query) -> io::Result<Found> {
        search::search(&self.shared.dir, self.shared.open(), q)
    }

    /// Messages received for each address of `addrs` between `since_ms` and `until_ms`
    /// (same order). Blocking.
    pub fn received_counts(
        &self,
        addrs: &[String],
        since_ms: u64,
        until_ms: u64,
    ) -> io::Result<Vec<u64>> {
        search::received_counts(
            &self.shared.dir,
            self.shared.open(),
            addrs,
            since_ms,
            until_ms,
        )
    }
}

#[cfg(test)]
mod tests;

impl Drop for Tracking {
    fn drop(&mut self) {
        self.tx.store(None);
    }
}
