//! The traffic tools: `coexist load` (replay generated or recorded mail at a server and
//! report rates and latency), `coexist sink` (a recording stand-in next hop) and
//! `coexist demo` (the relay end to end with two built-in sinks).
//!
//! This file turns the flags into the options of [`crate::load`]: which traffic to send
//! ([`client::Traffic`]: generated from a directory or synthetic recipients, or replayed
//! from .eml files or an mbox, paced or not), and where to write the reports (JSON
//! document, chart, HTML; see [`crate::load::report`]).

use crate::load::client;
use crate::load::report::{Parameters, Skipped};
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
    /// More servers beside --target, as MX hosts of equal preference (comma-separated, or
    /// the flag repeated): sessions start at each in turn and move on to the next when a
    /// connection is refused or greeted with 421.
    #[arg(long, value_delimiter = ',')]
    pub also: Vec<SocketAddr>,
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
    /// Envelope recipients for replayed files (default: their To and Cc headers): a
    /// comma-separated list, or the flag repeated.
    #[arg(long, value_delimiter = ',')]
    pub to: Vec<String>,
    /// Replayed files at their original pace (Date header, else the newest Received):
    /// `original`, or a speed-up factor such as 60 (an hour in a minute). Files without a
    /// date are skipped; --max-seconds still ends the run.
    #[arg(long, value_name = "original|FACTOR")]
    pub timing: Option<Timing>,
    /// The run's name in reports (default: the target address).
    #[arg(long)]
    pub label: Option<String>,
    /// Write the report document (figures, parameters, series over time) as JSON to this
    /// file; `coexist report` reads it.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput, latency percentiles and (with --metrics-url) per-route deliveries
    /// over time into this file: PNG if its name ends in .png, else SVG.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write a self-contained HTML report (parameters, summary, charts) to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Scrape the relay's Prometheus metrics at this URL before, during and after the run,
    /// for deliveries per route (e.g. http://127.0.0.1:8025/metrics).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Bearer token for --metrics-url: the file holding the relay's admin token.
    #[arg(long, requires = "metrics_url")]
    pub metrics_token_file: Option<PathBuf>,
    /// With --metrics-url: after the load, wait at most this many seconds for every
    /// recipient the relay accepted to be delivered or bounced.
    #[arg(long, default_value_t = 10, requires = "metrics_url")]
    pub metrics_settle: u64,
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
    /// Append `QUEUE-ID COUNT RCPT,RCPT... CRC32 UNIX_MS` per accepted message to this file.
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
    /// Plain text from the load client to the relay and to the on-premises sink instead of
    /// STARTTLS (the Exchange Online sink always takes verified STARTTLS, as the shipped
    /// cloud route requires).
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

/// `--timing`: replayed files at their original pace, or sped up.
#[derive(Clone, Debug, PartialEq)]
pub enum Timing {
    /// As they happened.
    Original,
    /// This many times faster.
    Factor(f64),
}

/// A `--timing` that is neither `original` nor a factor above 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: want `original` or a speed-up factor above 0 (60: a minute per second)")]
pub struct BadTiming(pub String);

impl std::str::FromStr for Timing {
    type Err = BadTiming;
    fn from_str(s: &str) -> Result<Timing, BadTiming> {
        if s.eq_ignore_ascii_case("original") {
            return Ok(Timing::Original);
        }
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Timing::Factor(f)),
            _ => Err(BadTiming(s.to_string())),
        }
    }
}

impl Timing {
    fn factor(&self) -> f64 {
        match self {
            Timing::Original => 1.0,
            Timing::Factor(f) => *f,
        }
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Timing::Original => write!(f, "original"),
            Timing::Factor(x) => write!(f, "{x}x faster"),
        }
    }
}

