//! `coexist demo --fleet`: three nodes sharing one directory through the local PostgreSQL.
//! Node 1 seeds the fleet with a synthetic directory; migration batches of 83,000 mailboxes
//! (the size of a weekend's batch) go in turn through each node, and the demo measures how
//! long each takes to be applied on all three; then mail through every node checks that
//! each recipient reached the side its mailbox is on now. The demo's schema is dropped at
//! the end.

use super::client::{self, Generator, LoadOptions};
use super::demo::DemoError;
use super::sink::{Sink, SinkOptions};
use crate::config::{Config, FleetConfig, TlsPolicy, DEFAULT_CONFIG};
use crate::directory::batch;
use crate::relay::Running;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fleet demo settings.
pub struct FleetDemoOptions {
    /// PostgreSQL connection string.
    pub postgres: String,
    /// Mailboxes in the synthetic directory.
    pub mailboxes: usize,
    /// Batches to apply.
    pub batches: usize,
    /// Mailboxes per batch.
    pub batch_size: usize,
    /// Messages sent through each node at the end.
    pub messages: u64,
}

/// Runs the fleet demo and prints what it measured.
pub async fn run(opts: FleetDemoOptions) -> Result<(), DemoError> {
    let work = tempfile::tempdir()?;
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    let sink = |host: &str| SinkOptions {
        hostname: host.into(),
        keep_bodies: false,
        ..SinkOptions::default()
    };
    // The shipped cloud route verifies the Exchange Online stand-in's certificate (a demo
    // CA's, for the route's tls_name); every node's config gets the same CA file.
    let mut shipped = Config::parse(DEFAULT_CONFIG, "embedded default config")?;
    let cloud_tls = super::demo::cloud_sink_tls(&mut shipped, work.path())?;
    let cloud_ca = shipped
        .routes
        .get("cloud")
        .and_then(|r| r.tls_ca_file.clone());
    let onprem = Sink::start(lo, sink("onprem.sink.test")).await?;
    let cloud = Sink::start(
        lo,
        SinkOptions {
            tls: Some(cloud_tls),
            ..sink("cloud.sink.test")
        },
    )
    .await?;
    let mailboxes = opts.mailboxes.max(opts.batch_size).max(1);
    let file = work.path().join("directory.csv");
    let listed = super::demo::write_directory(&file, mailboxes)?;
    let schema = format!("coexist_demo_{}", std::process::id());
    let mut states: HashMap<String, &str> = listed.iter().map(|(a, s)| (a.key(), *s)).collect();

    let mut nodes: Vec<Running> = Vec::new();
    let t0 = Instant::now();
    for i in 1..=3 {
        let dir = work.path().join(format!("mx{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut cfg = Config::parse(DEFAULT_CONFIG, "embedded default config")?;
        cfg.server.listen = vec![lo];
        cfg.admin = None;
        cfg.tls = None;
        cfg.spool.dir = dir.join("spool");
        cfg.directory.watch = false;
        cfg.directory.store_dir = dir.join("directory-store");
        cfg.directory.file = (i == 1).then(|| file.clone());
        cfg.queue.min_backoff = Duration::from_secs(1);
        cfg.fleet = Some(FleetConfig {
            postgres: opts.postgres.clone(),
            schema: schema.clone(),
            node: format!("mx{i}"),
            max_lag: Duration::from_secs(300),
            commit_timeout: Duration::from_secs(120),
        });
        for (name, route) in cfg.routes.iter_mut() {
            if name == "cloud" {
                route.next_hops = vec![cloud.addr.into()];
                route.tls_ca_file = cloud_ca.clone();
            } else {
                route.next_hops = vec![onprem.addr.into()];
                route.tls = TlsPolicy::None;
            }
        }
        let node = crate::relay::start(cfg).await?;
        println!(
            "node mx{i}: SMTP on {}, {} addresses, fleet change {} ({:.2} s since the demo started)",
            node.local_addrs[0],
            node.directory.len(),
            node.directory.applied(),
            t0.elapsed().as_secs_f64()
        );
        nodes.push(node);
    }
    let result = batches(&nodes, &listed, &mut states, &opts).await;
    let result = match result {
        Ok(times) => mail(&nodes, &onprem, &cloud, &states, &opts)
            .await
            .map(|m| (times, m)),
        Err(e) => Err(e),
    };
    for n in &nodes {
        if let Some(f) = &n.control.fleet {
            f.stop();
        }
    }
    drop(nodes);
    drop_schema(&opts.postgres, &schema).await;
    let (times, misrouted) = result?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(0.0);
    println!(
        "convergence of {} batches of {} mailboxes on 3 nodes: median {:.0} ms, max {:.0} ms (from the apply call to the change in force on every node)",
        times.len(),
        opts.batch_size,
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0) * 1e3,
        max * 1e3
    );
    if misrouted > 0 {
        return Err(DemoError::Misrouted(misrouted));
    }
    Ok(())
}

/// Applies the batches in turn through each node; returns each one's convergence time.
async fn batches(
    nodes: &[Running],
    listed: &[(crate::types::Address, &'static str)],
    states: &mut HashMap<String, &'static str>,
    opts: &FleetDemoOptions,
) -> Result<Vec<f64>, DemoError> {
    let mut times = Vec::new();
    for b in 0..opts.batches {
        let via = &nodes[b % nodes.len()];
        let fleet = via.control.fleet.clone().ok_or(DemoError::NoFleet)?;
        let writer = via.control.writer.clone();
        let target = if b % 2 == 0 { "cloud" } else { "onprem" };
        let start = (b * opts.batch_size / 2) % listed.len();
        let mut csv = String::from("EmailAddress\n");
        let chosen: Vec<&crate::types::Address> = listed
            .iter()
            .cycle()
            .skip(start)
            .take(opts.batch_size.min(listed.len()))
            .map(|(a, _)| a)
            .collect();
        for a in &chosen {
            csv.push_str(&a.to_string());
            csv.push('\n');
        }
        let rows = batch::parse(
            csv.as_bytes(),
            "demo-batch.csv",
            via.directory.states(),
            Some(target),
        )?;
        let t0 = Instant::now();
        let written = writer
            .apply(rows, format!("demo batch {}", b + 1), false)
            .await?;
        let (report, progress) = (written.report, written.progress);
        let committed = t0.elapsed();
        let seq = report.id.unwrap_or(0);
        for n in nodes {
            while n.directory.applied() < seq {
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err(DemoError::NotApplied(seq));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let all = t0.elapsed().as_secs_f64();
        for a in chosen {
            states.insert(a.key(), target);
        }
        println!(
            "batch {} ({} mailboxes to {target}) through {}: change {seq}, {} changed; committed and applied there in {:.0} ms; on all 3 nodes after {:.0} ms{}",
            b + 1,
            report.rows,
            fleet.node(),
            report.changed,
            committed.as_secs_f64() * 1e3,
            all * 1e3,
            progress
                .map(|p| format!(" ({} of {} live nodes had it when the call returned)", p.applied, p.live))
                .unwrap_or_default()
        );
        times.push(all);
    }
    Ok(times)
}

/// Sends mail through every node and counts recipients that reached the wrong side.
async fn mail(
    nodes: &[Running],
    onprem: &Sink,
    cloud: &Sink,
    states: &HashMap<String, &str>,
    opts: &FleetDemoOptions,
) -> Result<u64, DemoError> {
    let rcpts: Vec<crate::types::Address> = states
        .keys()
        .take(5000)
        .filter_map(|k| crate::types::Address::parse(k, false).ok())
        .collect();
    let mut want = 0;
    for n in nodes {
        let gen = Arc::new(client::Traffic::Synthetic(Generator {
            rcpts: rcpts.clone(),
            max_rcpts: 3,
            size: 2048,
            ..Generator::default()
        }));
        let r = client::run(
            LoadOptions::closed_loop(
                n.local_addrs[0],
                opts.messages,
                8,
                TlsPolicy::None,
                Duration::from_secs(120),
            ),
            gen,
        )
        .await;
        want += r.accepted_rcpts;
    }
    let delivered =
        super::demo::wait_delivered(onprem, cloud, want, Duration::from_secs(120)).await;
    let misrouted = super::demo::misrouted(onprem, cloud, states);
    println!(
        "mail through all 3 nodes: {delivered}/{want} recipients delivered, misrouted {misrouted}"
    );
    Ok(misrouted)
}

/// Drops the demo's schema (best effort: the demo's result does not depend on it).
async fn drop_schema(postgres: &str, schema: &str) {
    let Ok(conn) = crate::config::postgres::parse(postgres) else {
        return;
    };
    let Ok(pg) = crate::fleet::tls::Pg::new(conn) else {
        return;
    };
    if let Ok((c, conn)) = pg.connect(pg.tls()).await {
        tokio::spawn(conn);
        let _ = c
            .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))
            .await;
    }
}
