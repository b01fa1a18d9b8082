//! Outbound SMTP to a route's next hops.
//!
//! mail-send does the connect, greeting, EHLO, STARTTLS and reply parsing. The transaction
//! itself (MAIL, RCPT, DATA/BDAT) is driven here on mail-send's stream, because mail-send's
//! `send()` stops at the first refused recipient, does not pipeline, and its DATA writer
//! changes the message (see notes/dependencies.md). We pipeline when the next hop offers
//! PIPELINING, send the exact bytes with BDAT when it offers CHUNKING, and otherwise use a
//! buffered dot-stuffing writer.
//!
//! Two rules shape what a transaction carries:
//! - **Recipients per transaction.** A next hop may take fewer recipients per transaction
//!   than a message has: it answers `452` (RFC 5321 4.5.3.1.10; `452 4.5.3`, or `552 5.5.3`
//!   from older servers) to the RCPTs beyond its limit. Those recipients go at once in a
//!   further transaction (on the same session, or a new one if it broke), within the same
//!   attempt, not after a retry delay. Only when the *first* RCPT of a transaction gets such
//!   a reply (the hop took nothing) are they deferred like any temporary failure, so every
//!   extra transaction settles at least one recipient and the loop ends. A route's
//!   `max_recipients_per_transaction` splits the same way before the hop has to say so.
//! - **Throttling.** A reply matching the route's `throttle_replies` (at the greeting or in
//!   the transaction) puts the next hop into the throttled state of [`hops`]: the
//!   recipients not yet sent are deferred to the end of the hop's pause, and deliveries that
//!   meet the pause skip the hop (failing over to another one) or defer to its end.
//! - **SMTPUTF8** (RFC 6531) is passed on MAIL FROM whenever the envelope asked for it and
//!   the next hop offers it. When the hop does not offer it, what the message needs decides:
//!   a non-ASCII address fails with `553 5.6.7`, UTF-8 in the header section of a message
//!   that asked for SMTPUTF8 fails with `554 5.6.9` (both permanent: a DSN tells the
//!   sender); a message that asked for it but is all ASCII in its envelope and headers is
//!   sent without it, as nothing in it needs the extension.
//!
//! This file holds the public API ([`Connection`], [`Outbound`], [`deliver`]) and the
//! failover over a route's next hops; `transaction` drives one MAIL/RCPT/DATA-BDAT
//! exchange and writes the message bytes. [`Transport`] is the outbound side as one value
//! (pool, resolver, route TLS) that the composition root builds and the queue delivers
//! through; [`states`] gives the console every next hop's state; [`HopRoutes`] is the loop
//! guard's memory of which routes send from which address.

mod connection;
pub mod dane;
pub mod destination;
pub mod dns;
pub mod hop_routes;
pub mod hops;
pub mod mta_sts;
pub mod pool;
pub mod states;
pub mod tls;
mod transaction;
pub mod transport;

pub use hop_routes::HopRoutes;
pub use transport::{SetupError, Transport};

pub use connection::{Connection, Looks, OpenTimes};

pub use transaction::dot_stuff;
use transaction::{transaction, TxRcpt};

use crate::config::{NextHop, TlsPolicy};
use crate::proto::{RcptDsn, Reply, Ret};
use crate::types::Address;
use mail_send::SmtpClient;
use pool::{Admission, Pool};
use smtp_proto::{EXT_CHUNKING, EXT_PIPELINING, EXT_START_TLS};
use std::net::SocketAddr;
use std::time::Duration;
pub use tls::RouteTls;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::proto::{Failure, LocalError, RcptOutcome};

/// Why a next hop could not be used at all (the next one is tried).
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    /// TCP connect failed or timed out.
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, String),
    /// The greeting or EHLO was refused or unreadable.
    #[error("{0} refused the session: {1}")]
    Refused(SocketAddr, String),
    /// The route (or the policy named) needs TLS and the next hop does not offer STARTTLS.
    #[error("{0} does not offer STARTTLS and {1} requires TLS")]
    TlsUnavailable(SocketAddr, String),
    /// STARTTLS failed.
    #[error("TLS with {0} failed: {1}")]
    Tls(SocketAddr, String),
    /// The connection broke during the transaction.
    #[error("lost connection with {0}: {1}")]
    Lost(SocketAddr, #[source] TxError),
}

