//! `coexist-report`: load runs side by side, drawn. Reads the JSON documents that
//! `coexist load --json` writes and puts the runs next to each other, each later run with
//! its ratio to the first, as a self-contained HTML page and/or a chart (SVG or PNG).
//!
//! A program of its own so that the chart libraries (plotters, png, the embedded font) are
//! not linked into the `coexist` binary that serves mail: `coexist report` and
//! `coexist load --report/--html` run this program, found beside `coexist`.
//!
//! - `chart.rs`: throughput, latency percentiles and per-route deliveries over time, one
//!   panel each, drawn with plotters to SVG or PNG (the font is embedded, so no system
//!   fonts are needed);
//! - `html.rs`: the HTML page (inline CSS and SVG, nothing loaded from elsewhere).

#![allow(clippy::disallowed_methods)] // A command-line program: reads and writes the files it is given.

mod chart;
mod html;

use anyhow::Context;
use clap::Parser;
use coexist_load::report::RunReport;
use std::path::PathBuf;

/// Why a chart or page could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// Nothing to draw or show.
    #[error("no run to report")]
    Empty,
    /// The plotting library failed.
    #[error("drawing the chart: {0}")]
    Chart(String),
    /// PNG encoding failed.
    #[error("encoding the PNG: {0}")]
    Png(#[from] png::EncodingError),
}

/// Arguments of `coexist-report` (and of `coexist report`, which passes them on).
#[derive(Parser)]
#[command(
    name = "coexist-report",
    version,
    about = "Put coexist load runs side by side: HTML report and charts"
)]
pub struct ReportArgs {
    /// Report documents written by `coexist load --json`; the first is the reference for
    /// ratios.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Write the side-by-side HTML report to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the comparison chart to this file: PNG if its name ends in .png, else SVG.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Rename the runs in the report, in order (comma-separated), e.g. `postfix,coexist`.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Do not print the comparison (`coexist load` prints its own summary).
    #[arg(long)]
    pub quiet: bool,
}

fn main() -> anyhow::Result<()> {
    report(ReportArgs::parse())
}

/// Reads the runs, prints a short comparison and writes the files asked for.
fn report(args: ReportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.labels.is_empty() || args.labels.len() == args.runs.len(),
        "--labels names {} runs, but {} report files are given",
        args.labels.len(),
        args.runs.len()
    );
    let mut runs = args
        .runs
        .iter()
        .map(|p| RunReport::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    for (r, l) in runs.iter_mut().zip(&args.labels) {
        r.label = l.clone();
    }
    if !args.quiet {
        println!("{}", comparison(&runs));
    }
    let write = |path: &PathBuf, bytes: &[u8]| {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &args.html {
        write(path, html::html(&runs)?.as_bytes())?;
    }
    if let Some(path) = &args.chart {
        write(path, &chart(path, &runs)?)?;
    }
    Ok(())
}

/// The chart of `runs` for `path`: PNG when the name ends in `.png`, else SVG.
fn chart(path: &std::path::Path, runs: &[RunReport]) -> Result<Vec<u8>, RenderError> {
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    Ok(if png {
        chart::png(runs)?
    } else {
        chart::svg(runs)?.into_bytes()
    })
}

/// One line per run: acceptance, p99, duration, and the ratios to the first run.
fn comparison(runs: &[RunReport]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    runs.iter()
        .map(|r| {
            let mut line = format!(
                "{}: {} accepted in {:.2} s, {:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
                r.label,
                r.accepted,
                r.elapsed_s,
                r.msg_per_s,
                r.latency.message.p50_ms,
                r.latency.message.p99_ms
            );
            if !std::ptr::eq(r, first)
                && first.msg_per_s > 0.0
                && first.latency.message.p99_ms > 0.0
            {
                line.push_str(&format!(
                    " ({:.2}x the acceptance rate of {}, p99 {:.2}x)",
                    r.msg_per_s / first.msg_per_s,
                    first.label,
                    r.latency.message.p99_ms / first.latency.message.p99_ms
                ));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}
