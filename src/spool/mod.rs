//! The durable queue on disk.
//!
//! Layout under `spool.dir`:
//! - `incoming/ID`: a message being written; never acknowledged, removed at start-up.
//! - `active/ID.msg`: one line of JSON envelope, then the message bytes. Renamed into place
//!   after `fdatasync`, then the directory is fsynced: only then does the client get `250`.
//! - `active/ID.state`: per-recipient delivery state, replaced atomically after each attempt.
//! - `failed/ID.msg` and `failed/ID.state`: messages with a permanently failed recipient,
//!   kept until bounces exist (they are never dropped silently).
//!
//! Directory fsyncs are grouped: one fsync of a directory covers every rename into or out of
//! that directory made before it started, so concurrent sessions share it (group commit).
//! There is one commit group per directory (`active/`, `failed/`): an fsync of `failed/` says
//! nothing about entries of `active/`, so a store waiting for its `active/` fsync is never
//! released by a sync of another directory.

mod records;

pub use records::{DeliveryState, Envelope, RcptState, RcptStatus};

use crate::types::QueueId;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

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
        /// Path.
        path: String,
        /// Reason.
        reason: String,
    },
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

/// Group commit of the fsyncs of one directory: callers take a ticket after their rename;
/// an fsync that starts after ticket `n` was taken completes every ticket up to `n`.
struct DirSync {
    /// The directory this group commits (the only one its fsyncs cover).
    dir: PathBuf,
    state: Mutex<SyncState>,
    cv: Condvar,
    #[cfg(test)]
    hook: std::sync::OnceLock<tests::Hook>,
}

/// Tickets of one [`DirSync`].
#[derive(Default)]
struct SyncState {
    /// Last ticket handed out.
    requested: u64,
    /// Every ticket up to this one is covered by a finished fsync.
    completed: u64,
    /// An fsync of this directory is running.
    syncing: bool,
}

impl DirSync {
    fn new(dir: PathBuf) -> DirSync {
        DirSync {
            dir,
            state: Mutex::new(SyncState::default()),
            cv: Condvar::new(),
            #[cfg(test)]
            hook: std::sync::OnceLock::new(),
        }
    }

    #[cfg(test)]
    fn at(&self, p: tests::SyncPoint) {
        if let Some(h) = self.hook.get() {
            h(&self.dir, p)
        }
    }

    /// fsyncs the directory, sharing one fsync among all callers that arrive while one runs.
    /// Returns once an fsync that started after this call began has finished.
    fn sync(&self) -> Result<(), SpoolError> {
        #[cfg(test)]
        self.at(tests::SyncPoint::Enter);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.completed >= ticket {
                #[cfg(test)]
                self.at(tests::SyncPoint::Exit);
                return Ok(());
            }
            if !st.syncing {
                st.syncing = true;
                let target = st.requested;
                drop(st);
                #[cfg(test)]
                self.at(tests::SyncPoint::Start);
                let res = File::open(&self.dir).and_then(|f| f.sync_all());
                #[cfg(test)]
                self.at(tests::SyncPoint::Done);
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.syncing = false;
                if res.is_ok() {
                    st.completed = st.completed.max(target);
                }
                self.cv.notify_all();
                res.map_err(io_err(&self.dir))?;
            } else {
                #[cfg(test)]
                self.at(tests::SyncPoint::Waiting);
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// The folders [`Spool::open`] keeps under the spool directory (messages being written,
/// queued messages, failed ones), each of which must be writable.
pub const FOLDERS: [&str; 3] = ["incoming", "active", "failed"];

/// The spool.
pub struct Spool {
    incoming: PathBuf,
    active: PathBuf,
    failed: PathBuf,
    /// Commit group of `active/`.
    active_sync: DirSync,
    /// Commit group of `failed/`.
    failed_sync: DirSync,
}

impl Spool {
    /// Opens (and creates) the spool under `dir`.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        let [incoming, active, failed] = FOLDERS.map(|f| dir.join(f));
        let s = Spool {
            active_sync: DirSync::new(active.clone()),
            failed_sync: DirSync::new(failed.clone()),
            incoming,
            active,
            failed,
        };
        for d in [&s.incoming, &s.active, &s.failed] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(s)
    }

    /// Free bytes for us on the spool's file system.
    pub fn available_space(&self) -> io::Result<u64> {
        fs4::available_space(&self.active)
    }

    fn msg_path(&self, id: &QueueId) -> PathBuf {
        self.active.join(format!("{id}.msg"))
    }

    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.active.join(format!("{id}.state"))
    }

    /// Writes a new message durably. When this returns `Ok`, the message survives a crash.
    pub fn store(&self, env: &Envelope, message: &[u8]) -> Result<(), SpoolError> {
        let tmp = self.incoming.join(env.id.as_str());
        let header = serde_json::to_vec(env).map_err(|e| SpoolError::Corrupt {
            path: tmp.display().to_string(),
            reason: e.to_string(),
        })?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            // Envelope line, then the message straight from the session's buffer: the
            // message is never copied to join them.
            let mut header = header;
            header.push(b'\n');
            f.write_all(&header)?;
            f.write_all(message)?;
            f.sync_data()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        let dest = self.msg_path(&env.id);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        self.active_sync.sync()
    }

    /// Records the delivery state after an attempt (atomic replace).
    pub fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        let path = self.state_path(id);
        let tmp = self.incoming.join(format!("{id}.state"));
        let data = serde_json::to_vec(state).map_err(|e| SpoolError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_data()
        };
        write().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.active_sync.sync()
    }

