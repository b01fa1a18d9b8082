//! Tracing spans: every line of a message's life can be found by its queue id.
//!
//! The relay runs in process with a JSON subscriber that writes into memory; the test sends
//! one message and reads the lines back. The `queued` line is logged inside the SMTP
//! session's span (which carries the client and, once MAIL is taken, the queue id); the
//! `delivery` lines inside the delivery attempt's span (which carries the queue id).
//!
//! Its own test binary, because a tracing subscriber is process-wide.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::*;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// A `MakeWriter` that appends every line to a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// Every JSON line written so far.
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The span named `name` in a line's span list, if any.
fn span<'a>(line: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    line["spans"].as_array()?.iter().find(|s| s["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_s_lines_carry_its_queue_id_from_the_spans() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(captured.clone())
        .init();

    let h = harness(|_| {}).await;
    let r = send_one(h.addr, &["alice@nhs.test", "carol@nhs.test"], "spans").await;
    assert_eq!(r.code, 250, "{r:?}");
    let qid = queue_id(&r);
    assert_eq!(wait(&h.onprem, 1).await + wait(&h.cloud, 1).await, 2);

    // The delivery lines are written after the sinks reply: wait for both.
    let deliveries: Vec<serde_json::Value> = eventually("two delivery lines", || {
        let d: Vec<serde_json::Value> = captured
            .lines()
            .into_iter()
            .filter(|l| l["fields"]["message"] == "delivery")
            .collect();
        if d.len() >= 2 {
            Ok(d)
        } else {
            Err(format!("{d:#?}"))
        }
    })
    .await;
    assert_eq!(deliveries.len(), 2, "{deliveries:#?}");
    for d in &deliveries {
        let attempt = span(d, "attempt").unwrap_or_else(|| panic!("no attempt span: {d}"));
        assert_eq!(attempt["qid"], qid.as_str(), "{d}");
    }

    // The line that says the message was queued comes from the session's span, which
    // names the client and the transaction's queue id.
    let lines = captured.lines();
    let queued = lines
        .iter()
        .find(|l| l["fields"]["message"] == "queued")
        .expect("a queued line");
    let session = span(queued, "session").unwrap_or_else(|| panic!("no session span: {queued}"));
    assert_eq!(session["qid"], qid.as_str(), "{queued}");
    assert!(
        session["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{queued}"
    );

    // The message's whole life in the queue, its removal included, is in its `message` span.
    let removed = eventually("a removed line", || {
        captured
            .lines()
            .into_iter()
            .find(|l| l["fields"]["message"] == "removed")
    })
    .await;
    let message = span(&removed, "message").unwrap_or_else(|| panic!("no message span: {removed}"));
    assert_eq!(message["qid"], qid.as_str(), "{removed}");
    for d in &deliveries {
        assert_eq!(
            span(d, "message").map(|m| &m["qid"]),
            Some(&qid.as_str().into()),
            "{d}"
        );
    }
}
