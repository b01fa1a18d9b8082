//! The load client: N concurrent SMTP sessions sending generated messages, bounded in count
//! and time, with a latency histogram (HDR) per message (MAIL to the final reply).

use crate::config::TlsPolicy;
use crate::deliver::{Connection, Outbound, RcptOutcome};
use crate::types::Address;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One generated message.
pub struct Generated {
    /// Reverse path.
    pub from: Address,
    /// Recipients.
    pub rcpts: Vec<Address>,
    /// Message bytes (CRLF lines).
    pub body: Vec<u8>,
}

/// Synthetic traffic: recipients drawn from a list (or by state with a given share), sizes
/// from a weighted distribution, optional UTF-8 headers and attachments.
#[derive(Default)]
pub struct Generator {
    /// Candidate recipients.
    pub rcpts: Vec<Address>,
    /// Most recipients per message (at least 1).
    pub max_rcpts: usize,
    /// Approximate body size in bytes (when `sizes` is empty).
    pub size: usize,
    /// Weighted sizes: (bytes, weight).
    pub sizes: Vec<(usize, u32)>,
    /// Draw recipients by state: (cloud mailboxes, other mailboxes, share of cloud).
    pub by_state: Option<(Vec<Address>, Vec<Address>, f64)>,
    /// Add a UTF-8 Subject and an 8-bit body line.
    pub utf8: bool,
    /// Share (0..1) of messages with a base64 attachment.
    pub attachment_share: f64,
}

/// Parses a size distribution such as `2k:50,10k:30,100k:15,1m:5` (size:weight).
pub fn parse_sizes(s: &str) -> Result<Vec<(usize, u32)>, String> {
    s.split(',')
        .map(|item| {
            let (size, weight) = item
                .split_once(':')
                .ok_or(format!("{item:?}: want SIZE:WEIGHT"))?;
            let size = size.trim().to_ascii_lowercase();
            let (num, mult) = match size.chars().last() {
                Some('k') => (&size[..size.len() - 1], 1024),
                Some('m') => (&size[..size.len() - 1], 1024 * 1024),
                _ => (size.as_str(), 1),
            };
            let n: usize = num.parse().map_err(|_| format!("{item:?}: bad size"))?;
            let w: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{item:?}: bad weight"))?;
            Ok((n * mult, w))
        })
        .collect()
}

impl Generator {
    fn pick_size(&self, rng: &mut fastrand::Rng) -> usize {
        let total: u32 = self.sizes.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return self.size;
        }
        let mut x = rng.u32(..total);
        for (size, w) in &self.sizes {
            if x < *w {
                return *size;
            }
            x -= w;
        }
        self.size
    }

    fn pick_rcpt(&self, rng: &mut fastrand::Rng) -> Option<Address> {
        let list = match &self.by_state {
            Some((cloud, other, share)) if !cloud.is_empty() && !other.is_empty() => {
                if rng.f64() < *share {
                    cloud
                } else {
                    other
                }
            }
            _ => &self.rcpts,
        };
        (!list.is_empty()).then(|| list[rng.usize(..list.len())].clone())
    }

    /// Message number `n` (deterministic for a given `n`).
    pub fn message(&self, n: u64) -> Generated {
        let mut rng = fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0E1);
        let count = rng.usize(1..=self.max_rcpts.max(1));
        let mut rcpts: Vec<Address> = Vec::with_capacity(count);
        for _ in 0..count {
            if let Some(a) = self.pick_rcpt(&mut rng) {
                if !rcpts.contains(&a) {
                    rcpts.push(a);
                }
            }
        }
        let fallback = Address::parse("postmaster@example.org", false).ok();
        let from = Address::parse(&format!("sender{}@example.org", n % 97), false)
            .ok()
            .or(fallback)
            .unwrap_or_else(|| rcpts[0].clone());
        let to = rcpts.first().map(|a| a.to_string()).unwrap_or_default();
        let subject = if self.utf8 {
            format!("Migración ✓ Überprüfung {n}")
        } else {
            format!("coexist load message {n}")
        };
        let attach = self.attachment_share > 0.0 && rng.f64() < self.attachment_share;
        let boundary = format!("=_coexist_{n}");
        let mut body = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
             Message-ID: <load.{n}@example.org>\r\nDate: {}\r\nMIME-Version: 1.0\r\n",
            chrono::Utc::now().to_rfc2822()
        )
        .into_bytes();
        let charset = if self.utf8 { "utf-8" } else { "us-ascii" };
        if attach {
            body.extend_from_slice(
                format!(
                    "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n\
                     Content-Type: text/plain; charset={charset}\r\n\r\n"
                )
                .as_bytes(),
            );
        } else {
            body.extend_from_slice(
                format!("Content-Type: text/plain; charset={charset}\r\n\r\n").as_bytes(),
            );
        }
        if self.utf8 {
            body.extend_from_slice("Grüße aus der Migration: ça marche, ¡sí!\r\n".as_bytes());
        }
        let size = self.pick_size(&mut rng);
        let text_target = if attach { size / 3 } else { size };
        const WORDS: [&str; 8] = [
            "mailbox",
            "migration",
            "estate",
            "relay",
            "batch",
            "tenant",
            "route",
            "queue",
        ];
        while body.len() < text_target {
            let mut line = String::with_capacity(78);
            while line.len() < 70 {
                line.push_str(WORDS[rng.usize(..WORDS.len())]);
                line.push(' ');
            }
            if rng.u8(..) < 8 {
                line.insert(0, '.');
            }
            body.extend_from_slice(line.trim_end().as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        if attach {
            body.extend_from_slice(
                format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n\
                     Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
                )
                .as_bytes(),
            );
            const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            while body.len() < size {
                let line: Vec<u8> = (0..76).map(|_| B64[rng.usize(..64)]).collect();
                body.extend_from_slice(&line);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        }
        Generated { from, rcpts, body }
    }
}

