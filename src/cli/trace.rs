//! `coexist trace ADDRESS [--since 12h]`: where mail for an address went, on every node,
//! with the origin of each routing decision (the directory's `file …` or `batch N`).
//!
//! Each node answers from its own record of recent outcomes (`GET /v1/trace`,
//! `queue.recent_outcomes`); the answers are merged into one list, oldest first, one line per
//! outcome:
//!
//! ```text
//! 2026-11-25T10:00:03Z mx1.nhs.test 18B2F0C4A9D1E0001 delivered route=onprem hop=10.0.0.5:25 origin="file /etc/coexist/directory.csv" reply="250 2.0.0 Ok: queued as 4F1"
//! 2026-11-25T18:42:10Z mx1.nhs.test 18B31D02B7C4F0003 deferred route=cloud hop=10.0.0.9:25 origin="batch 12" reply="451 4.3.0 try later"
//! ```
//!
//! A node that cannot be asked is named on stderr and the others are still shown; the
//! command fails only when no node answered.

use super::{load_config, Api};
use crate::admin::client::{AdminClient, ClientError, Target};
use crate::admin::types::{TraceEntry, TraceReply};
use anyhow::Context;
use std::path::Path;
use std::time::Duration;

/// Arguments of `coexist trace`.
#[derive(clap::Args)]
pub struct TraceArgs {
    /// The recipient, as received or as sent to the next hop (case does not matter).
    pub address: String,
    /// How far back to look (e.g. 30m, 12h, 2d).
    #[arg(long, default_value = "12h")]
    pub since: String,
    /// Where the running server is.
    #[command(flatten)]
    pub api: Api,
}

/// The admin APIs of the nodes to ask: in a fleet, every node of the nodes table (through
/// `GET /v1/fleet` on the node of the config); else that node alone. A node that cannot be
/// asked from here (no address, one that does not resolve, or a loopback address of another
/// host: see [`crate::fleet::peers::reach`]), or only with the token in clear over the
/// network (see [`crate::admin::client::Target::may_carry_token`]), is named on stderr
/// with why.
pub fn nodes(local: &AdminClient) -> Result<Vec<Target>, ClientError> {
    // Not in a fleet (404), or the node cannot be asked: that node alone (asking it then
    // says precisely what is wrong).
    let Ok(st) = local.fleet_status() else {
        return Ok(vec![local.target().clone()]);
    };
    let here = crate::fleet::peers::host_scope();
    let mut out = vec![local.target().clone()];
    for n in st.nodes.iter().filter(|n| n.name != st.node) {
        if !n.alive {
            eprintln!(
                "node {}: not asked: silent or stopped (no heartbeat for {:.0} s)",
                n.name, n.heartbeat_age_seconds
            );
            continue;
        }
        match crate::fleet::peers::reach(
            n.admin.as_deref(),
            n.admin_tls_name.as_deref(),
            n.admin_host.as_deref(),
            &here,
        ) {
            Ok(t) if out.iter().any(|o| o.addr == t.addr) => eprintln!(
                "node {}: not asked: its admin address {} is the one asked already",
                n.name, t.addr
            ),
            Ok(t) if !t.may_carry_token() => eprintln!(
                "node {}: cannot be asked: {}",
                n.name,
                ClientError::ClearText { addr: t.addr }
            ),
            Ok(t) => out.push(t),
            Err(why) => eprintln!("node {}: cannot be asked: {why}", n.name),
        }
    }
    Ok(out)
}

/// Asks every node in `nodes` (in parallel, with `token`; https certificates checked
/// against `ca_file` or the system roots) for the outcomes for `address` in the last
/// `since` seconds; each node's answer or why it could not be asked, in the order of
/// `nodes`. The first node is this config's own admin API (the admin chose its address);
/// every other one is a peer from the nodes table and gets the token only over TLS or on
/// loopback ([`AdminClient::for_peer`]).
pub fn ask_nodes(
    nodes: &[Target],
    token: &str,
    ca_file: Option<&Path>,
    address: &str,
    since: u64,
) -> Vec<(Target, Result<TraceReply, ClientError>)> {
    std::thread::scope(|s| {
        let asks: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ask = move || {
                    let timeout = Duration::from_secs(300);
                    let client = if i == 0 {
                        AdminClient::connect(t, token.to_string(), timeout, ca_file)?
                    } else {
                        AdminClient::for_peer(t, token.to_string(), timeout, ca_file)?
                    };
                    client.trace(address, Some(since))
                };
                (t.clone(), s.spawn(ask))
            })
            .collect();
        asks.into_iter()
            .map(|(t, h)| {
                let answer = h.join().unwrap_or_else(|_| {
                    Err(ClientError::Unexpected {
                        call: "GET /v1/trace".into(),
                        reason: "the request's thread panicked".into(),
                    })
                });
                (t, answer)
            })
            .collect()
    })
}

