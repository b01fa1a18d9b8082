//! What an LDAP round that changed 50 mailboxes costs against 2,000,000 addresses:
//! `cargo bench --bench ldap_delta [-- COUNT]`.
//!
//! On the real code paths and a real store directory (fsync included): the 50 mailboxes
//! applied as a source delta (kind `delta`, rows logged, no snapshot) against the way a
//! sync took them before issue 29, a whole reload of the source's 2,000,000 rows (parse,
//! merge, snapshot); and a restart that replays the delta from the change log.
//!
//! Then the fleet (PostgreSQL at `COEXIST_TEST_POSTGRES`, default the machine's
//! 127.0.0.1:5432 `test`, in a schema of its own, dropped afterwards): a relay node seeds
//! the fleet with the 2,000,000 addresses, then the same 50 mailboxes are committed as one
//! `delta` change, against the way the LDAP leader committed them before issue 29, a new
//! base of every address (COPY).
#![allow(clippy::disallowed_methods)] // Benchmarks set up files directly.

use coexist::config::DirectoryConfig;
use coexist::directory::delta::{Delta, DeltaEntry, Mailbox};
use coexist::directory::Directory;
use coexist::types::RouteName;
use std::time::{Duration, Instant};

fn states() -> Vec<RouteName> {
    vec![RouteName("cloud".into()), RouteName("onprem".into())]
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
    let cfg = DirectoryConfig {
        file: Some(file.clone()),
        unknown: "onprem".into(),
        cache_capacity: 0,
        cache_ttl: Duration::from_secs(60),
        store_dir: tmp.path().join("store"),
        watch: false,
        max_shrink: coexist::config::Percent::parse("10%").unwrap(),
        ldap: None,
        move_grace: Duration::from_secs(7200),
    };
    let dir = Directory::open(&cfg, states()).expect("open");
    println!("directory: {count} addresses");
    let text = std::fs::read_to_string(&file).expect("read");
    let state_of = |i: usize| {
        let d = coexist::directory::generate::domain(i, 4);
        let a = format!("user{i}@{d}");
        (
            a.clone(),
            dir.lookup(&coexist::types::Address::parse(&a, true).unwrap())
                .state
                .unwrap(),
        )
    };
    let other = |s: &str| if s == "cloud" { "onprem" } else { "cloud" };
    // 50 mailboxes spread over the directory: each moves, and gets an alias.
    let picked: Vec<usize> = (0..50).map(|k| k * (count / 50) + 7).collect();
    let delta = Delta {
        cursor: Some("{\"usn\":1}".into()),
        entries: picked
            .iter()
            .map(|&i| {
                let (a, s) = state_of(i);
                DeltaEntry {
                    key: Some(format!("guid-{i}")),
                    before: Some(Mailbox {
                        addresses: vec![a.clone()],
                        route: s.clone(),
                        routing: None,
                    }),
                    after: Some(Mailbox {
                        addresses: vec![a, format!("alias{i}@nhs.test")],
                        route: other(&s).into(),
                        routing: None,
                    }),
                }
            })
            .collect(),
    };
    let t = Instant::now();
    let r = dir.apply_delta(&delta, "ldap usn 1", false).expect("delta");
    let delta_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "50-mailbox delta: {delta_ms:.0} ms ({} changed, {} addresses now), change log +{} bytes",
        r.changed,
        r.entries,
        serde_json::to_vec(&delta).map(|v| v.len()).unwrap_or(0)
    );

    // A restart: the snapshot, then the delta replayed in place from the change log.
    drop(dir);
    let t = Instant::now();
    let dir = Directory::open(&cfg, states()).expect("restart");
    println!(
        "restart after it (snapshot + the delta replayed from the change log): {:.2} s, {} addresses",
        t.elapsed().as_secs_f64(),
        dir.len()
    );

    // The same 50 moves as a whole reload of the source (what a sync did before).
    let mut edited = String::with_capacity(text.len());
    let set: std::collections::HashSet<String> =
        picked.iter().map(|&i| format!("user{i}@")).collect();
    for line in text.lines() {
        let flip = line
            .split_once('@')
            .is_some_and(|(l, _)| set.contains(&format!("{l}@")));
        match (flip, line.rsplit_once(',')) {
            (true, Some((a, s))) => edited.push_str(&format!("{a},{}\n", other(s))),
            _ => {
                edited.push_str(line);
                edited.push('\n');
            }
        }
    }
    std::fs::write(&file, edited).expect("write");
    let t = Instant::now();
    let r = dir.reload_file(false).expect("reload");
    println!(
        "the same change as a whole reload of {count} rows (before issue 29): {:.0} ms ({} changed)",
        t.elapsed().as_secs_f64() * 1000.0,
        r.changed
    );
    drop(dir);
    std::fs::write(&file, &text).expect("write");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(fleet(tmp.path(), &file, &delta));
}

/// The fleet's side: a 50-mailbox delta against a new base of every address.
async fn fleet(tmp: &std::path::Path, file: &std::path::Path, delta: &Delta) {
    let url = std::env::var("COEXIST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let schema = format!("bench_ldap_delta_{}", std::process::id());
    let mut cfg =
        coexist::config::Config::parse(coexist::config::DEFAULT_CONFIG, "default").unwrap();
    cfg.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.admin = None;
    cfg.tls = None;
    cfg.directory.watch = false;
    cfg.spool.dir = tmp.join("fleet-spool");
    cfg.directory.file = Some(file.to_path_buf());
    cfg.directory.store_dir = tmp.join("fleet-store");
    cfg.fleet = Some(coexist::config::FleetConfig {
        postgres: url.clone(),
        schema: schema.clone(),
        node: "bench".into(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(600),
    });
    let t = Instant::now();
    let relay = match coexist::relay::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            println!("fleet: skipped (no PostgreSQL at {url}: {e})");
            return;
        }
    };
    let fleet = relay.control.fleet.clone().expect("a fleet");
    println!(
        "fleet: seeded with {} addresses in {:.1} s",
        relay.directory.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let r = fleet
        .commit_delta(delta.clone(), "ldap usn 1".into(), false)
        .await
        .expect("delta");
    println!(
        "fleet: 50-mailbox delta committed and applied: {:.0} ms ({} changed; one `changes` row)",
        t.elapsed().as_secs_f64() * 1000.0,
        r.changed
    );
    let text = std::fs::read(file).expect("read");
    let t = Instant::now();
    let b = fleet
        .import(text, "ldap usn 2".into(), true)
        .await
        .expect("base");
    println!(
        "fleet: the same round as a new base of every address (before issue 29): {:.1} s ({} addresses COPYed)",
        t.elapsed().as_secs_f64(),
        b.report.entries
    );
    drop(relay);
    if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = c
            .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))
            .await;
    }
}
