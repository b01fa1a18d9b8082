//! `coexist queue …`: the queue of the running server, like Postfix's postqueue and
//! postsuper, through the admin API.
//!
//! A listing shows per message its id, age, size, phase and sender, then each recipient not
//! yet delivered with its status, the route it would take now, the time to the next attempt
//! and the last reply of the next hop:
//!
//! ```text
//! 1 message(s)
//! 5F2A9C0E1B3D4A77      4m      2048  deferred  <a@example.org>
//!     bob@nhs.test                             deferred  route cloud    next in 2m
//!         (451 4.3.0 Sink: deferring on request)
//! ```

use super::Api;
use crate::admin::types::{MessageView, QueueAction, QueueFilter};
use anyhow::Context;
use clap::Subcommand;

/// The queue commands.
#[derive(Subcommand)]
pub enum QueueCmd {
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
        /// At most this many messages, oldest first (default 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Show one message.
    Show {
        /// Queue id.
        id: String,
        /// Where the running server is.
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
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Deliver again what went to one route in a window, from the copies of delivered
    /// messages `shadow.keep_delivered` keeps (e.g. after that estate restored a mailbox
    /// database from backup). Without `--yes` it only counts them.
    Resubmit {
        /// The route (e.g. onprem).
        #[arg(long)]
        route: String,
        /// Start of the window: 2026-11-28T22:00Z or full RFC 3339.
        #[arg(long)]
        since: String,
        /// End of the window (default: now).
        #[arg(long)]
        until: Option<String>,
        /// Queue them again (without it: a preview count).
        #[arg(long)]
        yes: bool,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Hold a message: no delivery until released (kept across restarts).
    Hold {
        /// Queue id.
        id: String,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Release a held message (attempted at once).
    Release {
        /// Queue id.
        id: String,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Delete a message from the queue and the spool, without a bounce.
    Delete {
        /// Queue id.
        id: String,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// Attempt every deferred message now.
    RetryNow {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
    /// List what the spool on disk holds, read straight from its log without a server (a
    /// stopped relay, or after a crash); changes nothing.
    Spooled {
        /// Spool directory (default: `spool.dir` of the config).
        #[arg(long)]
        spool: Option<std::path::PathBuf>,
        /// Where the config is, and output format.
        #[command(flatten)]
        api: Api,
    },
}

/// A message in the spool on disk, as `queue spooled --json` prints it.
#[derive(serde::Serialize)]
struct Spooled {
    id: String,
    received_at: u64,
    attempts: u32,
    held: bool,
    next_attempt_ms: Option<u64>,
}

/// Runs a queue command.
pub fn run(cmd: QueueCmd) -> anyhow::Result<()> {
    match cmd {
        QueueCmd::List {
            route,
            state,
            min_age,
            rcpt,
            limit,
            api,
        } => {
            let min_age = min_age
                .map(|a| {
                    humantime::parse_duration(&a)
                        .map(|d| d.as_secs())
                        .with_context(|| format!("--min-age {a:?}"))
                })
                .transpose()?;
            let filter = QueueFilter {
                route,
                state,
                min_age,
                rcpt,
                limit,
            };
            let client = api.client()?;
            let list = client.queue_list(&filter)?;
            // Next hops that hold mail back (throttled, circuit open) head the text listing.
            let hops = if api.json { Vec::new() } else { client.hops()? };
            api.print(&list, |l| {
                let mut out = String::new();
                for line in super::status::hops_text(&hops) {
                    out.push_str(&line);
                    out.push('\n');
                }
                out.push_str(&list_text(l));
                out
            })
        }
        QueueCmd::Show { id, api } => {
            let m = api.client()?.queue_show(&id)?;
            api.print(&m, message_text)
        }
        QueueCmd::Flush {
            id: Some(id), api, ..
        } => action(&id, QueueAction::Flush, &api),
        QueueCmd::Flush {
            id: None,
            route,
            api,
        } => {
            let r = api.client()?.queue_flush(route.as_deref())?;
            api.print(&r, |r| format!("flushed {} deferred message(s)", r.flushed))
        }
        QueueCmd::Resubmit {
            route,
            since,
            until,
            yes,
            api,
        } => {
            use crate::directory::scheduled::parse_at;
            let (since_s, since_t) = parse_at(&since)?;
            let (until_s, until_t) = match until {
                Some(u) => parse_at(&u)?,
                None => (crate::clock::now_secs() as i64 + 1, "now".to_string()),
            };
            let r = api
                .client()?
                .queue_resubmit(&route, since_s, until_s, !yes)?;
            api.print(&r, |r| {
                let what = format!(
                    "{} message(s), {} recipient(s) delivered through route {route} between {since_t} and {until_t}",
                    r.messages, r.recipients
                );
                if r.queued {
                    format!("queued again: {what}")
                } else {
                    format!("would queue again: {what} (run again with --yes to do it)")
                }
            })
        }
        QueueCmd::Hold { id, api } => action(&id, QueueAction::Hold, &api),
        QueueCmd::Release { id, api } => action(&id, QueueAction::Release, &api),
        QueueCmd::Delete { id, api } => action(&id, QueueAction::Delete, &api),
        QueueCmd::RetryNow { api } => {
            let r = api.client()?.queue_flush(None)?;
            api.print(&r, |r| format!("flushed {} deferred message(s)", r.flushed))
        }
        QueueCmd::Spooled { spool, api } => {
            let dir = match spool {
                Some(d) => d,
                None => super::load_config(api.config.as_ref())?.spool.dir,
            };
            let queued = crate::spool::inspect(&dir)?;
            let list: Vec<Spooled> = queued
                .into_iter()
                .map(|q| Spooled {
                    id: q.id.to_string(),
                    received_at: q.received_at,
                    attempts: q.attempts,
                    held: q.held,
                    next_attempt_ms: q.next_attempt_ms,
                })
                .collect();
            api.print(&list, |l| {
                let mut out = format!("{} message(s) in the spool\n", l.len());
                for m in l {
                    out += &format!(
                        "{}  attempts {}{}\n",
                        m.id,
                        m.attempts,
                        if m.held { "  held" } else { "" }
                    );
                }
                out.trim_end().to_string()
            })
        }
    }
}

/// Hold, release, delete or flush one message.
fn action(id: &str, what: QueueAction, api: &Api) -> anyhow::Result<()> {
    let r = api.client()?.queue_action(id, what)?;
    api.print(&r, |r| format!("{}: {}", r.id, r.action))
}

/// A duration for humans, in its largest whole unit: `45s`, `12m`, `5h`, `3d`.
pub fn age(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A listing: the count, then each message.
pub fn list_text(list: &[MessageView]) -> String {
    let mut out = format!("{} message(s)", list.len());
    for m in list {
        out.push('\n');
        out.push_str(&message_text(m));
    }
    out
}

/// One message: a head line, then each recipient not yet delivered.
pub fn message_text(m: &MessageView) -> String {
    let mut out = format!(
        "{}  {:>6}  {:>8}  {:<8}  <{}>",
        m.id,
        age(m.age_s),
        m.size,
        m.phase,
        m.from
    );
    if let Some(u) = &m.unwritten {
        out.push_str(&format!("\n    ! {u}"));
    }
    if let Some(t) = &m.taken_from {
        out.push_str(&format!("\n    {t}"));
    }
    for r in &m.recipients {
        if r.status == "delivered" {
            continue;
        }
        out.push_str(&format!(
            "\n    {:<40} {:<9} route {:<8}",
            r.address,
            r.status,
            r.route.as_deref().unwrap_or("-")
        ));
        if r.status == "deferred" {
            if let Some(n) = m.next_attempt_in_s {
                out.push_str(&format!(" next in {}", age(n)));
            }
        }
        if let Some(reply) = &r.last_reply {
            out.push_str(&format!("\n        ({reply})"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::types::RcptView;

    #[test]
    fn ages_use_their_largest_whole_unit() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(119), "119s");
        assert_eq!(age(120), "2m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(172_800), "2d");
    }

    #[test]
    fn a_message_shows_its_undelivered_recipients_with_route_and_reply() {
        let m = MessageView {
            id: "QID1".into(),
            from: "a@example.org".into(),
            age_s: 240,
            size: 2048,
            phase: "deferred".into(),
            attempts: 2,
            next_attempt_in_s: Some(130),
            unwritten: None,
            taken_from: None,
            recipients: vec![
                RcptView {
                    address: "bob@nhs.test".into(),
                    status: "deferred".into(),
                    route: Some("cloud".into()),
                    last_reply: Some("451 4.3.0 try later".into()),
                },
                RcptView {
                    address: "alice@nhs.test".into(),
                    status: "delivered".into(),
                    route: None,
                    last_reply: None,
                },
            ],
        };
        let text = list_text(std::slice::from_ref(&m));
        assert_eq!(
            text,
            "1 message(s)\n\
             QID1      4m      2048  deferred  <a@example.org>\n    \
             bob@nhs.test                             deferred  route cloud    next in 2m\n        \
             (451 4.3.0 try later)"
        );
    }
}
