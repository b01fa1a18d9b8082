//! `coexist demo`: the relay's main job end to end on the embedded default config, with no
//! outside servers. Two sinks stand in for on-premises Exchange and Exchange Online, a
//! synthetic directory says where each mailbox lives, and the load client sends mail.

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
    /// Use STARTTLS on both legs.
    pub tls: bool,
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
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let mut cfg = Config::parse(DEFAULT_CONFIG, "embedded default config")?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;

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
        anyhow::bail!("demo failed: {got_onprem_cloud}/{want} delivered, {misrouted} misrouted");
    }
    Ok(())
}
