//! Issue 12: coexist's spool against an embedded store (fjall 3) on the same workload, on
//! this machine. Run with `cargo bench --bench spool_compare`; prints a markdown table.
//!
//! Workload: N messages of 5 KiB (envelope like `hot_path`'s), stored by C concurrent tokio
//! tasks and each finished afterwards as delivery does; every store and every finish is
//! durable before the task goes on (the session's `250`, delivery's `Done`).
//!
//! - `coexist`: [`Spool::store`] then [`Spool::finish`]; its commit thread covers every
//!   request waiting at that moment with one `fdatasync`.
//! - `fjall`: the same group commit written for fjall: one thread takes every waiting
//!   request, puts them all in one `WriteBatch` (key = queue id, value = envelope JSON and
//!   message, the message going to fjall's blob files through key-value separation; a finish
//!   is a `remove`), commits it with `PersistMode::SyncData` (one `fdatasync` of fjall's
//!   journal), and only then answers them all.
//!
//! Columns: messages per second (wall clock of the N messages), process CPU time (user and
//! system, all threads, from `/proc/self/stat`; 10 ms resolution) per message, syncs made
//! by the commit thread, and bytes the process sent to the storage layer (`write_bytes` of
//! `/proc/self/io`) per message. `close` is what dropping the store after the run costs (fjall
//! writes its journal out on drop), added to the CPU column in `CPU incl. close`.
//!
//! Environment: `SPOOL_COMPARE_N` (default 20000), `SPOOL_COMPARE_C` (comma-separated
//! concurrencies, default `1,20,64`).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

#[path = "support/mod.rs"]
mod support;

use coexist::spool::{Envelope, Spool};
use coexist::types::QueueId;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const BODY_LEN: usize = 5 * 1024;

/// 5 KiB of base64-looking lines (like an attachment): fjall compresses blobs with LZ4 by
/// default, and a body of one repeated byte would flatter it.
fn body() -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = fastrand::Rng::with_seed(12);
    let mut b = Vec::with_capacity(BODY_LEN);
    while b.len() < BODY_LEN {
        if b.len() % 78 == 76 {
            b.extend_from_slice(b"\r\n");
        } else {
            b.push(ALPHABET[rng.usize(..ALPHABET.len())]);
        }
    }
    b.truncate(BODY_LEN);
    b
}

/// Process CPU time (user + system, all threads, live and ended).
fn cpu_time() -> Duration {
    // utime and stime are fields 14 and 15; the command name (field 2) may hold spaces, so
    // count from the ')' that closes it. Units are USER_HZ, 100 on Linux.
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let rest = &stat[stat.rfind(')').expect("/proc/self/stat format") + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// Bytes this process caused to be sent to the storage layer, if the kernel tells.
fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// fjall with the spool's group commit in front.
struct FjallStore {
    jobs: Option<mpsc::Sender<FjallJob>>,
    commits: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Remove { key: Vec<u8> },
}

struct FjallJob {
    op: Op,
    reply: oneshot::Sender<Result<(), String>>,
}

impl FjallStore {
    fn open(dir: &Path) -> fjall::Result<FjallStore> {
        let db = Database::builder(dir).open()?;
        // Values above 1 KiB (every message here) go to blob files; the LSM tree keeps keys
        // and pointers.
        let queue = db.keyspace("queue", || {
            KeyspaceCreateOptions::default().with_kv_separation(Some(
                KvSeparationOptions::default().separation_threshold(1024),
            ))
        })?;
        let (tx, rx) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let c2 = commits.clone();
        let thread = std::thread::Builder::new()
            .name("fjall-commit".into())
            .spawn(move || fjall_commit(db, queue, rx, c2))
            .map_err(fjall::Error::Io)?;
        Ok(FjallStore {
            jobs: Some(tx),
            commits,
            thread: Some(thread),
        })
    }

    async fn submit(&self, op: Op) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or("store closed")?;
        jobs.send(FjallJob { op, reply })
            .map_err(|_| "commit thread stopped".to_string())?;
        rx.await.map_err(|_| "commit thread stopped".to_string())?
    }

    async fn store(&self, env: &Envelope, body: &[u8]) -> Result<(), String> {
        let meta = serde_json::to_vec(env).map_err(|e| e.to_string())?;
        let mut value = Vec::with_capacity(4 + meta.len() + body.len());
        value.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        value.extend_from_slice(&meta);
        value.extend_from_slice(body);
        let key = env.id.as_str().as_bytes().to_vec();
        self.submit(Op::Put { key, value }).await
    }

    async fn finish(&self, id: &QueueId) -> Result<(), String> {
        let key = id.as_str().as_bytes().to_vec();
        self.submit(Op::Remove { key }).await
    }

    /// Stops the commit thread and closes the database.
    fn close(mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            t.join().expect("fjall commit thread panicked");
        }
    }
}

