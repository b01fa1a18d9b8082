//! Watching the nodes: each one's readiness, applied change and queue every second (the
//! history's samples), the wait for every queue to empty, and the read-back of their
//! directories after the run.

use crate::admin::{address, Mailboxes};
use crate::history::{Files, Sample};
use crate::nodes::Node;
use crate::run::say;
use coexist_base::clock::now_ms;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Asks every node each second whether it is ready, what it has applied and how long
/// its queue is, into `samples.jsonl`, until `on` is cleared.
pub(crate) fn start_poller(
    nodes: &[Node],
    files: &Files,
    on: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let clients: Vec<(String, coexist_api::client::AdminClient)> = nodes
        .iter()
        .map(|n| Ok((n.name.clone(), n.client(Duration::from_secs(2))?)))
        .collect::<anyhow::Result<_>>()?;
    let path = files.path(crate::history::SAMPLES);
    Ok(std::thread::spawn(move || {
        #[allow(clippy::disallowed_methods)] // The poller's own thread: one history file.
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        else {
            return;
        };
        let mut w = std::io::LineWriter::new(f);
        while on.load(Ordering::SeqCst) {
            let tick = Instant::now();
            for (name, c) in &clients {
                let ready = c.ready().ok();
                let applied = c.fleet_node().ok().map(|n| n.applied);
                let queue = queued(c);
                let s = Sample {
                    at_ms: now_ms() as i64,
                    node: name.clone(),
                    up: ready.is_some(),
                    ready: ready.as_ref().is_some_and(|r| r.ready),
                    applied,
                    postgres_up: ready.as_ref().and_then(|r| r.fleet_postgres_up),
                    queue,
                };
                if let Ok(line) = serde_json::to_string(&s) {
                    let _ = writeln!(w, "{line}");
                }
            }
            std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
    }))
}

/// Waits until every node's queue is empty in three samples in a row, at most `limit`;
/// the error says what is left.
pub(crate) async fn drain(nodes: &[Node], limit: Duration) -> Result<(), String> {
    let clients: Vec<_> = nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), n.client(Duration::from_secs(5)).ok()?)))
        .collect();
    let deadline = Instant::now() + limit;
    let mut empty_rounds = 0;
    let mut left = String::new();
    while Instant::now() < deadline {
        let mut total = 0u64;
        left.clear();
        for (name, c) in &clients {
            let q = queued(c).unwrap_or(u64::MAX / 4);
            total += q;
            left.push_str(&format!("{name}: {q} queued; "));
        }
        empty_rounds = if total == 0 { empty_rounds + 1 } else { 0 };
        if empty_rounds >= 3 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(left)
}

/// Reads back from every node the state of a sample of mailboxes (every pinned one, 3,000
/// others that moved, 2,000 that never did) into the history's `final.jsonl`.
pub(crate) async fn read_finals(
    nodes: &[Node],
    mb: &Mailboxes,
    seed: u64,
    files: &Files,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xF1A1);
    let mut moved: Vec<usize> = (0..mb.estate.len())
        .filter(|i| mb.estate[*i] != mb.source[*i])
        .collect();
    let mut still: Vec<usize> = (0..mb.estate.len())
        .filter(|i| mb.estate[*i] == mb.source[*i] && !mb.pinned.contains(i))
        .collect();
    rng.shuffle(&mut moved);
    rng.shuffle(&mut still);
    let mut sample: Vec<String> = mb.pinned.iter().copied().map(address).collect();
    sample.extend(moved.into_iter().take(3_000).map(address));
    sample.extend(still.into_iter().take(2_000).map(address));
    sample.sort();
    sample.dedup();
    let mut count = 0;
    for n in nodes {
        let client = n.client(Duration::from_secs(60))?;
        for chunk in sample.chunks(500) {
            let answers = tokio::task::block_in_place(|| client.route_explain(chunk))?;
            for (address, e) in chunk.iter().zip(answers) {
                files.append(
                    crate::history::FINAL,
                    &crate::history::Final {
                        node: n.name.clone(),
                        address: address.clone(),
                        state: e.lookup.state,
                        origin: e.lookup.origin,
                    },
                )?;
                count += 1;
            }
        }
    }
    say(&format!("read {count} mailbox states back from the nodes"));
    Ok(())
}

/// Messages in a node's queue (active, deferred and held, from `GET /v1/overview`); none
/// when it does not answer.
fn queued(c: &coexist_api::client::AdminClient) -> Option<u64> {
    let o: coexist_api::types::Overview =
        serde_json::from_value(c.get("/v1/overview").ok()?).ok()?;
    Some((o.active + o.deferred + o.held) as u64)
}
