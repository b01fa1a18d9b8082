//! The commit stage: one thread owns the head segment and appends records for everybody.
//!
//! Each turn it takes every request waiting at that moment, writes their records one after
//! another, then a `Commit` record marking the turn's end, and makes them durable with one
//! `fdatasync` (group commit); only then does any of the callers hear back (and a session
//! send its `250`). A failed write or sync is cut off the file again and reported to every
//! caller of that turn, whose records are then not in the spool. When the cut itself fails,
//! an empty marker file `NNNNNNNNNN.seg.void-OFFSET` records that the segment's bytes from
//! `OFFSET` on are void before the callers hear back, nothing more is written to that
//! segment (a new one is started), and at the next start the replay ignores (and cuts, if it
//! can) those bytes ([`super::recover`]): neither a torn record stops the start nor do whole
//! records of a refused message come back.
//!
//! Before anyone hears back, what keeps each new record's segment (a reference, or a pin)
//! is recorded under the reclaim lock, so a rotation or deletion can never take a segment
//! holding a record its caller is about to rely on. When the head segment is full a new one
//! is started: written under a temporary name, synced, renamed, folder synced. A failed
//! creation leaves no file under the segment's name (the temporary file is removed), so the
//! next turn simply tries again while the current segment keeps taking records.
//!
//! Deleting segments nothing needs any more is done here too, so all file changes of the
//! spool happen on this thread. Only a segment whose unlink succeeded (and whose folder was
//! synced) releases the pins it held; one that could not be deleted keeps them, and its
//! deletion is retried with backoff (1 s doubling to 5 min) until it succeeds.
//!
//! Written by hand rather than with an embedded store: the spool needs exactly this append
//! path (records of a message written once, read back by position, whole segments dropped
//! when their messages are done); the README compares it with fjall on this machine.

use super::faults::{made_up, Faults};
use super::inject::{self, Point};
use super::reclaim::Reclaim;
use super::segindex;
use super::segment::{self, Kind, HEADER_LEN};
use super::void::void_marker;
use super::{io_err, Loc, SpoolError};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, warn};

/// A head segment at least this long is closed and a new one started.
pub const SEGMENT_SIZE: u64 = 64 << 20;
/// One turn writes at most about this much before syncing (bounds a turn's latency).
const MAX_TURN_BYTES: u64 = 32 << 20;
/// Bodies longer than this are written straight from the caller's buffer.
const DIRECT_WRITE: usize = 64 << 10;
/// Longest a turn of only background records (states, `Done`) waits for more, and only
/// while new messages are coming in (a turn held one within the last ten lingers): then the
/// next one usually arrives well within it and one `fdatasync` covers both, which nearly
/// halves the syncs per relayed message (every message ends with a `Done`). A queue
/// draining with nothing arriving never waits. Every record is still durable before its
/// caller hears back.
pub const LINGER: Duration = Duration::from_millis(1);
/// How long a turn holding a new message waits for more when messages come fast and
/// together: the previous turn with new messages began less than five of these ago and held
/// at least two. With clients that wait for each reply, this took the syncs per message
/// from 0.32 to 0.28 (`smtp-source` load of `bench/vs-postfix.sh`) for at most this much
/// more latency before `250`; a client alone, one message at a time, never waits.
pub const GATHER: Duration = Duration::from_micros(200);

/// How long the commit stage lets records wait for others to share their sync.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// [`LINGER`].
    pub linger: Duration,
    /// [`GATHER`].
    pub gather: Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            linger: LINGER,
            gather: GATHER,
        }
    }
}
/// First wait before a segment that could not be deleted is tried again (doubles each time).
const DELETE_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between tries to delete a segment.
const DELETE_RETRY_MAX: Duration = Duration::from_secs(300);

/// Counters of the commit stage.
#[derive(Debug, Default)]
pub struct Stats {
    /// Syncs made (one per turn).
    pub commits: AtomicU64,
    /// Records those syncs covered.
    pub records: AtomicU64,
    /// Failures to make up (test hook).
    pub faults: Faults,
}