/// Why a transaction broke off (the connection is then given up).
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// A write did not finish within the delivery timeout.
    #[error("write timeout")]
    WriteTimeout,
    /// A reply did not come within the delivery timeout.
    #[error("reply timeout")]
    ReplyTimeout,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The next hop's replies could not be read (mail-send's error).
    #[error(transparent)]
    Protocol(#[from] mail_send::Error),
    /// Fewer replies than commands.
    #[error("missing reply")]
    MissingReply,
    /// The connection was closed (or reset) before the next hop answered anything in this
    /// transaction (it most likely took nothing; at-least-once either way).
    #[error("connection closed before any reply")]
    Closed,
    /// A reply could not be read.
    #[error(transparent)]
    Reply(#[from] crate::proto::reply::WireError),
}

/// One message to send on a connection.
pub struct Outbound<'a> {
    /// Reverse path (`None` = `<>`).
    pub from: Option<&'a Address>,
    /// Recipients.
    pub rcpts: Vec<&'a Address>,
    /// Exact message bytes.
    pub message: &'a [u8],
    /// Declared 8BITMIME.
    pub eight_bit: bool,
    /// DSN `RET` and `ENVID`, passed on when the next hop offers DSN.
    pub ret: Option<Ret>,
    /// DSN `ENVID`.
    pub envid: Option<&'a str>,
    /// DSN parameters per recipient (same order as `rcpts`; may be empty).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// The envelope asked for SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

impl<'a> Outbound<'a> {
    /// The same message for the recipients at positions `which` only.
    fn only(&self, which: &[usize]) -> Outbound<'a> {
        Outbound {
            from: self.from,
            rcpts: which.iter().map(|&i| self.rcpts[i]).collect(),
            message: self.message,
            eight_bit: self.eight_bit,
            ret: self.ret,
            envid: self.envid,
            rcpt_dsn: which
                .iter()
                .filter_map(|&i| self.rcpt_dsn.get(i).cloned())
                .collect(),
            smtputf8: self.smtputf8,
        }
    }
}

/// Result of trying a route's next hops for one set of recipients.
#[derive(Debug)]
pub struct Attempt {
    /// Outcome per recipient, same order as given.
    pub outcomes: Vec<RcptOutcome>,
    /// The next hop that answered, if any.
    pub next_hop: Option<SocketAddr>,
    /// TLS was used.
    pub tls: bool,
    /// Unix ms when the throttled next hop that deferred these recipients resumes (their
    /// next attempt), if throttling deferred them.
    pub throttled_until_ms: Option<u64>,
}

