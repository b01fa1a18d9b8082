//! `coexist directory …`: the migration-state directory of the running server, through the
//! admin API (apply, diff, rollback, lookup, batches, reload), and `generate`, which writes a
//! synthetic directory file locally.

use super::route::explain_text;
use super::Api;
use crate::admin::client::BatchUpload;
use crate::admin::types::{
    BatchFormat, BatchReply, BatchReport, ChangeKind, ChangeSummary, FleetBatch, Progress,
    ReloadReport, Scheduled, ScheduledStatus, StatusGroup,
};
use anyhow::Context;
use clap::Subcommand;
use std::path::{Path, PathBuf};

/// The directory commands.
#[derive(Subcommand)]
pub enum DirCmd {
    /// Apply a migration batch to the running server (our CSV, New-MigrationBatch CSV, or
    /// with `--format migration-users` a Get-MigrationUser/Get-MoveRequest export).
    Apply {
        /// Batch file.
        file: PathBuf,
        /// Target state (route name); without it the file needs a `state` column (a
        /// migration report moves its completed users to `cloud`).
        #[arg(long)]
        state: Option<String>,
        /// `auto` (our CSV or New-MigrationBatch CSV: every row moves) or `migration-users`
        /// (Get-MigrationUser/Get-MoveRequest export: only completed users move, the others
        /// are reported by status).
        #[arg(long, default_value_t = BatchFormat::Auto)]
        format: BatchFormat,
        /// Apply it at this time instead of now (e.g. 2026-11-28T22:00Z): kept on the server,
        /// listed by `directory scheduled`, applied once, even across restarts.
        #[arg(long)]
        at: Option<String>,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// List batches scheduled with `apply --at`, with their status.
    Scheduled {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Cancel a scheduled batch before its time.
    Cancel {
        /// Scheduled batch id (from `apply --at` or `scheduled`).
        id: u32,
        /// Where the running server is.
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
        /// `auto` or `migration-users` (see `apply`).
        #[arg(long, default_value_t = BatchFormat::Auto)]
        format: BatchFormat,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Undo a batch by id.
    Rollback {
        /// Batch id (from `apply` or `batches`).
        id: u32,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Show an address's state, where it comes from, and its route now.
    Lookup {
        /// Address.
        address: String,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// List applied batches, rollbacks and file reloads.
    Batches {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Re-read the directory file on the running server.
    Reload {
        /// Apply it even if it removes more than `directory.max_shrink` of the addresses.
        #[arg(long)]
        force: bool,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Load a directory file as the fleet's new base (fleet only; COPY into PostgreSQL).
    /// Merged like a file reload: mailboxes whose row changed take the file's state, the
    /// others keep what batches gave them.
    Import {
        /// Directory CSV (`address,state[,mailbox]`).
        file: PathBuf,
        /// Import it even if it removes more than `directory.max_shrink` of the addresses.
        #[arg(long)]
        force: bool,
        /// Where the running server is.
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

/// Runs a directory command.
pub fn run(cmd: DirCmd) -> anyhow::Result<()> {
    match cmd {
        DirCmd::Apply {
            file,
            state,
            format,
            at,
            api,
        } => batch(&file, state.as_deref(), format, &api, false, at.as_deref()),
        DirCmd::Diff {
            file,
            state,
            format,
            api,
        } => batch(&file, state.as_deref(), format, &api, true, None),
        DirCmd::Scheduled { api } => {
            let list = api.client()?.directory_scheduled()?;
            api.print(&list, |l| scheduled_text(l))
        }
        DirCmd::Cancel { id, api } => {
            let s = api.client()?.directory_cancel(id)?;
            api.print(&s, |s| {
                format!("cancelled: {}", scheduled_text(std::slice::from_ref(s)))
            })
        }
        DirCmd::Rollback { id, api } => {
            let r = api.client()?.directory_rollback(id)?;
            api.print(&r, |r| reply_text(r, &format!("rollback of batch {id}")))
        }
        DirCmd::Import { file, force, api } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = api
                .client()?
                .directory_import(&body, &file.display().to_string(), force)?;
            api.print(&r, import_text)
        }
        DirCmd::Lookup { address, api } => {
            let e = api.client()?.directory_lookup(&address)?;
            api.print(&e, explain_text)
        }
        DirCmd::Batches { api } => {
            let list = api.client()?.directory_batches()?;
            api.print(&list, |l| batches_text(l))
        }
        DirCmd::Reload { force, api } => {
            let r = api.client()?.directory_reload(force)?;
            api.print(&r, reload_text)
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
            crate::directory::generate::write(f, count, domains, cloud_share)?;
            println!("wrote {count} addresses to {}", out.display());
            Ok(())
        }
    }
}

/// Sends a batch file to be applied (now, or `at` a later time), or only previewed
/// (`dry_run`).
fn batch(
    file: &Path,
    state: Option<&str>,
    format: BatchFormat,
    api: &Api,
    dry_run: bool,
    at: Option<&str>,
) -> anyhow::Result<()> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let source = file
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let r = api.client()?.directory_apply(&BatchUpload {
        body: &body,
        source: &source,
        state,
        dry_run,
        at,
        format,
    })?;
    api.print(&r, |r| match &r.scheduled {
        Some(s) => {
            let mut out = format!(
                "scheduled as {} for {}; would change now:\n{}",
                s.id,
                s.at,
                batch_text(&r.report, "preview")
            );
            if let Some(t) = &r.traffic {
                out.push('\n');
                out.push_str(&traffic_text(t));
            }
            out
        }
        None => reply_text(r, if dry_run { "preview" } else { "applied" }),
    })
}

/// The scheduled batches as a table: id, time, source (in a fleet with the node it was
/// scheduled on), status (and the change it became, or why it failed).
pub fn scheduled_text(list: &[Scheduled]) -> String {
    let rows: Vec<String> = list
        .iter()
        .map(|s| {
            let status = match &s.status {
                ScheduledStatus::Pending => "pending".to_string(),
                ScheduledStatus::Applied { change, time } => match change {
                    Some(c) => format!("applied as change {c} at {time}"),
                    None => format!("applied at {time} (nothing to change)"),
                },
                ScheduledStatus::Failed { error, time } => format!("failed at {time}: {error}"),
                ScheduledStatus::Cancelled { time } => format!("cancelled at {time}"),
                ScheduledStatus::Moved { to, time } => {
                    format!("moved at {time} to the fleet's schedule as {to}")
                }
            };
            // In a fleet: the node it was scheduled on.
            let on = s
                .node
                .as_ref()
                .map(|n| format!(" (on {n})"))
                .unwrap_or_default();
            format!("{:>4}  {}  {}{on}  {}", s.id, s.at, s.source, status)
        })
        .collect();
    format!(
        "  id  at                    source  status\n{}",
        rows.join("\n")
    )
}

/// A batch's or rollback's report, and in a fleet how far it has spread.
pub fn reply_text(r: &BatchReply, what: &str) -> String {
    let mut s = batch_text(&r.report, what);
    if let Some(p) = &r.fleet {
        s.push('\n');
        s.push_str(&progress_text(p));
    }
    if let Some(t) = &r.traffic {
        s.push('\n');
        s.push_str(&traffic_text(t));
    }
    s
}

/// What a batch moves, from one node's tracking log and queue.
pub fn traffic_text(t: &crate::admin::types::BatchTraffic) -> String {
    format!(
        "  traffic on {}: {} messages to these {} addresses in the last {} day(s) ({:.1} a day); {} queued for them now",
        t.node, t.received, t.addresses, t.days, t.per_day, t.queued_now
    )
}

/// "applied on N of M live nodes so far", and the silent nodes.
pub fn progress_text(p: &Progress) -> String {
    let mut s = format!(
        "  fleet change {}: applied on {} of {} live nodes so far",
        p.seq, p.applied, p.live
    );
    if !p.silent.is_empty() {
        s.push_str(&format!(
            "; silent (they apply it when back): {}",
            p.silent.join(", ")
        ));
    }
    s
}

/// What a base import did.
pub fn import_text(r: &FleetBatch) -> String {
    let id = r.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
    format!(
        "imported as base {id}: {} addresses, {} mailboxes; changed {}, added {}, removed {} ({} addresses){} ({} ms)\n{}",
        r.report.entries,
        r.report.mailboxes,
        r.report.changed,
        r.report.added,
        r.report.removed,
        r.report.removed_addresses,
        if r.report.forced { ", forced" } else { "" },
        r.report.elapsed_ms,
        progress_text(&r.nodes)
    )
}

/// What a batch, preview or rollback did (`what` says which).
pub fn batch_text(r: &BatchReport, what: &str) -> String {
    let mut s = match r.id {
        Some(id) => format!("{what}: id {id}"),
        None => format!("{what}: nothing applied"),
    };
    s.push_str(&format!(
        "\n  rows {}, changed {}, already in state {}, not found {}",
        r.rows, r.changed, r.already, r.not_found_count
    ));
    if r.changed_since > 0 {
        s.push_str(&format!(
            ", moved again since (left alone) {}",
            r.changed_since
        ));
    }
    if !r.not_found.is_empty() {
        s.push_str(&format!(
            "\n  not in the directory: {}",
            r.not_found.join(", ")
        ));
    }
    if let Some(groups) = &r.not_completed {
        s.push_str(&format!(
            "\n  not completed (left as they are): {}",
            not_completed_text(groups)
        ));
    }
    s.push_str(&format!("\n  took {} ms", r.elapsed_ms));
    s
}

/// A migration report's users that have not completed: `Failed 3 (a@…, b@…, c@…), Syncing
/// 25 (… and 5 more)`, or `none`.
pub fn not_completed_text(groups: &[StatusGroup]) -> String {
    if groups.is_empty() {
        return "none".into();
    }
    groups
        .iter()
        .map(|g| {
            let mut listed = g.addresses.join(", ");
            if g.count > g.addresses.len() {
                listed.push_str(&format!(" and {} more", g.count - g.addresses.len()));
            }
            format!("{} {} ({listed})", g.status, g.count)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The change log as a table: id, time, kind, count, source (and which batch a rollback
/// undoes).
pub fn batches_text(list: &[ChangeSummary]) -> String {
    let rows: Vec<String> = list
        .iter()
        .map(|c| {
            let kind = match c.kind {
                ChangeKind::Apply => "apply",
                ChangeKind::Rollback => "rollback",
                ChangeKind::Reload => "reload",
                ChangeKind::Base => "base",
                ChangeKind::Delta => "delta",
            };
            format!(
                "{:>5}  {}  {:<8}  {:>7}  {}{}",
                c.id,
                c.time,
                kind,
                c.count,
                c.source,
                c.rolls_back
                    .map(|b| format!(" (undoes {b})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "   id  time                  kind        count  source\n{}",
        rows.join("\n")
    )
}

/// What a reload of the directory file changed.
pub fn reload_text(r: &ReloadReport) -> String {
    format!(
        "reloaded{}: {} addresses, {} mailboxes; changed {}, added {}, removed {} ({} addresses) ({} ms)",
        if r.forced { " (forced)" } else { "" },
        r.entries,
        r.mailboxes,
        r.changed,
        r.added,
        r.removed,
        r.removed_addresses,
        r.elapsed_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_report_names_what_it_skipped() {
        let r = BatchReport {
            id: Some(3),
            rows: 4,
            changed: 2,
            already: 1,
            not_found: vec!["nobody@nhs.test".into()],
            not_found_count: 1,
            changed_since: 0,
            elapsed_ms: 7,
            not_completed: None,
        };
        assert_eq!(
            batch_text(&r, "applied"),
            "applied: id 3\n  rows 4, changed 2, already in state 1, not found 1\n  \
             not in the directory: nobody@nhs.test\n  took 7 ms"
        );
        let preview = BatchReport {
            changed_since: 2,
            ..Default::default()
        };
        assert!(batch_text(&preview, "preview")
            .starts_with("preview: nothing applied\n  rows 0, changed 0, already in state 0, not found 0, moved again since (left alone) 2"));
    }

    #[test]
    fn a_migration_report_lists_who_was_left_by_status() {
        let mut r = BatchReport {
            id: Some(4),
            rows: 2,
            changed: 2,
            not_completed: Some(vec![
                StatusGroup {
                    status: "Failed".into(),
                    count: 2,
                    addresses: vec!["ann@nhs.test".into(), "carl@nhs.test".into()],
                },
                StatusGroup {
                    status: "Syncing".into(),
                    count: 22,
                    addresses: (0..20).map(|i| format!("u{i}@nhs.test")).collect(),
                },
            ]),
            ..Default::default()
        };
        let text = batch_text(&r, "applied");
        assert!(
            text.contains(
                "\n  not completed (left as they are): Failed 2 (ann@nhs.test, carl@nhs.test), \
                 Syncing 22 (u0@nhs.test, u1@nhs.test,"
            ),
            "{text}"
        );
        assert!(
            text.contains("u19@nhs.test and 2 more)\n  took 0 ms"),
            "{text}"
        );
        r.not_completed = Some(Vec::new());
        assert!(batch_text(&r, "preview").contains("\n  not completed (left as they are): none\n"));
    }

    #[test]
    fn the_change_log_shows_what_a_rollback_undoes() {
        let list = vec![ChangeSummary {
            id: 2,
            time: "2026-11-25T10:00:00Z".into(),
            kind: ChangeKind::Rollback,
            source: "evening.csv".into(),
            rolls_back: Some(1),
            count: 12,
            uid: None,
            committed: None,
        }];
        let text = batches_text(&list);
        assert!(
            text.ends_with(
                "    2  2026-11-25T10:00:00Z  rollback       12  evening.csv (undoes 1)"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_reload_says_when_it_was_forced() {
        let r = ReloadReport {
            entries: 52,
            mailboxes: 50,
            changed: 1,
            added: 0,
            removed: 52,
            removed_addresses: 52,
            forced: true,
            elapsed_ms: 3,
        };
        assert_eq!(
            reload_text(&r),
            "reloaded (forced): 52 addresses, 50 mailboxes; changed 1, added 0, removed 52 (52 addresses) (3 ms)"
        );
    }
}
