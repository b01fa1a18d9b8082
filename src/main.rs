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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
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
    /// Run a recording SMTP sink (a stand-in next hop) until interrupted.
    Sink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2601")]
        listen: SocketAddr,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(DEFAULT_CONFIG, "embedded default config")?,
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve { config } => {
            init_logging();
            let cfg = load_config(config.as_ref())?;
            rt.block_on(async {
                let running = coexist::relay::start(cfg).await?;
                tracing::info!(addrs = ?running.local_addrs, "coexist ready");
                tokio::signal::ctrl_c().await?;
                tracing::info!("interrupted, stopping");
                anyhow::Ok(())
            })
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            if let Some(t) = &cfg.tls {
                coexist::smtp::tls::load_acceptor(&t.cert, &t.key)?;
            }
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
                init_logging();
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
        Cmd::Sink { listen } => {
            init_logging();
            rt.block_on(async {
                let sink = coexist::load::sink::Sink::start(
                    listen,
                    coexist::load::sink::SinkOptions {
                        keep_bodies: false,
                        ..Default::default()
                    },
                )
                .await?;
                tracing::info!(addr = %sink.addr, "sink ready");
                tokio::signal::ctrl_c().await?;
                let s = &sink.state;
                println!(
                    "sink: {} messages, {} recipients, {} bytes",
                    s.accepted.load(std::sync::atomic::Ordering::SeqCst),
                    s.recipients.load(std::sync::atomic::Ordering::SeqCst),
                    s.bytes.load(std::sync::atomic::Ordering::SeqCst)
                );
                anyhow::Ok(())
            })
        }
    }
}
