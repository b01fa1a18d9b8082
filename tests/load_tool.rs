//! `coexist load` against a sink: replaying .eml files and an mbox with their envelopes,
//! phase latencies and the JSON and SVG reports.

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::bin::BIN;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_files_and_writes_reports() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let emls = dir.path().join("emls");
    std::fs::create_dir(&emls).unwrap();
    std::fs::write(
        emls.join("1.eml"),
        "From: A <a@example.org>\nTo: b@nhs.test, \"C\" <c@nhs.test>\nSubject: one\n\n.dot\nbody\n",
    )
    .unwrap();
    std::fs::write(emls.join("ignored.txt"), "not a message").unwrap();
    let mbox = dir.path().join("box.mbox");
    std::fs::write(&mbox, "From x@y Mon Jan 1 00:00:00 2026\nFrom: x@example.org\nTo: d@nhs.test\nSubject: two\n\n>From the start\n").unwrap();
    let json = dir.path().join("r.json");
    let svg = dir.path().join("r.svg");
    let out = Command::new(BIN)
        .args([
            "load",
            "--target",
            &sink.addr.to_string(),
            "--messages",
            "4",
            "--concurrency",
            "1",
            "--phases",
        ])
        .arg("--eml")
        .arg(&emls)
        .arg("--mbox")
        .arg(&mbox)
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4 accepted (6 recipients)"), "{text}");
    assert!(
        text.contains("MAIL-RCPT") && text.contains("DATA"),
        "{text}"
    );

    let msgs = sink.state.messages();
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[0].from.as_ref().unwrap().to_string(), "a@example.org");
    assert_eq!(
        msgs[0]
            .rcpts
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        vec!["b@nhs.test", "c@nhs.test"]
    );
    assert_eq!(msgs[0].body, b"From: A <a@example.org>\r\nTo: b@nhs.test, \"C\" <c@nhs.test>\r\nSubject: one\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(msgs[1].rcpts[0].to_string(), "d@nhs.test");
    assert!(String::from_utf8_lossy(&msgs[1].body).ends_with("\r\nFrom the start\r\n"));

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["accepted"], 4);
    assert_eq!(v["latency"]["mail_rcpt"]["count"], 4);
    assert!(v["series"].as_array().is_some_and(|s| !s.is_empty()));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}