/// Where messages come from: generated, or files replayed in turn.
pub enum Traffic {
    /// Synthetic messages.
    Synthetic(Generator),
    /// Messages read from .eml files or an mbox, replayed round-robin.
    Files(Vec<Generated>),
}

impl Traffic {
    /// Message number `n`.
    pub fn message(&self, n: u64) -> Generated {
        match self {
            Traffic::Synthetic(g) => g.message(n),
            Traffic::Files(v) => {
                let m = &v[(n as usize) % v.len().max(1)];
                Generated {
                    from: m.from.clone(),
                    rcpts: m.rcpts.clone(),
                    body: m.body.clone(),
                }
            }
        }
    }
}

/// Reads messages from a folder of `.eml` files and/or an mbox file. The envelope comes
/// from the headers (From; To and Cc) unless `from`/`to` are given. Lines become CRLF.
pub fn read_messages(
    eml_dir: Option<&std::path::Path>,
    mbox: Option<&std::path::Path>,
    from: Option<&Address>,
    to: &[Address],
) -> std::io::Result<Vec<Generated>> {
    let mut raw: Vec<Vec<u8>> = Vec::new();
    if let Some(dir) = eml_dir {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("eml")))
            .collect();
        paths.sort();
        for p in paths {
            raw.push(std::fs::read(p)?);
        }
    }
    if let Some(path) = mbox {
        let text = std::fs::read(path)?;
        let mut cur: Vec<u8> = Vec::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b"From ") {
                if !cur.is_empty() {
                    raw.push(std::mem::take(&mut cur));
                }
                continue;
            }
            // mboxrd quoting: ">From " at a line start stands for "From ".
            let line = if line.starts_with(b">From ") {
                &line[1..]
            } else {
                line
            };
            cur.extend_from_slice(line);
        }
        if !cur.is_empty() {
            raw.push(cur);
        }
    }
    let mut out = Vec::new();
    for m in raw {
        let body = to_crlf(&m);
        let (mut sender, mut rcpts) = (None, Vec::new());
        if let Ok((headers, _)) = mailparse::parse_headers(&body) {
            use mailparse::MailHeaderMap;
            let addrs = |name: &str| -> Vec<Address> {
                headers
                    .get_all_values(name)
                    .iter()
                    .filter_map(|v| mailparse::addrparse(v).ok())
                    .flat_map(|l| l.iter().cloned().collect::<Vec<_>>())
                    .flat_map(|a| match a {
                        mailparse::MailAddr::Single(s) => vec![s.addr],
                        mailparse::MailAddr::Group(g) => {
                            g.addrs.into_iter().map(|s| s.addr).collect()
                        }
                    })
                    .filter_map(|s| Address::parse(&s, true).ok())
                    .collect()
            };
            sender = addrs("From").into_iter().next();
            rcpts = addrs("To");
            rcpts.extend(addrs("Cc"));
        }
        let sender = from.cloned().or(sender);
        let rcpts = if to.is_empty() { rcpts } else { to.to_vec() };
        if let (Some(from), false) = (sender, rcpts.is_empty()) {
            out.push(Generated { from, rcpts, body });
        }
    }
    Ok(out)
}

