//! What an LDAP round that changed 50 mailboxes costs against 2,000,000 addresses:
//! `cargo bench --bench ldap_delta [-- COUNT]`.
//!
//! On the real code paths and a real store directory (fsync included): the 50 mailboxes
//! applied as a source delta (kind `delta`, rows logged, no snapshot) against the way a
//! sync took them before issue 29, a whole reload of the source's 2,000,000 rows (parse,
//! merge, snapshot). Then a restart replaying the delta from the change log. The fleet's
//! side (one `changes` row carrying the 50 mailboxes instead of a base of every address) is
//! checked by `tests/active_directory.rs`.
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
    let t = Instant::now();
    let dir = Directory::open(&cfg, states()).expect("restart");
    println!(
        "restart (snapshot, change log, file reload): {:.2} s, {} addresses",
        t.elapsed().as_secs_f64(),
        dir.len()
    );
}
