//! The load report document: what a run writes ([`RunReport`], the contract between
//! `coexist load --json` and `coexist report`), its schema name and version, reading it
//! back. The charts and the HTML page drawn from it are the `coexist-report` program's
//! (crates/report), so that no chart library is linked here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `schema` field of every report document.
pub const SCHEMA: &str = "coexist.load-report";
/// The document version this build writes; it reads this one and older.
pub const VERSION: u32 = 1;

/// Why a report document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a report document of a version this build knows.
    #[error("{path} is not a coexist load report: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What did not fit.
        reason: String,
    },
}

/// One load run as a document: its parameters, what it measured, its series over time and,
/// when scraped, the relay's deliveries per route. Written by `coexist load --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The document version ([`VERSION`] when written by this build).
    pub version: u32,
    /// The run's name in reports (`--label`, else the target address).
    pub label: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// The version of coexist that ran it.
    pub coexist_version: String,
    /// How the run was set up.
    pub parameters: Parameters,
    /// Messages attempted.
    pub sent: u64,
    /// Messages accepted for every recipient.
    pub accepted: u64,
    /// Recipients accepted.
    pub accepted_recipients: u64,
    /// Refused recipients by reply code.
    pub refused_by_code: BTreeMap<String, u64>,
    /// Connection-level failures.
    pub connection_errors: u64,
    /// Wall time of the run (s).
    pub elapsed_s: f64,
    /// Accepted messages per second over the run.
    pub msg_per_s: f64,
    /// Megabytes (10^6) of accepted messages per second.
    pub mb_per_s: f64,
    /// Bytes of accepted messages.
    pub bytes: u64,
    /// Latency percentiles per message and per SMTP phase.
    pub latency: Latencies,
    /// Open-loop pacing (`--rate`, `--timing`): how often the schedule was missed.
    pub open_loop: OpenLoop,
    /// Width of one point of `series` (s): 0.01, 0.1 or 1 for runs under 1 s, 10 s and
    /// longer, wider for very long runs.
    pub series_bucket_s: f64,
    /// Throughput and latency over time, one point per bucket that accepted mail.
    pub series: Vec<Point>,
    /// The relay's deliveries per route, when its metrics were scraped (`--metrics-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Routes>,
    /// Replayed files that were not sent, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Skipped>,
}

/// How a run was set up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Parameters {
    /// The SMTP server under test.
    pub target: String,
    /// Messages asked for.
    pub messages: u64,
    /// Concurrent sessions.
    pub concurrency: usize,
    /// Messages per session before reconnecting.
    pub per_session: u64,
    /// STARTTLS when offered.
    pub tls: bool,
    /// PIPELINING when offered.
    pub pipelining: bool,
    /// CHUNKING (BDAT) when offered.
    pub chunking: bool,
    /// MAIL-RCPT and DATA measured apart.
    pub phases: bool,
    /// Open loop at this rate (msg/s).
    pub rate: Option<f64>,
    /// Upper bound on the run's length (s).
    pub max_seconds: f64,
    /// What was sent, in words (generated: sizes and recipients; replayed: which files).
    pub traffic: String,
    /// Replay timing (`original` or a speed-up factor), if any.
    pub timing: Option<String>,
}

/// Latency percentiles of one measure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median (ms).
    pub p50_ms: f64,
    /// 90th percentile (ms).
    pub p90_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// 99.9th percentile (ms).
    pub p99_9_ms: f64,
    /// Largest (ms).
    pub max_ms: f64,
}

/// Latency per message and per SMTP phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latencies {
    /// Whole message, MAIL to the final reply.
    pub message: Percentiles,
    /// TCP connect.
    pub connect: Percentiles,
    /// Greeting, EHLO and STARTTLS.
    pub ehlo_tls: Percentiles,
    /// MAIL and RCPT replies (with `phases`).
    pub mail_rcpt: Percentiles,
    /// Body to the final reply (with `phases`).
    pub data: Percentiles,
}

/// Open-loop pacing figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenLoop {
    /// Messages started more than 100 ms after their due time.
    pub late: u64,
    /// The largest start delay (ms).
    pub max_lag_ms: f64,
}