    /// Reads a queued message's bytes (without the envelope line).
    pub fn load_message(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        let path = self.msg_path(id);
        let mut data = fs::read(&path).map_err(io_err(&path))?;
        let nl = memchr::memchr(b'\n', &data).ok_or_else(|| SpoolError::Corrupt {
            path: path.display().to_string(),
            reason: "no envelope line".into(),
        })?;
        data.drain(..=nl);
        Ok(data)
    }

    /// Removes a message whose recipients are all delivered.
    pub fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let msg = self.msg_path(id);
        fs::remove_file(&msg).map_err(io_err(&msg))?;
        let _ = fs::remove_file(self.state_path(id));
        Ok(())
    }

    /// Moves a message with failed recipients to `failed/`, where it stays for the admin.
    pub fn move_to_failed(&self, id: &QueueId) -> Result<(), SpoolError> {
        let state = self.state_path(id);
        if state.exists() {
            let dest = self.failed.join(format!("{id}.state"));
            fs::rename(&state, &dest).map_err(io_err(&dest))?;
        }
        let dest = self.failed.join(format!("{id}.msg"));
        fs::rename(self.msg_path(id), &dest).map_err(io_err(&dest))?;
        self.failed_sync.sync()?;
        self.active_sync.sync()
    }

    /// Start-up scan: drops unacknowledged files in `incoming/` and returns every queued
    /// message with its delivery state.
    pub fn recover(&self) -> Result<Vec<(Envelope, DeliveryState)>, SpoolError> {
        for e in fs::read_dir(&self.incoming).map_err(io_err(&self.incoming))? {
            let e = e.map_err(io_err(&self.incoming))?;
            let _ = fs::remove_file(e.path());
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&self.active).map_err(io_err(&self.active))? {
            let path = e.map_err(io_err(&self.active))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(stem) = name.strip_suffix(".msg") else {
                if let Some(stem) = name.strip_suffix(".state") {
                    if !self.active.join(format!("{stem}.msg")).exists() {
                        let _ = fs::remove_file(&path);
                    }
                }
                continue;
            };
            if QueueId::from_file_stem(stem).is_none() {
                continue;
            }
            let env = read_envelope(&path)?;
            let state = match fs::read(self.state_path(&env.id)) {
                Ok(bytes) => serde_json::from_slice::<DeliveryState>(&bytes)
                    .ok()
                    .filter(|s| s.rcpts.len() == env.rcpts.len())
                    .unwrap_or_else(|| DeliveryState::new(env.rcpts.len())),
                Err(_) => DeliveryState::new(env.rcpts.len()),
            };
            out.push((env, state));
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }
}

