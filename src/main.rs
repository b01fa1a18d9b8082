//! The `coexist` command: serve, check-config, demo, gen-certs, sink.

use anyhow::Context;
use clap::{Parser, Subcommand};
use coexist::config::{Config, DEFAULT_CONFIG};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "coexist",
    version,
    about = "Mail-flow coexistence SMTP relay for mailbox migrations"
)]
struct Cli {
    /// Log format on stderr: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the relay.
    Serve {
        /// Config file (TOML); the embedded default config when absent.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file (and the directory and certificates it names) without starting.
    CheckConfig {
        /// Config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the relay end to end on the embedded default config with two built-in sinks.
    Demo {
        /// Messages to send.
        #[arg(long, default_value_t = 5000)]
        messages: u64,
        /// Concurrent client sessions.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Mailboxes in the synthetic directory (half on each side).
        #[arg(long, default_value_t = 10_000)]
        mailboxes: usize,
        /// Most recipients per message.
        #[arg(long, default_value_t = 3)]
        max_rcpts: usize,
        /// Approximate message size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Plain text on both legs instead of STARTTLS.
        #[arg(long)]
        no_tls: bool,
    },
    /// Write a development CA and server certificate (ca.crt, server.crt, server.key).
    GenCerts {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Host name for the certificate.
        #[arg(long, default_value = "mx1.coexist.test")]
        hostname: String,
    },
    /// Migration-state directory: lookups, batches, rollbacks (through the admin API).
    Directory {
        #[command(subcommand)]
        cmd: DirCmd,
    },
    /// The queue (through the admin API), like postqueue/postsuper.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Routing questions (through the admin API).
    Route {
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// Send a bounded load of generated mail to an SMTP server and report rates and latency.
    Load {
        /// Server to load.
        #[arg(long, default_value = "127.0.0.1:2525")]
        target: SocketAddr,
        /// Messages to send.
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Messages per session before reconnecting.
        #[arg(long, default_value_t = 100)]
        per_session: u64,
        /// Draw recipients from this directory CSV (default: user0..user9999@nhs.test).
        #[arg(long)]
        directory: Option<PathBuf>,
        /// Most recipients per message.
        #[arg(long, default_value_t = 3)]
        max_rcpts: usize,
        /// Approximate message size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Use STARTTLS when offered.
        #[arg(long)]
        tls: bool,
        /// Stop after this many seconds whatever the count.
        #[arg(long, default_value_t = 300)]
        max_seconds: u64,
        /// Write the queue id of every accepted message to this file, one per line.
        #[arg(long)]
        ids: Option<PathBuf>,
        /// Do not use PIPELINING even when offered.
        #[arg(long)]
        no_pipelining: bool,
        /// Do not use CHUNKING (BDAT) even when offered: send with DATA.
        #[arg(long)]
        no_chunking: bool,
        /// Open loop: start this many messages per second (sessions at most --concurrency);
        /// the report says when the target was missed.
        #[arg(long)]
        rate: Option<f64>,
        /// Measure MAIL-RCPT and DATA apart (waits for the RCPT replies before the body).
        #[arg(long)]
        phases: bool,
        /// Replay the .eml files of this folder instead of generated mail.
        #[arg(long)]
        eml: Option<PathBuf>,
        /// Replay the messages of this mbox file instead of generated mail.
        #[arg(long)]
        mbox: Option<PathBuf>,
        /// Envelope sender for replayed files (default: their From header).
        #[arg(long)]
        from: Option<String>,
        /// Envelope recipients for replayed files (default: their To and Cc headers).
        #[arg(long)]
        to: Vec<String>,
        /// Write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw throughput and latency over time as SVG into this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Size distribution instead of --size, e.g. 2k:50,10k:30,100k:15,1m:5 (size:weight).
        #[arg(long)]
        size_dist: Option<String>,
        /// With --directory: share (0 to 1) of recipients drawn from `cloud` mailboxes.
        #[arg(long)]
        cloud_share: Option<f64>,
        /// UTF-8 Subject and an 8-bit body line.
        #[arg(long)]
        utf8: bool,
        /// Share (0 to 1) of messages with a base64 attachment.
        #[arg(long, default_value_t = 0.0)]
        attachment_share: f64,
    },
    /// Re-read the running server's config file and swap it in (refused whole if invalid).
    Reload {
        #[command(flatten)]
        api: Api,
    },
    /// Answer new SMTP sessions with 421 so traffic moves to other MX hosts (`--off` ends it).
    Drain {
        /// Stop draining.
        #[arg(long)]
        off: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Readiness of the running server: draining, open sessions, directory size.
    Status {
        #[command(flatten)]
        api: Api,
    },
    /// Run a recording SMTP sink (a stand-in next hop) until interrupted.
    Sink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2601")]
        listen: SocketAddr,
        /// Append `QUEUE-ID COUNT RCPT,RCPT... CRC32` per accepted message to this file.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Share (0 to 1) of recipients to defer with 450 4.2.1.
        #[arg(long, default_value_t = 0.0)]
        defer_share: f64,
        /// Share (0 to 1) of recipients to refuse with 550 5.1.1.
        #[arg(long, default_value_t = 0.0)]
        reject_share: f64,
        /// Milliseconds to wait before answering the end of data.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Most recipients per transaction; further RCPTs get 452 4.5.3 (0: every RCPT).
        #[arg(long, default_value_t = 100_000)]
        max_rcpts: usize,
        /// Do not offer SMTPUTF8 (MAIL with SMTPUTF8 gets 555 5.5.4).
        #[arg(long)]
        no_smtputf8: bool,
        /// Send every error reply (4xx, 5xx) in three lines, the original text first.
        #[arg(long)]
        multiline_errors: bool,
    },
}

/// Where the CLI finds the running server.
#[derive(clap::Args)]
struct Api {
    /// Config file of the running server (for the admin API address and token); the
    /// embedded default config when absent.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum DirCmd {
    /// Apply a migration batch to the running server (our CSV or New-MigrationBatch CSV).
    Apply {
        /// Batch file.
        file: PathBuf,
        /// Target state (route name); without it the file needs a `state` column.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Preview what a batch would change, without applying it.
    Diff {
        /// Batch file.
        file: PathBuf,
        /// Target state (route name).
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Undo a batch by id.
    Rollback {
        /// Batch id (from `apply` or `batches`).
        id: u32,
        #[command(flatten)]
        api: Api,
    },
    /// Show an address's state, where it comes from, and its route now.
    Lookup {
        /// Address.
        address: String,
        #[command(flatten)]
        api: Api,
    },
    /// List applied batches, rollbacks and file reloads.
    Batches {
        #[command(flatten)]
        api: Api,
    },
    /// Re-read the directory file on the running server.
    Reload {
        /// Apply it even if it removes more than `directory.max_shrink` of the addresses.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: Api,
    },
    /// Write a synthetic directory CSV (for tests and benchmarks).
    Generate {
        /// Number of addresses.
        #[arg(long)]
        count: usize,
        /// Number of domains (nhs.test, trust1.nhs.test, ...).
        #[arg(long, default_value_t = 1)]
        domains: usize,
        /// Share of mailboxes in `cloud` (0 to 1).
        #[arg(long, default_value_t = 0.5)]
        cloud_share: f64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// List queued messages with each recipient's state, route, next attempt and last reply.
    List {
        /// Only messages with a pending recipient on this route.
        #[arg(long)]
        route: Option<String>,
        /// Only messages in this state: active, deferred, held.
        #[arg(long)]
        state: Option<String>,
        /// Only messages older than this (e.g. 30m, 4h).
        #[arg(long)]
        min_age: Option<String>,
        /// Only messages with a recipient containing this text.
        #[arg(long)]
        rcpt: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Show one message.
    Show {
        /// Queue id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Attempt deferred mail now: one message, one route, or all.
    Flush {
        /// Queue id (all deferred messages when absent).
        id: Option<String>,
        /// Only messages with a pending recipient on this route.
        #[arg(long)]
        route: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Hold a message: no delivery until released (kept across restarts).
    Hold {
        /// Queue id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Release a held message (attempted at once).
    Release {
        /// Queue id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Delete a message from the queue and the spool, without a bounce.
    Delete {
        /// Queue id.
        id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Attempt every deferred message now.
    RetryNow {
        #[command(flatten)]
        api: Api,
    },
}

fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn message_text(m: &serde_json::Value) -> String {
    let mut out = format!(
        "{}  {:>6}  {:>8}  {:<8}  <{}>",
        m["id"].as_str().unwrap_or(""),
        age(m["age_s"].as_u64().unwrap_or(0)),
        m["size"],
        m["phase"].as_str().unwrap_or(""),
        m["from"].as_str().unwrap_or("")
    );
    for r in m["recipients"].as_array().into_iter().flatten() {
        let status = r["status"].as_str().unwrap_or("");
        if status == "delivered" {
            continue;
        }
        out.push_str(&format!(
            "\n    {:<40} {:<9} route {:<8}",
            r["address"].as_str().unwrap_or(""),
            status,
            r["route"].as_str().unwrap_or("-")
        ));
        if status == "deferred" {
            if let Some(n) = m["next_attempt_in_s"].as_u64() {
                out.push_str(&format!(" next in {}", age(n)));
            }
        }
        if let Some(reply) = r["last_reply"].as_str() {
            out.push_str(&format!("\n        ({reply})"));
        }
    }
    out
}

fn run_queue(cmd: QueueCmd) -> anyhow::Result<()> {
    use coexist::admin::client::encode;
    let action = |id: &str, what: &str, api: &Api| -> anyhow::Result<()> {
        let v = client(api)?.post(
            &format!("/v1/queue/{}/{what}", encode(id)),
            b"",
            "text/plain",
        )?;
        show(api, &v, |_| format!("{id}: {what}"));
        Ok(())
    };
    match cmd {
        QueueCmd::List {
            route,
            state,
            min_age,
            rcpt,
            api,
        } => {
            let mut q = Vec::new();
            if let Some(r) = route {
                q.push(format!("route={}", encode(&r)));
            }
            if let Some(s) = state {
                q.push(format!("state={}", encode(&s)));
            }
            if let Some(a) = min_age {
                let d =
                    humantime::parse_duration(&a).with_context(|| format!("--min-age {a:?}"))?;
                q.push(format!("min_age={}", d.as_secs()));
            }
            if let Some(r) = rcpt {
                q.push(format!("rcpt={}", encode(&r)));
            }
            let v = client(&api)?.get(&format!("/v1/queue?{}", q.join("&")))?;
            show(&api, &v, |v| {
                let list = v.as_array().cloned().unwrap_or_default();
                let mut out = format!("{} message(s)", list.len());
                for m in &list {
                    out.push('\n');
                    out.push_str(&message_text(m));
                }
                out
            });
            Ok(())
        }
        QueueCmd::Show { id, api } => {
            let v = client(&api)?.get(&format!("/v1/queue/{}", encode(&id)))?;
            show(&api, &v, message_text);
            Ok(())
        }
        QueueCmd::Flush {
            id: Some(id), api, ..
        } => action(&id, "flush", &api),
        QueueCmd::Flush {
            id: None,
            route,
            api,
        } => {
            let path = match &route {
                Some(r) => format!("/v1/queue/flush?route={}", encode(r)),
                None => "/v1/queue/flush".to_string(),
            };
            let v = client(&api)?.post(&path, b"", "text/plain")?;
            show(&api, &v, |v| {
                format!("flushed {} deferred message(s)", v["flushed"])
            });
            Ok(())
        }
        QueueCmd::Hold { id, api } => action(&id, "hold", &api),
        QueueCmd::Release { id, api } => action(&id, "release", &api),
        QueueCmd::Delete { id, api } => action(&id, "delete", &api),
        QueueCmd::RetryNow { api } => {
            let v = client(&api)?.post("/v1/queue/flush", b"", "text/plain")?;
            show(&api, &v, |v| {
                format!("flushed {} deferred message(s)", v["flushed"])
            });
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Show where mail for each address would go now, and why.
    Explain {
        /// Addresses.
        #[arg(required = true)]
        addresses: Vec<String>,
        #[command(flatten)]
        api: Api,
    },
}

fn client(api: &Api) -> anyhow::Result<coexist::admin::client::AdminClient> {
    let cfg = load_config(api.config.as_ref())?;
    Ok(coexist::admin::client::AdminClient::from_config(&cfg)?)
}

fn show(api: &Api, v: &serde_json::Value, text: impl FnOnce(&serde_json::Value) -> String) {
    if api.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", text(v));
    }
}

fn batch_text(v: &serde_json::Value, what: &str) -> String {
    let mut s = match v["id"].as_u64() {
        Some(id) => format!("{what}: id {id}"),
        None => format!("{what}: nothing applied"),
    };
    s.push_str(&format!(
        "\n  rows {}, changed {}, already in state {}, not found {}",
        v["rows"], v["changed"], v["already"], v["not_found_count"]
    ));
    if v["changed_since"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!(
            ", moved again since (left alone) {}",
            v["changed_since"]
        ));
    }
    if let Some(nf) = v["not_found"].as_array().filter(|a| !a.is_empty()) {
        let list: Vec<&str> = nf.iter().filter_map(|x| x.as_str()).collect();
        s.push_str(&format!("\n  not in the directory: {}", list.join(", ")));
    }
    s.push_str(&format!("\n  took {} ms", v["elapsed_ms"]));
    s
}

fn explain_text(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let hops: Vec<&str> = v["next_hops"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let target = match v["mx"].as_str() {
        Some(mx) => format!("mx {mx}"),
        None if hops.is_empty() => "-".to_string(),
        None => hops.join(", "),
    };
    let mut out = format!(
        "{}\n  mailbox {}\n  state   {} (from {})\n  rcpt    {}\n  route   {} -> {} (tls {})",
        s("address"),
        s("mailbox"),
        s("state"),
        s("origin"),
        s("rcpt"),
        s("route"),
        target,
        s("tls")
    );
    if let Some(name) = v["tls_name"].as_str() {
        out.push_str(&format!("\n  tls name {name}"));
    }
    if let Some(to) = v["rewritten"].as_str() {
        out.push_str(&format!("\n  sent as {to}"));
    }
    out.push_str(&format!("\n  dsn     {}", s("dsn_route")));
    out
}

fn run_directory(cmd: DirCmd) -> anyhow::Result<()> {
    use coexist::admin::client::encode;
    match cmd {
        DirCmd::Apply { file, state, api } => batch_call(&file, state, &api, false),
        DirCmd::Diff { file, state, api } => batch_call(&file, state, &api, true),
        DirCmd::Rollback { id, api } => {
            let v = client(&api)?.post(
                &format!("/v1/directory/batches/{id}/rollback"),
                b"",
                "text/plain",
            )?;
            show(&api, &v, |v| {
                batch_text(v, &format!("rollback of batch {id}"))
            });
            Ok(())
        }
        DirCmd::Lookup { address, api } => {
            let v = client(&api)?.get(&format!(
                "/v1/directory/lookup?address={}",
                encode(&address)
            ))?;
            show(&api, &v, explain_text);
            Ok(())
        }
        DirCmd::Batches { api } => {
            let v = client(&api)?.get("/v1/directory/batches")?;
            show(&api, &v, |v| {
                let rows: Vec<String> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|c| {
                                format!(
                                    "{:>5}  {}  {:<8}  {:>7}  {}{}",
                                    c["id"],
                                    c["time"].as_str().unwrap_or(""),
                                    c["kind"].as_str().unwrap_or(""),
                                    c["count"],
                                    c["source"].as_str().unwrap_or(""),
                                    c["rolls_back"]
                                        .as_u64()
                                        .map(|b| format!(" (undoes {b})"))
                                        .unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "   id  time                  kind        count  source\n{}",
                    rows.join("\n")
                )
            });
            Ok(())
        }
        DirCmd::Reload { force, api } => {
            let path = format!("/v1/directory/reload?force={force}");
            let v = client(&api)?.post(&path, b"", "text/plain")?;
            show(&api, &v, |v| {
                format!(
                    "reloaded{}: {} addresses, {} mailboxes; changed {}, added {}, removed {} ({} addresses) ({} ms)",
                    if v["forced"].as_bool() == Some(true) { " (forced)" } else { "" },
                    v["entries"], v["mailboxes"], v["changed"], v["added"], v["removed"],
                    v["removed_addresses"], v["elapsed_ms"]
                )
            });
            Ok(())
        }
        DirCmd::Generate {
            count,
            domains,
            cloud_share,
            out,
        } => {
            if !(0.0..=1.0).contains(&cloud_share) {
                anyhow::bail!("--cloud-share must be between 0 and 1");
            }
            let f = std::fs::File::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            coexist::directory::generate::write(f, count, domains, cloud_share)?;
            println!("wrote {count} addresses to {}", out.display());
            Ok(())
        }
    }
}

fn batch_call(
    file: &std::path::Path,
    state: Option<String>,
    api: &Api,
    dry_run: bool,
) -> anyhow::Result<()> {
    use coexist::admin::client::encode;
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let source = file
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut path = format!(
        "/v1/directory/batches?source={}&dry_run={dry_run}",
        encode(&source)
    );
    if let Some(s) = &state {
        path.push_str(&format!("&state={}", encode(s)));
    }
    let v = client(api)?.post(&path, &body, "text/csv")?;
    show(api, &v, |v| {
        batch_text(v, if dry_run { "preview" } else { "applied" })
    });
    Ok(())
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(DEFAULT_CONFIG, "embedded default config")?,
    })
}

/// Serves signals until SIGINT or SIGTERM. SIGHUP reloads the config file and then the
/// directory file (if it changed). SIGTERM/SIGINT stop gracefully: no new sessions, open
/// sessions get `server.shutdown_timeout` to finish.
async fn wait_for_stop(running: &coexist::relay::Running) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config and the directory file");
                let control = running.control.clone();
                let _ = tokio::task::spawn_blocking(move || control.reload()).await;
                let dir = running.directory.clone();
                if dir.source_changed() {
                    // Outcomes (and refusals) are logged by the directory itself.
                    if let Err(e) = tokio::task::spawn_blocking(move || dir.reload_file(false)).await {
                        tracing::error!(error = %e, "reload task failed");
                    }
                }
            }
        }
    }
    let deadline = running.control.config().server.shutdown_timeout;
    tracing::info!(
        open_sessions = running.control.open_sessions(),
        deadline_s = deadline.as_secs(),
        "stopping: no new sessions"
    );
    let left = running.shutdown(deadline).await;
    tracing::info!(
        sessions_cut = left,
        "stopped; every acknowledged message is in the spool or delivered"
    );
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve { config } => {
            init_logging(cli.log_format);
            let cfg = load_config(config.as_ref())?;
            rt.block_on(async {
                let running = coexist::relay::start_with_file(cfg, config.clone()).await?;
                tracing::info!(addrs = ?running.local_addrs, "coexist ready");
                wait_for_stop(&running).await?;
                anyhow::Ok(())
            })
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            if let Some(t) = &cfg.tls {
                coexist::smtp::tls::load_acceptor(&t.cert, &t.key)?;
            }
            // Outbound TLS material (CA files, client certificates) of every route.
            coexist::deliver::tls::route_tls(&cfg)?;
            let source = coexist::directory::FileSource {
                path: cfg.directory.file.clone(),
            };
            let dir = coexist::directory::Source::load(&source, &cfg.route_names())?;
            println!(
                "{}: ok ({} routes, {} directory entries)",
                config.display(),
                cfg.routes.len(),
                dir.table.len()
            );
            if let Some(f) = cfg.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
                if !f.exists() {
                    println!(
                        "note: admin.token_file {} does not exist yet; `coexist serve` will write a fresh token to it",
                        f.display()
                    );
                }
            }
            Ok(())
        }
        Cmd::Demo {
            messages,
            concurrency,
            mailboxes,
            max_rcpts,
            size,
            no_tls,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(cli.log_format);
            }
            rt.block_on(coexist::load::demo::run(coexist::load::demo::DemoOptions {
                messages,
                concurrency,
                mailboxes,
                max_rcpts,
                size,
                tls: !no_tls,
            }))
        }
        Cmd::GenCerts { out, hostname } => {
            coexist::certs::write(&out, &hostname).context("writing certificates")?;
            println!(
                "wrote {}/ca.crt, server.crt, server.key for {hostname}",
                out.display()
            );
            Ok(())
        }
        Cmd::Directory { cmd } => run_directory(cmd),
        Cmd::Queue { cmd } => run_queue(cmd),
        Cmd::Reload { api } => {
            let v = client(&api)?.post("/v1/config/reload", b"", "text/plain")?;
            show(&api, &v, |v| {
                format!("config reloaded; changed sections: {}", v["changed"])
            });
            Ok(())
        }
        Cmd::Drain { off, api } => {
            let v = client(&api)?.post(&format!("/v1/drain?on={}", !off), b"", "text/plain")?;
            show(&api, &v, |v| {
                format!(
                    "draining: {}; SMTP sessions still open: {}",
                    v["draining"], v["sessions_open"]
                )
            });
            Ok(())
        }
        Cmd::Status { api } => {
            let v = client(&api)?.get("/v1/ready")?;
            show(&api, &v, |v| {
                let mut out = format!(
                    "ready: {}; draining: {}; SMTP sessions open: {}; directory entries: {}",
                    v["ready"], v["draining"], v["sessions_open"], v["directory_entries"]
                );
                let r = &v["directory_reload"];
                if let (Some(res), Some(t)) = (r["last_result"].as_str(), r["last_time"].as_str()) {
                    out.push_str(&format!("\nlast directory file reload: {res} at {t}"));
                }
                if let Some(f) = r["last_refused"].as_object() {
                    out.push_str(&format!(
                        "\nlast refused directory file reload: {} at {}: {}",
                        f["result"].as_str().unwrap_or(""),
                        f["time"].as_str().unwrap_or(""),
                        f["reason"].as_str().unwrap_or("")
                    ));
                }
                out
            });
            Ok(())
        }
        Cmd::Load {
            target,
            messages,
            concurrency,
            per_session,
            directory,
            max_rcpts,
            size,
            tls,
            max_seconds,
            ids,
            no_pipelining,
            no_chunking,
            rate,
            phases,
            eml,
            mbox,
            from,
            to,
            json,
            report: svg,
            size_dist,
            cloud_share,
            utf8,
            attachment_share,
        } => {
            use coexist::load::client;
            let gen = if eml.is_some() || mbox.is_some() {
                let from = from
                    .map(|f| coexist::types::Address::parse(&f, true))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--from: {e}"))?;
                let to = to
                    .iter()
                    .map(|t| {
                        coexist::types::Address::parse(t, true)
                            .map_err(|e| anyhow::anyhow!("--to {t}: {e}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let msgs =
                    client::read_messages(eml.as_deref(), mbox.as_deref(), from.as_ref(), &to)?;
                anyhow::ensure!(
                    !msgs.is_empty(),
                    "no message with a sender and recipients in the files"
                );
                client::Traffic::Files(msgs)
            } else {
                // One read of the directory serves both the recipient list and the split by state.
                let rows = match directory.as_deref() {
                    Some(path) => client::directory_rows(path)?,
                    None => client::synthetic_recipients(10_000)
                        .into_iter()
                        .map(|a| (a, false))
                        .collect(),
                };
                anyhow::ensure!(!rows.is_empty(), "no recipients to send to");
                let sizes = match &size_dist {
                    Some(d) => {
                        client::parse_sizes(d).map_err(|e| anyhow::anyhow!("--size-dist {e}"))?
                    }
                    None => Vec::new(),
                };
                let by_state = match cloud_share {
                    Some(_) if directory.is_none() => {
                        anyhow::bail!("--cloud-share needs --directory")
                    }
                    Some(share) => {
                        anyhow::ensure!(
                            (0.0..=1.0).contains(&share),
                            "--cloud-share must be between 0 and 1"
                        );
                        let (cloud, other): (Vec<_>, Vec<_>) =
                            rows.iter().cloned().partition(|(_, c)| *c);
                        Some((
                            cloud.into_iter().map(|(a, _)| a).collect(),
                            other.into_iter().map(|(a, _)| a).collect(),
                            share,
                        ))
                    }
                    None => None,
                };
                let rcpts = rows.into_iter().map(|(a, _)| a).collect();
                client::Traffic::Synthetic(client::Generator {
                    rcpts,
                    max_rcpts,
                    size,
                    sizes,
                    by_state,
                    utf8,
                    attachment_share,
                })
            };
            let gen = std::sync::Arc::new(gen);
            let report = rt.block_on(client::run(
                client::LoadOptions {
                    target,
                    messages,
                    concurrency,
                    per_session,
                    tls: if tls {
                        coexist::config::TlsPolicy::Opportunistic
                    } else {
                        coexist::config::TlsPolicy::None
                    },
                    max_duration: std::time::Duration::from_secs(max_seconds),
                    pipelining: !no_pipelining,
                    chunking: !no_chunking,
                    rate,
                    phases,
                    progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                },
                gen,
            ));
            println!("{}", report.summary(concurrency));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report.to_json())?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = svg {
                std::fs::write(&path, report.svg())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = ids {
                let mut text = report.ids.join("\n");
                text.push('\n');
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Route {
            cmd: RouteCmd::Explain { addresses, api },
        } => {
            let body = serde_json::to_vec(&serde_json::json!({ "addresses": addresses }))?;
            let v = client(&api)?.post("/v1/route/explain", &body, "application/json")?;
            show(&api, &v, |v| {
                v.as_array()
                    .map(|a| a.iter().map(explain_text).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default()
            });
            Ok(())
        }
        Cmd::Sink {
            listen,
            record,
            defer_share,
            reject_share,
            delay_ms,
            max_rcpts,
            no_smtputf8,
            multiline_errors,
        } => {
            init_logging(cli.log_format);
            anyhow::ensure!(
                (0.0..=1.0).contains(&defer_share)
                    && (0.0..=1.0).contains(&reject_share)
                    && defer_share + reject_share <= 1.0,
                "--defer-share and --reject-share must be between 0 and 1, and together at most 1"
            );
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let sink = coexist::load::sink::Sink::start(
                    listen,
                    coexist::load::sink::SinkOptions {
                        keep_bodies: false,
                        record,
                        defer_share,
                        reject_share,
                        delay: std::time::Duration::from_millis(delay_ms),
                        max_rcpts,
                        smtputf8: !no_smtputf8,
                        multiline_errors,
                        ..Default::default()
                    },
                )
                .await?;
                tracing::info!(addr = %sink.addr, "sink ready");
                // SIGUSR1 prints the counts; SIGINT/SIGTERM print them and stop.
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
    }
}
