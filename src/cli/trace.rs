//! `coexist trace [ADDRESS] [--sender S | --message-id M | --queue-id Q] [--since 12h]
//! [--until 1h]`: what became of mail, on every node: received, routed (with the origin of
//! the directory state: `file …`, `batch N`), each delivery attempt's outcome, DSNs, admin
//! actions, takeovers.
//!
//! Each node answers from its tracking log (`GET /v1/trace`; a node without the log answers
//! a recipient search from its recent outcomes in memory); the answers are merged into one
//! list, oldest first, one line per event:
//!
//! ```text
//! 2026-11-25T10:00:03.120Z mx1 18B2F0C4A9D1E0001 received from=bob@example.org to=alice@nhs.test size=1830 client=192.0.2.7:40122 tls=TLSv1.3 message_id=a1@example.org
//! 2026-11-25T10:00:03.120Z mx1 18B2F0C4A9D1E0001 routed rcpt=alice@nhs.test state=cloud route=cloud origin="batch 12"
//! 2026-11-25T10:00:03.410Z mx1 18B2F0C4A9D1E0001 delivered rcpt=alice@nhs.test route=cloud hop=10.0.0.9:25 origin="batch 12" reply="250 2.6.0 Queued mail for delivery"
//! ```
//!
//! `--since` and `--until` take a duration back from now (`30m`, `12h`, `2d`) or a time
//! (`2026-11-25T10:00:00Z`). A node that cannot be asked is named on stderr and the others
//! are still shown; the command fails only when no node answered.

use super::{load_config, Api};
use crate::admin::client::{AdminClient, ClientError, Target, TraceAsk, TraceField};
use crate::admin::types::{TraceEntry, TraceReply, TrackEvent, TrackKind};
use std::path::Path;
use std::time::Duration;

/// Arguments of `coexist trace`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("key").required(true).args(["address", "sender", "message_id", "queue_id"])))]
pub struct TraceArgs {
    /// A recipient, as received or as sent to the next hop (case does not matter).
    pub address: Option<String>,
    /// Mail from this sender (reverse path).
    #[arg(long)]
    pub sender: Option<String>,
    /// The message with this Message-ID header (angle brackets optional).
    #[arg(long)]
    pub message_id: Option<String>,
    /// The message with this queue id (as a node's log or a 250 reply names it).
    #[arg(long)]
    pub queue_id: Option<String>,
    /// Where the window starts: a duration back from now (30m, 12h, 2d) or a time
    /// (2026-11-25T10:00:00Z).
    #[arg(long, default_value = "12h")]
    pub since: String,
    /// Where the window ends (same forms; default now).
    #[arg(long)]
    pub until: Option<String>,
    /// Where the running server is.
    #[command(flatten)]
    pub api: Api,
}

impl TraceArgs {
    /// The key asked about, as the API names it.
    fn key(&self) -> (TraceField, &str) {
        if let Some(s) = &self.sender {
            (TraceField::Sender, s)
        } else if let Some(m) = &self.message_id {
            (TraceField::MessageId, m)
        } else if let Some(q) = &self.queue_id {
            (TraceField::QueueId, q)
        } else {
            (TraceField::Address, self.address.as_deref().unwrap_or(""))
        }
    }
}

/// Seconds back from `now` (Unix seconds) that `s` says: a duration, or a time.
pub fn seconds_ago(s: &str, now: u64, flag: &str) -> anyhow::Result<u64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(d.as_secs());
    }
    match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => Ok(now.saturating_sub(u64::try_from(t.timestamp()).unwrap_or(0))),
        Err(_) => anyhow::bail!(
            "{flag} {s:?}: neither a duration such as 30m or 12h nor a time such as 2026-11-25T10:00:00Z"
        ),
    }
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
/// against `ca_file` or the system roots) the trace question `ask`; each node's answer or why it could not be asked, in the order of
/// `nodes`. The first node is this config's own admin API (the admin chose its address);
/// every other one is a peer from the nodes table and gets the token only over TLS or on
/// loopback ([`AdminClient::for_peer`]).
pub fn ask_nodes(
    nodes: &[Target],
    token: &str,
    ca_file: Option<&Path>,
    ask: &TraceAsk,
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
                    client.trace_by(ask)
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

/// Prints what became of the mail asked about, on every node.
pub fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let now = crate::clock::now_secs();
    let since = seconds_ago(&args.since, now, "--since")?;
    let until = match &args.until {
        Some(u) => seconds_ago(u, now, "--until")?,
        None => 0,
    };
    anyhow::ensure!(
        until <= since,
        "--until {:?} is before --since {:?}",
        args.until.as_deref().unwrap_or(""),
        args.since
    );
    let (field, value) = args.key();
    let ask = TraceAsk {
        field,
        value: value.to_string(),
        since: Some(since),
        until: Some(until),
    };
    let config = load_config(args.api.config.as_ref())?;
    let local = AdminClient::from_config(&config)?;
    let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
    let token = admin.token().map_err(ClientError::Token)?;
    let nodes = nodes(&local)?;
    let mut answers = Vec::new();
    let ca = admin.tls_ca_file.as_deref();
    for (t, answer) in ask_nodes(&nodes, &token, ca, &ask) {
        match answer {
            Ok(a) => answers.push(a),
            Err(e) => eprintln!("node {}: {e}", t.addr),
        }
    }
    if answers.is_empty() {
        anyhow::bail!("no node answered (asked {})", nodes.len());
    }
    for a in answers.iter().filter(|a| a.truncated) {
        eprintln!(
            "node {}: more events matched than one answer carries; narrow the window (--since/--until)",
            a.node
        );
    }
    let asked = nodes.len();
    let what = format!("{} {value}", field.param().replace('_', "-"));
    args.api
        .print(&answers, |a| trace_text(a, &what, &args.since, asked))
}

