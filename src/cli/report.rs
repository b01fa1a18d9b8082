//! `coexist report`, and the charts of `coexist load --report/--html`: both run the
//! `coexist-report` program (crates/report), which holds the chart libraries, so that the
//! `coexist` binary that serves mail does not link them. The program is looked for beside
//! this one (where `cargo build` puts both), then on `PATH`.

use crate::load::report::RunReport;
use anyhow::Context;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The program's name.
const PROGRAM: &str = "coexist-report";

/// Arguments of `coexist report`: passed on unchanged to `coexist-report` (`coexist report
/// --help` shows its help: `RUN.json... [--html FILE] [--chart FILE] [--labels a,b]`).
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct ReportArgs {
    /// Report documents written by `coexist load --json` (the first is the reference for
    /// ratios), `--html FILE`, `--chart FILE` (.png or .svg), `--labels a,b`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Runs `coexist-report` with the arguments; its exit status becomes ours.
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let status = Command::new(program()?)
        .args(&args.args)
        .status()
        .with_context(|| format!("running {PROGRAM}"))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Draws one run: the chart to `chart` (PNG if it ends in .png, else SVG) and/or the HTML
/// page to `html`, through `coexist-report` and a temporary copy of the document.
pub fn draw(doc: &RunReport, chart: Option<&Path>, html: Option<&Path>) -> anyhow::Result<()> {
    if chart.is_none() && html.is_none() {
        return Ok(());
    }
    let program = program()?;
    let mut file = tempfile::Builder::new()
        .prefix("coexist-load-")
        .suffix(".json")
        .tempfile()
        .context("creating a temporary report document")?;
    serde_json::to_writer(&mut file, doc).context("writing the temporary report document")?;
    let mut cmd = Command::new(program);
    cmd.arg(file.path()).arg("--quiet");
    if let Some(p) = chart {
        cmd.arg("--chart").arg(p);
    }
    if let Some(p) = html {
        cmd.arg("--html").arg(p);
    }
    let status = cmd.status().with_context(|| format!("running {PROGRAM}"))?;
    anyhow::ensure!(status.success(), "{PROGRAM} failed ({status})");
    Ok(())
}

/// Where `coexist-report` is: beside this program, else on `PATH`; else an error that says
/// how to build it.
fn program() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let beside = exe.with_file_name(PROGRAM);
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(PROGRAM);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    anyhow::bail!(
        "charts and HTML reports are drawn by {PROGRAM}, which is neither beside {} nor on PATH: build it with `cargo build --release` (every program of the workspace) or `cargo build --release -p {PROGRAM}`",
        exe.display()
    )
}
