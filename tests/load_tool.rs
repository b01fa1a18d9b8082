//! `coexist load` against a sink: replaying .eml files and an mbox with their envelopes,
//! phase latencies and the reports: the JSON document and its schema, charts of short runs,
//! the self-contained HTML page, `coexist report` side by side, replay timing and skipped
//! files, and per-route deliveries scraped from the relay's metrics.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

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

/// Runs the binary with `args` off the runtime's threads.
async fn run_bin(args: Vec<std::ffi::OsString>) -> std::process::Output {
    tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
        .await
        .unwrap()
}

/// Runs the binary with `args`; panics with its stderr on failure.
async fn coexist(args: Vec<std::ffi::OsString>) -> String {
    let out = run_bin(args).await;
    assert!(
        out.status.success(),
        "coexist failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    list.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// The report document's shape: every field the HTML page and `coexist report` read, with
/// its JSON type ("n" number, "s" string, "b" bool, "o" object, "a" array, "s?"/"n?" string
/// or number or null).
fn check_schema(v: &serde_json::Value) {
    use serde_json::Value;
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "b",
        Value::Number(_) => "n",
        Value::String(_) => "s",
        Value::Array(_) => "a",
        Value::Object(_) => "o",
    };
    let fields = [
        ("/schema", "s"),
        ("/version", "n"),
        ("/label", "s"),
        ("/started_at", "s"),
        ("/coexist_version", "s"),
        ("/parameters/target", "s"),
        ("/parameters/messages", "n"),
        ("/parameters/concurrency", "n"),
        ("/parameters/per_session", "n"),
        ("/parameters/tls", "b"),
        ("/parameters/pipelining", "b"),
        ("/parameters/chunking", "b"),
        ("/parameters/phases", "b"),
        ("/parameters/rate", "n?"),
        ("/parameters/max_seconds", "n"),
        ("/parameters/traffic", "s"),
        ("/parameters/timing", "s?"),
        ("/sent", "n"),
        ("/accepted", "n"),
        ("/accepted_recipients", "n"),
        ("/refused_by_code", "o"),
        ("/connection_errors", "n"),
        ("/elapsed_s", "n"),
        ("/msg_per_s", "n"),
        ("/mb_per_s", "n"),
        ("/bytes", "n"),
        ("/open_loop/late", "n"),
        ("/open_loop/max_lag_ms", "n"),
        ("/series_bucket_s", "n"),
        ("/series", "a"),
    ];
    for (ptr, want) in fields {
        let got = v.pointer(ptr).map(kind).unwrap_or("missing");
        let ok = match want {
            "n?" => got == "n" || got == "null",
            "s?" => got == "s" || got == "null",
            w => got == w,
        };
        assert!(ok, "{ptr}: {got}, want {want}");
    }
    assert_eq!(v["schema"], "coexist.load-report");
    assert_eq!(v["version"], 1);
    for phase in ["message", "connect", "ehlo_tls", "mail_rcpt", "data"] {
        for q in ["count", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"] {
            assert!(v["latency"][phase][q].is_number(), "latency.{phase}.{q}");
        }
    }
    for p in v["series"].as_array().unwrap() {
        for k in ["t", "accepted", "msg_per_s", "p50_ms", "p99_ms", "p99_9_ms"] {
            assert!(p[k].is_number(), "series point {k}: {p}");
        }
    }
}

/// Points of each data line in a chart (grid lines and legend samples have two).
fn data_lines(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|p| p.split("points=\"").nth(1))
        .filter_map(|p| p.split('"').next())
        .map(|p| p.split_whitespace().count())
        .filter(|&n| n > 2)
        .collect()
}

