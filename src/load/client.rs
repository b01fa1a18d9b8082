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

/// Synthetic traffic: recipients drawn from a list, sizes around a target.
pub struct Generator {
    /// Candidate recipients.
    pub rcpts: Vec<Address>,
    /// Most recipients per message (at least 1).
    pub max_rcpts: usize,
    /// Approximate body size in bytes.
    pub size: usize,
}

impl Generator {
    /// Message number `n` (deterministic for a given `n`).
    pub fn message(&self, n: u64) -> Generated {
        let mut rng = fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0E1);
        let count = rng.usize(1..=self.max_rcpts.max(1));
        let mut rcpts: Vec<Address> = Vec::with_capacity(count);
        for _ in 0..count {
            if self.rcpts.is_empty() {
                break;
            }
            let a = self.rcpts[rng.usize(..self.rcpts.len())].clone();
            if !rcpts.contains(&a) {
                rcpts.push(a);
            }
        }
        let from = Address::parse(&format!("sender{}@example.org", n % 97), false)
            .unwrap_or_else(|_| rcpts[0].clone());
        let to = rcpts.first().map(|a| a.to_string()).unwrap_or_default();
        let mut body = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: coexist load message {n}\r\n\
             Message-ID: <load.{n}@example.org>\r\nDate: {}\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n",
            chrono::Utc::now().to_rfc2822()
        )
        .into_bytes();
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
        while body.len() < self.size {
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
        Generated { from, rcpts, body }
    }
}

/// Load run settings.
pub struct LoadOptions {
    /// The SMTP server under test.
    pub target: SocketAddr,
    /// Messages to send in all.
    pub messages: u64,
    /// Concurrent sessions.
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
    /// Bytes of accepted messages.
    pub bytes: u64,
    /// Queue ids from the server's final replies (`... queued as ID`), in no order.
    pub ids: Vec<String>,
}

/// Runs a bounded load against `opts.target`.
pub async fn run(opts: LoadOptions, gen: Arc<Generator>) -> LoadReport {
    let next = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(LoadReport {
        sent: 0,
        accepted: 0,
        accepted_rcpts: 0,
        refused: BTreeMap::new(),
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
            .unwrap_or_else(|_| Histogram::new(3).expect("histogram")),
        bytes: 0,
        ids: Vec::new(),
    }));
    let started = Instant::now();
    let deadline = started + opts.max_duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let (next, report, gen) = (next.clone(), report.clone(), gen.clone());
        let (target, total, per_session, tls) = (
            opts.target,
            opts.messages,
            opts.per_session.max(1),
            opts.tls,
        );
        let route_tls = crate::deliver::RouteTls::plain(tls);
        let (pipelining, chunking) = (opts.pipelining, opts.chunking);
        tasks.spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).ok();
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
                        c
                    }
                    Err(_) => {
                        lock(&report).errors += 1;
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
                    let m = gen.message(n);
                    let out = Outbound {
                        from: Some(&m.from),
                        rcpts: m.rcpts.iter().collect(),
                        message: &m.body,
                        eight_bit: false,
                        ret: None,
                        envid: None,
                        rcpt_dsn: Vec::new(),
                    };
                    let t0 = Instant::now();
                    let res = conn.send(&out).await;
                    let us = t0.elapsed().as_micros() as u64;
                    let mut r = lock(&report);
                    r.sent += 1;
                    match res {
                        Ok(outcomes) => {
                            if let Some(h) = local.as_mut() {
                                let _ = h.record(us.max(1));
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
                                    if let Some(id) = t
                                        .rsplit("queued as ")
                                        .next()
                                        .filter(|_| t.contains("queued as "))
                                    {
                                        r.ids.push(id.trim().to_string());
                                    }
                                }
                            }
                            for o in outcomes {
                                if let RcptOutcome::Deferred(t) | RcptOutcome::Failed(t) = o {
                                    *r.refused.entry(t.chars().take(3).collect()).or_default() += 1;
                                }
                            }
                        }
                        Err(_) => {
                            r.errors += 1;
                            continue 'sessions;
                        }
                    }
                }
                conn.quit().await;
            }
            if let Some(h) = local {
                let _ = lock(&report).latency_us.add(&h);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut r = lock(&report);
    r.elapsed = started.elapsed();
    LoadReport {
        sent: r.sent,
        accepted: r.accepted,
        accepted_rcpts: r.accepted_rcpts,
        refused: std::mem::take(&mut r.refused),
        errors: r.errors,
        elapsed: r.elapsed,
        latency_us: r.latency_us.clone(),
        bytes: r.bytes,
        ids: std::mem::take(&mut r.ids),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LoadReport {
    /// The summary lines printed by `coexist load` and `coexist demo`.
    pub fn summary(&self, sessions: usize) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let h = &self.latency_us;
        format!(
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
        )
    }
}

/// Recipients for a load run: the addresses of a directory CSV (first column, header
/// skipped), or `count` synthetic `user{i}@nhs.test`.
pub fn recipients(
    directory: Option<&std::path::Path>,
    count: usize,
) -> std::io::Result<Vec<Address>> {
    match directory {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            Ok(text
                .lines()
                .skip(1)
                .filter_map(|l| l.split(',').next())
                .filter_map(|a| Address::parse(a.trim(), true).ok())
                .collect())
        }
        None => Ok((0..count)
            .filter_map(|i| Address::parse(&format!("user{i}@nhs.test"), false).ok())
            .collect()),
    }
}
