//! `coexist demo`: the relay's main job end to end on the embedded default config, with no
//! outside servers. Two sinks stand in for on-premises Exchange and Exchange Online, a
//! synthetic directory says where each mailbox lives, and the load client sends mail.
//!
//! The shipped cloud route verifies Exchange Online's certificate; the demo keeps that: its
//! Exchange Online sink presents a certificate for the route's `tls_name` from a demo CA,
//! which the route trusts through `tls_ca_file` ([`cloud_sink_tls`]).

use super::client::{self, Generator, LoadOptions};
use super::sink::{Sink, SinkOptions};
use crate::config::{Config, TlsPolicy, DEFAULT_CONFIG};
use crate::types::Address;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a demo (this one or the fleet demo) could not run, or what it found wrong.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded default config lacks what the demo needs (what, in words).
    #[error("{0}")]
    Embedded(&'static str),
    /// The embedded default config did not parse.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The demo certificates could not be made.
    #[error(transparent)]
    Certs(#[from] rcgen::Error),
    /// The demo's TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::certs::TlsError),
    /// A file or socket of the demo.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A relay did not start.
    #[error(transparent)]
    Start(#[from] crate::relay::StartError),
    /// A demo batch was refused.
    #[error(transparent)]
    Directory(#[from] crate::directory::DirectoryError),
    /// The fleet refused or failed.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// A demo batch could not be written through the directory writer.
    #[error(transparent)]
    Write(#[from] crate::directory::WriteError),
    /// A fleet demo node started without a fleet.
    #[error("node without a fleet")]
    NoFleet,
    /// A change did not reach every node in time.
    #[error("change {0} not applied on every node within 60 s")]
    NotApplied(u32),
    /// Mail was lost or misrouted.
    #[error("demo failed: {delivered}/{want} delivered, {misrouted} misrouted")]
    Failed {
        /// Recipients delivered.
        delivered: u64,
        /// Recipients accepted.
        want: u64,
        /// Recipients delivered to the wrong side.
        misrouted: u64,
    },
    /// The fleet demo misrouted mail.
    #[error("fleet demo failed: {0} recipients misrouted")]
    Misrouted(u64),
}

/// Demo settings.
pub struct DemoOptions {
    /// Messages to send.
    pub messages: u64,
    /// Concurrent client sessions.
    pub concurrency: usize,
    /// Mailboxes in the synthetic directory.
    pub mailboxes: usize,
    /// Most recipients per message.
    pub max_rcpts: usize,
    /// Approximate message size.
    pub size: usize,
    /// Use STARTTLS from the load client to the relay and to the on-premises sink (the
    /// Exchange Online sink always takes verified STARTTLS, as the shipped route requires).
    pub tls: bool,
}

/// The Exchange Online stand-in's TLS, for the shipped `cloud` route of `cfg`: a demo CA and a
/// certificate for the route's `tls_name`, written under `dir`; the route's `tls_ca_file` is
/// pointed at the CA. Returns the sink's acceptor.
pub(super) fn cloud_sink_tls(
    cfg: &mut Config,
    dir: &Path,
) -> Result<tokio_rustls::TlsAcceptor, DemoError> {
    let route = cfg.routes.get_mut("cloud").ok_or(DemoError::Embedded(
        "the embedded config has no cloud route",
    ))?;
    let name = route.tls_name.clone().ok_or(DemoError::Embedded(
        "the embedded cloud route has no tls_name",
    ))?;
    let certs = crate::certs::generate(&name)?;
    let (cert, key, ca) = (
        dir.join("cloud.crt"),
        dir.join("cloud.key"),
        dir.join("cloud-ca.crt"),
    );
    std::fs::write(&cert, &certs.cert_pem)?;
    std::fs::write(&key, &certs.key_pem)?;
    std::fs::write(&ca, &certs.ca_pem)?;
    route.tls_ca_file = Some(ca);
    Ok(crate::smtp::tls::load_acceptor(&cert, &key)?)
}

/// Writes a synthetic directory: `user{i}@nhs.test`, every second mailbox in `cloud`.
/// Returns the addresses and their states.
pub fn write_directory(
    path: &Path,
    mailboxes: usize,
) -> std::io::Result<Vec<(Address, &'static str)>> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "address,state")?;
    let mut out = Vec::with_capacity(mailboxes);
    for i in 0..mailboxes {
        let state = if i % 2 == 0 { "cloud" } else { "onprem" };
        let addr = format!("user{i}@nhs.test");
        writeln!(f, "{addr},{state}")?;
        if let Ok(a) = Address::parse(&addr, false) {
            out.push((a, state));
        }
    }
    f.flush()?;
    Ok(out)
}

/// Waits until the two sinks together have `want` recipients (or `deadline` passes);
/// returns how many they have.
pub(super) async fn wait_delivered(
    onprem: &Sink,
    cloud: &Sink,
    want: u64,
    deadline: Duration,
) -> u64 {
    let count = || {
        onprem
            .state
            .recipients
            .load(std::sync::atomic::Ordering::SeqCst)
            + cloud
                .state
                .recipients
                .load(std::sync::atomic::Ordering::SeqCst)
    };
    let t0 = Instant::now();
    while count() < want && t0.elapsed() <= deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    count()
}

/// Recipients that reached the sink of the other side than `expected` (address key → side)
/// says.
pub(super) fn misrouted(onprem: &Sink, cloud: &Sink, expected: &HashMap<String, &str>) -> u64 {
    [(onprem, "onprem"), (cloud, "cloud")]
        .iter()
        .map(|(sink, side)| {
            sink.state
                .messages()
                .iter()
                .flat_map(|m| m.rcpts.iter())
                .filter(|r| expected.get(&r.key()).is_some_and(|s| s != side))
                .count() as u64
        })
        .sum()
}

/// Runs the demo and prints its report.
pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let mut cfg = Config::parse(DEFAULT_CONFIG, "embedded default config")?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));

    let certs = crate::certs::generate(&cfg.server.hostname)?;
    std::fs::write(dir.join("server.crt"), &certs.cert_pem)?;
    std::fs::write(dir.join("server.key"), &certs.key_pem)?;
    let sink_tls = if opts.tls {
        Some(crate::smtp::tls::load_acceptor(
            &dir.join("server.crt"),
            &dir.join("server.key"),
        )?)
    } else {
        None
    };
    let sink_opts = SinkOptions {
        tls: sink_tls,
        keep_bodies: false,
        ..SinkOptions::default()
    };
    let onprem = Sink::start(
        loopback,
        SinkOptions {
            hostname: "onprem.sink.test".into(),
            ..sink_opts.clone()
        },
    )
    .await?;
    let cloud = Sink::start(
        loopback,
        SinkOptions {
            hostname: "cloud.sink.test".into(),
            tls: Some(cloud_sink_tls(&mut cfg, dir)?),
            ..sink_opts
        },
    )
    .await?;

    let mailboxes = write_directory(&dir.join("directory.csv"), opts.mailboxes.max(1))?;
    cfg.server.listen = vec![loopback];
    cfg.admin = None;
    cfg.directory.watch = false;
    cfg.spool.dir = dir.join("spool");
    cfg.directory.file = Some(dir.join("directory.csv"));
    cfg.directory.store_dir = dir.join("directory-store");
    if let Some(t) = cfg.tls.as_mut() {
        t.cert = dir.join("server.crt");
        t.key = dir.join("server.key");
    }
    cfg.queue.min_backoff = Duration::from_secs(1);
    for (name, route) in cfg.routes.iter_mut() {
        let sink = if name == "cloud" { &cloud } else { &onprem };
        route.next_hops = vec![sink.addr.into()];
    }
    let relay = crate::relay::start(cfg).await?;
    let target = relay.local_addrs[0];
    println!(
        "coexist demo: relay on {target}, on-premises sink on {}, Exchange Online sink on {}, {} mailboxes",
        onprem.addr,
        cloud.addr,
        mailboxes.len()
    );

    let expected: HashMap<String, &str> = mailboxes.iter().map(|(a, s)| (a.key(), *s)).collect();
    let gen = Arc::new(client::Traffic::Synthetic(Generator {
        rcpts: mailboxes.into_iter().map(|(a, _)| a).collect(),
        max_rcpts: opts.max_rcpts,
        size: opts.size,
        ..Generator::default()
    }));
    let started = Instant::now();
    let report = client::run(
        LoadOptions::closed_loop(
            target,
            opts.messages,
            opts.concurrency,
            if opts.tls {
                TlsPolicy::Opportunistic
            } else {
                TlsPolicy::None
            },
            Duration::from_secs(300),
        ),
        gen,
    )
    .await;
    let want = report.accepted_rcpts;
    let got_onprem_cloud = wait_delivered(&onprem, &cloud, want, Duration::from_secs(120)).await;
    let end_to_end = started.elapsed().as_secs_f64();

    let mut per_side = Vec::new();
    for (sink, side) in [(&onprem, "onprem"), (&cloud, "cloud")] {
        let msgs = sink.state.messages();
        let rcpts: usize = msgs.iter().map(|m| m.rcpts.len()).sum();
        per_side.push((side, msgs.len(), rcpts));
    }
    let misrouted = misrouted(&onprem, &cloud, &expected);
    relay.stop_listening();

    println!("{}", report.summary(opts.concurrency));
    for (side, msgs, rcpts) in &per_side {
        println!("  {side:>6}: {msgs} deliveries, {rcpts} recipients");
    }
    println!("  delivered {got_onprem_cloud}/{want} recipients, misrouted {misrouted}");
    println!(
        "end to end: {:.2} s from first message sent to last recipient delivered ({:.0} msg/s)",
        end_to_end,
        report.accepted as f64 / end_to_end.max(1e-9)
    );
    if got_onprem_cloud < want || misrouted > 0 || report.accepted == 0 {
        return Err(DemoError::Failed {
            delivered: got_onprem_cloud,
            want,
            misrouted,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo delivers everything on the shipped config, the cloud leg over TLS verified
    /// against the route's `tls_name` (a refused certificate would leave mail undelivered
    /// and the demo would fail), with and without TLS on the other legs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_delivers_with_the_cloud_route_verifying() {
        let shipped = Config::parse(DEFAULT_CONFIG, "embedded default config").unwrap();
        assert_eq!(shipped.routes["cloud"].tls, TlsPolicy::Verify);
        for tls in [true, false] {
            run(DemoOptions {
                messages: 40,
                concurrency: 4,
                mailboxes: 50,
                max_rcpts: 2,
                size: 1000,
                tls,
            })
            .await
            .unwrap();
        }
    }
}
