//! What a run measured, and how it is shown: HDR latency histograms per message and per
//! SMTP phase, a per-second series, refusals by code, and the summary and JSON report that
//! `coexist load` and `coexist demo` print.

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

/// One second of a run: messages accepted and their latency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Second {
    /// Second since the start.
    pub t: u64,
    /// Messages accepted in it.
    pub accepted: u64,
    /// Median message latency in it (ms).
    pub p50_ms: f64,
    /// 99th percentile message latency in it (ms).
    pub p99_ms: f64,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
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
    /// Per-second throughput and latency.
    pub series: Vec<Second>,
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(), "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99),
        "p99_9_ms": ms(0.999), "max_ms": h.max() as f64 / 1000.0,
    })
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

    /// The figures as JSON (for `--json FILE`).
    pub fn to_json(&self) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        serde_json::json!({
            "sent": self.sent,
            "accepted": self.accepted,
            "accepted_recipients": self.accepted_rcpts,
            "refused_by_code": self.refused,
            "connection_errors": self.errors,
            "elapsed_s": secs,
            "msg_per_s": self.accepted as f64 / secs,
            "mb_per_s": self.bytes as f64 / 1e6 / secs,
            "latency": {
                "message": percentiles(&self.latency_us),
                "connect": percentiles(&self.phases.connect),
                "ehlo_tls": percentiles(&self.phases.ehlo),
                "mail_rcpt": percentiles(&self.phases.mail_rcpt),
                "data": percentiles(&self.phases.data),
            },
            "open_loop": { "late": self.late, "max_lag_ms": self.max_lag.as_secs_f64() * 1000.0 },
            "series": self.series,
        })
    }

    /// An SVG chart of throughput and latency over time (for `--report FILE.svg`).
    /// Drawn by hand: two polylines and a few labels do not justify a plotting crate.
    pub fn svg(&self) -> String {
        let (w, h, pad) = (900.0, 420.0, 50.0);
        let n = self.series.len().max(2) as f64;
        let max_rate = self
            .series
            .iter()
            .map(|s| s.accepted)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_lat = self.series.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
        let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
        let y = |v: f64, max: f64| h - pad - (h - 2.0 * pad) * v / max;
        let line = |f: &dyn Fn(&Second) -> f64, max: f64| {
            self.series
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{:.1},{:.1}", x(i), y(f(s), max)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="25" font-size="15">coexist load: {} accepted in {:.1} s</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#888"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{rate}"/>
<polyline fill="none" stroke="#d62728" stroke-width="2" points="{lat}"/>
<text x="{pad}" y="{ly}" fill="#1f77b4">msg/s (max {max_rate:.0})</text>
<text x="{lx}" y="{ly}" fill="#d62728">p99 latency ms (max {max_lat:.1})</text>
<text x="{r}" y="{tb}" text-anchor="end">seconds ({n:.0})</text>
</svg>
"##,
            self.accepted,
            self.elapsed.as_secs_f64(),
            b = h - pad,
            r = w - pad,
            rate = line(&|s: &Second| s.accepted as f64, max_rate),
            lat = line(&|s: &Second| s.p99_ms, max_lat),
            ly = h - 15.0,
            lx = pad + 250.0,
            tb = h - 30.0,
        )
    }
}
