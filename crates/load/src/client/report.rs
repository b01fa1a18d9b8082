//! What a run measured: HDR latency histograms per message and per SMTP phase, a series
//! over time, refusals by code; the summary `coexist load` and `coexist demo` print, and
//! the report document ([`RunReport`]) the JSON, chart and HTML reports are made from.

use crate::report::{
    Latencies, OpenLoop, Parameters, Percentiles, Point, Routes, RunReport, Skipped, SCHEMA,
    VERSION,
};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::Duration;

/// An empty latency histogram in microseconds.
pub(super) fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// Latency histograms (microseconds) per SMTP phase.
#[derive(Debug, Clone)]
pub struct Phases {
    /// TCP connect.
    pub connect: Histogram<u64>,
    /// Greeting, EHLO and STARTTLS.
    pub ehlo: Histogram<u64>,
    /// MAIL and RCPT replies (measured with `phases`).
    pub mail_rcpt: Histogram<u64>,
    /// Body to the final reply (measured with `phases`).
    pub data: Histogram<u64>,
    /// Whole message, MAIL to the final reply.
    pub message: Histogram<u64>,
}

impl Phases {
    /// Empty histograms.
    pub(super) fn new() -> Phases {
        Phases {
            connect: histogram(),
            ehlo: histogram(),
            mail_rcpt: histogram(),
            data: histogram(),
            message: histogram(),
        }
    }

    /// Adds another session's measurements.
    pub(super) fn add(&mut self, o: &Phases) {
        let _ = self.connect.add(&o.connect);
        let _ = self.ehlo.add(&o.ehlo);
        let _ = self.mail_rcpt.add(&o.mail_rcpt);
        let _ = self.data.add(&o.data);
        let _ = self.message.add(&o.message);
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    /// When the run started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Messages attempted.
    pub sent: u64,
    /// Messages accepted for every recipient.
    pub accepted: u64,
    /// Recipients accepted.
    pub accepted_rcpts: u64,
    /// Refusals by reply code.
    pub refused: BTreeMap<String, u64>,
    /// Connection-level failures.
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Per-message latency in microseconds.
    pub latency_us: Histogram<u64>,
    /// Per-phase latencies.
    pub phases: Phases,
    /// Bytes of accepted messages.
    pub bytes: u64,
    /// Queue ids from the server's final replies (`... queued as ID`), in no order.
    pub ids: Vec<String>,
    /// Open loop: messages started more than 100 ms after their due time.
    pub late: u64,
    /// Open loop: the largest start delay.
    pub max_lag: Duration,
    /// Throughput and latency over time.
    pub series: Vec<Point>,
    /// Width of one point of `series` (s).
    pub series_bucket_s: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p99_9_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

impl LoadReport {
    /// The summary lines printed by `coexist load` and `coexist demo`.
    pub fn summary(&self, sessions: usize) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let h = &self.latency_us;
        let mut s = format!(
            "sent {} messages over {sessions} sessions in {:.2} s: {} accepted ({} recipients), refused {:?}, connection errors {}\n\
             acceptance: {:.0} msg/s ({:.1} MB/s), latency per message (MAIL to final reply): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            self.sent,
            secs,
            self.accepted,
            self.accepted_rcpts,
            self.refused,
            self.errors,
            self.accepted as f64 / secs,
            self.bytes as f64 / 1e6 / secs,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
        let p = &self.phases;
        for (name, h) in [
            ("connect", &p.connect),
            ("EHLO/TLS", &p.ehlo),
            ("MAIL-RCPT", &p.mail_rcpt),
            ("DATA", &p.data),
        ] {
            if h.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "\n  {name:<9} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.9) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
                h.len()
            ));
        }
        if self.late > 0 || self.max_lag > Duration::ZERO {
            s.push_str(&format!(
                "\n  open loop: target rate missed for {} messages (started > 100 ms late), largest lag {:.0} ms",
                self.late,
                self.max_lag.as_secs_f64() * 1000.0
            ));
        }
        s
    }

    /// The run as a report document (`--json`, `--html`, `--report`): these figures with
    /// the run's `label` and `parameters`, and the relay's per-route counts and the replay's
    /// skipped messages when there are any.
    pub fn document(
        &self,
        label: String,
        parameters: Parameters,
        routes: Option<Routes>,
        skipped: Option<Skipped>,
    ) -> RunReport {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        RunReport {
            schema: SCHEMA.into(),
            version: VERSION,
            label,
            started_at: self
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            coexist_version: env!("CARGO_PKG_VERSION").into(),
            parameters,
            sent: self.sent,
            accepted: self.accepted,
            accepted_recipients: self.accepted_rcpts,
            refused_by_code: self.refused.clone(),
            connection_errors: self.errors,
            elapsed_s: secs,
            msg_per_s: self.accepted as f64 / secs,
            mb_per_s: self.bytes as f64 / 1e6 / secs,
            bytes: self.bytes,
            latency: Latencies {
                message: percentiles(&self.latency_us),
                connect: percentiles(&self.phases.connect),
                ehlo_tls: percentiles(&self.phases.ehlo),
                mail_rcpt: percentiles(&self.phases.mail_rcpt),
                data: percentiles(&self.phases.data),
            },
            open_loop: OpenLoop {
                late: self.late,
                max_lag_ms: self.max_lag.as_secs_f64() * 1000.0,
            },
            series_bucket_s: self.series_bucket_s,
            series: self.series.clone(),
            routes,
            skipped,
        }
    }
}
