//! The `coexist` command line: clap definitions and dispatch.
//!
//! `src/main.rs` parses the arguments, starts logging when the command wants it, and calls
//! [`run`]; everything a command does lives here, one file per command group:
//!
//! | file | commands |
//! |---|---|
//! | [`serve`] | `serve` (with its signal loop) and `check-config` |
//! | [`queue`] | `queue list, show, flush, hold, release, delete, retry-now` |
//! | [`directory`] | `directory apply, diff, rollback, lookup, batches, reload, import, generate` |
//! | [`route`] | `route explain` |
//! | [`fleet`] | `fleet status` |
//! | [`trace`] | `trace`: where mail for an address went, on every node |
//! | [`status`] | `status`, `drain`, `reload`: the running server's state |
//! | [`load`] | `load`, `sink` and `demo`: the traffic tools |
//! | [`report`] | `report`: load runs side by side (HTML, charts) |
//! | [`certs`] | `gen-certs` |
//!
//! Commands that talk to a running server take [`Api`] (`--config`, `--json`) and call the
//! admin API through [`AdminClient`], whose methods return the API's own types
//! ([`crate::admin::types`]). Each group renders its text from those types' fields, so a
//! field the server renames is a compile error here rather than a `null` on the terminal;
//! `--json` prints the same value as JSON.
//!
//! The commands return `anyhow` errors: this is the program's edge, where an error only has
//! to be printed.
#![allow(clippy::disallowed_methods)] // The command line: files are read and written before or besides serving.

pub mod certs;
pub mod directory;
pub mod fleet;
pub mod load;
pub mod queue;
pub mod report;
pub mod route;
pub mod serve;
pub mod status;
pub mod trace;

use crate::admin::client::AdminClient;
use crate::config::{Config, DEFAULT_CONFIG};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The `coexist` command line.
#[derive(Parser)]
#[command(
    name = "coexist",
    version,
    about = "Mail-flow coexistence SMTP relay for mailbox migrations"
)]
pub struct Cli {
    /// Log format on stderr: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How log lines are written on stderr: human-readable `text` (coloured on a terminal) or
/// `json`, one object per line.
// The variants have no doc comments: clap would show them as help for each value and
// switch every command's help to the long layout.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The commands.
#[derive(Subcommand)]
// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    /// Run the relay.
    Serve(serve::ServeArgs),
    /// Validate a config file (and the directory and certificates it names) without starting.
    CheckConfig(serve::CheckConfigArgs),
    /// Run the relay end to end on the embedded default config with two built-in sinks.
    Demo(load::DemoArgs),
    /// Write a development CA and server certificate (ca.crt, server.crt, server.key).
    GenCerts(certs::GenCertsArgs),
    /// Migration-state directory: lookups, batches, rollbacks (through the admin API).
    Directory {
        /// The directory command.
        #[command(subcommand)]
        cmd: directory::DirCmd,
    },
    /// The queue (through the admin API), like postqueue/postsuper.
    Queue {
        /// The queue command.
        #[command(subcommand)]
        cmd: queue::QueueCmd,
    },
    /// The fleet of MX nodes sharing the directory through PostgreSQL (through the admin API).
    Fleet {
        /// The fleet command.
        #[command(subcommand)]
        cmd: fleet::FleetCmd,
    },
    /// Routing questions (through the admin API).
    Route {
        /// The route command.
        #[command(subcommand)]
        cmd: route::RouteCmd,
    },
    /// Where mail for an address went on every node, with the origin of each routing
    /// decision (through the admin API).
    Trace(trace::TraceArgs),
    /// Send a bounded load of generated mail to an SMTP server and report rates and latency.
    Load(load::LoadArgs),
    /// Put load runs (`coexist load --json` files) side by side: HTML report and charts.
    Report(report::ReportArgs),
    /// Re-read the running server's config file and swap it in (refused whole if invalid).
    Reload {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Answer new SMTP sessions with 421 so traffic moves to other MX hosts (`--off` ends it).
    Drain(status::DrainArgs),
    /// Readiness of the running server: draining, open sessions, directory size.
    Status {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Run a recording SMTP sink (a stand-in next hop) until interrupted.
    Sink(load::SinkArgs),
}

impl Cmd {
    /// Whether the command logs on stderr: the long-running servers always, the demo when
    /// `RUST_LOG` asks for it; the one-shot commands print their results instead.
    pub fn logs(&self) -> bool {
        match self {
            Cmd::Serve(_) | Cmd::Sink(_) => true,
            Cmd::Demo(_) => std::env::var_os("RUST_LOG").is_some(),
            _ => false,
        }
    }
}

/// Where the CLI finds the running server, and how it prints the answer.
#[derive(clap::Args)]
pub struct Api {
    /// Config file of the running server (for the admin API address and token); the
    /// embedded default config when absent.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Api {
    /// A client for the admin API named in the config.
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        let cfg = load_config(self.config.as_ref())?;
        Ok(AdminClient::from_config(&cfg)?)
    }

    /// Prints `value`: as pretty JSON with `--json`, else as `text` renders it.
    pub fn print<T: serde::Serialize>(
        &self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            println!("{}", text(value));
        }
        Ok(())
    }
}

/// The config at `path`, or the embedded default config.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(DEFAULT_CONFIG, "embedded default config")?,
    })
}

/// Starts logging on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Runs one command to its end.
pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve(args) => serve::serve(args, &runtime()?),
        Cmd::CheckConfig(args) => serve::check_config(args),
        Cmd::Demo(args) => load::demo(args, &runtime()?),
        Cmd::GenCerts(args) => certs::gen_certs(args),
        Cmd::Directory { cmd } => directory::run(cmd),
        Cmd::Queue { cmd } => queue::run(cmd),
        Cmd::Route { cmd } => route::run(cmd),
        Cmd::Fleet { cmd } => fleet::run(cmd),
        Cmd::Trace(args) => trace::trace(&args),
        Cmd::Load(args) => load::load(args, &runtime()?),
        Cmd::Report(args) => report::report(args),
        Cmd::Reload { api } => status::reload(&api),
        Cmd::Drain(args) => status::drain(&args),
        Cmd::Status { api } => status::status(&api),
        Cmd::Sink(args) => load::sink(args, &runtime()?),
    }
}

/// The multi-threaded tokio runtime of the commands that run servers or clients.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