/// One line per event across all answers, oldest first (by time, then in each node's
/// order): the tracking log's events, and the outcomes of nodes that answered from memory;
/// a line saying so when there is none.
pub fn trace_text(answers: &[TraceReply], what: &str, since: &str, asked: usize) -> String {
    let mut lines: Vec<(u64, String)> = Vec::new();
    for a in answers {
        if a.source == "log" || !a.events.is_empty() {
            lines.extend(a.events.iter().map(|e| (e.time_ms, event_line(&a.node, e))));
        } else {
            lines.extend(
                a.entries
                    .iter()
                    .rev()
                    .map(|e| (e.time * 1000, entry_line(&a.node, e))),
            );
        }
    }
    // Stable: events of one node at the same time keep their order.
    lines.sort_by_key(|(t, _)| *t);
    if lines.is_empty() {
        return format!(
            "nothing for {what} in the last {since} on {} of {asked} node(s)",
            answers.len()
        );
    }
    lines
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A reply as one string: `code status text`.
fn reply_text(code: Option<u16>, status: Option<&str>, text: &str) -> String {
    let mut parts: Vec<String> = code.iter().map(|c| c.to_string()).collect();
    parts.extend(status.map(str::to_string));
    parts.push(text.to_string());
    parts.join(" ")
}

/// `time node queue-id kind details`, the details as `key=value` by kind.
pub fn event_line(node: &str, e: &TrackEvent) -> String {
    let time = chrono::DateTime::from_timestamp_millis(e.time_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| e.time_ms.to_string());
    let mut line = format!("{time} {node} {} {}", e.queue_id, e.kind);
    let mut kv = |k: &str, v: &str| line.push_str(&format!(" {k}={v}"));
    match e.kind {
        TrackKind::Received => {
            let from = e.sender.as_deref().unwrap_or("");
            kv("from", if from.is_empty() { "<>" } else { from });
            kv("to", &e.recipients.join(","));
            kv("size", &e.size.unwrap_or(0).to_string());
            kv("client", e.client.as_deref().unwrap_or("-"));
            kv("tls", e.tls.as_deref().unwrap_or("-"));
            kv("message_id", e.message_id.as_deref().unwrap_or("-"));
        }
        TrackKind::Dsn => kv("dsn", e.related.as_deref().unwrap_or("-")),
        TrackKind::Held | TrackKind::Released => {}
        _ => {
            kv("rcpt", e.rcpt.as_deref().unwrap_or("-"));
            if let Some(s) = &e.state {
                kv("state", s);
            }
            if e.kind != TrackKind::TakenOver {
                kv("route", e.route.as_deref().unwrap_or("-"));
            }
            if e.kind != TrackKind::Routed && e.kind != TrackKind::TakenOver {
                kv("hop", e.next_hop.as_deref().unwrap_or("-"));
            }
            if let Some(s) = &e.sent_as {
                kv("sent_as", s);
            }
            kv(
                "origin",
                &format!("{:?}", e.origin.as_deref().unwrap_or("")),
            );
            if let Some(r) = &e.reply {
                kv(
                    "reply",
                    &format!("{:?}", reply_text(r.code, r.status.as_deref(), &r.text)),
                );
            }
        }
    }
    line
}

/// `time node queue-id outcome route= hop= [sent_as=] origin= reply=` (an answer from a
/// node's recent outcomes in memory).
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
    let reply = e
        .reply
        .as_ref()
        .map(|r| reply_text(r.code, r.status.as_deref(), &r.text));
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
            events: vec![],
            source: "memory".into(),
            truncated: false,
        };
        let mut old = entry(1_800_000_050, "C", Outcome::Deleted, "file d.csv");
        old.route = None;
        old.next_hop = None;
        old.reply = None;
        old.sent_as = Some("alice@tenant.test".into());
        let mx2 = TraceReply {
            node: "mx2".into(),
            entries: vec![old],
            events: vec![],
            source: "memory".into(),
            truncated: false,
        };
        assert_eq!(
            trace_text(&[mx1, mx2], "address alice@nhs.test", "12h", 2),
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
            events: vec![],
            source: "log".into(),
            truncated: false,
        };
        assert_eq!(
            trace_text(&[a], "address x@nhs.test", "1h", 2),
            "nothing for address x@nhs.test in the last 1h on 1 of 2 node(s)"
        );
    }
}
