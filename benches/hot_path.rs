//! Hot-path micro benchmarks: command parser, next-hop reply parser, DATA reader, directory
//! lookup, route planning, spool write (with fsync). Run with `cargo bench --bench hot_path`.

#[path = "support/mod.rs"]
mod support;

use coexist::config::DirectoryConfig;
use coexist::directory::{table, Directory};
use coexist::smtp::command;
use coexist::smtp::data::DataReader;
use coexist::spool::Spool;
use coexist::types::{Address, RouteName};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

fn parser(c: &mut Criterion) {
    let mut g = c.benchmark_group("command");
    g.bench_function("parse MAIL FROM with params", |b| {
        b.iter(|| {
            command::parse(
                black_box(b"MAIL FROM:<john.doe@example.org> SIZE=4096 BODY=8BITMIME"),
                false,
            )
        })
    });
    g.bench_function("parse RCPT TO", |b| {
        b.iter(|| command::parse(black_box(b"RCPT TO:<user123456@nhs.test>"), false))
    });
    g.finish();
}

/// A next hop's replies: ours (keeps `4.7.500`) next to mail-send's parser (smtp-proto).
fn replies(c: &mut Criterion) {
    let one: &[u8] =
        b"250 2.0.0 OK <a1b2c3@tenant.mail.protection.outlook.com> [Hostname=AM0PR01MB1234]\r\n";
    let three: &[u8] = b"451-4.7.500 Server busy. Please try again later from [192.0.2.1].\r\n451-4.7.500 (S77719) [AM0PR01MB1234]\r\n451 4.7.500 Throttled\r\n";
    let mut g = c.benchmark_group("reply");
    for (name, wire) in [("one line", one), ("three lines", three)] {
        g.bench_function(format!("parse_wire {name}"), |b| {
            b.iter(|| coexist::proto::reply::parse_wire(black_box(wire)))
        });
        g.bench_function(format!("smtp-proto {name}"), |b| {
            b.iter(|| {
                smtp_proto::response::parser::ResponseReceiver::default()
                    .parse(&mut black_box(wire).iter())
            })
        });
    }
    g.finish();
}

fn data_reader(c: &mut Criterion) {
    let mut msg = Vec::new();
    while msg.len() < 64 * 1024 {
        msg.extend_from_slice(
            b"The quick brown fox jumps over the lazy dog, migrating mailboxes.\r\n",
        );
        msg.extend_from_slice(b"..a stuffed line\r\n");
    }
    msg.extend_from_slice(b".\r\n");
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("DATA reader 64 KiB", |b| {
        b.iter(|| {
            let mut r = DataReader::new(1 << 20);
            let (_, done) = r.feed(black_box(&msg));
            assert!(done);
            r.message().len()
        })
    });
    g.finish();
}

fn states() -> Vec<RouteName> {
    vec![RouteName("cloud".into()), RouteName("onprem".into())]
}

fn directory(c: &mut Criterion) {
    let n = 200_000;
    let mut csv = String::from("address,state\n");
    for i in 0..n {
        csv.push_str(&format!(
            "user{i}@nhs.test,{}\n",
            if i % 2 == 0 { "cloud" } else { "onprem" }
        ));
    }
    let parsed = table::parse(csv.as_bytes(), "bench", &states()).expect("bench directory");
    let cfg = DirectoryConfig {
        file: Some("bench".into()),
        unknown: "onprem".into(),
        cache_capacity: 100_000,
        cache_ttl: Duration::from_secs(60),
        store_dir: "unused".into(),
        watch: false,
        max_shrink: coexist::config::Percent::parse("10%").unwrap(),
        ldap: None,
        move_grace: std::time::Duration::from_secs(7200),
    };
    let dir = Directory::in_memory(parsed, states(), &cfg);
    let addrs: Vec<Address> = (0..1000)
        .map(|i| Address::parse(&format!("User{}@NHS.test", i * 97), false).expect("address"))
        .collect();
    let config = coexist::config::Config::parse(coexist::config::DEFAULT_CONFIG, "default")
        .expect("default config");
    let mut g = c.benchmark_group("directory");
    let mut i = 0;
    g.bench_function("resolve (200k entries, hot cache)", |b| {
        b.iter(|| {
            i = (i + 1) % addrs.len();
            dir.resolve(black_box(&addrs[i]))
        })
    });
    g.bench_function("route plan, 10 recipients", |b| {
        b.iter(|| {
            coexist::route::plan(
                addrs[..10].iter().enumerate(),
                coexist::route::Kind::Relayed,
                |a| dir.resolve_routed(a),
                &config,
            )
        })
    });
    g.finish();
}

/// The spool's append path: one message alone (a group of one: its own fdatasync), and 64
/// messages stored at once (the commit stage covers them with as few syncs as it can), each
/// finished afterwards as delivery does.
fn spool(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = std::sync::Arc::new(Spool::open(tmp.path()).expect("spool").spool);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let body = std::sync::Arc::new(vec![b'x'; 4096]);
    let mut g = c.benchmark_group("spool");
    g.sample_size(20);
    g.bench_function("store + finish one 4 KiB message alone", |b| {
        b.iter(|| {
            let env = support::envelope(4096);
            rt.block_on(async {
                let loc = spool.store(&env, body.clone()).await.expect("store");
                spool.finish(&env.id, loc, None).await.expect("finish");
            })
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("store + finish 64 concurrent 4 KiB messages", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (spool, body) = (spool.clone(), body.clone());
                        tokio::spawn(async move {
                            let env = support::envelope(4096);
                            let loc = spool.store(&env, body).await.expect("store");
                            spool.finish(&env.id, loc, None).await.expect("finish");
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, parser, replies, data_reader, directory, spool);
criterion_main!(benches);
