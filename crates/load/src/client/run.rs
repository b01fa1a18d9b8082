//! Running a load: N concurrent SMTP sessions (closed loop, or open loop at a fixed rate or
//! at replayed mail's original pace)
//! sending messages from a [`Traffic`] to the server under test, bounded in count and time,
//! each message timed from MAIL to its final reply and recorded in the [`LoadReport`].
//!
//! The sessions speak SMTP through the relay's own outbound client,
//! [`deliver::Connection`](crate::deliver::Connection), so the load tool measures the
//! server with the same client code the relay delivers with.

use super::replay::Traffic;
use super::report::{histogram, LoadReport, Phases};
use super::series::Buckets;
use crate::config::TlsPolicy;
use crate::deliver::{Connection, Outbound};
use crate::proto::RcptOutcome;
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
    /// Open loop at the replayed messages' original pace (takes precedence over `rate`).
    pub offsets: Option<Offsets>,
    /// Measure MAIL-RCPT and DATA apart (one more round trip per message).
    pub phases: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// More servers beside `target`, as MX hosts of equal preference: session `i` starts at
    /// server `i` of the list (round robin, as DNS hands them out), and a session that
    /// cannot open a connection (refused, timed out, `421` at the greeting) or reconnects
    /// after `per_session` messages moves on to the next.
    pub more_targets: Vec<SocketAddr>,
    /// Called with every message's outcome, as it comes (the weekend run's history).
    pub observer: Option<Observer>,
}

/// A function that sees every message's outcome.
pub type Observer = Arc<dyn Fn(Observed<'_>) + Send + Sync>;

/// One message's outcome, for an [`Observer`].
pub struct Observed<'a> {
    /// The server it was sent to.
    pub target: SocketAddr,
    /// Its recipients, in order.
    pub rcpts: &'a [crate::types::Address],
    /// Each recipient's outcome (the final reply for those whose RCPT was accepted), or
    /// why the session failed before a final reply.
    pub result: Result<&'a [RcptOutcome], String>,
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
            offsets: None,
            phases: false,
            progress: false,
            more_targets: Vec::new(),
            observer: None,
        }
    }
}

/// Replayed mail at its original pace: when each message of the traffic is due after the
/// start of the run. Messages past the end of the list start a new lap.
#[derive(Clone, Debug, Default)]
pub struct Offsets {
    /// Due time of each message of one lap, in sending order.
    pub at: Vec<Duration>,
    /// Length of one lap: the next starts this long after the previous one.
    pub lap: Duration,
}

impl Offsets {
    /// Offsets from the messages' original times (Unix seconds, in sending order), sped up
    /// by `factor` (1: as they happened; 60: a minute per second). A lap lasts the original
    /// span plus one average gap.
    pub fn from_times(times: &[i64], factor: f64) -> Offsets {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        let first = times.iter().copied().min().unwrap_or(0);
        let scaled = |secs: i64| Duration::from_secs_f64((secs - first).max(0) as f64 / factor);
        let at: Vec<Duration> = times.iter().map(|&t| scaled(t)).collect();
        let span = at.iter().copied().max().unwrap_or_default();
        let gap = if at.len() > 1 {
            span / (at.len() as u32 - 1).max(1)
        } else {
            Duration::from_secs_f64(1.0 / factor)
        };
        Offsets {
            at,
            lap: span + gap,
        }
    }

    /// When message `n` is due after the start.
    pub fn due(&self, n: u64) -> Duration {
        let len = self.at.len().max(1) as u64;
        let lap = self.lap.mul_f64((n / len) as f64);
        lap + self.at.get((n % len) as usize).copied().unwrap_or_default()
    }
}

/// A connection left idle longer than this while waiting for a message's due time is
/// closed and opened again when the message is due (servers drop idle sessions).
const IDLE_QUIT: Duration = Duration::from_secs(10);

struct Shared {
    report: LoadReport,
    buckets: Buckets,
}