/// One bucket of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Point {
    /// Start of the bucket (s since the start of the run).
    pub t: f64,
    /// Messages accepted in it.
    pub accepted: u64,
    /// Accepted messages per second in it (a last, partial bucket counts its own length).
    pub msg_per_s: f64,
    /// Median message latency in it (ms).
    pub p50_ms: f64,
    /// 99th percentile message latency in it (ms).
    pub p99_ms: f64,
    /// 99.9th percentile message latency in it (ms).
    pub p99_9_ms: f64,
}

/// The relay's own counts per route, from its Prometheus endpoint, as differences from a
/// scrape taken before the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Routes {
    /// The endpoint scraped.
    pub url: String,
    /// Per route: recipients accepted at RCPT and delivery outcomes.
    pub totals: BTreeMap<String, RouteTotals>,
    /// Recipients delivered (`sent`) per route so far, at each scrape.
    pub series: Vec<RoutePoint>,
    /// Scrapes that failed during the run.
    pub scrape_errors: u64,
}

/// One route's counts over the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteTotals {
    /// Recipients accepted at RCPT for this route.
    pub accepted: u64,
    /// Recipients delivered.
    pub sent: u64,
    /// Delivery attempts deferred (per recipient).
    pub deferred: u64,
    /// Recipients bounced.
    pub bounced: u64,
}

/// Recipients delivered per route at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoutePoint {
    /// Seconds since the start of the run.
    pub t: f64,
    /// Delivered recipients per route since the run started.
    pub sent: BTreeMap<String, u64>,
}

/// Replayed messages that were not sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Skipped {
    /// Messages found (files and mbox entries).
    pub found: u64,
    /// Messages replayed.
    pub used: u64,
    /// Per reason (`unreadable`, `unparseable`, `no_sender`, `no_recipients`, `no_date`):
    /// how many, and the first few of them by name.
    pub reasons: BTreeMap<String, SkipCount>,
}

/// How many messages were skipped for one reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SkipCount {
    /// Messages skipped.
    pub count: u64,
    /// The first few (file name, or mbox name and message number).
    pub examples: Vec<String>,
}

impl Skipped {
    /// Counts one skipped message (keeps the first five names per reason).
    pub fn add(&mut self, reason: &str, name: String) {
        let e = self.reasons.entry(reason.to_string()).or_default();
        e.count += 1;
        if e.examples.len() < 5 {
            e.examples.push(name);
        }
    }

    /// Messages skipped for any reason.
    pub fn total(&self) -> u64 {
        self.reasons.values().map(|r| r.count).sum()
    }

    /// One line for the summary: `skipped 3 of 10 messages: no_recipients 2 (a.eml, b.eml), ...`.
    pub fn line(&self) -> String {
        let reasons = self
            .reasons
            .iter()
            .map(|(k, v)| format!("{k} {} ({})", v.count, v.examples.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        format!(
            "replay: {} of {} messages used, {} skipped{}{reasons}",
            self.used,
            self.found,
            self.total(),
            if reasons.is_empty() { "" } else { ": " }
        )
    }
}

impl RunReport {
    /// Reads a report document, checking its schema and version.
    pub fn read(path: &Path) -> Result<RunReport, ReportError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ReportError::Read {
            path: name.clone(),
            source,
        })?;
        RunReport::parse(&bytes, &name)
    }

    /// Parses a report document (`name` for errors), checking its schema and version.
    pub fn parse(bytes: &[u8], name: &str) -> Result<RunReport, ReportError> {
        let format = |reason: String| ReportError::Format {
            path: name.to_string(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format(e.to_string()))?;
        match v.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => return Err(format(format!("schema is {other:?}, not {SCHEMA:?}"))),
            None => {
                return Err(format(format!(
                    "no \"schema\" field (written by a coexist older than the {SCHEMA} format?)"
                )))
            }
        }
        match v.get("version").and_then(|s| s.as_u64()) {
            Some(n) if n >= 1 && n <= u64::from(VERSION) => {}
            other => {
                return Err(format(format!(
                    "version {other:?}: this coexist reads versions 1 to {VERSION}"
                )))
            }
        }
        serde_json::from_value(v).map_err(|e| format(e.to_string()))
    }

