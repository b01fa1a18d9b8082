//! The durable queue on disk: an append-only log of segment files.
//!
//! Layout under `spool.dir`:
//! - `segments/NNNNNNNNNN.seg`: the log. A new message is one record (envelope and message
//!   bytes); each delivery attempt or admin action that changes a message's state appends a
//!   small state record; a finished message gets a `Done` record. See [`segment`] for the
//!   framing (lengths, and checksums keyed by a random salt per segment, so message bytes
//!   that copy records are never taken for records).
//! - `failed/ID.msg` and `failed/ID.state`: messages with failed recipients that could not be
//!   bounced, kept for the admin.
//! - `damaged/NNNNNNNNNN.seg.OFFSET.{corrupt,torn}`: bytes recovery found damaged in a
//!   segment and moved out of the log (see [`tail`]), for the admin; nothing reads them again.
//!
//! Writes go through one commit thread ([`commit`]) that makes every record waiting at that
//! moment durable with one `fdatasync` (group commit): a caller hears back only after the sync
//! that covers its records, so the session sends `250` only then (DESIGN invariant 1). There
//! is no per-message file create, rename or unlink. A segment is deleted once no queued
//! message needs a record in it ([`reclaim`]); one whose unlink fails keeps what it pins and
//! is tried again later. At start the log is replayed ([`recover`]): a torn tail (damage in
//! the last, unsynced commit turn) is cut off, damage in a synced turn is corruption, skipped
//! with the records after it kept, and either's bytes are moved to `damaged/` first (when
//! that copy fails, a torn tail is cut anyway and corruption left in place, skipped for
//! that start); a spool of the former one-file-per-message layout is imported.

// The blocking boundary of the spool: the commit thread, recovery at start-up and the
// files it keeps aside, and `files` (reads, `failed/`), which async code reaches only
// through the blocking pool. Everything else here must not block.
#[allow(clippy::disallowed_methods)] // The commit thread: never an async worker.
mod commit;
mod faults;
mod files;
#[allow(clippy::disallowed_methods)]
// Blocking boundary: recovery at start-up, the commit thread, the change log behind the directory writer.
pub mod framed;
mod gathered;
mod inject;
mod reclaim;
mod records;
#[allow(clippy::disallowed_methods)] // Replay at start-up (`Spool::open`), and `inspect` offline.
mod recover;
pub mod replica;
#[allow(clippy::disallowed_methods)] // The indexer thread (beside the commit thread) and start-up.
mod segindex;
pub mod segment;
#[allow(clippy::disallowed_methods)] // Recovery at start-up: damaged bytes moved aside.
mod tail;
#[allow(clippy::disallowed_methods)] // The commit thread and recovery: void markers.
mod void;

pub use files::SpoolFiles;
pub use gathered::QueuedSet;
pub use records::{DeliveryState, Envelope, RcptState, RcptStatus, TakenFrom};
pub use recover::{inspect, Queued};
pub use tail::Damaged;

use crate::types::QueueId;
use commit::{Job, Keep, Rec};
use reclaim::Reclaim;
use segment::{Kind, HEADER_LEN};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Spool failures.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// File system error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: String,
        /// Error.
        source: io::Error,
    },
    /// A spool file is not in our format.
    #[error("{path}: corrupt spool file: {reason}")]
    Corrupt {
        /// Path (and offset).
        path: String,
        /// Reason.
        reason: String,
    },
    /// No redundant copy could be made and the message is refused for it
    /// (`shadow.on_failure = "defer"`); its local record is ended.
    #[error("no redundant copy of the message could be stored: {0}")]
    NoCopy(String),
    /// The commit thread is gone (the spool is shutting down).
    #[error("the spool's commit thread has stopped")]
    Stopped,
    /// The blocking task that did the file work failed.
    #[error("spool task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl SpoolError {
    /// True when the disk is full (ENOSPC or quota).
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where a record is: segment, offset of its header, length of its metadata. 16 bytes, so a
/// queued message's index entry stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Segment number.
    pub seg: u32,
    /// Length of the record's metadata part.
    pub meta_len: u32,
    /// Offset of the record header in the segment.
    pub off: u64,
}

