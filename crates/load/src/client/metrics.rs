//! The relay's own view of a run: its Prometheus endpoint (`/metrics` of the admin API)
//! scraped once before the run, then every fraction of a second while it runs, then until
//! every recipient it accepted has a final outcome (or a time limit passes). The report keeps, per route, the differences from the first
//! scrape: recipients accepted at RCPT (`coexist_recipients_accepted_total`) and delivery
//! outcomes (`coexist_delivery_recipients_total`, summed over next hops), and the delivered
//! count at each scrape for the chart.
//!
//! The scrapes run on a thread of their own with a blocking HTTP client (ureq, as the CLI's
//! admin client), so they never compete with the load's sessions for the runtime.

use crate::metrics::{DELIVERIES, RCPT_ACCEPTED};
use crate::report::{RoutePoint, RouteTotals, Routes};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The endpoint could not be scraped before the run.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Connection or protocol failure.
    #[error("cannot scrape {url}: {reason}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// Why.
        reason: String,
    },
    /// The endpoint answered with an error status.
    #[error("{url} answered {status} (with the admin API, pass --metrics-token-file)")]
    Status {
        /// The endpoint.
        url: String,
        /// HTTP status.
        status: u16,
    },
}

/// Largest answer read (the relay's metrics are a few tens of kilobytes).
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Per-route counts from one scrape.
type Counts = BTreeMap<String, RouteTotals>;

/// A running scraper; [`Scraper::finish`] ends it and returns what it saw.
pub struct Scraper {
    url: String,
    stop: mpsc::Sender<Duration>,
    thread: std::thread::JoinHandle<(Vec<(f64, Counts)>, u64)>,
}

/// One scrape's answer, parsed.
fn scrape(agent: &ureq::Agent, url: &str, token: Option<&str>) -> Result<Counts, MetricsError> {
    let unreachable = |e: ureq::Error| MetricsError::Unreachable {
        url: url.to_string(),
        reason: e.to_string(),
    };
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut res = req.call().map_err(unreachable)?;
    let status = res.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(MetricsError::Status {
            url: url.to_string(),
            status,
        });
    }
    let text = res
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(unreachable)?;
    Ok(parse(&text))
}

/// The per-route counts in a Prometheus text exposition.
fn parse(text: &str) -> Counts {
    let mut out = Counts::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let Some(route) = labels.get("route") else {
            continue;
        };
        let v = value.max(0.0) as u64;
        if name == RCPT_ACCEPTED {
            out.entry(route.clone()).or_default().accepted += v;
        } else if name == DELIVERIES {
            let t = out.entry(route.clone()).or_default();
            match labels.get("outcome").map(String::as_str) {
                Some("sent") => t.sent += v,
                Some("deferred") => t.deferred += v,
                Some("bounced") => t.bounced += v,
                _ => {}
            }
        }
    }
    out
}

