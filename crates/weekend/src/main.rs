//! `coexist-weekend`: runs the weekend under fire (as root: it makes network namespaces),
//! or checks a run's history again. Exit status: 0 when the checker finds no violation, 1
//! when it finds some, 2 when the run itself could not be made.

use clap::{Parser, Subcommand};
use coexist_weekend::{check, history, plan::Plan, report, run};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The weekend under fire.
#[derive(Parser)]
#[command(
    name = "coexist-weekend",
    version,
    about = "A coexist fleet under injected faults, and a checker over its history"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the topology, run the weekend, check the history, write the report.
    Run {
        /// The two-minute run of CI instead of the ten-minute weekend.
        #[arg(long)]
        smoke: bool,
        /// Seed of the mailboxes moved (and, with --random, of the faults).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Faults drawn from the seed instead of the fixed schedule.
        #[arg(long)]
        random: bool,
        /// Output folder: history, logs, report.html (default: a new folder under /tmp).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The `coexist` binary (default: the one beside this program).
        #[arg(long)]
        coexist: Option<PathBuf>,
    },
    /// Check the history in a run's output folder again and rewrite its report.
    Check {
        /// The run's output folder.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Run {
            smoke,
            seed,
            random,
            out,
            coexist,
        } => run_and_check(smoke, seed, random, out, coexist),
        Cmd::Check { dir } => judge(&dir),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("coexist-weekend: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A program beside this one.
fn beside(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn run_and_check(
    smoke: bool,
    seed: u64,
    random: bool,
    out: Option<PathBuf>,
    coexist: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let mut plan = if smoke {
        Plan::smoke()
    } else {
        Plan::weekend()
    };
    if random {
        plan = plan.randomized(seed);
    }
    let out = match out {
        Some(p) => p,
        None => std::env::temp_dir().join(format!(
            "coexist-weekend-{}-{}",
            plan.name,
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        )),
    };
    #[allow(clippy::disallowed_methods)] // The run's output folder, made before anything runs.
    std::fs::create_dir_all(&out)?;
    let opts = run::RunOptions {
        plan,
        seed,
        out: out.clone(),
        coexist: match coexist {
            Some(p) => p,
            None => beside("coexist")?,
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run::run(&opts))?;
    drop(rt);
    judge(&out)
}

/// Checks the history under `dir`, writes verdict.json and report.html, prints the
/// verdict; true when it passed.
fn judge(dir: &Path) -> anyhow::Result<bool> {
    let h = history::Files::new(dir).read()?;
    let v = check::check(&h);
    // The load's charts, drawn by coexist-report from the run's load document.
    let chart = dir.join("load.svg");
    let drew = std::process::Command::new(beside("coexist-report")?)
        .arg(dir.join("load.json"))
        .arg("--chart")
        .arg(&chart)
        .arg("--quiet")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    #[allow(clippy::disallowed_methods)] // The run's report files.
    {
        let svg = if drew {
            std::fs::read_to_string(&chart).ok()
        } else {
            None
        };
        let page = report::html(
            &h,
            &v,
            svg.as_deref(),
            &format!("coexist weekend under fire: {}", dir.display()),
        );
        std::fs::write(dir.join("report.html"), page)?;
        std::fs::write(dir.join("verdict.json"), serde_json::to_vec_pretty(&v)?)?;
    }
    println!("{}", summary(&v));
    println!("report: {}", dir.join("report.html").display());
    Ok(v.passed())
}

/// The verdict in a few lines: the figures, then each class of violation with its examples.
fn summary(v: &check::Verdict) -> String {
    let mut s = format!(
        "{}: {} violation(s); {} recipients acknowledged, {} delivered, {} duplicates explained, {} deliveries without an acknowledgement, routing at most {:.1} s stale, 4xx at RCPT/DATA by code {:?}, {} session errors",
        if v.passed() { "PASSED" } else { "FAILED" },
        v.violations(),
        v.acknowledged,
        v.delivered,
        v.duplicates_explained,
        v.unacknowledged_deliveries,
        v.max_stale_delivery_ms as f64 / 1000.0,
        v.deferred_by_code,
        v.session_errors,
    );
    for (name, class) in v.classes() {
        s.push_str(&format!("\n  {name}: {}", class.count));
        for e in &class.examples {
            s.push_str(&format!("\n    {e}"));
        }
    }
    s
}