/// Nothing in the page is loaded from elsewhere.
fn self_contained(page: &str) {
    let page = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in ["<script", "<link", "@import", "src=", "href=", "url("] {
        assert!(!page.contains(needle), "{needle} in the page");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_has_a_report_document_a_chart_with_points_and_a_page_a_browser_shows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let target = sink.addr.to_string();
    // 20 messages at 100 a second: a run of about 0.2 s.
    for label in ["first", "second"] {
        coexist(args(&[
            &"load",
            &"--target",
            &target,
            &"--messages",
            &"20",
            &"--rate",
            &"100",
            &"--concurrency",
            &"2",
            &"--max-seconds",
            &"60",
            &"--label",
            &label,
            &"--json",
            &d.join(format!("{label}.json")),
            &"--report",
            &d.join(format!("{label}.svg")),
            &"--html",
            &d.join(format!("{label}.html")),
        ]))
        .await;
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("first.json")).unwrap()).unwrap();
    check_schema(&v);
    assert_eq!(v["label"], "first");
    assert_eq!(v["accepted"], 20);
    assert_eq!(v["parameters"]["rate"], 100.0);
    let series = v["series"].as_array().unwrap();
    assert!(series.len() >= 2, "{series:?}");
    let counted: u64 = series.iter().map(|p| p["accepted"].as_u64().unwrap()).sum();
    assert_eq!(counted, 20);
    // A run under a second is reported in 10 ms buckets (100 ms if it took longer).
    let bucket = v["series_bucket_s"].as_f64().unwrap();
    assert!(bucket == 0.01 || bucket == 0.1, "{bucket}");

    let svg = std::fs::read_to_string(d.join("first.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    // Throughput and three percentiles, each with every point drawn and marked.
    let n = series.len();
    if n > 2 {
        assert_eq!(data_lines(&svg), vec![n; 4]);
    }
    assert!(svg.matches("<circle").count() >= 4 * n);
    for label in [
        "Throughput",
        "accepted messages/s",
        "latency (ms)",
        "p99.9",
        "time since start (s)",
    ] {
        assert!(svg.contains(label), "{label} missing from the chart");
    }

    let page = std::fs::read_to_string(d.join("first.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    self_contained(&page);
    assert!(page.contains("acceptance rate") && page.contains("<svg"));

    // Side by side, renamed, with ratios; a chart as PNG.
    let out = coexist(args(&[
        &"report",
        &d.join("first.json"),
        &d.join("second.json"),
        &"--labels",
        &"postfix,coexist",
        &"--html",
        &d.join("cmp.html"),
        &"--chart",
        &d.join("cmp.png"),
    ]))
    .await;
    assert!(
        out.contains("postfix: 20 accepted") && out.contains("x the acceptance rate of postfix"),
        "{out}"
    );
    let page = std::fs::read_to_string(d.join("cmp.html")).unwrap();
    self_contained(&page);
    assert!(page.contains("<th>coexist / postfix</th>"));
    assert!(page.contains("×</td>"));
    let png = std::fs::read(d.join("cmp.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));

    // The page as a reader sees it, in a real browser (headless Chromium): the title, the
    // summary with ratios, and charts drawn with data and labelled axes; nothing fetched.
    let browser = common::browser::Browser::start().await;
    browser.open_file(&d.join("cmp.html")).await;
    let h1 = browser.text("h1").await;
    assert!(h1.starts_with("coexist load report"), "{h1}");
    let table = browser.text("table").await;
    assert!(
        table.contains("acceptance rate")
            && table.contains("coexist / postfix")
            && table.contains('×'),
        "{table}"
    );
    let seen = browser
        .client()
        .execute(
            r#"const svg = document.querySelector('figure#chart svg');
               const lines = svg ? [...svg.querySelectorAll('polyline')] : [];
               const texts = svg ? [...svg.querySelectorAll('text')].map(t => t.textContent) : [];
               return {
                 width: svg ? svg.getBoundingClientRect().width : 0,
                 longest: Math.max(0, ...lines.map(l => l.points.numberOfItems)),
                 texts: texts.join('|'),
                 fetched: performance.getEntriesByType('resource').length,
                 details: document.querySelectorAll('details').length,
               };"#,
            vec![],
        )
        .await
        .expect("script runs");
    assert!(seen["width"].as_f64().unwrap_or(0.0) > 0.0, "{seen}");
    assert!(seen["longest"].as_u64().unwrap_or(0) > 2, "{seen}");
    let texts = seen["texts"].as_str().unwrap_or("");
    assert!(
        texts.contains("time since start (s)") && texts.contains("accepted messages/s"),
        "{seen}"
    );
    assert_eq!(seen["fetched"], 0, "the page loads nothing: {seen}");
    assert_eq!(seen["details"], 2, "one chart per run: {seen}");
    browser.close().await;

    // Anything else is refused by name.
    std::fs::write(d.join("other.json"), "{\"sent\": 1}").unwrap();
    let out = Command::new(BIN)
        .arg("report")
        .arg(d.join("other.json"))
        .arg("--html")
        .arg(d.join("x.html"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a coexist load report"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_takes_recipient_lists_keeps_original_timing_and_reports_skips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let emls = d.join("emls");
    std::fs::create_dir(&emls).unwrap();
    let w = |name: &str, text: &str| std::fs::write(emls.join(name), text).unwrap();
    // File names in another order than the dates: 30 s apart.
    w(
        "a.eml",
        "From: s@example.org\nDate: Tue, 24 Nov 2026 10:01:00 +0000\nSubject: third\n\nx\n",
    );
    w(
        "b.eml",
        "Received: from x by y; Tue, 24 Nov 2026 10:00:00 +0000\nFrom: s@example.org\nSubject: first\n\nx\n",
    );
    w(
        "c.eml",
        "From: s@example.org\nDate: Tue, 24 Nov 2026 10:00:30 +0000\nSubject: second\n\nx\n",
    );
    w("d.eml", "From: s@example.org\nSubject: undated\n\nx\n");
    w(
        "e.eml",
        "Date: Tue, 24 Nov 2026 10:00:10 +0000\nSubject: no sender\n\nx\n",
    );
    w("f.eml", "");
    let json = d.join("r.json");
    let out = coexist(args(&[
        &"load",
        &"--target",
        &sink.addr.to_string(),
        &"--eml",
        &emls,
        // A comma-separated list, with a space as people type it.
        &"--to",
        &"x@nhs.test, y@nhs.test",
        &"--timing",
        &"300",
        &"--messages",
        &"3",
        &"--concurrency",
        &"1",
        &"--max-seconds",
        &"60",
        &"--json",
        &json,
        &"--html",
        &d.join("r.html"),
    ]))
    .await;
    assert!(
        out.contains("replay: 3 of 6 messages used, 3 skipped: no_date 1 (d.eml); no_sender 1 (e.eml); unparseable 1 (f.eml)"),
        "{out}"
    );
    let msgs = sink.state.messages();
    let subjects: Vec<String> = msgs
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.body).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(subjects, vec!["first", "second", "third"]);
    for m in &msgs {
        let rcpts: Vec<String> = m.rcpts.iter().map(|a| a.to_string()).collect();
        assert_eq!(rcpts, vec!["x@nhs.test", "y@nhs.test"]);
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    check_schema(&v);
    assert_eq!(v["parameters"]["timing"], "300x faster");
    assert_eq!(v["skipped"]["found"], 6);
    assert_eq!(v["skipped"]["used"], 3);
    for (reason, file) in [
        ("no_date", "d.eml"),
        ("no_sender", "e.eml"),
        ("unparseable", "f.eml"),
    ] {
        assert_eq!(v["skipped"]["reasons"][reason]["count"], 1);
        assert_eq!(v["skipped"]["reasons"][reason]["examples"][0], file);
    }
    // Sixty seconds of mail at 300 times: the last message is due 0.2 s after the first.
    assert!(v["elapsed_s"].as_f64().unwrap() >= 0.2);
    let page = std::fs::read_to_string(d.join("r.html")).unwrap();
    assert!(page.contains("no Date or Received date") && page.contains("d.eml"));

    // --timing needs replayed files; a factor must be above zero.
    for bad in [
        vec!["--timing", "original"],
        vec!["--eml", "x", "--timing", "0"],
    ] {
        let out = Command::new(BIN)
            .args(["load", "--target", "127.0.0.1:9", "--messages", "1"])
            .args(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("timing"),
            "{bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_metrics_give_deliveries_per_route() {
    let h = common::harness(|_| {}).await;
    let d = h.dir.path();
    let token = d.join("token");
    std::fs::write(&token, common::TOKEN).unwrap();
    let admin = h.relay.admin_addr.unwrap();
    let json = d.join("r.json");
    let svg = d.join("r.svg");
    let out = coexist(args(&[
        &"load",
        &"--target",
        &h.addr.to_string(),
        &"--directory",
        &d.join("directory.csv"),
        &"--messages",
        &"30",
        &"--concurrency",
        &"2",
        &"--max-seconds",
        &"60",
        &"--metrics-url",
        &format!("http://{admin}/metrics"),
        &"--metrics-token-file",
        &token,
        &"--metrics-settle",
        &"60",
        &"--json",
        &json,
        &"--report",
        &svg,
    ]))
    .await;
    assert!(out.contains("relay metrics (http://"), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    check_schema(&v);
    let totals = v["routes"]["totals"].as_object().unwrap();
    let sent = |r: &str| totals[r]["sent"].as_u64().unwrap();
    assert!(sent("onprem") > 0 && sent("cloud") > 0, "{totals:?}");
    // Every accepted recipient was delivered, on the route of its state.
    assert_eq!(
        sent("onprem") + sent("cloud"),
        v["accepted_recipients"].as_u64().unwrap()
    );
    assert_eq!(
        h.onprem
            .state
            .messages()
            .iter()
            .map(|m| m.rcpts.len() as u64)
            .sum::<u64>(),
        sent("onprem")
    );
    let series = v["routes"]["series"].as_array().unwrap();
    let last = series.last().unwrap();
    assert_eq!(last["sent"]["cloud"].as_u64().unwrap(), sent("cloud"));
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("Deliveries per route") && chart.contains("recipients delivered"));

    // Without the token the endpoint refuses, and the load says so before sending.
    let out = run_bin(args(&[
        &"load",
        &"--target",
        &h.addr.to_string(),
        &"--messages",
        &"1",
        &"--metrics-url",
        &format!("http://{admin}/metrics"),
    ]))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered 401"));
}