/// The folders [`Spool::open`] keeps under the spool directory (the log, messages kept for
/// the admin, damaged bytes moved out of the log), each of which must be writable.
pub const FOLDERS: [&str; 3] = ["segments", "failed", "damaged"];

/// The spool, as async code uses it: appends go to the commit thread ([`commit`]), reads
/// and `failed/` run on tokio's blocking pool ([`SpoolFiles`], the one place of the
/// spool's blocking file work after start-up); nothing here blocks an async worker.
/// Opening it ([`Spool::open`]) is blocking, at start-up.
pub struct Spool {
    files: Arc<SpoolFiles>,
    jobs: mpsc::Sender<Job>,
    reclaim: Arc<Mutex<Reclaim>>,
    stats: Arc<commit::Stats>,
    /// Appends sent to the commit stage and not yet answered.
    pending: std::sync::atomic::AtomicUsize,
    /// Where redundant copies are kept, when there is such a place (`[shadow]`).
    replica: std::sync::OnceLock<Arc<dyn replica::Replica>>,
    /// The commit thread: joined when the spool is dropped, so whatever was sent to it
    /// (appends, deletions) is done before the spool can be opened again.
    thread: Option<std::thread::JoinHandle<()>>,
    /// The free space last read, and when (see [`Spool::available_space`]).
    free: Mutex<Option<(std::time::Instant, u64)>>,
}

/// Above this much free space, [`Spool::available_space`] answers from a reading at most
/// [`FREE_FRESH`] old: no 100 ms of writes comes near it.
const FREE_PLENTY: u64 = 8 << 30;
/// How long a reading of plenty of free space is used.
const FREE_FRESH: std::time::Duration = std::time::Duration::from_millis(100);

impl Drop for Spool {
    fn drop(&mut self) {
        // Closing the channel ends the commit thread once it has done what it was sent.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Test hook: failures (EIO) and stalls the commit stage makes up ([`Spool::inject_faults`]);
/// each count is used up by one turn (or one cut).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectedFaults {
    /// Turns whose write stops half-way (a short write), then fails.
    pub short_writes: u32,
    /// Turns whose records are written whole, then whose sync fails.
    pub syncs: u32,
    /// Cuts of a failed turn off the segment that fail.
    pub cuts: u32,
    /// Turns holding an end (`Done`) record whose sync fails.
    pub end_syncs: u32,
    /// Turns whose sync takes `stall` longer (a disk that stalls), then succeeds.
    pub stalls: u32,
    /// How long a stalled turn waits.
    pub stall: std::time::Duration,
}

/// A spool just opened, with the messages it holds.
pub struct Opened {
    /// The spool.
    pub spool: Spool,
    /// Every queued message, oldest first.
    pub queued: QueuedSet,
    /// Damage recovery found in the log: kept in `damaged/`, then skipped (corruption) or
    /// cut off (a torn tail). Already logged and counted.
    pub damaged: Vec<Damaged>,
    /// The spool had no segment file before this open: it is new, or its disk was lost.
    pub fresh: bool,
}

/// The state record's metadata.
#[derive(serde::Serialize)]
struct StateMeta<'a> {
    id: &'a QueueId,
    state: &'a DeliveryState,
}

#[derive(serde::Deserialize)]
struct StateMetaOwned {
    state: DeliveryState,
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, SpoolError> {
    serde_json::to_vec(v).map_err(|e| SpoolError::Corrupt {
        path: "(record being written)".into(),
        reason: e.to_string(),
    })
}

pub(crate) fn message_rec(env: &Envelope, body: Arc<Vec<u8>>) -> Result<Rec, SpoolError> {
    if u32::try_from(body.len()).is_err() {
        return Err(SpoolError::Corrupt {
            path: "(record being written)".into(),
            reason: format!(
                "a message of {} bytes is too large for a spool record",
                body.len()
            ),
        });
    }
    Ok(Rec {
        kind: Kind::Message,
        meta: json(env)?,
        body: Some(body),
        keep: Keep::Ref,
    })
}

pub(crate) fn state_rec(id: &QueueId, state: &DeliveryState) -> Result<Rec, SpoolError> {
    Ok(Rec {
        kind: Kind::State,
        meta: json(&StateMeta { id, state })?,
        body: None,
        keep: Keep::Ref,
    })
}

impl Spool {
    /// Opens (and creates) the spool under `dir`: replays the log, repairs the segment being
    /// written (a torn tail cut, corruption skipped, damaged bytes kept aside), imports
    /// a spool of the former layout, and starts the commit thread. Blocking.
    pub fn open(dir: &Path) -> Result<Opened, SpoolError> {
        Spool::open_sized(dir, commit::SEGMENT_SIZE)
    }