/// Runs a bounded load against `opts.target`.
pub async fn run(opts: LoadOptions, traffic: Arc<Traffic>) -> LoadReport {
    let next = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Mutex::new(Shared {
        report: LoadReport {
            started_at: crate::clock::now_utc(),
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
            series_bucket_s: 1.0,
        },
        buckets: Buckets::new(),
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
    let offsets = opts.offsets.clone().map(Arc::new);
    let started = Instant::now();
    let deadline = started + opts.max_duration;
    let mut tasks = tokio::task::JoinSet::new();
    let targets: Arc<[SocketAddr]> = std::iter::once(opts.target)
        .chain(opts.more_targets.iter().copied())
        .collect();
    for session in 0..opts.concurrency.max(1) {
        let (next, shared, traffic, bar, offsets) = (
            next.clone(),
            shared.clone(),
            traffic.clone(),
            bar.clone(),
            offsets.clone(),
        );
        let (targets, observer) = (targets.clone(), opts.observer.clone());
        let (total, per_session) = (opts.messages, opts.per_session.max(1));
        let (pipelining, chunking, rate, split) =
            (opts.pipelining, opts.chunking, opts.rate, opts.phases);
        let route_tls = crate::deliver::RouteTls::plain(opts.tls);
        tasks.spawn(async move {
            let mut local = Phases::new();
            let mut conn: Option<Connection> = None;
            let mut used = 0u64;
            // The session's place in the list of servers; the first connection uses it.
            let mut at = session % targets.len();
            let mut target = targets[at];
            'messages: loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total || Instant::now() >= deadline {
                    break;
                }
                let due = match (&offsets, rate.filter(|r| *r > 0.0)) {
                    (Some(o), _) => Some(started + o.due(n)),
                    (None, Some(rate)) => Some(started + Duration::from_secs_f64(n as f64 / rate)),
                    (None, None) => None,
                };
                let mut lag = Duration::ZERO;
                if let Some(due) = due {
                    if due >= deadline {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        if due - now > IDLE_QUIT {
                            if let Some(c) = conn.take() {
                                c.quit().await;
                            }
                        }
                        tokio::time::sleep_until(due.into()).await;
                    } else {
                        lag = now - due;
                    }
                }
                if used >= per_session {
                    if let Some(c) = conn.take() {
                        c.quit().await;
                        at = (at + 1) % targets.len();
                        target = targets[at];
                    }
                }
                while conn.is_none() {
                    if Instant::now() >= deadline {
                        break 'messages;
                    }
                    match Connection::open_timed(
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
                            used = 0;
                            conn = Some(c);
                        }
                        Err(_) => {
                            lock(&shared).report.errors += 1;
                            at = (at + 1) % targets.len();
                            target = targets[at];
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { break };
                used += 1;
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
                let res = c.send_phased(&out, split).await;
                let us = (t0.elapsed().as_micros() as u64).max(1);
                if let Some(o) = &observer {
                    o(Observed {
                        target,
                        rcpts: &m.rcpts,
                        result: match &res {
                            Ok((outcomes, _)) => Ok(outcomes),
                            Err(e) => Err(e.to_string()),
                        },
                    });
                }
                let since = started.elapsed();
                bar.inc(1);
                // A transaction that did not end in 250 for every recipient (a RCPT refused,
                // or the end of data refused) may still be open on the server: RSET before
                // the next MAIL (found by the weekend run: `503 5.5.1 Nested MAIL command`).
                let refused = |o: &RcptOutcome| !matches!(o, RcptOutcome::Delivered(_));
                if matches!(&res, Ok((o, _)) if o.iter().any(refused)) {
                    if let Some(c) = conn.as_mut() {
                        if !c.reset().await {
                            conn = None;
                        }
                    }
                }
                let mut sh = lock(&shared);
                let sh = &mut *sh;
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
                        // The session is in an unknown state: drop it, open another.
                        conn = None;
                        continue;
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
                    sh.buckets.record(since, us);
                }
                for o in outcomes {
                    if let RcptOutcome::Deferred(t) | RcptOutcome::Failed(t) = o {
                        *r.refused
                            .entry(t.code().map(|c| c.to_string()).unwrap_or_default())
                            .or_default() += 1;
                    }
                }
            }
            if let Some(c) = conn.take() {
                c.quit().await;
            }
            let mut sh = lock(&shared);
            let _ = sh.report.latency_us.add(&local.message);
            sh.report.phases.add(&local);
        });
    }
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let mut sh = lock(&shared);
    let (series_bucket_s, series) = sh.buckets.points(elapsed);
    let r = &mut sh.report;
    LoadReport {
        started_at: r.started_at,
        sent: r.sent,
        accepted: r.accepted,
        accepted_rcpts: r.accepted_rcpts,
        refused: std::mem::take(&mut r.refused),
        errors: r.errors,
        elapsed,
        latency_us: r.latency_us.clone(),
        phases: r.phases.clone(),
        bytes: r.bytes,
        ids: std::mem::take(&mut r.ids),
        late: r.late,
        max_lag: r.max_lag,
        series,
        series_bucket_s,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_times_become_scaled_offsets_with_laps() {
        // 0, 60 and 180 s after the first, sixty times faster.
        let o = Offsets::from_times(&[1_000, 1_060, 1_180], 60.0);
        assert_eq!(
            o.at,
            vec![
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(3)
            ]
        );
        // One lap: the span (3 s) plus an average gap (1.5 s).
        assert_eq!(o.lap, Duration::from_millis(4500));
        assert_eq!(o.due(4), Duration::from_millis(5500));
        let one = Offsets::from_times(&[5], 2.0);
        assert_eq!(
            (one.due(0), one.due(1)),
            (Duration::ZERO, Duration::from_millis(500))
        );
        // A bad factor means real time.
        assert_eq!(
            Offsets::from_times(&[0, 2], 0.0).at[1],
            Duration::from_secs(2)
        );
    }
}
