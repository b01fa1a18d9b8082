//! Tracking log at scale: `cargo bench --bench tracking [-- DAYS [PER_DAY]]` (default 30 days
//! of 1,000,000 messages a day).
//!
//! Generates the log a node would hold after DAYS days (per message: `received`, one
//! `routed` and one `delivered` per recipient; 1 or 2 recipients out of 2,000,000
//! addresses, senders out of 200,000), written as the writer writes it (records of 4,096
//! events, files of 64 MiB, each sealed with its index by the same functions), in a folder
//! under the system's temporary directory that is removed at the end. Then times searches
//! by recipient, sender, Message-ID and queue id over the whole window (each one alone,
//! warm page cache, and once after dropping the page cache when this process may), and a
//! batch preview's traffic count for 22,000 addresses over the last week.
#![allow(clippy::disallowed_methods)] // A benchmark writes and reads its files directly.

use coexist::tracking::files::{self, IndexBuilder, FORMAT};
use coexist::tracking::{search, Event, EventReply, Kind, Query, Role};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DAY_MS: u64 = 86_400_000;
const ADDRESSES: u64 = 2_000_000;
const SENDERS: u64 = 200_000;
const RECORD_EVENTS: usize = 4096;
const FILE_BYTES: u64 = 64 << 20;

fn rcpt(n: u64) -> String {
    format!("user{n}@nhs.test")
}
fn sender(n: u64) -> String {
    format!("sender{n}@example{}.org", n % 97)
}

/// The events of message `i` of the day starting at `day0`.
fn message(rng: &mut fastrand::Rng, day0: u64, per_day: u64, day: u64, i: u64) -> Vec<Event> {
    let t = day0 + i * DAY_MS / per_day;
    let qid = format!("{:013X}{:04X}", t * 1000, i & 0xFFFF);
    let n = if rng.u8(0..10) < 7 { 1 } else { 2 };
    let to: Vec<String> = (0..n).map(|_| rcpt(rng.u64(0..ADDRESSES))).collect();
    let mut r = Event::new(t, Kind::Received, &qid);
    r.client = Some(format!(
        "198.51.100.{}:{}",
        rng.u8(1..255),
        rng.u16(1024..65535)
    ));
    r.tls = Some("TLSv1.3".into());
    r.size = Some(rng.u64(2_000..200_000));
    r.message_id = Some(format!("{day}.{i}@gen.example.org"));
    r.sender = Some(sender(rng.u64(0..SENDERS)));
    r.recipients = to.clone();
    let mut out = vec![r];
    for a in &to {
        let mut e = Event::new(t, Kind::Routed, &qid);
        e.sender = out[0].sender.clone();
        e.rcpt = Some(a.clone());
        e.state = Some("cloud".into());
        e.route = Some("cloud".into());
        e.origin = Some("batch 12".into());
        out.push(e);
    }
    for a in &to {
        let mut e = Event::new(t + 300, Kind::Delivered, &qid);
        e.sender = out[0].sender.clone();
        e.rcpt = Some(a.clone());
        e.route = Some("cloud".into());
        e.next_hop = Some("52.101.0.10:25".into());
        e.origin = Some("batch 12".into());
        e.reply = Some(EventReply {
            code: Some(250),
            status: Some("2.6.0".into()),
            text: format!("<{day}.{i}@gen.example.org> [InternalId=1] Queued mail for delivery"),
        });
        out.push(e);
    }
    out
}

/// Writes day `day` (its first millisecond `day0`) as sealed files in `dir`.
fn write_day(dir: &Path, day: u64, day0: u64, per_day: u64) -> u64 {
    let mut rng = fastrand::Rng::with_seed(day);
    let mut bytes = 0;
    let mut file: Option<(PathBuf, Vec<u8>, IndexBuilder)> = None;
    let mut batch: Vec<Event> = Vec::with_capacity(RECORD_EVENTS + 8);
    let flush = |file: &mut Option<(PathBuf, Vec<u8>, IndexBuilder)>,
                 batch: &mut Vec<Event>,
                 first_ms: u64| {
        if batch.is_empty() {
            return;
        }
        let f = file.get_or_insert_with(|| {
            (
                files::log_path(dir, first_ms),
                FORMAT.magic.to_vec(),
                IndexBuilder::default(),
            )
        });
        let mut payload = Vec::new();
        for e in batch.iter() {
            serde_json::to_writer(&mut payload, e).unwrap();
            payload.push(b'\n');
        }
        let off = f.1.len() as u64;
        f.1.extend_from_slice(&FORMAT.frame(&payload));
        for e in batch.iter() {
            f.2.add(e, off);
        }
        batch.clear();
    };
    let seal = |file: &mut Option<(PathBuf, Vec<u8>, IndexBuilder)>| -> u64 {
        let Some((path, data, index)) = file.take() else {
            return 0;
        };
        std::fs::write(&path, &data).unwrap();
        index.write(&path).unwrap();
        data.len() as u64
    };
    for i in 0..per_day {
        batch.extend(message(&mut rng, day0, per_day, day, i));
        if batch.len() >= RECORD_EVENTS {
            let first = batch[0].time_ms;
            flush(&mut file, &mut batch, first);
            if file
                .as_ref()
                .is_some_and(|f| f.1.len() as u64 >= FILE_BYTES)
            {
                bytes += seal(&mut file);
            }
        }
    }
    let first = batch.first().map_or(day0, |e| e.time_ms);
    flush(&mut file, &mut batch, first);
    bytes + seal(&mut file)
}

