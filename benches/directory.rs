//! Directory at national scale: `cargo bench --bench directory [-- COUNT]` (default 2,000,000).
//!
//! Measures, on the real code paths and a real store directory (fsync included): CSV parse
//! and first start, restart from the snapshot, resident memory, per-lookup latency
//! percentiles (each lookup timed on its own into an HDR histogram, with and without the moka
//! cache), and applying an 83,000-mailbox batch while 2 threads keep looking up.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

use coexist::config::DirectoryConfig;
use coexist::directory::{batch, Directory};
use coexist::types::{Address, RouteName};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn states() -> Vec<RouteName> {
    vec![RouteName("cloud".into()), RouteName("onprem".into())]
}

fn lookup_histogram(dir: &Directory, addrs: &[Address], rounds: usize) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    for _ in 0..rounds {
        for a in addrs {
            let t = Instant::now();
            std::hint::black_box(dir.resolve(a));
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
    }
    h
}

fn print_hist(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns ({} lookups)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    );
}

fn main() {
    let count: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("directory.csv");
    let f = std::fs::File::create(&file).expect("create");
    coexist::directory::generate::write(f, count, 4, 0.5).expect("generate");
    let base_rss = rss_mb();
    println!(
        "directory: {count} addresses, {:.1} MB CSV, machine: {} CPUs",
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64 / 1e6,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let cfg = |cache: u64| DirectoryConfig {
        file: Some(file.clone()),
        unknown: "onprem".into(),
        cache_capacity: cache,
        cache_ttl: Duration::from_secs(60),
        store_dir: tmp.path().join("store"),
        watch: false,
        max_shrink: coexist::config::Percent::parse("10%").unwrap(),
        ldap: None,
        move_grace: Duration::from_secs(7200),
    };
    let t = Instant::now();
    let dir = Directory::open(&cfg(0), states()).expect("first open");
    println!(
        "first start (parse CSV, build index, write snapshot): {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(dir);

    let t = Instant::now();
    let dir = Arc::new(Directory::open(&cfg(0), states()).expect("restart"));
    println!("restart from snapshot: {:.3} s", t.elapsed().as_secs_f64());
    println!(
        "resident memory of the directory: {:.0} MB (process RSS {:.0} MB)",
        rss_mb() - base_rss,
        rss_mb()
    );

    let mut rng = fastrand::Rng::with_seed(7);
    let addrs: Vec<Address> = (0..100_000)
        .map(|_| {
            let i = rng.usize(..count);
            let domain = coexist::directory::generate::domain(i, 4);
            Address::parse(&format!("User{i}@{domain}"), false).expect("address")
        })
        .collect();
    print_hist(
        "lookup, no cache (table only)",
        &lookup_histogram(&dir, &addrs, 5),
    );
    let cached = Directory::open(&cfg(200_000), states()).expect("open with cache");
    lookup_histogram(&cached, &addrs, 1);
    print_hist(
        "lookup, moka cache hit",
        &lookup_histogram(&cached, &addrs, 5),
    );
    drop(cached);

    // An 83,000-mailbox weekend batch while another thread keeps resolving (2 threads on 2 cores).
    let mut text = String::from("EmailAddress\n");
    for i in (0..count).step_by((count / 83_000).max(1)).take(83_000) {
        text.push_str(&format!(
            "user{i}@{}\n",
            coexist::directory::generate::domain(i, 4)
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..1)
        .map(|k| {
            let (dir, stop, done, addrs) = (dir.clone(), stop.clone(), done.clone(), addrs.clone());
            std::thread::spawn(move || {
                let mut worst = 0u128;
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    std::hint::black_box(dir.resolve(&addrs[i % addrs.len()]));
                    worst = worst.max(t.elapsed().as_nanos());
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                worst
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let rows =
        batch::parse(text.as_bytes(), "weekend.csv", dir.states(), Some("cloud")).expect("batch");
    let parsed = t.elapsed();
    let report = dir.apply(&rows, "weekend.csv", false).expect("apply");
    let total = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let worst: Vec<u128> = readers.into_iter().map(|r| r.join().unwrap_or(0)).collect();
    println!(
        "83,000-row batch: parse {:.0} ms, apply + fsync'd log {:.0} ms, total {:.0} ms ({} changed, {} already); \
         {} lookups meanwhile, slowest {:.1} us",
        parsed.as_secs_f64() * 1e3,
        (total - parsed).as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
        report.changed,
        report.already,
        done.load(Ordering::Relaxed),
        worst.iter().copied().max().unwrap_or(0) as f64 / 1e3
    );
    let t = Instant::now();
    let rb = dir.rollback(report.id.unwrap_or(0)).expect("rollback");
    println!(
        "rollback of it: {:.0} ms ({} restored)",
        t.elapsed().as_secs_f64() * 1e3,
        rb.changed
    );
    drop(dir);
    let t = Instant::now();
    let _dir = Directory::open(&cfg(0), states()).expect("restart with log");
    println!(
        "restart from snapshot + replay of 2 logged changes: {:.3} s",
        t.elapsed().as_secs_f64()
    );
}
