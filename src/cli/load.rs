//! The traffic tools: `coexist load` (replay generated or recorded mail at a server and
//! report rates and latency), `coexist sink` (a recording stand-in next hop) and
//! `coexist demo` (the relay end to end with two built-in sinks).
//!
//! This file turns the flags into the options of [`crate::load`]: which traffic to send
//! ([`client::Traffic`]: generated from a directory or synthetic recipients, or replayed
//! from .eml files or an mbox), and where to write the report.

use crate::load::client;
use crate::load::sink::{Sink, SinkOptions};
use crate::types::Address;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `coexist load`.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// Server to load.
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub target: SocketAddr,
    /// Messages to send.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Messages per session before reconnecting.
    #[arg(long, default_value_t = 100)]
    pub per_session: u64,
    /// Draw recipients from this directory CSV (default: user0..user9999@nhs.test).
    #[arg(long)]
    pub directory: Option<PathBuf>,
    /// Most recipients per message.
    #[arg(long, default_value_t = 3)]
    pub max_rcpts: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Use STARTTLS when offered.
    #[arg(long)]
    pub tls: bool,
    /// Stop after this many seconds whatever the count.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Write the queue id of every accepted message to this file, one per line.
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Do not use PIPELINING even when offered.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Do not use CHUNKING (BDAT) even when offered: send with DATA.
    #[arg(long)]
    pub no_chunking: bool,
    /// Open loop: start this many messages per second (sessions at most --concurrency);
    /// the report says when the target was missed.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measure MAIL-RCPT and DATA apart (waits for the RCPT replies before the body).
    #[arg(long)]
    pub phases: bool,
    /// Replay the .eml files of this folder instead of generated mail.
    #[arg(long)]
    pub eml: Option<PathBuf>,
    /// Replay the messages of this mbox file instead of generated mail.
    #[arg(long)]
    pub mbox: Option<PathBuf>,
    /// Envelope sender for replayed files (default: their From header).
    #[arg(long)]
    pub from: Option<String>,
    /// Envelope recipients for replayed files (default: their To and Cc headers).
    #[arg(long)]
    pub to: Vec<String>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput and latency over time as SVG into this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Size distribution instead of --size, e.g. 2k:50,10k:30,100k:15,1m:5 (size:weight).
    #[arg(long)]
    pub size_dist: Option<String>,
    /// With --directory: share (0 to 1) of recipients drawn from `cloud` mailboxes.
    #[arg(long)]
    pub cloud_share: Option<f64>,
    /// UTF-8 Subject and an 8-bit body line.
    #[arg(long)]
    pub utf8: bool,
    /// Share (0 to 1) of messages with a base64 attachment.
    #[arg(long, default_value_t = 0.0)]
    pub attachment_share: f64,
}

/// Arguments of `coexist sink`.
#[derive(clap::Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2601")]
    pub listen: SocketAddr,
    /// Append `QUEUE-ID COUNT RCPT,RCPT... CRC32` per accepted message to this file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Share (0 to 1) of recipients to defer with 450 4.2.1.
    #[arg(long, default_value_t = 0.0)]
    pub defer_share: f64,
    /// Share (0 to 1) of recipients to refuse with 550 5.1.1.
    #[arg(long, default_value_t = 0.0)]
    pub reject_share: f64,
    /// Milliseconds to wait before answering the end of data.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Most recipients per transaction; further RCPTs get 452 4.5.3 (0: every RCPT).
    #[arg(long, default_value_t = 100_000)]
    pub max_rcpts: usize,
    /// Do not offer SMTPUTF8 (MAIL with SMTPUTF8 gets 555 5.5.4).
    #[arg(long)]
    pub no_smtputf8: bool,
    /// Send every error reply (4xx, 5xx) in three lines, the original text first.
    #[arg(long)]
    pub multiline_errors: bool,
}

/// Arguments of `coexist demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 5000)]
    pub messages: u64,
    /// Concurrent client sessions.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Mailboxes in the synthetic directory (half on each side).
    #[arg(long, default_value_t = 10_000)]
    pub mailboxes: usize,
    /// Most recipients per message.
    #[arg(long, default_value_t = 3)]
    pub max_rcpts: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Plain text on both legs instead of STARTTLS.
    #[arg(long)]
    pub no_tls: bool,
    /// Three nodes sharing the directory through PostgreSQL: applies migration batches
    /// through each node in turn and prints how long each takes to be in force on all three.
    #[arg(long)]
    pub fleet: bool,
    /// PostgreSQL for `--fleet` (a schema of its own is created and dropped).
    #[arg(long, default_value = "postgresql://postgres@127.0.0.1:5432/test")]
    pub postgres: String,
    /// Batches `--fleet` applies.
    #[arg(long, default_value_t = 6)]
    pub batches: usize,
    /// Mailboxes per batch with `--fleet` (a migration weekend's batch).
    #[arg(long, default_value_t = 83_000)]
    pub batch_size: usize,
}