/// The addresses of a next hop: an IP as is, a name through the system resolver.
/// Where a route delivers: fixed next hops, or the MX hosts of a domain.
pub enum Target<'a> {
    /// `next_hops`, in order.
    Hops(&'a [NextHop]),
    /// The MX hosts of a domain, on this port.
    Mx(&'a str, u16),
}

/// One address to try: where, the host name it came from, and the TLS settings for it.
pub(crate) struct Hop {
    addr: SocketAddr,
    host: String,
    tls: RouteTls,
}

/// The addresses to try for `target`, in order, each with the host name it came from and
/// its TLS settings: the route's, or for `mta-sts` and `dane` routes to MX hosts what the
/// domain's policy or the host's TLSA records give (`mta_sts::hops`, `dane::hops`).
async fn resolve(
    dns: &dns::Dns,
    target: &Target<'_>,
    tls: &RouteTls,
) -> Result<Vec<Hop>, dns::DnsError> {
    let hosts: Vec<(String, u16, RouteTls)> = match (target, tls.policy) {
        (Target::Mx(domain, port), TlsPolicy::MtaSts) => {
            return mta_sts::hops(dns, domain, *port, tls).await
        }
        (Target::Mx(domain, port), TlsPolicy::Dane) => {
            return dane::hops(dns, domain, *port, tls).await
        }
        (Target::Hops(hops), _) => hops
            .iter()
            .map(|h| (h.host.clone(), h.port, tls.clone()))
            .collect(),
        (Target::Mx(domain, port), _) => dns
            .mx_hosts(domain)
            .await?
            .into_iter()
            .map(|h| (h, *port, tls.clone()))
            .collect(),
    };
    addresses(dns, hosts).await
}

/// The addresses of `hosts` (name, port, TLS settings), in order, each with its host's TLS
/// settings; the last lookup error when none resolves.
async fn addresses(
    dns: &dns::Dns,
    hosts: Vec<(String, u16, RouteTls)>,
) -> Result<Vec<Hop>, dns::DnsError> {
    let mut out = Vec::new();
    let mut last = None;
    for (host, port, tls) in hosts {
        match dns.addresses(&host).await {
            Ok(ips) => out.extend(ips.into_iter().map(|ip| Hop {
                addr: SocketAddr::new(ip, port),
                host: host.clone(),
                tls: tls.clone(),
            })),
            Err(e) => last = Some(e),
        }
    }
    match (out.is_empty(), last) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// The session a route opens with its next hops: EHLO name, TLS settings, timeout.
#[derive(Clone, Copy)]
pub struct Hello<'a> {
    /// The name we say EHLO with.
    pub helo: &'a str,
    /// The route's TLS settings.
    pub tls: &'a RouteTls,
    /// Connect and reply timeout.
    pub timeout: Duration,
}

/// How a route's deliveries treat its next hops' limits (see the module docs and
/// [`hops`]).
#[derive(Clone, Copy)]
pub struct HopRules<'a> {
    /// The route (throttle state and metrics name it).
    pub route: &'a str,
    /// Most recipients per transaction (`None`: as many as the next hop takes).
    pub max_rcpts: Option<usize>,
    /// Replies that mean "slow down".
    pub throttle_replies: &'a [crate::proto::ReplyPattern],
    /// Pause of a throttled next hop.
    pub pause: hops::PauseRules,
}

impl HopRules<'_> {
    /// Rules with no recipient limit and no throttling replies (load tool, tests).
    pub fn none() -> HopRules<'static> {
        HopRules {
            route: "-",
            max_rcpts: None,
            throttle_replies: &[],
            pause: hops::PauseRules {
                first: Duration::from_secs(30),
                max: Duration::from_secs(600),
            },
        }
    }

    fn throttles(&self, r: &crate::proto::Reply) -> bool {
        crate::proto::pattern::any_matches(self.throttle_replies, r)
    }

    fn throttles_text(&self, text: &str) -> bool {
        self.throttle_replies.iter().any(|p| p.matches_text(text))
    }
}

/// Unix ms of an instant.
fn unix_ms(t: std::time::Instant) -> u64 {
    crate::clock::now_ms()
        + t.saturating_duration_since(std::time::Instant::now())
            .as_millis() as u64
}