    fn open_sized(dir: &Path, segment_size: u64) -> Result<Opened, SpoolError> {
        Spool::open_tuned(dir, segment_size, commit::Pace::default())
    }

    /// [`Spool::open`] with a segment size and waits for company of its own.
    fn open_tuned(dir: &Path, segment_size: u64, pace: commit::Pace) -> Result<Opened, SpoolError> {
        let segments = dir.join("segments");
        // A spool with no segment yet: new (or its disk was lost).
        #[allow(clippy::disallowed_methods)] // Start-up, blocking by contract.
        let fresh = std::fs::read_dir(&segments).map_or(true, |mut d| d.next().is_none());
        let failed = dir.join("failed");
        for d in [&segments, &failed, &dir.join("damaged")] {
            crate::fsmode::create_dir_all(d).map_err(io_err(d))?;
        }
        let replayed = recover::replay(dir, &segments)?;
        let reclaim = Arc::new(Mutex::new(replayed.reclaim));
        let (tx, rx) = mpsc::channel();
        let free = lock(&reclaim).all_free();
        let stats = Arc::new(commit::Stats::default());
        let (r2, s2) = (reclaim.clone(), stats.clone());
        let files = Arc::new(SpoolFiles::new(dir));
        let open = files.reader().open_segments();
        let thread = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || commit::run(replayed.head, rx, r2, s2, open, segment_size, pace))
            .map_err(io_err(&segments))?;
        let spool = Spool {
            files,
            jobs: tx,
            reclaim,
            stats,
            pending: Default::default(),
            replica: Default::default(),
            thread: Some(thread),
            free: Mutex::new(None),
        };
        spool.delete(free);
        Ok(Opened {
            spool,
            queued: replayed.queued,
            damaged: replayed.damaged,
            fresh,
        })
    }