/// One sample line: `name{k="v",...} value [timestamp]`.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        };
        rest = &after[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

fn minus(a: &Counts, b: &Counts) -> Counts {
    a.iter()
        .map(|(route, t)| {
            let z = RouteTotals::default();
            let o = b.get(route).unwrap_or(&z);
            (
                route.clone(),
                RouteTotals {
                    accepted: t.accepted.saturating_sub(o.accepted),
                    sent: t.sent.saturating_sub(o.sent),
                    deferred: t.deferred.saturating_sub(o.deferred),
                    bounced: t.bounced.saturating_sub(o.bounced),
                },
            )
        })
        .collect()
}

/// Whether every recipient accepted at RCPT has a final outcome (delivered or bounced).
fn final_for_all(c: &Counts) -> bool {
    let (accepted, done) = c
        .values()
        .fold((0, 0), |(a, d), t| (a + t.accepted, d + t.sent + t.bounced));
    done >= accepted
}

impl Scraper {
    /// Scrapes `url` once now (an error here means the endpoint is wrong, and is returned),
    /// then keeps scraping on a thread: every 100 ms for the first 2 s, every 250 ms up to
    /// 30 s, then every second (every 50 ms once the load is over). `token` is the admin API's bearer token.
    pub fn start(url: &str, token: Option<String>) -> Result<Scraper, MetricsError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let before = scrape(&agent, url, token.as_deref())?;
        let started = Instant::now();
        let (stop, rx) = mpsc::channel::<Duration>();
        let (u, base) = (url.to_string(), before);
        let thread = std::thread::spawn(move || {
            let mut points = vec![(0.0, Counts::new())];
            let mut errors = 0u64;
            let mut settle_until: Option<Instant> = None;
            loop {
                let t = started.elapsed();
                // Closely while settling: the load ends as soon as the relay is done.
                let interval = if settle_until.is_some() {
                    Duration::from_millis(50)
                } else if t < Duration::from_secs(2) {
                    Duration::from_millis(100)
                } else if t < Duration::from_secs(30) {
                    Duration::from_millis(250)
                } else {
                    Duration::from_secs(1)
                };
                if settle_until.is_none() {
                    match rx.recv_timeout(interval) {
                        Ok(settle) => settle_until = Some(Instant::now() + settle),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                } else {
                    std::thread::sleep(interval);
                }
                let mut settled = false;
                match scrape(&agent, &u, token.as_deref()) {
                    Ok(c) => {
                        let c = minus(&c, &base);
                        settled = final_for_all(&c);
                        points.push((started.elapsed().as_secs_f64(), c));
                    }
                    Err(_) => errors += 1,
                }
                if let Some(until) = settle_until {
                    if settled || Instant::now() >= until {
                        break;
                    }
                }
            }
            (points, errors)
        });
        Ok(Scraper {
            url: url.to_string(),
            stop,
            thread,
        })
    }

    /// Ends the scraping once every recipient the relay accepted during the run has a final
    /// outcome (delivered or bounced), or after `settle` at most, and returns the per-route
    /// counts of the run.
    pub fn finish(self, settle: Duration) -> Routes {
        let _ = self.stop.send(settle);
        let (points, scrape_errors) = self.thread.join().unwrap_or_default();
        let totals = points.last().map(|(_, c)| c.clone()).unwrap_or_default();
        let routes: Vec<&String> = totals.keys().collect();
        let series = points
            .iter()
            .map(|(t, c)| RoutePoint {
                t: *t,
                sent: routes
                    .iter()
                    .map(|r| ((*r).clone(), c.get(*r).map(|x| x.sent).unwrap_or(0)))
                    .collect(),
            })
            .collect();
        Routes {
            url: self.url,
            totals,
            series,
            scrape_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_summed_per_route() {
        let text = r#"# TYPE coexist_delivery_recipients_total counter
coexist_delivery_recipients_total{route="cloud",next_hop="127.0.0.1:2602",outcome="sent"} 7
coexist_delivery_recipients_total{route="cloud",next_hop="10.0.0.2:25",outcome="sent"} 3
coexist_delivery_recipients_total{route="cloud",next_hop="none",outcome="deferred"} 2
coexist_delivery_recipients_total{outcome="bounced",route="on\"prem"} 1 1700000000
coexist_recipients_accepted_total{route="cloud"} 12
coexist_messages_total{result="accepted",status="2.0.0"} 99
broken{route="x" 5
"#;
        let c = parse(text);
        assert_eq!(
            c["cloud"],
            RouteTotals {
                accepted: 12,
                sent: 10,
                deferred: 2,
                bounced: 0
            }
        );
        assert_eq!(c["on\"prem"].bounced, 1);
        assert_eq!(c.len(), 2);
        let d = minus(
            &c,
            &parse("coexist_recipients_accepted_total{route=\"cloud\"} 2\n"),
        );
        assert_eq!(d["cloud"].accepted, 10);
    }
}