/// Tries the route's next hops (MX hosts or `next_hops`, and each address of a name) in
/// order until one takes the transaction, reusing pooled connections and skipping hops whose
/// circuit is open or that are paused by throttling; if none can be used, every recipient is
/// deferred with the last error (or fails, for a null MX).
pub async fn deliver(
    pool: &Pool,
    dns: &dns::Dns,
    target: &Target<'_>,
    hello: Hello<'_>,
    rules: &HopRules<'_>,
    out: &Outbound<'_>,
) -> Attempt {
    let mut last_error = String::from("no next hop configured");
    // The earliest end of a pause met, with the text that explains it.
    let mut throttled: Option<(std::time::Instant, String)> = None;
    let mut met_pause = |until: std::time::Instant, why: String| {
        if throttled.as_ref().is_none_or(|(t, _)| until < *t) {
            throttled = Some((until, why));
        }
    };
    let addrs = match resolve(dns, target, hello.tls).await {
        Ok(a) => a,
        Err(e @ dns::DnsError::NullMx(_)) => {
            return Attempt {
                outcomes: vec![
                    RcptOutcome::Failed(Failure::Local(LocalError::NullMx(
                        e.to_string()
                    )));
                    out.rcpts.len()
                ],
                next_hop: None,
                tls: false,
                throttled_until_ms: None,
            }
        }
        Err(e) => {
            last_error = e.to_string();
            Vec::new()
        }
    };
    // MX hosts come from DNS someone else controls: no private addresses (see `destination`).
    let from_dns = matches!(target, Target::Mx(..));
    for Hop { addr, host, tls } in &addrs {
        let (hop, host) = (*addr, host.as_str());
        if from_dns {
            let refused = destination::refusal("MX host", host, hop.ip(), dns.allow_private());
            if let Some(why) = refused {
                last_error = why;
                continue;
            }
        }
        // This host's TLS settings (what its MTA-STS policy or TLSA records give).
        let hello = Hello { tls, ..hello };
        // Limits and throttling are per host (all its addresses), circuits per address.
        let name = hop_name(host, hop.port());
        if let Some((until, reply)) = pool.paused(&name) {
            met_pause(until, paused_text(&name, until, &reply));
            continue;
        }
        if let Admission::Skip(wait) = pool.admit(hop) {
            last_error = format!(
                "{hop} is down (circuit open; next probe in {} s)",
                wait.as_secs()
            );
            continue;
        }
        let _slot = pool.slot(&name).await;
        // A throttling reply may have paused the hop while this delivery waited for a slot.
        if let Some((until, reply)) = pool.paused(&name) {
            met_pause(until, paused_text(&name, until, &reply));
            continue;
        }
        let key = pool::SessionKey::new(hop, host, hello.helo, hello.tls);
        let (conn, reuse) = match pool
            .checkout(&key, host, hello.helo, hello.tls, hello.timeout)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                if matches!(e, HopError::Refused(..)) && rules.throttles_text(&text) {
                    // "Too many connections" at the greeting: the hop is up but busy.
                    pool.report(hop, None);
                    let until = pool.throttle(&name, rules.route, &text, rules.pause);
                    met_pause(until, paused_text(&name, until, &text));
                } else if matches!(e, HopError::Connect(..) | HopError::Refused(..)) {
                    pool.report(hop, Some(&text));
                    last_error = text;
                } else {
                    // Reachable but unusable under this TLS policy: not a dead host.
                    pool.report(hop, None);
                    last_error = text;
                }
                continue;
            }
        };
        pool.report(hop, None);
        let is_tls = conn.is_tls();
        let reused = reuse != pool::Reuse::New;
        let session = (conn, reuse == pool::Reuse::Unchecked);
        let (outcomes, paused) =
            transactions(pool, &key, session, (host, &name, hello), rules, out).await;
        metrics::counter!(crate::metrics::CONNECTIONS, "next_hop" => hop.to_string(), "reused" => if reused { "yes" } else { "no" }).increment(1);
        return Attempt {
            outcomes,
            next_hop: Some(hop),
            tls: is_tls,
            throttled_until_ms: paused.map(unix_ms),
        };
    }
    let (failure, throttled_until_ms) = match throttled {
        Some((until, why)) => (LocalError::Throttled(why), Some(unix_ms(until))),
        None => (LocalError::Unreachable(last_error), None),
    };
    Attempt {
        outcomes: vec![RcptOutcome::Deferred(Failure::Local(failure)); out.rcpts.len()],
        next_hop: None,
        tls: false,
        throttled_until_ms,
    }
}