    /// Free bytes for us on the spool's file system. Asked at every `MAIL`: while more than
    /// 8 GiB are free the kernel is asked at most every 100 ms; below that, every time (a
    /// disk filling up is seen at once).
    pub fn available_space(&self) -> io::Result<u64> {
        let now = std::time::Instant::now();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, bytes)) = *free {
            if bytes > FREE_PLENTY && now.duration_since(at) < FREE_FRESH {
                return Ok(bytes);
            }
        }
        let bytes = fs4::available_space(&self.files.reader().segments)?;
        *free = Some((now, bytes));
        Ok(bytes)
    }

    /// Segment files on disk (for metrics and tests).
    pub fn segment_count(&self) -> usize {
        lock(&self.reclaim).segments()
    }

    /// Syncs made by the commit stage so far, and the records they covered: their ratio is
    /// how many records share one `fdatasync`.
    pub fn commit_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.stats.commits.load(Relaxed),
            self.stats.records.load(Relaxed),
        )
    }

    /// Test hook: the commit stage makes up failures (EIO) or stalls for its next turns, as
    /// `faults` says. For tests of the rare paths only.
    #[doc(hidden)]
    pub fn inject_faults(&self, faults: InjectedFaults) {
        use std::sync::atomic::Ordering::SeqCst;
        let f = &self.stats.faults;
        f.short_writes.store(faults.short_writes, SeqCst);
        f.syncs.store(faults.syncs, SeqCst);
        f.cuts.store(faults.cuts, SeqCst);
        f.end_syncs.store(faults.end_syncs, SeqCst);
        f.stall_ms.store(faults.stall.as_millis() as u64, SeqCst);
        f.stalls.store(faults.stalls, SeqCst);
    }

    /// Test only: requests sent to the commit stage and not yet answered or taken.
    #[cfg(test)]
    fn jobs_waiting_for_test(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Appends `recs` durably. `urgent`: a client waits for them (see [`commit::LINGER`]).
    async fn append(&self, recs: Vec<Rec>, urgent: bool) -> Result<Vec<Loc>, SpoolError> {
        use std::sync::atomic::Ordering::SeqCst;
        let (reply, rx) = oneshot::channel();
        self.pending.fetch_add(1, SeqCst);
        let res = match self.jobs.send(Job::Append {
            recs,
            reply,
            urgent,
        }) {
            Ok(()) => rx.await.map_err(|_| SpoolError::Stopped),
            Err(_) => Err(SpoolError::Stopped),
        };
        self.pending.fetch_sub(1, SeqCst);
        res?
    }

    /// Records at `locs` are no longer needed (replaced or finished, by records already
    /// durable): segments nothing needs any more are deleted.
    fn release(&self, locs: impl IntoIterator<Item = Loc>) {
        let free: Vec<u32> = {
            let mut r = lock(&self.reclaim);
            locs.into_iter().filter_map(|l| r.drop_ref(l.seg)).collect()
        };
        self.delete(free);
    }

    fn delete(&self, segs: Vec<u32>) {
        if !segs.is_empty() {
            let _ = self.jobs.send(Job::Delete(segs));
        }
    }

    /// Writes a new message received from a client durably, and its redundant copy when the
    /// spool has a replica (in parallel: this returns when both are stored). When the copy
    /// fails and the replica says to refuse the message, the local record is ended again
    /// and [`SpoolError::NoCopy`] returned. When this returns `Ok`, the message survives a
    /// crash (and, with a replica, the loss of this node).
    pub async fn store(&self, env: &Envelope, body: Arc<Vec<u8>>) -> Result<Loc, SpoolError> {
        self.store_copied(env, body, replica::Need::AsConfigured)
            .await
    }

    /// Records a message's delivery state durably; `prev` is the state record it replaces.
    pub async fn save_state(
        &self,
        id: &QueueId,
        state: &DeliveryState,
        prev: Option<Loc>,
    ) -> Result<Loc, SpoolError> {
        let loc = self.append(vec![state_rec(id, state)?], false).await?[0];
        self.release(prev);
        self.progress(id, state);
        Ok(loc)
    }

    /// True when the message at `msg` sits in a mostly dead segment and should be
    /// [`relocate`](Spool::relocate)d so that segment can be deleted.
    pub fn should_relocate(&self, msg: Loc) -> bool {
        lock(&self.reclaim).sparse(msg.seg)
    }

    /// Compaction of one message: appends a copy of its message record and its state (in
    /// one commit), which replace the records at `msg` and `prev`. Returns the new positions
    /// (message, state).
    pub async fn relocate(
        &self,
        env: &Envelope,
        body: Arc<Vec<u8>>,
        state: &DeliveryState,
        msg: Loc,
        prev: Option<Loc>,
    ) -> Result<(Loc, Loc), SpoolError> {
        let mut copy = message_rec(env, body)?;
        copy.keep = Keep::Copies(msg.seg);
        let locs = self
            .append(vec![copy, state_rec(&env.id, state)?], false)
            .await?;
        self.release(std::iter::once(msg).chain(prev));
        self.progress(&env.id, state);
        Ok((locs[0], locs[1]))
    }

    /// Records that a message is finished (delivered, bounced, deleted or kept in
    /// `failed/`); its records are then no longer needed.
    pub async fn finish(
        &self,
        id: &QueueId,
        msg: Loc,
        state: Option<Loc>,
    ) -> Result<(), SpoolError> {
        self.finish_as(id, msg, state, None, false).await
    }

    /// [`Spool::finish`] of a message whose recipients all have their outcome, `last`: the
    /// replica may keep what was delivered (`shadow.keep_delivered`).
    pub async fn finish_delivered(
        &self,
        id: &QueueId,
        msg: Loc,
        state: Option<Loc>,
        last: &DeliveryState,
    ) -> Result<(), SpoolError> {
        self.finish_as(id, msg, state, Some(last), false).await
    }

    /// Ends a message; `urgent` when a client waits for it (see [`Spool::append`]).
    async fn finish_as(
        &self,
        id: &QueueId,
        msg: Loc,
        state: Option<Loc>,
        last: Option<&DeliveryState>,
        urgent: bool,
    ) -> Result<(), SpoolError> {
        self.append(
            vec![Rec {
                kind: Kind::Done,
                meta: json(id)?,
                body: None,
                keep: Keep::Ends(msg.seg),
            }],
            urgent,
        )
        .await?;
        self.release(std::iter::once(msg).chain(state));
        if let Some(r) = self.replica.get() {
            r.forget(id, last);
        }
        Ok(())
    }

    /// The spool's blocking file work, for code that already runs on a blocking thread (a
    /// `spawn_blocking` closure, the queue's listings, tests). Async code uses the methods
    /// below, which run it on the blocking pool.
    pub fn files(&self) -> &Arc<SpoolFiles> {
        &self.files
    }

    /// Runs `work` on the spool's files on tokio's blocking pool.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&SpoolFiles) -> Result<T, SpoolError> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || work(&files)).await?
    }

    /// Reads a queued message's envelope (a few hundred bytes).
    pub async fn read_envelope(&self, msg: Loc) -> Result<Envelope, SpoolError> {
        self.blocking(move |f| f.read_envelope(msg)).await
    }

    /// Reads a queued message's bytes, checked against their checksum.
    pub async fn read_message(&self, msg: Loc) -> Result<Vec<u8>, SpoolError> {
        self.blocking(move |f| f.read_message(msg)).await
    }

    /// Reads a queued message's envelope and latest state (a fresh state when it has no
    /// state record yet), checked to belong together.
    pub async fn read_queued(
        &self,
        msg: Loc,
        state: Option<Loc>,
    ) -> Result<(Envelope, DeliveryState), SpoolError> {
        self.blocking(move |f| f.read_queued(msg, state)).await
    }
}