/// Runs the load, prints the summary and writes the files asked for.
pub fn load(args: LoadArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let chosen = traffic(&args)?;
    let opts = client::LoadOptions {
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
        offsets: chosen.offsets,
        phases: args.phases,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        more_targets: args.also.clone(),
        observer: None,
    };
    let parameters = Parameters {
        target: args.target.to_string(),
        messages: args.messages,
        concurrency: args.concurrency,
        per_session: args.per_session,
        tls: args.tls,
        pipelining: !args.no_pipelining,
        chunking: !args.no_chunking,
        phases: args.phases,
        rate: args.rate,
        max_seconds: args.max_seconds as f64,
        traffic: chosen.description,
        timing: args.timing.as_ref().map(|t| t.to_string()),
    };
    let scraper = match &args.metrics_url {
        Some(url) => {
            let token = match &args.metrics_token_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("--metrics-token-file {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            Some(client::Scraper::start(url, token)?)
        }
        None => None,
    };
    let report = rt.block_on(client::run(opts, Arc::new(chosen.traffic)));
    let routes = scraper.map(|s| s.finish(Duration::from_secs(args.metrics_settle)));
    println!("{}", report.summary(args.concurrency));
    if let Some(s) = &chosen.skipped {
        println!("{}", s.line());
    }
    if let Some(r) = &routes {
        let split = r
            .totals
            .iter()
            .map(|(k, t)| {
                format!(
                    "{k} {} accepted, {} delivered, {} deferred, {} bounced",
                    t.accepted, t.sent, t.deferred, t.bounced
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "relay metrics ({}): {}",
            r.url,
            if split.is_empty() {
                "no route counted"
            } else {
                &split
            }
        );
    }
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| args.target.to_string());
    let doc = report.document(label, parameters, routes, chosen.skipped);
    let write = |path: &PathBuf, bytes: &[u8]| {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.json {
        write(path, &serde_json::to_vec_pretty(&doc)?)?;
    }
    super::report::draw(&doc, args.report.as_deref(), args.html.as_deref())?;
    if let Some(path) = &args.ids {
        let mut text = report.ids.join("\n");
        text.push('\n');
        write(path, text.as_bytes())?;
    }
    Ok(())
}

/// What the flags ask to send, how, and what was left out.
struct Chosen {
    traffic: client::Traffic,
    /// Original pacing of replayed files (`--timing`).
    offsets: Option<client::Offsets>,
    /// The traffic in words, for reports.
    description: String,
    /// Replayed files not sent.
    skipped: Option<Skipped>,
}

/// The traffic the flags ask for: recorded files replayed, or generated mail.
fn traffic(args: &LoadArgs) -> anyhow::Result<Chosen> {
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
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| Address::parse(t, true).map_err(|e| anyhow::anyhow!("--to {t}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut replayed = client::read_messages(
            args.eml.as_deref(),
            args.mbox.as_deref(),
            from.as_ref(),
            &to,
        )?;
        let offsets = args.timing.as_ref().map(|t| {
            let times = replayed.by_time();
            client::Offsets::from_times(&times, t.factor())
        });
        if replayed.messages.is_empty() {
            anyhow::bail!(
                "no message to replay in the files ({})",
                replayed.skipped.line()
            );
        }
        let places = [
            args.eml
                .as_ref()
                .map(|p| format!("the .eml files of {}", p.display())),
            args.mbox
                .as_ref()
                .map(|p| format!("the mbox {}", p.display())),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ");
        let description = format!(
            "replayed: {} messages from {places}, round robin{}{}",
            replayed.messages.len(),
            args.from
                .as_ref()
                .map(|f| format!(", envelope sender {f}"))
                .unwrap_or_default(),
            if to.is_empty() {
                String::new()
            } else {
                format!(
                    ", envelope recipients {}",
                    to.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        return Ok(Chosen {
            traffic: client::Traffic::Files(replayed.messages),
            offsets,
            description,
            skipped: Some(replayed.skipped),
        });
    }
    anyhow::ensure!(
        args.timing.is_none(),
        "--timing needs replayed files (--eml or --mbox)"
    );
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
    let description = format!(
        "generated: {}, 1 to {} recipients each from {}{}{}{}",
        match &args.size_dist {
            Some(d) => format!("sizes {d} (size:weight)"),
            None => format!("about {} bytes", args.size),
        },
        args.max_rcpts.max(1),
        match &args.directory {
            Some(p) => format!("{} ({} addresses)", p.display(), rows.len()),
            None => format!("{} synthetic addresses", rows.len()),
        },
        args.cloud_share
            .map(|s| format!(", {:.0} % cloud", s * 100.0))
            .unwrap_or_default(),
        if args.utf8 { ", UTF-8 headers" } else { "" },
        if args.attachment_share > 0.0 {
            format!(", {:.0} % with attachments", args.attachment_share * 100.0)
        } else {
            String::new()
        },
    );
    let traffic = client::Traffic::Synthetic(client::Generator {
        rcpts: rows.into_iter().map(|(a, _)| a).collect(),
        max_rcpts: args.max_rcpts,
        size: args.size,
        sizes,
        by_state,
        utf8: args.utf8,
        attachment_share: args.attachment_share,
    });
    Ok(Chosen {
        traffic,
        offsets: None,
        description,
        skipped: None,
    })
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
        return Ok(rt.block_on(crate::load::fleet_demo::run(
            crate::load::fleet_demo::FleetDemoOptions {
                postgres: args.postgres,
                mailboxes: args.mailboxes.max(args.batch_size * 2),
                batches: args.batches,
                batch_size: args.batch_size,
                messages: 300,
            },
        ))?);
    }
    rt.block_on(crate::load::demo::run(crate::load::demo::DemoOptions {
        messages: args.messages,
        concurrency: args.concurrency,
        mailboxes: args.mailboxes,
        max_rcpts: args.max_rcpts,
        size: args.size,
        tls: !args.no_tls,
    }))?;
    Ok(())
}
