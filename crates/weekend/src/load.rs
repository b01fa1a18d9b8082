//! The load: a day's curve of mail through all three MX nodes (the load tool's client with
//! its round robin over the nodes), each transaction written to the history as it ends,
//! and the run's load report document.

use crate::admin::{address, Mailboxes};
use crate::history::{Files, Refusal, Sent};
use crate::nodes::Node;
use crate::plan::{due_times, Plan};
use coexist_base::clock::now_ms;
use coexist_base::proto::RcptOutcome;
use coexist_load::client::{self, Generator, LoadOptions, Observed, Offsets, Traffic};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Starts the load: the plan's day curve of messages, 1–3 recipients each from the
/// directory, through the three nodes in turn; each transaction is written to `sent.jsonl`.
pub(crate) fn start_load(
    plan: &Plan,
    nodes: &[Node],
    mb: &Mailboxes,
    files: &Files,
) -> anyhow::Result<tokio::task::JoinHandle<client::LoadReport>> {
    let due = due_times(plan.load, plan.peak_rate);
    let count = due.len() as u64;
    let rcpts = (0..mb.estate.len())
        .filter_map(|i| coexist_base::types::Address::parse(&address(i), true).ok())
        .collect();
    let traffic = Arc::new(Traffic::Synthetic(Generator {
        rcpts,
        max_rcpts: plan.max_rcpts,
        size: 3000,
        ..Default::default()
    }));
    let names: HashMap<SocketAddr, String> =
        nodes.iter().map(|n| (n.smtp, n.name.clone())).collect();
    #[allow(clippy::disallowed_methods)] // The history file the observer appends to.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.path(crate::history::SENT))?;
    let out = Arc::new(Mutex::new(std::io::BufWriter::new(f)));
    let observer: client::Observer = Arc::new(move |o: Observed<'_>| {
        let sent = sent_of(&o, &names);
        if let (Ok(line), Ok(mut w)) = (serde_json::to_string(&sent), out.lock()) {
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    });
    let opts = LoadOptions {
        target: nodes[0].smtp,
        more_targets: nodes[1..].iter().map(|n| n.smtp).collect(),
        messages: count,
        concurrency: 24,
        per_session: 10,
        tls: coexist_core::config::TlsPolicy::None,
        max_duration: plan.load + Duration::from_secs(10),
        pipelining: true,
        chunking: true,
        rate: None,
        offsets: Some(Offsets {
            at: due,
            lap: plan.load + Duration::from_secs(3600),
        }),
        phases: false,
        progress: false,
        observer: Some(observer),
    };
    Ok(tokio::spawn(client::run(opts, traffic)))
}

/// A load generator's view of one message.
pub(crate) fn sent_of(o: &Observed<'_>, names: &HashMap<SocketAddr, String>) -> Sent {
    let mut s = Sent {
        at_ms: now_ms() as i64,
        node: names
            .get(&o.target)
            .cloned()
            .unwrap_or_else(|| o.target.to_string()),
        qid: None,
        accepted: Vec::new(),
        refused: Vec::new(),
        error: None,
    };
    match &o.result {
        Err(e) => s.error = Some(e.clone()),
        Ok(outcomes) => {
            for (rcpt, out) in o.rcpts.iter().zip(outcomes.iter()) {
                match out {
                    RcptOutcome::Delivered(reply) => {
                        if s.qid.is_none() {
                            s.qid = reply
                                .text()
                                .rsplit_once("queued as ")
                                .map(|(_, id)| id.trim().to_string());
                        }
                        s.accepted.push(rcpt.to_string());
                    }
                    RcptOutcome::Deferred(f) | RcptOutcome::Failed(f) => s.refused.push(Refusal {
                        rcpt: rcpt.to_string(),
                        code: f.code().unwrap_or(0),
                        reply: f.to_string(),
                    }),
                }
            }
        }
    }
    s
}

/// The load's report document (JSON), for `coexist-report` to chart.
pub(crate) fn write_load_report(
    r: &client::LoadReport,
    plan: &Plan,
    out: &Path,
) -> anyhow::Result<()> {
    let doc = r.document(
        format!("weekend ({})", plan.name),
        coexist_load::report::Parameters::default(),
        None,
        None,
    );
    #[allow(clippy::disallowed_methods)] // The run's report file.
    std::fs::write(out.join("load.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}