fn time_queries(dir: &Path, what: &str, qs: &[Query]) {
    let mut ms: Vec<f64> = Vec::new();
    let (mut events, mut files_read) = (0, 0);
    for q in qs {
        let t = Instant::now();
        let f = search::search(dir, None, q).unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        events += f.events.len();
        files_read = f.files;
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "  {what:<28} {} queries: median {:>7.1} ms, max {:>7.1} ms; {:.1} events found a query; {files_read} files looked at",
        qs.len(),
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        events as f64 / qs.len() as f64
    );
}

/// Writes dirty pages out and drops the page cache (root only); false when it cannot.
fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let days = args.first().copied().unwrap_or(30);
    let per_day = args.get(1).copied().unwrap_or(1_000_000);
    let tmp = tempfile::Builder::new()
        .prefix("coexist-tracking-bench")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let now = coexist::clock::now_ms();
    let today0 = now / DAY_MS * DAY_MS;
    println!(
        "== tracking log: {days} days x {per_day} messages a day, {} CPUs, {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        chrono::Utc::now().format("%F")
    );
    let t = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(0);
    let total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let d = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if d >= days {
                    break;
                }
                let day0 = today0 - (days - 1 - d) * DAY_MS;
                let b = write_day(&dir, d, day0, per_day);
                total.fetch_add(b, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    let listed = files::list(&dir).unwrap();
    let idx: u64 = listed.iter().map(|f| f.bytes).sum::<u64>()
        - total.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "  generated in {:.0} s: {} files, log {:.1} GiB, indexes {:.1} GiB",
        t.elapsed().as_secs_f64(),
        listed.len(),
        total.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1u64 << 30) as f64,
        idx as f64 / (1u64 << 30) as f64
    );

    // Keys that exist: regenerate a few messages of random days.
    let mut rng = fastrand::Rng::with_seed(4242);
    let (mut rcpts, mut senders, mut mids, mut qids) = (vec![], vec![], vec![], vec![]);
    for _ in 0..20 {
        let d = rng.u64(0..days);
        let i = rng.u64(0..per_day);
        // Replay the day's generator up to message i.
        let mut g = fastrand::Rng::with_seed(d);
        let day0 = today0 - (days - 1 - d) * DAY_MS;
        let mut evs = Vec::new();
        for j in 0..=i {
            evs = message(&mut g, day0, per_day, d, j);
        }
        rcpts.push(evs[0].recipients[0].clone());
        senders.push(evs[0].sender.clone().unwrap());
        mids.push(evs[0].message_id.clone().unwrap());
        qids.push(evs[0].queue_id.clone());
    }
    let window = |role, v: &String| Query {
        role,
        value: v.clone(),
        since_ms: today0 - (days - 1) * DAY_MS,
        until_ms: now + DAY_MS,
        limit: 20_000,
    };
    let run = |label: &str| {
        println!("  -- {label}");
        for (what, role, values) in [
            ("recipient", Role::Recipient, &rcpts),
            ("sender", Role::Sender, &senders),
            ("Message-ID", Role::MessageId, &mids),
            ("queue id", Role::QueueId, &qids),
        ] {
            let qs: Vec<Query> = values.iter().map(|v| window(role, v)).collect();
            time_queries(&dir, &format!("{what} ({days} days)"), &qs);
        }
    };
    if drop_caches() {
        run("cold page cache (dropped once, before these 80 queries)");
    } else {
        println!("  (cannot drop the page cache here: cold numbers not measured)");
    }
    run("warm page cache");
    let batch: Vec<String> = (0..22_000).map(|_| rcpt(rng.u64(0..ADDRESSES))).collect();
    let t = Instant::now();
    let counts = search::received_counts(&dir, None, &batch, now - 7 * DAY_MS, now).unwrap();
    println!(
        "  batch preview traffic, 22,000 addresses over 7 days: {:.0} ms ({} messages)",
        t.elapsed().as_secs_f64() * 1000.0,
        counts.iter().sum::<u64>()
    );
}