/// Prints where mail for the address went on every node.
pub fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let since = humantime::parse_duration(&args.since).with_context(|| {
        format!(
            "--since {:?}: not a duration such as 30m or 12h",
            args.since
        )
    })?;
    let config = load_config(args.api.config.as_ref())?;
    let local = AdminClient::from_config(&config)?;
    let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
    let token = admin.token().map_err(ClientError::Token)?;
    let nodes = nodes(&local)?;
    let mut answers = Vec::new();
    let ca = admin.tls_ca_file.as_deref();
    for (t, answer) in ask_nodes(&nodes, &token, ca, &args.address, since.as_secs()) {
        match answer {
            Ok(a) => answers.push(a),
            Err(e) => eprintln!("node {}: {e}", t.addr),
        }
    }
    if answers.is_empty() {
        anyhow::bail!("no node answered (asked {})", nodes.len());
    }
    let asked = nodes.len();
    args.api.print(&answers, |a| {
        trace_text(a, &args.address, &args.since, asked)
    })
}

/// One line per outcome across all answers, oldest first (by time, then in each node's
/// order); a line saying so when there is none.
pub fn trace_text(answers: &[TraceReply], address: &str, since: &str, asked: usize) -> String {
    let mut lines: Vec<(&str, &TraceEntry)> = answers
        .iter()
        .flat_map(|a| a.entries.iter().rev().map(move |e| (a.node.as_str(), e)))
        .collect();
    // Stable: outcomes of one node in the same second keep their order.
    lines.sort_by_key(|(_, e)| e.time);
    if lines.is_empty() {
        return format!(
            "no outcomes for {address} in the last {since} on {} of {asked} node(s)",
            answers.len()
        );
    }
    lines
        .iter()
        .map(|(node, e)| entry_line(node, e))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `time node queue-id outcome route= hop= [sent_as=] origin= reply=`.
fn entry_line(node: &str, e: &TraceEntry) -> String {
    let time = chrono::DateTime::from_timestamp(e.time as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| e.time.to_string());
    let mut line = format!(
        "{time} {node} {} {} route={} hop={}",
        e.queue_id,
        e.outcome,
        e.route.as_deref().unwrap_or("-"),
        e.next_hop.as_deref().unwrap_or("-"),
    );
    if let Some(s) = &e.sent_as {
        line.push_str(&format!(" sent_as={s}"));
    }
    let reply = e.reply.as_ref().map(|r| {
        let mut parts: Vec<String> = r.code.iter().map(|c| c.to_string()).collect();
        parts.extend(r.status.clone());
        parts.push(r.text.clone());
        parts.join(" ")
    });
    line.push_str(&format!(" origin={:?}", e.origin));
    line.push_str(&format!(" reply={:?}", reply.unwrap_or_default()));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::types::{Outcome, OutcomeReply};

    fn entry(time: u64, qid: &str, outcome: Outcome, origin: &str) -> TraceEntry {
        TraceEntry {
            time,
            queue_id: qid.into(),
            recipient: "alice@nhs.test".into(),
            sent_as: None,
            route: Some("cloud".into()),
            next_hop: Some("127.0.0.1:2602".into()),
            outcome,
            reply: Some(OutcomeReply {
                code: Some(250),
                status: Some("2.0.0".into()),
                text: "Ok".into(),
            }),
            origin: origin.into(),
        }
    }

    #[test]
    fn lines_are_merged_across_nodes_oldest_first() {
        let mx1 = TraceReply {
            node: "mx1".into(),
            // Newest first, as the API answers; two in the same second.
            entries: vec![
                entry(1_800_000_100, "B", Outcome::Delivered, "batch 3"),
                entry(1_800_000_100, "A", Outcome::Deferred, "batch 3"),
            ],
        };
        let mut old = entry(1_800_000_050, "C", Outcome::Deleted, "file d.csv");
        old.route = None;
        old.next_hop = None;
        old.reply = None;
        old.sent_as = Some("alice@tenant.test".into());
        let mx2 = TraceReply {
            node: "mx2".into(),
            entries: vec![old],
        };
        assert_eq!(
            trace_text(&[mx1, mx2], "alice@nhs.test", "12h", 2),
            "2027-01-15T08:00:50Z mx2 C deleted route=- hop=- sent_as=alice@tenant.test origin=\"file d.csv\" reply=\"\"\n\
             2027-01-15T08:01:40Z mx1 A deferred route=cloud hop=127.0.0.1:2602 origin=\"batch 3\" reply=\"250 2.0.0 Ok\"\n\
             2027-01-15T08:01:40Z mx1 B delivered route=cloud hop=127.0.0.1:2602 origin=\"batch 3\" reply=\"250 2.0.0 Ok\""
        );
    }

    #[test]
    fn no_outcomes_says_so() {
        let a = TraceReply {
            node: "mx1".into(),
            entries: vec![],
        };
        assert_eq!(
            trace_text(&[a], "x@nhs.test", "1h", 2),
            "no outcomes for x@nhs.test in the last 1h on 1 of 2 node(s)"
        );
    }
}