/// Runs the load, prints the summary and writes the files asked for.
pub fn load(args: LoadArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let traffic = Arc::new(traffic(&args)?);
    let report = rt.block_on(client::run(
        client::LoadOptions {
            target: args.target,
            messages: args.messages,
            concurrency: args.concurrency,
            per_session: args.per_session,
            tls: if args.tls {
                crate::config::TlsPolicy::Opportunistic
            } else {
                crate::config::TlsPolicy::None
            },
            max_duration: Duration::from_secs(args.max_seconds),
            pipelining: !args.no_pipelining,
            chunking: !args.no_chunking,
            rate: args.rate,
            phases: args.phases,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        },
        traffic,
    ));
    println!("{}", report.summary(args.concurrency));
    let write = |path: &PathBuf, bytes: &[u8]| {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.json {
        write(path, &serde_json::to_vec_pretty(&report.to_json())?)?;
    }
    if let Some(path) = &args.report {
        write(path, report.svg().as_bytes())?;
    }
    if let Some(path) = &args.ids {
        let mut text = report.ids.join("\n");
        text.push('\n');
        write(path, text.as_bytes())?;
    }
    Ok(())
}

/// The traffic the flags ask for: recorded files replayed, or generated mail.
fn traffic(args: &LoadArgs) -> anyhow::Result<client::Traffic> {
    if args.eml.is_some() || args.mbox.is_some() {
        let from = args
            .from
            .as_ref()
            .map(|f| Address::parse(f, true))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--from: {e}"))?;
        let to = args
            .to
            .iter()
            .map(|t| Address::parse(t, true).map_err(|e| anyhow::anyhow!("--to {t}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let msgs = client::read_messages(
            args.eml.as_deref(),
            args.mbox.as_deref(),
            from.as_ref(),
            &to,
        )?;
        anyhow::ensure!(
            !msgs.is_empty(),
            "no message with a sender and recipients in the files"
        );
        return Ok(client::Traffic::Files(msgs));
    }
    // One read of the directory serves both the recipient list and the split by state.
    let rows = match args.directory.as_deref() {
        Some(path) => client::directory_rows(path)?,
        None => client::synthetic_recipients(10_000)
            .into_iter()
            .map(|a| (a, false))
            .collect(),
    };
    anyhow::ensure!(!rows.is_empty(), "no recipients to send to");
    let sizes = match &args.size_dist {
        Some(d) => client::parse_sizes(d).map_err(|e| anyhow::anyhow!("--size-dist {e}"))?,
        None => Vec::new(),
    };
    let by_state = match args.cloud_share {
        Some(_) if args.directory.is_none() => {
            anyhow::bail!("--cloud-share needs --directory")
        }
        Some(share) => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&share),
                "--cloud-share must be between 0 and 1"
            );
            let (cloud, other): (Vec<_>, Vec<_>) = rows.iter().cloned().partition(|(_, c)| *c);
            Some((
                cloud.into_iter().map(|(a, _)| a).collect(),
                other.into_iter().map(|(a, _)| a).collect(),
                share,
            ))
        }
        None => None,
    };
    Ok(client::Traffic::Synthetic(client::Generator {
        rcpts: rows.into_iter().map(|(a, _)| a).collect(),
        max_rcpts: args.max_rcpts,
        size: args.size,
        sizes,
        by_state,
        utf8: args.utf8,
        attachment_share: args.attachment_share,
    }))
}

/// Runs a sink until SIGINT or SIGTERM; SIGUSR1 prints its counts, and so does stopping.
pub fn sink(args: SinkArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.defer_share)
            && (0.0..=1.0).contains(&args.reject_share)
            && args.defer_share + args.reject_share <= 1.0,
        "--defer-share and --reject-share must be between 0 and 1, and together at most 1"
    );
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let sink = Sink::start(
            args.listen,
            SinkOptions {
                keep_bodies: false,
                record: args.record,
                defer_share: args.defer_share,
                reject_share: args.reject_share,
                delay: Duration::from_millis(args.delay_ms),
                max_rcpts: args.max_rcpts,
                smtputf8: !args.no_smtputf8,
                multiline_errors: args.multiline_errors,
                ..Default::default()
            },
        )
        .await?;
        tracing::info!(addr = %sink.addr, "sink ready");
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut term = signal(SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = usr1.recv() => println!("{}", sink.state.summary()),
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        println!("{}", sink.state.summary());
        anyhow::Ok(())
    })
}

/// Runs the demo: the relay on the embedded default config between the load client and two
/// sinks.
pub fn demo(args: DemoArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if args.fleet {
        return rt.block_on(crate::load::fleet_demo::run(
            crate::load::fleet_demo::FleetDemoOptions {
                postgres: args.postgres,
                mailboxes: args.mailboxes.max(args.batch_size * 2),
                batches: args.batches,
                batch_size: args.batch_size,
                messages: 300,
            },
        ));
    }
    rt.block_on(crate::load::demo::run(crate::load::demo::DemoOptions {
        messages: args.messages,
        concurrency: args.concurrency,
        mailboxes: args.mailboxes,
        max_rcpts: args.max_rcpts,
        size: args.size,
        tls: !args.no_tls,
    }))
}