/// Reads records by position; works on the spool of a running or stopped relay (with the
/// positions [`inspect`] gives).
#[derive(Debug, Clone)]
pub struct Reader {
    segments: PathBuf,
    open: Arc<OpenSegments>,
}

/// Segment files kept open for reading, with their salts: a read costs its `pread`s, not an
/// `open`, a read of the file header and a `close` (a relay under load reads back every
/// message that waited for an attempt slot). At most [`OpenSegments::MAX`]; a deleted
/// segment is dropped from it by the commit stage, so its disk space is freed.
#[derive(Debug, Default)]
pub struct OpenSegments(Mutex<HashMap<u32, Arc<(File, segment::Salt)>>>);

impl OpenSegments {
    /// Most segment files kept open.
    const MAX: usize = 64;

    /// Segment `n` at `path`, opened and its file header read when it is not open yet.
    #[allow(clippy::disallowed_methods)] // Blocking boundary: run through `SpoolFiles` only.
    fn get(&self, n: u32, path: &Path) -> Result<Arc<(File, segment::Salt)>, SpoolError> {
        if let Some(f) = self.lock().get(&n) {
            return Ok(f.clone());
        }
        let f = File::open(path).map_err(io_err(path))?;
        let mut fh = [0u8; segment::FILE_HEADER_LEN];
        let got = framed::read_at_most(&f, &mut fh, 0).map_err(io_err(path))?;
        let segment::FileHeader::Segment(salt) = segment::parse_file_header(&fh[..got]) else {
            return Err(SpoolError::Corrupt {
                path: format!("{} at offset 0", path.display()),
                reason: "not a coexist spool segment".into(),
            });
        };
        let open = Arc::new((f, salt));
        let mut map = self.lock();
        if map.len() >= Self::MAX {
            // The oldest segment goes first: the likeliest to be spent soon.
            if let Some(&oldest) = map.keys().min() {
                map.remove(&oldest);
            }
        }
        map.insert(n, open.clone());
        // Deleted meanwhile (the commit stage unlinks, then forgets): not kept open.
        use std::os::unix::fs::MetadataExt;
        if open.0.metadata().map_or(true, |m| m.nlink() == 0) {
            map.remove(&n);
        }
        Ok(open)
    }