    /// Delivered recipients per route over the run (from the scraped metrics), largest
    /// first; empty without metrics.
    pub fn route_split(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .routes
            .iter()
            .flat_map(|r| r.totals.iter().map(|(k, t)| (k.clone(), t.sent)))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// A made-up run of `points` buckets of `bucket` seconds, with two routes: what the tests
/// of the document and of `coexist-report`'s charts draw.
pub fn sample(label: &str, points: usize, bucket: f64) -> RunReport {
    let series = (0..points)
        .map(|i| Point {
            t: i as f64 * bucket,
            accepted: 100 + i as u64,
            msg_per_s: (100 + i) as f64 / bucket,
            p50_ms: 2.0 + i as f64 * 0.1,
            p99_ms: 8.0 + i as f64 * 0.2,
            p99_9_ms: 12.0,
        })
        .collect();
    let elapsed = points as f64 * bucket;
    let routes = Routes {
        url: "http://127.0.0.1:8025/metrics".into(),
        totals: [
            (
                "cloud".to_string(),
                RouteTotals {
                    accepted: 60,
                    sent: 60,
                    ..Default::default()
                },
            ),
            (
                "onprem".to_string(),
                RouteTotals {
                    accepted: 40,
                    sent: 40,
                    ..Default::default()
                },
            ),
        ]
        .into(),
        series: (0..=points)
            .map(|i| RoutePoint {
                t: i as f64 * bucket,
                sent: [
                    ("cloud".to_string(), i as u64 * 6),
                    ("onprem".to_string(), i as u64 * 4),
                ]
                .into(),
            })
            .collect(),
        scrape_errors: 0,
    };
    RunReport {
        schema: SCHEMA.into(),
        version: VERSION,
        label: label.into(),
        started_at: "2026-11-25T10:00:00Z".into(),
        coexist_version: "0.1.0".into(),
        parameters: Parameters {
            target: "127.0.0.1:2525".into(),
            messages: 1000,
            concurrency: 16,
            traffic: "generated <&> mail".into(),
            ..Default::default()
        },
        sent: 1000,
        accepted: 990,
        accepted_recipients: 1980,
        refused_by_code: [("450".to_string(), 10)].into(),
        connection_errors: 0,
        elapsed_s: elapsed,
        msg_per_s: 990.0 / elapsed,
        mb_per_s: 4.0,
        bytes: 4_000_000,
        latency: Latencies {
            message: Percentiles {
                count: 990,
                p50_ms: 2.0,
                p90_ms: 5.0,
                p99_ms: 9.0,
                p99_9_ms: 12.0,
                max_ms: 15.0,
            },
            ..Default::default()
        },
        open_loop: OpenLoop::default(),
        series_bucket_s: bucket,
        series,
        routes: Some(routes),
        skipped: None,
    }
}

/// Escapes text for HTML element content and attribute values (the reports' pages, drawn by
/// `coexist-report` and `coexist-weekend`).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_and_foreign_files_are_refused() {
        let r = sample("a", 3, 1.0);
        let bytes = serde_json::to_vec(&r).unwrap();
        let back = RunReport::parse(&bytes, "a.json").unwrap();
        assert_eq!(back.label, "a");
        assert_eq!(back.series.len(), 3);
        assert_eq!(
            back.route_split(),
            vec![("cloud".to_string(), 60), ("onprem".to_string(), 40)]
        );

        let old = br#"{"sent": 1, "accepted": 1}"#;
        let e = RunReport::parse(old, "old.json").unwrap_err().to_string();
        assert!(e.contains("no \"schema\""), "{e}");
        let mut v = serde_json::to_value(&r).unwrap();
        v["version"] = (VERSION + 1).into();
        let e = RunReport::parse(&serde_json::to_vec(&v).unwrap(), "new.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reads versions 1 to"), "{e}");
        assert!(RunReport::parse(b"not json", "x").is_err());
    }

    #[test]
    fn skipped_counts_keep_a_few_examples() {
        let mut s = Skipped {
            found: 9,
            used: 2,
            ..Default::default()
        };
        for i in 0..7 {
            s.add("no_recipients", format!("{i}.eml"));
        }
        assert_eq!(s.total(), 7);
        assert_eq!(s.reasons["no_recipients"].examples.len(), 5);
        assert!(s
            .line()
            .starts_with("replay: 2 of 9 messages used, 7 skipped: no_recipients 7 (0.eml"));
    }
}