fn to_crlf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + m.len() / 40);
    let mut prev = 0u8;
    for &b in m {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// Load run settings.
pub struct LoadOptions {
    /// The SMTP server under test.
    pub target: SocketAddr,
    /// Messages to send in all.
    pub messages: u64,
    /// Concurrent sessions (closed loop: as fast as they can).
    pub concurrency: usize,
    /// Messages per session before reconnecting.
    pub per_session: u64,
    /// STARTTLS use.
    pub tls: TlsPolicy,
    /// Stop sending after this long, whatever the count.
    pub max_duration: Duration,
    /// Use PIPELINING when offered.
    pub pipelining: bool,
    /// Use CHUNKING (BDAT) when offered.
    pub chunking: bool,
    /// Open loop: start messages at this rate (msg/s), with `concurrency` sessions at most.
    pub rate: Option<f64>,
    /// Measure MAIL-RCPT and DATA apart (one more round trip per message).
    pub phases: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

fn histogram() -> Histogram<u64> {
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
    fn new() -> Phases {
        Phases {
            connect: histogram(),
            ehlo: histogram(),
            mail_rcpt: histogram(),
            data: histogram(),
            message: histogram(),
        }
    }

    fn add(&mut self, o: &Phases) {
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

struct Shared {
    report: LoadReport,
    per_second: BTreeMap<u64, Histogram<u64>>,
}

/// Runs a bounded load against `opts.target`.
pub async fn run(opts: LoadOptions, traffic: Arc<Traffic>) -> LoadReport {
    let next = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Mutex::new(Shared {
        report: LoadReport {
            sent: 0,
            accepted: 0,
            accepted_rcpts: 0,
            refused: BTreeMap::new(),
            errors: 0,
            elapsed: Duration::ZERO,
            latency_us: histogram(),
            phases: Phases::new(),
            bytes: 0,
            ids: Vec::new(),
            late: 0,
            max_lag: Duration::ZERO,
            series: Vec::new(),
        },
        per_second: BTreeMap::new(),
    }));
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(opts.messages);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} messages, {per_sec}, eta {eta}",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let deadline = started + opts.max_duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let (next, shared, traffic, bar) =
            (next.clone(), shared.clone(), traffic.clone(), bar.clone());
        let (target, total, per_session) = (opts.target, opts.messages, opts.per_session.max(1));
        let (pipelining, chunking, rate, split) =
            (opts.pipelining, opts.chunking, opts.rate, opts.phases);
        let route_tls = crate::deliver::RouteTls::plain(opts.tls);
        tasks.spawn(async move {
            let mut local = Phases::new();
            'sessions: while Instant::now() < deadline {
                let mut conn = match Connection::open(
                    target,
                    &target.ip().to_string(),
                    "load.coexist.test",
                    &route_tls,
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok(mut c) => {
                        c.limit_extensions(pipelining, chunking);
                        c.split_phases = split;
                        let _ = local.connect.record((c.opened.0.as_micros() as u64).max(1));
                        let _ = local.ehlo.record((c.opened.1.as_micros() as u64).max(1));
                        c
                    }
                    Err(_) => {
                        lock(&shared).report.errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                for _ in 0..per_session {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= total || Instant::now() >= deadline {
                        conn.quit().await;
                        break 'sessions;
                    }
                    let mut lag = Duration::ZERO;
                    if let Some(rate) = rate.filter(|r| *r > 0.0) {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            tokio::time::sleep_until(due.into()).await;
                        } else {
                            lag = now - due;
                        }
                    }
                    let m = traffic.message(n);
                    let out = Outbound {
                        from: Some(&m.from),
                        rcpts: m.rcpts.iter().collect(),
                        message: &m.body,
                        eight_bit: !m.body.is_ascii(),
                        ret: None,
                        envid: None,
                        rcpt_dsn: Vec::new(),
                        smtputf8: false,
                    };
                    let t0 = Instant::now();
                    let res = conn.send(&out).await;
                    let us = (t0.elapsed().as_micros() as u64).max(1);
                    let second = started.elapsed().as_secs();
                    bar.inc(1);
                    let mut sh = lock(&shared);
                    let r = &mut sh.report;
                    r.sent += 1;
                    if lag > Duration::from_millis(100) {
                        r.late += 1;
                    }
                    r.max_lag = r.max_lag.max(lag);
                    let outcomes = match res {
                        Ok(o) => o,
                        Err(_) => {
                            r.errors += 1;
                            continue 'sessions;
                        }
                    };
                    let _ = local.message.record(us);
                    if let Some(mr) = conn.last_mail_rcpt {
                        let mr = (mr.as_micros() as u64).max(1);
                        let _ = local.mail_rcpt.record(mr);
                        let _ = local.data.record(us.saturating_sub(mr).max(1));
                    }
                    let ok = outcomes
                        .iter()
                        .filter(|o| matches!(o, RcptOutcome::Delivered(_)))
                        .count();
                    r.accepted_rcpts += ok as u64;
                    if ok == outcomes.len() {
                        r.accepted += 1;
                        r.bytes += m.body.len() as u64;
                        if let Some(RcptOutcome::Delivered(t)) = outcomes.first() {
                            if let Some((_, id)) = t.text().rsplit_once("queued as ") {
                                r.ids.push(id.trim().to_string());
                            }
                        }
                        let h = sh.per_second.entry(second).or_insert_with(|| {
                            Histogram::new_with_bounds(1, 600_000_000, 2)
                                .unwrap_or_else(|_| histogram())
                        });
                        let _ = h.record(us);
                    }
                    for o in outcomes {
                        if let RcptOutcome::Deferred(t) | RcptOutcome::Failed(t) = o {
                            *sh.report
                                .refused
                                .entry(t.code().map(|c| c.to_string()).unwrap_or_default())
                                .or_default() += 1;
                        }
                    }
                }
                conn.quit().await;
            }
            let mut sh = lock(&shared);
            let _ = sh.report.latency_us.add(&local.message);
            sh.report.phases.add(&local);
        });
    }
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    let mut sh = lock(&shared);
    let series = sh
        .per_second
        .iter()
        .map(|(t, h)| Second {
            t: *t,
            accepted: h.len(),
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
        .collect();
    let r = &mut sh.report;
    LoadReport {
        sent: r.sent,
        accepted: r.accepted,
        accepted_rcpts: r.accepted_rcpts,
        refused: std::mem::take(&mut r.refused),
        errors: r.errors,
        elapsed: started.elapsed(),
        latency_us: r.latency_us.clone(),
        phases: r.phases.clone(),
        bytes: r.bytes,
        ids: std::mem::take(&mut r.ids),
        late: r.late,
        max_lag: r.max_lag,
        series,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

/// The addresses of a directory CSV (header `address,state…` skipped), each with whether
/// its state is `cloud`.
pub fn directory_rows(path: &std::path::Path) -> std::io::Result<Vec<(Address, bool)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split(',');
            let addr = Address::parse(f.next()?.trim(), true).ok()?;
            Some((addr, f.next().is_some_and(|s| s.trim() == "cloud")))
        })
        .collect())
}

/// `count` synthetic recipients `user{i}@nhs.test`.
pub fn synthetic_recipients(count: usize) -> Vec<Address> {
    (0..count)
        .filter_map(|i| Address::parse(&format!("user{i}@nhs.test"), false).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_generator_follows_options() {
        assert_eq!(
            parse_sizes("2k:50,1m:5,100:1").unwrap(),
            vec![(2048, 50), (1 << 20, 5), (100, 1)]
        );
        assert!(parse_sizes("2k").is_err());
        let a = |s: &str| Address::parse(s, false).unwrap();
        let g = Generator {
            max_rcpts: 1,
            sizes: vec![(20_000, 1)],
            by_state: Some((vec![a("c@nhs.test")], vec![a("o@nhs.test")], 0.8)),
            utf8: true,
            attachment_share: 1.0,
            ..Generator::default()
        };
        let mut cloud = 0;
        for n in 0..500 {
            let m = g.message(n);
            assert!(m.body.len() >= 20_000);
            if m.rcpts[0].local() == "c" {
                cloud += 1;
            }
            if n == 0 {
                let text = String::from_utf8(m.body.clone()).unwrap();
                assert!(
                    text.contains("Subject: Migración")
                        && text.contains("Content-Transfer-Encoding: base64")
                );
            }
        }
        assert!(
            (320..480).contains(&cloud),
            "{cloud} of 500 drawn from cloud at share 0.8"
        );
    }
}