fn read_envelope(path: &Path) -> Result<Envelope, SpoolError> {
    use std::io::BufRead;
    let f = File::open(path).map_err(io_err(path))?;
    let mut line = Vec::new();
    io::BufReader::new(f)
        .read_until(b'\n', &mut line)
        .map_err(io_err(path))?;
    serde_json::from_slice(&line).map_err(|e| SpoolError::Corrupt {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BodyType, Ret};
    use crate::types::Address;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn state_written_with_string_replies_still_loads() {
        // The form of a `.state` file before replies were typed.
        let old = br#"{"rcpts":[{"status":"delivered","last_reply":"250 2.0.0 Ok: queued as A"},
            {"status":"failed","last_reply":"message expired in queue; last reply: 451 4.4.1 connect to 127.0.0.1:1 failed: refused"},
            {"status":"pending","last_reply":"450 4.2.1 try later"},{"status":"pending","last_reply":null}],
            "attempts":3}"#;
        let st: DeliveryState = serde_json::from_slice(old).unwrap();
        let shown: Vec<Option<String>> = st
            .rcpts
            .iter()
            .map(|r| r.last_reply.as_ref().map(|l| l.to_string()))
            .collect();
        assert_eq!(
            shown,
            vec![
                Some("250 2.0.0 Ok: queued as A".to_string()),
                Some("message expired in queue; last reply: 451 4.4.1 connect to 127.0.0.1:1 failed: refused".to_string()),
                Some("450 4.2.1 try later".to_string()),
                None
            ]
        );
        let expired = st.rcpts[1].last_reply.as_ref().and_then(|l| l.failure());
        assert!(expired.is_some_and(|f| f.is_expired()));
        // Written back in the typed form, it reads the same.
        let again: DeliveryState =
            serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(
            again
                .rcpts
                .iter()
                .map(|r| r.last_reply.clone())
                .collect::<Vec<_>>(),
            st.rcpts
                .iter()
                .map(|r| r.last_reply.clone())
                .collect::<Vec<_>>()
        );
    }

    /// Where a caller of a directory sync is (test hook).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum SyncPoint {
        /// Entered the sync, after its rename.
        Enter,
        /// Waiting for another caller's fsync.
        Waiting,
        /// About to fsync the directory.
        Start,
        /// The fsync returned.
        Done,
        /// Returning `Ok` to its caller.
        Exit,
    }

    /// Called at each [`SyncPoint`] with the directory being synced.
    pub(super) type Hook = Arc<dyn Fn(&Path, SyncPoint) + Send + Sync>;

    /// Waits (at most 30 s) until `cond` holds on the shared value.
    fn wait_for<T>(m: &Mutex<T>, cv: &Condvar, what: &str, cond: impl Fn(&T) -> bool) {
        let t0 = Instant::now();
        let mut g = m.lock().unwrap();
        while !cond(&g) {
            assert!(t0.elapsed() < Duration::from_secs(30), "timed out: {what}");
            g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
        }
    }

    fn env(id: QueueId) -> Envelope {
        Envelope {
            id,
            from: None,
            rcpts: vec![Address::parse("a@nhs.test", false).unwrap()],
            smtputf8: false,
            body: BodyType::SevenBit,
            received_at: 0,
            size: 5,
            client: "127.0.0.1:1".into(),
            ret: None,
            envid: None,
            rcpt_dsn: Vec::new(),
            bounce: false,
        }
    }

    fn install_hook(s: &mut Spool, hook: Hook) {
        let _ = s.active_sync.hook.set(hook.clone());
        let _ = s.failed_sync.hook.set(hook);
    }

    #[test]
    fn store_recover_state_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        let id = QueueId::generate();
        s.store(&env(id.clone()), b"hello").unwrap();
        fs::write(dir.path().join("incoming/junk"), b"x").unwrap();
        let s = Spool::open(dir.path()).unwrap();
        let rec = s.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert!(!dir.path().join("incoming/junk").exists());
        assert_eq!(s.load_message(&id).unwrap(), b"hello");
        let mut st = rec[0].1.clone();
        st.rcpts[0].status = RcptStatus::Failed;
        s.save_state(&id, &st).unwrap();
        let rec = s.recover().unwrap();
        assert_eq!(rec[0].1.rcpts[0].status, RcptStatus::Failed);
        s.move_to_failed(&id).unwrap();
        assert!(s.recover().unwrap().is_empty());
        assert!(dir.path().join(format!("failed/{id}.msg")).exists());
    }

    /// Spool files written before `RET` was typed hold it as the keyword string; they must
    /// still load, and new files keep writing the same form.
    #[test]
    fn envelopes_with_ret_as_written_by_older_versions_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for ret in [Some("FULL"), Some("HDRS"), None] {
            let id = QueueId::generate();
            let ret = ret.map(|r| format!(r#","ret":"{r}""#)).unwrap_or_default();
            let line = format!(
                r#"{{"id":"{id}","from":{{"local":"s","domain":"example.org"}},"rcpts":[{{"local":"u","domain":"nhs.test"}}],"smtputf8":false,"body":"EightBitMime","received_at":1764000000,"size":5,"client":"192.0.2.1:25"{ret},"envid":"E1","rcpt_dsn":[{{"notify":"FAILURE"}}]}}"#
            );
            fs::write(
                dir.path().join(format!("active/{id}.msg")),
                format!("{line}\nhello"),
            )
            .unwrap();
            ids.push(id);
        }
        let rec = s.recover().unwrap();
        let rets: Vec<Option<Ret>> = rec.iter().map(|(e, _)| e.ret).collect();
        assert_eq!(rets, [Some(Ret::Full), Some(Ret::Hdrs), None]);
        let old = &rec[0].0;
        assert_eq!(old.id, ids[0]);
        assert_eq!(old.body, BodyType::EightBitMime);
        assert_eq!(old.envid.as_deref(), Some("E1"));
        assert!(old.dsn(0).wants_failure() && !old.dsn(0).wants_delay());
        assert_eq!(s.load_message(&ids[0]).unwrap(), b"hello");

        // What this version writes, older versions read: the same keyword.
        let id = QueueId::generate();
        let mut e = env(id.clone());
        e.ret = Some(Ret::Hdrs);
        s.store(&e, b"x").unwrap();
        let written = fs::read_to_string(dir.path().join(format!("active/{id}.msg"))).unwrap();
        assert!(written.contains(r#""ret":"HDRS""#), "{written}");
    }

    /// Item: a store waiting behind an fsync of `failed/` must not be released by it (and a
    /// move to `failed/` must not be released by an fsync of `active/`). One store holds an
    /// fsync of `active/` open; a second store and a move to `failed/` queue behind it; then
    /// every call that returned must have seen an fsync of its own directory that started
    /// after it entered the sync (i.e. after its rename) and ended before it returned.
    #[test]
    fn each_call_waits_for_an_fsync_of_its_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let moved = QueueId::generate();
        s.store(&env(moved.clone()), b"to fail").unwrap();

        type Log = Vec<(String, PathBuf, SyncPoint)>;
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let hook: Hook = {
            let (log, release) = (log.clone(), release.clone());
            let active = s.active.clone();
            Arc::new(move |d: &Path, p: SyncPoint| {
                let me = std::thread::current().name().unwrap_or("?").to_string();
                {
                    let mut l = log.0.lock().unwrap();
                    l.push((me.clone(), d.to_path_buf(), p));
                    log.1.notify_all();
                }
                // t1's fsync of active/ is held until the others are queued.
                if me == "t1" && p == SyncPoint::Start && d == active {
                    let (m, cv) = &*release;
                    let t0 = Instant::now();
                    let mut g = m.lock().unwrap();
                    while !*g && t0.elapsed() < Duration::from_secs(30) {
                        g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
                    }
                }
            })
        };
        install_hook(&mut s, hook);
        let s = &s;
        std::thread::scope(|scope| {
            let named = |name: &str| std::thread::Builder::new().name(name.into());
            let has = |who: &'static str, p: SyncPoint| {
                move |l: &Log| l.iter().any(|(t, _, q)| t == who && *q == p)
            };
            let t1 = named("t1")
                .spawn_scoped(scope, || {
                    s.store(&env(QueueId::generate()), b"one").unwrap()
                })
                .unwrap();
            wait_for(
                &log.0,
                &log.1,
                "t1 starts its fsync",
                has("t1", SyncPoint::Start),
            );
            let t2 = named("t2")
                .spawn_scoped(scope, || {
                    s.store(&env(QueueId::generate()), b"two").unwrap()
                })
                .unwrap();
            let t3 = named("t3")
                .spawn_scoped(scope, || s.move_to_failed(&moved).unwrap())
                .unwrap();
            wait_for(&log.0, &log.1, "t2 queued", has("t2", SyncPoint::Waiting));
            wait_for(&log.0, &log.1, "t3 queued", has("t3", SyncPoint::Waiting));
            *release.0.lock().unwrap() = true;
            release.1.notify_all();
            for t in [t1, t2, t3] {
                t.join().unwrap();
            }
        });

        let log = log.0.lock().unwrap().clone();
        // Each fsync: (start index, done index, directory).
        let mut syncs = Vec::new();
        for (i, (t, d, p)) in log.iter().enumerate() {
            if *p == SyncPoint::Start {
                let done = log[i..]
                    .iter()
                    .position(|(u, e, q)| u == t && e == d && *q == SyncPoint::Done)
                    .map(|k| i + k)
                    .unwrap();
                syncs.push((i, done, d.clone()));
            }
        }
        // Each call: (thread, directory, enter index, exit index).
        let mut checked = 0;
        for (i, (t, d, p)) in log.iter().enumerate() {
            if *p != SyncPoint::Enter {
                continue;
            }
            let exit = log[i..]
                .iter()
                .position(|(u, e, q)| u == t && e == d && *q == SyncPoint::Exit)
                .map(|k| i + k)
                .unwrap();
            assert!(
                syncs
                    .iter()
                    .any(|(s, e, sd)| sd == d && *s > i && *e < exit),
                "{t} returned from the sync of {} without an fsync of it after its rename; events: {log:#?}",
                d.display()
            );
            checked += 1;
        }
        assert_eq!(checked, 4, "t1, t2 and t3 (failed/ then active/)");
        assert!(dir.path().join(format!("failed/{moved}.msg")).exists());
    }
}
