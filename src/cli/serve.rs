//! `coexist serve` and `coexist check-config`.
//!
//! Both run the same start-up checks, [`crate::preflight::check`]: `serve` through
//! [`crate::relay::start_with_file`], before it opens the spool or binds a port, and
//! `check-config` alone, so a config that `check-config` passes does not then stop `serve`
//! on any of them, and a refusal reads the same in both.
//!
//! `serve` then runs until SIGINT or SIGTERM; SIGHUP reloads the config file and then the
//! directory file (when it changed).

use super::load_config;
use crate::config::Config;
use crate::relay::Running;
use std::path::PathBuf;

/// Arguments of `coexist serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Config file (TOML); the embedded default config when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Arguments of `coexist check-config`.
#[derive(clap::Args)]
pub struct CheckConfigArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs the relay until SIGINT or SIGTERM.
pub fn serve(args: ServeArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    // (The embedded default config has no warnings.)
    let (cfg, warnings) = match &args.config {
        Some(path) => Config::load_with_warnings(path)?,
        None => (load_config(None)?, Vec::new()),
    };
    for w in &warnings {
        tracing::warn!("config: {w}");
    }
    rt.block_on(async {
        let running = crate::relay::start_with_file(cfg, args.config.clone()).await?;
        tracing::info!(addrs = ?running.local_addrs, "coexist ready");
        wait_for_stop(&running).await
    })
}

/// Validates a config file with the start-up checks of `serve`, and loads its directory
/// file, without starting anything; prints what it found.
pub fn check_config(args: CheckConfigArgs) -> anyhow::Result<()> {
    let (cfg, warnings) = Config::load_with_warnings(&args.config)?;
    let found = crate::preflight::check(&cfg)?;
    let entries = crate::preflight::dry_run_directory(&cfg)?;
    println!(
        "{}: ok ({} routes, {entries} directory entries)",
        args.config.display(),
        cfg.routes.len(),
    );
    for w in &warnings {
        println!("warning: {w}");
    }
    if let Some(f) = &cfg.fleet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match rt.block_on(crate::fleet::probe(f)) {
            Ok((0, _)) => println!(
                "fleet: PostgreSQL reachable; schema {:?} has no directory yet{}",
                f.schema,
                if cfg.directory.file.is_some() {
                    " (the first node seeds it from directory.file)"
                } else {
                    " (load one with `coexist directory import`)"
                }
            ),
            Ok((head, nodes)) => println!(
                "fleet: PostgreSQL reachable; schema {:?} at change {head}, {nodes} node(s) known",
                f.schema
            ),
            Err(e) => println!(
                "warning: fleet: {e} (the node would start on its local snapshot and keep trying)"
            ),
        }
    }
    for w in &found.readable {
        println!("warning: {w}");
    }
    if let Some(why) = crate::descriptors::shortfall(&cfg) {
        println!("warning: {why}");
    }
    if let Some(f) = &found.new_token_file {
        println!(
            "note: admin.token_file {} does not exist yet; `coexist serve` will write a fresh token to it",
            f.display()
        );
    }
    Ok(())
}

/// Serves signals until SIGINT or SIGTERM. SIGHUP reloads the config file and then the
/// directory file (if it changed). SIGTERM/SIGINT stop gracefully: no new sessions, open
/// sessions get `server.shutdown_timeout` to finish.
async fn wait_for_stop(running: &Running) -> anyhow::Result<()> {
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
                if running.directory.source_changed() {
                    // Outcomes (and refusals) are logged by the directory itself.
                    if let Err(crate::directory::WriteError::Task(e)) = running.control.writer.reload(false).await {
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