/// One record to append.
pub struct Rec {
    /// Kind.
    pub kind: Kind,
    /// Metadata (JSON).
    pub meta: Vec<u8>,
    /// Message bytes (messages only).
    pub body: Option<Arc<Vec<u8>>>,
    /// What keeps the record's segment: recorded under the reclaim lock before the caller
    /// hears back, so no rotation or deletion can slip in between.
    pub keep: Keep,
}

/// Why a record's segment must stay.
#[derive(Debug, Clone, Copy)]
pub enum Keep {
    /// A record of a queued message (a message or its latest state): one reference.
    Ref,
    /// A `Done` record ending a message whose message record is in this segment.
    Ends(u32),
    /// A message record copied forward from this segment (a reference, and the copy must
    /// outlive the original).
    Copies(u32),
}

impl Rec {
    fn len(&self) -> u64 {
        (HEADER_LEN + self.meta.len() + self.body.as_ref().map_or(0, |b| b.len())) as u64
    }
}

/// Work for the commit thread.
pub enum Job {
    /// Append records durably; the reply carries where each one is.
    Append {
        /// Records, written in this order.
        recs: Vec<Rec>,
        /// Where the positions (or the error) go.
        reply: ReplyTo,
        /// A client waits for these records (a new message, before its `250`). Only such
        /// turns may wait [`GATHER`] for more new messages; records nobody outside waits
        /// for (states, `Done`, copies, messages the relay made) may wait up to [`LINGER`]
        /// for a new message to share its sync.
        urgent: bool,
    },
    /// Delete these segments (nothing needs them).
    Delete(Vec<u32>),
    /// Test only: stop until the sender side is dropped, so requests pile up.
    #[cfg(test)]
    Pause(std::sync::mpsc::Receiver<()>),
}

/// The head segment being written.
pub struct Head {
    /// Segments folder.
    pub dir: PathBuf,
    /// Segment number.
    pub n: u32,
    /// The open file, positioned at `len`.
    pub file: File,
    /// Bytes written and synced.
    pub len: u64,
    /// A failed write could not be cut off: nothing more goes into this segment.
    pub broken: bool,
    /// The key of this segment's checksums (random, in its file header).
    pub salt: segment::Salt,
}

