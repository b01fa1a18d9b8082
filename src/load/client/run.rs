//! Running a load: N concurrent SMTP sessions (closed loop, or open loop at a fixed rate)
//! sending messages from a [`Traffic`] to the server under test, bounded in count and time,
//! each message timed from MAIL to its final reply and recorded in the [`LoadReport`].
//!
//! The sessions speak SMTP through the relay's own outbound client,
//! [`deliver::Connection`](crate::deliver::Connection), so the load tool measures the
//! server with the same client code the relay delivers with.

use super::replay::Traffic;
use super::report::{histogram, LoadReport, Phases, Second};
use crate::config::TlsPolicy;
use crate::deliver::{Connection, Outbound};
use crate::proto::RcptOutcome;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

impl LoadOptions {
    /// A closed loop of `concurrency` sessions sending `messages` to `target` as fast as
    /// they can (100 per session, PIPELINING and CHUNKING when offered, no progress bar),
    /// for at most `max_duration`: what the demos run.
    pub fn closed_loop(
        target: SocketAddr,
        messages: u64,
        concurrency: usize,
        tls: TlsPolicy,
        max_duration: Duration,
    ) -> LoadOptions {
        LoadOptions {
            target,
            messages,
            concurrency,
            per_session: 100,
            tls,
            max_duration,
            pipelining: true,
            chunking: true,
            rate: None,
            phases: false,
            progress: false,
        }
    }
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
                let mut conn = match Connection::open_timed(
                    target,
                    &target.ip().to_string(),
                    "load.coexist.test",
                    &route_tls,
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok((mut c, opened)) => {
                        c.limit_extensions(pipelining, chunking);
                        let _ = local
                            .connect
                            .record((opened.connect.as_micros() as u64).max(1));
                        let _ = local.ehlo.record((opened.ehlo.as_micros() as u64).max(1));
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
                    let res = conn.send_phased(&out, split).await;
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
                    let (outcomes, mail_rcpt) = match res {
                        Ok(o) => o,
                        Err(_) => {
                            r.errors += 1;
                            continue 'sessions;
                        }
                    };
                    let _ = local.message.record(us);
                    if let Some(mr) = mail_rcpt {
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
