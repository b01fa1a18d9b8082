//! The Prometheus alerting rules and the Grafana dashboard shipped in `ops/` (issue 27) name
//! only metrics coexist exports: every `coexist_*` name in them is one of the metric names
//! of `crates/base/src/metrics.rs` (a histogram's `_bucket`, `_sum` and `_count` series
//! included). `scripts/test.sh` also runs `promtool check rules` and `promtool test rules`.
#![allow(clippy::disallowed_methods)] // Tests read the repository's files directly.

use std::collections::BTreeSet;

/// Every `coexist_…` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("coexist_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The metric names coexist exports: the string constants of `crates/base/src/metrics.rs`.
fn exported() -> BTreeSet<String> {
    let src = include_str!("../crates/base/src/metrics.rs");
    src.lines()
        .filter(|l| l.trim_start().starts_with("pub const"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("coexist_"))
        .map(str::to_string)
        .collect()
}

fn check(file: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let known = exported();
    assert!(known.len() > 40, "the metric list was not read: {known:?}");
    let used = names(&text);
    assert!(!used.is_empty(), "{file} names no metric");
    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            !known.contains(*n) && !known.contains(base)
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} names metrics coexist does not export: {unknown:?}"
    );
}

#[test]
fn the_alerting_rules_name_only_exported_metrics() {
    check("ops/prometheus/coexist-alerts.yml");
    check("ops/prometheus/coexist-alerts.test.yml");
}

#[test]
fn the_dashboard_is_json_and_names_only_exported_metrics() {
    let text = std::fs::read_to_string("ops/grafana/coexist-dashboard.json").unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = v["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{p}");
    }
    check("ops/grafana/coexist-dashboard.json");
}

#[test]
fn a_made_up_metric_is_caught() {
    let used = names("rate(coexist_no_such_metric_total[5m]) + coexist_queue_messages");
    assert!(used.contains("coexist_no_such_metric_total"));
    assert!(!exported().contains("coexist_no_such_metric_total"));
}

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_expiry_the_alerts_read_is_exported() {
    let h = common::harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let (status, _, body) =
        common::http(api, "GET", "/metrics", Some(common::TOKEN), None, b"").await;
    assert_eq!(status, 200);
    let line = body
        .lines()
        .find(|l| l.starts_with("coexist_tls_cert_expiry_timestamp_seconds{cert=\"smtp\"}"))
        .unwrap_or_else(|| panic!("no expiry of the STARTTLS certificate in:\n{body}"));
    let at: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = coexist::clock::now_secs() as f64;
    // The test certificate (rcgen's default validity) ends in the future.
    assert!(at > now, "{line}");
}