impl Head {
    /// Creates segment `n` (with its file header and a new random salt): written and synced under a temporary
    /// name, renamed, and the folder synced. On failure no file is left under either name,
    /// so creating `n` can simply be tried again. A file already under the name is replaced
    /// only when it holds no record (an empty segment an older version left behind).
    pub fn create(dir: &Path, n: u32) -> Result<Head, SpoolError> {
        let path = dir.join(segment::file_name(n));
        let tmp = dir.join(segment::temp_name(n));
        match fs::metadata(&path) {
            Ok(m) if m.len() > segment::FILE_HEADER_LEN as u64 => {
                return Err(io_err(&path)(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a segment under this name already holds records",
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let salt = segment::Salt::random().map_err(io_err(&path))?;
        let make = || -> io::Result<File> {
            let mut f = crate::fsmode::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&salt.file_header())?;
            inject::check(Point::NewSegmentSync, &tmp)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()?;
            Ok(f)
        };
        let file = make().map_err(|e| {
            // Nothing was written to it: no file under the temporary name stays behind
            // (after a failed folder sync, the renamed file holds only its header and is
            // replaced at the next try).
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })?;
        Ok(Head {
            dir: dir.to_path_buf(),
            n,
            file,
            len: salt.data_start(),
            broken: false,
            salt,
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(segment::file_name(self.n))
    }

    /// Appends `recs` (not yet synced) at the end of what is written, followed by a
    /// `Commit` record when `end_turn` (the last write before a sync); returns their
    /// positions. Writes are positioned, so the positions hold whatever a failed write left.
    pub fn write(
        &mut self,
        recs: &[&Rec],
        end_turn: bool,
        buf: &mut Vec<u8>,
    ) -> io::Result<Vec<Loc>> {
        use std::os::unix::fs::FileExt;
        let mut locs = Vec::with_capacity(recs.len());
        let mut off = self.len;
        let mut at = self.len;
        buf.clear();
        for r in recs {
            let body = r.body.as_deref().map_or(&[][..], |b| &b[..]);
            buf.extend_from_slice(&segment::encode_header(&self.salt, r.kind, &r.meta, body));
            buf.extend_from_slice(&r.meta);
            if body.len() > DIRECT_WRITE {
                self.file.write_all_at(buf, at)?;
                at += buf.len() as u64;
                buf.clear();
                self.file.write_all_at(body, at)?;
                at += body.len() as u64;
            } else {
                buf.extend_from_slice(body);
            }
            locs.push(Loc {
                seg: self.n,
                meta_len: r.meta.len() as u32,
                off,
            });
            off += r.len();
        }
        if end_turn {
            buf.extend_from_slice(&segment::encode_header(&self.salt, Kind::Commit, &[], &[]));
            off += HEADER_LEN as u64;
        }
        self.file.write_all_at(buf, at)?;
        self.len = off;
        Ok(locs)
    }

    /// Makes everything written durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts the file back to `len` (after a failed write or sync).
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.len = len;
        self.file.set_len(len)?;
        self.file.sync_data()
    }
}

/// What one turn gathered.
#[derive(Default)]
struct Turn {
    appends: Waiting,
    deletes: Vec<u32>,
    bytes: u64,
    /// Some client waits for a record of this turn.
    urgent: bool,
    /// Jobs of this turn a client waits for.
    news: usize,
}

impl Turn {
    fn take(&mut self, job: Job) {
        match job {
            Job::Append {
                recs,
                reply,
                urgent,
            } => {
                self.bytes += recs.iter().map(Rec::len).sum::<u64>();
                self.urgent |= urgent;
                self.news += usize::from(urgent);
                self.appends.push((recs, reply));
            }
            Job::Delete(segs) => self.deletes.extend(segs),
            #[cfg(test)]
            Job::Pause(gate) => {
                let _ = gate.recv();
            }
        }
    }

    /// Takes every job waiting now, while the turn is under [`MAX_TURN_BYTES`].
    fn drain(&mut self, jobs: &Receiver<Job>) {
        while self.bytes < MAX_TURN_BYTES {
            match jobs.try_recv() {
                Ok(job) => self.take(job),
                Err(_) => break,
            }
        }
    }

    /// Takes jobs as they come for `wait` (while the turn is under [`MAX_TURN_BYTES`]);
    /// with `until_urgent`, only until one a client waits for is taken.
    fn wait(&mut self, jobs: &Receiver<Job>, wait: Duration, until_urgent: bool) {
        let until = Instant::now() + wait;
        while !(until_urgent && self.urgent) && self.bytes < MAX_TURN_BYTES {
            match jobs.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(job) => self.take(job),
                Err(_) => break,
            }
        }
    }
}

/// Runs the commit stage until every sender is gone. Turns wait for more records as `pace`
/// says ([`LINGER`], [`GATHER`]).
pub fn run(
    mut head: Head,
    jobs: Receiver<Job>,
    reclaim: Arc<Mutex<Reclaim>>,
    stats: Arc<Stats>,
    open: Arc<super::OpenSegments>,
    segment_size: u64,
    pace: Pace,
) {
    let mut buf = Vec::with_capacity(256 << 10);
    // Sealed segments go to the indexer, which writes their indexes off this thread.
    let (sealed, sealed_rx) = std::sync::mpsc::channel();
    let dir = head.dir.clone();
    let indexer = std::thread::Builder::new()
        .name("spool-index".into())
        .spawn(move || segindex::run(dir, sealed_rx))
        .map_err(|e| warn!(error = %e, "cannot start the segment indexer; sealed segments are read whole at start-up"))
        .ok();
    // Segments whose deletion failed, and when to try again.
    let mut undeleted: Vec<u32> = Vec::new();
    let mut retry = DELETE_RETRY_MIN;
    let mut retry_at: Option<Instant> = None;
    // When the last turn holding new messages began, and how many it held.
    let mut last_urgent: Option<Instant> = None;
    let mut last_news = 0;
    loop {
        let first = match retry_at {
            None => match jobs.recv() {
                Ok(j) => Some(j),
                Err(_) => break,
            },
            Some(at) => match jobs.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut turn = Turn::default();
        if let Some(job) = first {
            turn.take(job);
            turn.drain(&jobs);
        }
        let began = Instant::now();
        let since = last_urgent.map(|t: Instant| began.duration_since(t));
        if turn.urgent && last_news >= 2 && since.is_some_and(|d| d < pace.gather * 5) {
            // New messages coming fast: let the next ones in on this sync (see GATHER).
            turn.wait(&jobs, pace.gather, false);
        } else if !turn.urgent
            && !turn.appends.is_empty()
            && since.is_some_and(|d| d < pace.linger * 10)
        {
            // Only background records, while new messages are coming in: wait a moment
            // for the next one (see LINGER), then take what came with it.
            turn.wait(&jobs, pace.linger, true);
            turn.drain(&jobs);
        }
        if turn.urgent {
            last_urgent = Some(began);
            last_news = turn.news;
        }
        let Turn {
            appends,
            mut deletes,
            ..
        } = turn;
        if !appends.is_empty() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.records.fetch_add(
                appends.iter().map(|a| a.0.len() as u64).sum(),
                Ordering::Relaxed,
            );
            if head.broken {
                // A failed write that could not be cut off, and no new segment yet.
                if let Ok(h) = Head::create(&head.dir, head.n + 1) {
                    head = h;
                    deletes.extend(lock(&reclaim).rotated(head.n));
                }
            }
            commit_turn(&mut head, appends, &mut buf, &reclaim, &stats.faults);
            if head.len >= segment_size || head.broken {
                let (old_n, void) = (head.n, head.broken);
                match Head::create(&head.dir, head.n + 1) {
                    Ok(h) => {
                        head = h;
                        let old = lock(&reclaim).rotated(head.n);
                        // (A sealed segment already spent is deleted now: no index.)
                        if !void && old != Some(old_n) {
                            let _ = sealed.send(old_n);
                        }
                        deletes.extend(old);
                    }
                    Err(e) => {
                        error!(error = %e, "cannot start a new spool segment; the current one keeps taking records and the next commit tries again")
                    }
                }
            }
        }
        let due = retry_at.is_some_and(|at| at <= Instant::now());
        if due {
            deletes.append(&mut undeleted);
        }
        let failed = delete(&head.dir, deletes, &reclaim, &open);
        if due {
            retry_at = None;
        }
        undeleted.extend(failed);
        undeleted.sort_unstable();
        undeleted.dedup();
        if undeleted.is_empty() {
            retry = DELETE_RETRY_MIN;
        } else if retry_at.is_none() {
            retry_at = Some(Instant::now() + retry);
            retry = (retry * 2).min(DELETE_RETRY_MAX);
        }
    }
    drop(sealed);
    if let Some(t) = indexer {
        let _ = t.join();
    }
}

fn lock(r: &Mutex<Reclaim>) -> std::sync::MutexGuard<'_, Reclaim> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the positions of one request's records (or the error) go.
type ReplyTo = oneshot::Sender<Result<Vec<Loc>, SpoolError>>;

/// The append requests of one turn.
type Waiting = Vec<(Vec<Rec>, ReplyTo)>;

/// Writes one turn's records, syncs once, answers every caller.
fn commit_turn(
    head: &mut Head,
    appends: Waiting,
    buf: &mut Vec<u8>,
    reclaim: &Mutex<Reclaim>,
    faults: &Faults,
) {
    if head.broken {
        // Its end is void (see the marker): nothing more goes into it.
        let path = head.path();
        for (_, reply) in appends {
            let err = io::Error::other("the head segment has a failed write that could not be cut off, and no new segment could be started");
            let _ = reply.send(Err(io_err(&path)(err)));
        }
        return;
    }
    let start = head.len;
    let all: Vec<&Rec> = appends.iter().flat_map(|(r, _)| r.iter()).collect();
    let res = head
        .write(&all, true, buf)
        .and_then(|locs| head.sync().map(|()| locs))
        .and_then(|locs| {
            faults
                .turn(&head.file, start, head.len, &all)
                .map(|()| locs)
        });
    match res {
        Ok(locs) => {
            {
                let mut r = lock(reclaim);
                for (rec, loc) in all.iter().zip(&locs) {
                    match rec.keep {
                        Keep::Ref => r.add_ref(loc.seg),
                        Keep::Ends(msg) => r.pin(loc.seg, msg),
                        Keep::Copies(old) => {
                            r.add_ref(loc.seg);
                            r.pin(loc.seg, old);
                        }
                    }
                }
            }
            drop(all);
            let mut locs = locs.into_iter();
            for (recs, reply) in appends {
                let mine: Vec<Loc> = locs.by_ref().take(recs.len()).collect();
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            drop(all);
            let path = head.path();
            warn!(path = %path.display(), error = %e, "spool write failed; the records of this commit are cut off");
            if let Err(e2) = made_up(&faults.cuts).and_then(|()| head.cut(start)) {
                head.broken = true;
                let marker = head.dir.join(void_marker(head.n, start));
                let marked = crate::fsmode::create(&marker)
                    .and_then(|_| File::open(&head.dir))
                    .and_then(|d| d.sync_all());
                match marked {
                    Ok(()) => {
                        error!(path = %path.display(), offset = start, error = %e2, marker = %marker.display(), "cannot cut a failed spool write off the segment: its bytes from this offset on are void (ignored at the next start); starting a new segment")
                    }
                    Err(e3) => {
                        error!(path = %path.display(), offset = start, error = %e2, marker_error = %e3, "cannot cut a failed spool write off the segment, nor mark it void: its records may come back at the next start; starting a new segment")
                    }
                }
            }
            for (_, reply) in appends {
                let err = io::Error::new(e.kind(), e.to_string());
                let _ = reply.send(Err(io_err(&path)(err)));
            }
        }
    }
}

/// Deletes `segs` and whatever their deletion frees; the folder is synced before any pin a
/// deleted segment held is released. Returns the segments that could not be deleted: they
/// keep their pins (so the segments holding the `Done` records of their messages stay) and
/// are tried again later.
fn delete(
    dir: &Path,
    mut segs: Vec<u32>,
    reclaim: &Mutex<Reclaim>,
    open: &super::OpenSegments,
) -> Vec<u32> {
    let mut kept = Vec::new();
    while !segs.is_empty() {
        segs.sort_unstable();
        segs.dedup();
        let mut gone = Vec::with_capacity(segs.len());
        for &s in &segs {
            let path = dir.join(segment::file_name(s));
            match inject::check(Point::Unlink, &path).and_then(|()| fs::remove_file(&path)) {
                Ok(()) => {
                    open.forget(s);
                    segindex::remove(dir, s);
                    gone.push(s);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    open.forget(s);
                    segindex::remove(dir, s);
                    gone.push(s);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot delete a spent spool segment; it keeps the segments it pins and is tried again later");
                    kept.push(s);
                }
            }
        }
        if gone.is_empty() {
            break;
        }
        if let Err(e) = File::open(dir).and_then(|f| f.sync_all()) {
            warn!(dir = %dir.display(), error = %e, "cannot sync the spool segments folder; the deletions are tried again later");
            kept.extend(gone);
            break;
        }
        let mut r = lock(reclaim);
        segs = gone.iter().flat_map(|&s| r.deleted(s)).collect();
    }
    kept
}