/// The name of a next hop for its limits and throttled state: `host:port` (`[v6]:port`).
fn hop_name(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a delivery skipped a paused hop.
fn paused_text(hop: &str, until: std::time::Instant, reply: &str) -> String {
    let secs = until
        .saturating_duration_since(std::time::Instant::now())
        .as_secs();
    format!("next hop {hop} is throttled (last reply: {reply}); paused for {secs} s more")
}

/// Sends `out` over `conn` in as many transactions as the route and the next hop need (see
/// the module docs: at most `max_rcpts` per transaction, and recipients refused as too many
/// go in the next transaction at once), then returns the session to the pool. A session
/// reused `unchecked` (see [`pool::Reuse`]) that is found closed before it answered anything
/// is replaced once by a new one, and the transaction sent again (as a deferral would send
/// it again later). One outcome per recipient, in order; and the end of the hop's pause when
/// it answered with a throttling reply (the recipients not yet sent are then deferred to it).
async fn transactions(
    pool: &Pool,
    key: &pool::SessionKey,
    (conn, mut unchecked): (Connection, bool),
    (host, name, hello): (&str, &str, Hello<'_>),
    rules: &HopRules<'_>,
    out: &Outbound<'_>,
) -> (Vec<RcptOutcome>, Option<std::time::Instant>) {
    let n = out.rcpts.len();
    let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; n];
    let mut todo: Vec<usize> = (0..n).collect();
    let mut conn = Some(conn);
    let mut paused = None;
    let defer_all = |outcomes: &mut Vec<Option<RcptOutcome>>, which: &[usize], e: LocalError| {
        for &i in which {
            outcomes[i] = Some(RcptOutcome::Deferred(Failure::Local(e.clone())));
        }
    };
    while !todo.is_empty() {
        let Some(c) = conn.as_mut() else { break };
        let take = rules
            .max_rcpts
            .map_or(todo.len(), |m| m.clamp(1, todo.len()));
        let (now, later) = todo.split_at(take);
        let part = out.only(now);
        let results = match c.transaction(&part, false).await {
            Ok((r, _)) => r,
            Err(HopError::Lost(_, TxError::Closed)) if unchecked => {
                // Closed before it answered anything: a new session, once (a deferral would
                // resend it later just the same).
                unchecked = false;
                let hop = key.addr();
                metrics::counter!(crate::metrics::STALE_SESSIONS, "next_hop" => hop.to_string())
                    .increment(1);
                match Connection::open(hop, host, hello.helo, hello.tls, hello.timeout).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        let text = e.to_string();
                        if matches!(e, HopError::Connect(..)) {
                            pool.report(hop, Some(&text));
                        }
                        defer_all(&mut outcomes, &todo, LocalError::Unreachable(text));
                        conn = None;
                        break;
                    }
                }
                continue;
            }
            Err(e) => {
                // The message may or may not have been taken: defer (at-least-once).
                defer_all(&mut outcomes, &todo, LocalError::Lost(e.to_string()));
                conn = None;
                break;
            }
        };
        let throttle = results.iter().find_map(|r| match &r.outcome {
            RcptOutcome::Deferred(Failure::Remote(rep))
            | RcptOutcome::Failed(Failure::Remote(rep))
                if rules.throttles(rep) =>
            {
                Some(rep.to_string())
            }
            _ => None,
        });
        // The first RCPT refused as "too many": the hop took nothing, a real deferral.
        let progress = results.first().is_some_and(|r| !r.too_many);
        let mut next = Vec::new();
        for (&i, r) in now.iter().zip(results) {
            if r.too_many && progress {
                next.push(i);
            } else if r.too_many {
                // A 552 5.5.3 is temporary too (RFC 5321 4.5.3.1.10).
                let failure = match r.outcome {
                    RcptOutcome::Failed(f) | RcptOutcome::Deferred(f) => f,
                    RcptOutcome::Delivered(r) => Failure::Remote(r),
                };
                outcomes[i] = Some(RcptOutcome::Deferred(failure));
            } else {
                outcomes[i] = Some(r.outcome);
            }
        }
        if let Some(reply) = throttle {
            // Slow down: nothing more goes to this hop until its pause ends.
            let until = pool.throttle(name, rules.route, &reply, rules.pause);
            next.extend_from_slice(later);
            defer_all(
                &mut outcomes,
                &next,
                LocalError::Throttled(paused_text(name, until, &reply)),
            );
            paused = Some(until);
            break;
        }
        pool.succeeded(name);
        if progress {
            next.extend_from_slice(later);
        } else {
            let e = LocalError::NotAttempted;
            defer_all(&mut outcomes, later, e);
        }
        todo = next;
        if todo.is_empty() {
            break;
        }
        // The next transaction: on this session if it still answers, else on a new one.
        unchecked = false;
        if let Some(mut c) = conn.take() {
            if c.reset().await {
                conn = Some(c);
            }
        }
        if conn.is_none() {
            match pool
                .checkout(key, host, hello.helo, hello.tls, hello.timeout)
                .await
            {
                Ok((c, reuse)) => {
                    conn = Some(c);
                    unchecked = reuse == pool::Reuse::Unchecked;
                }
                Err(e) => {
                    defer_all(&mut outcomes, &todo, LocalError::Unreachable(e.to_string()));
                    break;
                }
            }
        }
    }
    if let Some(c) = conn {
        if paused.is_none() {
            pool.checkin(key.clone(), c);
        }
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(RcptOutcome::Deferred(Failure::Local(
                LocalError::NotAttempted,
            )))
        })
        .collect();
    (outcomes, paused)
}