    /// Segment `n` was deleted: its file is closed here (readers holding it finish first).
    pub(super) fn forget(&self, n: u32) {
        self.lock().remove(&n);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<(File, segment::Salt)>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reader {
    /// A reader of the spool under `dir`.
    pub fn new(dir: &Path) -> Reader {
        Reader {
            segments: dir.join("segments"),
            open: Arc::default(),
        }
    }

    /// The segment files this reader keeps open.
    pub(super) fn open_segments(&self) -> Arc<OpenSegments> {
        self.open.clone()
    }

    fn read(&self, loc: Loc, body: bool) -> Result<(Vec<u8>, Vec<u8>), SpoolError> {
        let res = self.read_record(loc, body);
        if let Err(SpoolError::Corrupt { .. }) = &res {
            // Damage the start did not see (the segment was read through its index): the
            // next start reads the segment whole and moves the damage aside.
            segindex::remove(&self.segments, loc.seg);
        }
        res
    }

    fn read_record(&self, loc: Loc, body: bool) -> Result<(Vec<u8>, Vec<u8>), SpoolError> {
        let path = self.segments.join(segment::file_name(loc.seg));
        let corrupt = |reason: &str| SpoolError::Corrupt {
            path: format!("{} at offset {}", path.display(), loc.off),
            reason: reason.into(),
        };
        let open = self.open.get(loc.seg, &path)?;
        let (f, salt) = (&open.0, open.1);
        let mut head = vec![0u8; HEADER_LEN + loc.meta_len as usize];
        f.read_exact_at(&mut head, loc.off).map_err(io_err(&path))?;
        let hb: [u8; HEADER_LEN] = head[..HEADER_LEN]
            .try_into()
            .map_err(|_| corrupt("short"))?;
        let h = segment::decode_header(&salt, &hb).ok_or_else(|| corrupt("not a record header"))?;
        let meta = head.split_off(HEADER_LEN);
        if h.meta_len != loc.meta_len || !h.meta_ok(&meta) {
            return Err(corrupt("record checksum mismatch"));
        }
        let mut b = Vec::new();
        if body {
            b.resize(h.body_len as usize, 0);
            f.read_exact_at(&mut b, loc.off + (HEADER_LEN + meta.len()) as u64)
                .map_err(io_err(&path))?;
            if !h.body_ok(&b) {
                return Err(corrupt("message checksum mismatch"));
            }
        }
        Ok((meta, b))
    }

    /// Reads a queued message's envelope (blocking; a few hundred bytes).
    pub fn read_envelope(&self, msg: Loc) -> Result<Envelope, SpoolError> {
        let (meta, _) = self.read(msg, false)?;
        serde_json::from_slice(&meta).map_err(|e| SpoolError::Corrupt {
            path: format!("segment {} at offset {}", msg.seg, msg.off),
            reason: e.to_string(),
        })
    }

    /// Reads a message's state record (blocking).
    pub fn read_state(&self, state: Loc) -> Result<DeliveryState, SpoolError> {
        let (meta, _) = self.read(state, false)?;
        serde_json::from_slice::<StateMetaOwned>(&meta)
            .map(|s| s.state)
            .map_err(|e| SpoolError::Corrupt {
                path: format!("segment {} at offset {}", state.seg, state.off),
                reason: e.to_string(),
            })
    }

    /// Reads a queued message's bytes, checked against their checksum (blocking).
    pub fn read_message(&self, msg: Loc) -> Result<Vec<u8>, SpoolError> {
        Ok(self.read(msg, true)?.1)
    }
}

fn lock(r: &Mutex<Reclaim>) -> std::sync::MutexGuard<'_, Reclaim> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod commit_tests;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tail_tests;
#[cfg(test)]
mod tests;