/// The commit thread: each turn takes every waiting request, writes them in one batch and
/// makes it durable with one `fdatasync` of the journal, then answers them all.
fn fjall_commit(
    db: Database,
    queue: Keyspace,
    rx: mpsc::Receiver<FjallJob>,
    commits: Arc<AtomicU64>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut batch = db.batch().durability(Some(PersistMode::SyncData));
        let mut replies = Vec::with_capacity(jobs.len());
        for j in jobs {
            match j.op {
                Op::Put { key, value } => batch.insert(&queue, key, value),
                Op::Remove { key } => batch.remove(&queue, key),
            }
            replies.push(j.reply);
        }
        let res = batch.commit().map_err(|e| e.to_string());
        commits.fetch_add(1, Ordering::Relaxed);
        for r in replies {
            let _ = r.send(res.clone());
        }
    }
    // The database is dropped here, which persists its journal (SyncAll).
}

enum Store {
    Coexist(Spool),
    Fjall(FjallStore),
}

impl Store {
    fn open(name: &str, dir: &Path) -> Store {
        match name {
            "coexist" => Store::Coexist(Spool::open(dir).expect("open spool").spool),
            _ => Store::Fjall(FjallStore::open(dir).expect("open fjall")),
        }
    }

    /// One message's life: stored durably, then finished durably.
    async fn store_and_finish(&self, body: &Arc<Vec<u8>>) {
        let env = support::envelope(BODY_LEN as u64);
        match self {
            Store::Coexist(s) => {
                let loc = s.store(&env, body.clone()).await.expect("spool store");
                s.finish(&env.id, loc, None).await.expect("spool finish");
            }
            Store::Fjall(f) => {
                f.store(&env, body).await.expect("fjall store");
                f.finish(&env.id).await.expect("fjall finish");
            }
        }
    }

    fn syncs(&self) -> u64 {
        match self {
            Store::Coexist(s) => s.commit_stats().0,
            Store::Fjall(f) => f.commits.load(Ordering::Relaxed),
        }
    }

    fn close(self) {
        match self {
            Store::Coexist(s) => drop(s),
            Store::Fjall(f) => f.close(),
        }
    }
}

struct Row {
    store: &'static str,
    c: usize,
    msg_s: f64,
    cpu_us: f64,
    syncs: u64,
    kb_written: Option<f64>,
    close_ms: f64,
    cpu_close_us: f64,
}

fn run(rt: &tokio::runtime::Runtime, name: &'static str, n: usize, c: usize) -> Row {
    let tmp = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let store = Arc::new(Store::open(name, tmp.path()));
    let body = Arc::new(body());
    let syncs0 = store.syncs();
    let (cpu0, wb0, t0) = (cpu_time(), write_bytes(), Instant::now());
    rt.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..c)
            .map(|_| {
                let (store, body, next) = (store.clone(), body.clone(), next.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        store.store_and_finish(&body).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
    let (elapsed, cpu1, wb1) = (t0.elapsed(), cpu_time(), write_bytes());
    let syncs = store.syncs() - syncs0;
    let t1 = Instant::now();
    Arc::into_inner(store).expect("tasks done").close();
    let (close, cpu2) = (t1.elapsed(), cpu_time());
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Row {
        store: name,
        c,
        msg_s: n as f64 / elapsed.as_secs_f64(),
        cpu_us: per_msg(cpu1 - cpu0),
        syncs,
        kb_written: wb0
            .zip(wb1)
            .map(|(a, b)| (b - a) as f64 / 1024.0 / n as f64),
        close_ms: close.as_secs_f64() * 1e3,
        cpu_close_us: per_msg(cpu2 - cpu0),
    }
}

fn main() {
    let n: usize = std::env::var("SPOOL_COMPARE_N")
        .ok()
        .map(|v| v.parse().expect("SPOOL_COMPARE_N: a number"))
        .unwrap_or(20_000);
    let cs: Vec<usize> = std::env::var("SPOOL_COMPARE_C")
        .unwrap_or_else(|_| "1,20,64".into())
        .split(',')
        .map(|c| c.trim().parse().expect("SPOOL_COMPARE_C: numbers"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{n} messages of {BODY_LEN} bytes, each stored then finished (both durable); data in {}",
        std::env::temp_dir().display()
    );
    println!();
    println!("| store | concurrency | msg/s | CPU µs/msg | syncs | syncs/msg | KiB written/msg | close ms | CPU µs/msg incl. close |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &cs {
        for name in ["coexist", "fjall"] {
            let r = run(&rt, name, n, c);
            println!(
                "| {} | {} | {:.0} | {:.1} | {} | {:.3} | {} | {:.1} | {:.1} |",
                r.store,
                r.c,
                r.msg_s,
                r.cpu_us,
                r.syncs,
                r.syncs as f64 / n as f64,
                r.kb_written.map_or("n/a".into(), |k| format!("{k:.1}")),
                r.close_ms,
                r.cpu_close_us,
            );
        }
    }
}
