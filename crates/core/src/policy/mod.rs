//! Policy: every accept/refuse decision, one file per stage, each decision made by one
//! function the stage calls. The stages ask; they keep no rules of their own.
//!
//! | Stage | File | Asked by | Decisions |
//! |---|---|---|---|
//! | connection | [`connection`] | `smtp::server` | drain and fleet lag, session slots, the reserve for trusted networks, per-client limits |
//! | recipient | [`recipient`] | `relay` (RCPT) | relay restrictions, directory (listed, unknown, source down), route size for `SIZE=` |
//! | message | [`message`] | `relay` (MAIL, end of data), `smtp::session` (hops) | spool space, hop limit, internal headers, route size, the loop guard's mark |
//! | delivery | [`delivery`] | `queue::attempt` | loop guard, route size, move grace |
//!
//! The route size limit (`routes.NAME.max_message_size`) is one function,
//! [`delivery::route_size`], asked at RCPT, at the end of data and before sending.
//! [`explain`] lists, for `route explain`, every decision that applies to an address.
//! What a session keeps from its start is [`Rules`].

pub mod connection;
pub mod delivery;
pub mod headers;
pub mod message;
pub mod recipient;

pub use connection::{client_group, is_trusted, plain_ip};
pub use headers::{count_hops, passed_through, strip_headers};
pub use recipient::Policy;

use crate::config::Config;
use crate::directory::{Directory, Resolution};
use crate::route::Rule;
use crate::types::Address;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What a session keeps from its start: the policy part of the config in force then.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The relay restrictions.
    policy: Policy,
    /// `policy.trusted_networks`.
    trusted: Vec<ipnet::IpNet>,
    /// `policy.strip_headers`.
    strip_headers: Vec<String>,
    /// `spool.min_free_space`.
    min_free_space: u64,
    /// `routes.NAME.max_message_size`, for the routes that set one.
    route_sizes: HashMap<String, u64>,
    /// Our host name (the loop guard looks for it in `Received:` headers).
    hostname: String,
}

impl Rules {
    /// The rules of config `c`.
    pub fn new(c: &Config) -> Rules {
        Rules {
            policy: Policy::new(&c.server.accepted_domains),
            trusted: c.policy.trusted_networks.clone(),
            strip_headers: c.policy.strip_headers.clone(),
            min_free_space: c.spool.min_free_space,
            route_sizes: c
                .routes
                .iter()
                .filter_map(|(n, r)| r.max_message_size.map(|m| (n.clone(), m)))
                .collect(),
            hostname: c.server.hostname.clone(),
        }
    }

    /// The relay restrictions.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// `route`'s `max_message_size` (`None`: no limit).
    pub fn route_limit(&self, route: &str) -> Option<u64> {
        self.route_sizes.get(route).copied()
    }
}

/// A stage of a message's way through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// A new SMTP session.
    Connection,
    /// `RCPT TO`.
    Recipient,
    /// `MAIL FROM` to the end of data.
    Message,
    /// Each delivery attempt.
    Delivery,
}

impl Stage {
    /// The stage's name, as in the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Connection => "connection",
            Stage::Recipient => "recipient",
            Stage::Message => "message",
            Stage::Delivery => "delivery",
        }
    }
}

/// One decision that applies to mail for an address, as `route explain` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applies {
    /// The stage that makes it.
    pub stage: Stage,
    /// Which decision: `relay`, `directory`, `size`, `move grace`, `loop guard`.
    pub decision: String,
    /// What it decides for this address now, in words.
    pub verdict: String,
}

/// Every decision that applies to mail for `addr` now (Unix seconds `now`), stage by stage,
/// under `config` and `directory`. The connection stage is left out: it decides on the
/// client, not on the address. Mail the relay restrictions refuse meets nothing else.
pub fn explain(config: &Config, directory: &Directory, addr: &Address, now: u64) -> Vec<Applies> {
    let line = |stage, decision: &str, verdict: String| Applies {
        stage,
        decision: decision.to_string(),
        verdict,
    };
    let policy = Policy::new(&config.server.accepted_domains);
    let mut out = Vec::new();
    if let Err(r) = policy.check_recipient(addr) {
        out.push(line(Stage::Recipient, "relay", format!("refused: {r}")));
        return out;
    }
    out.push(line(Stage::Recipient, "relay", "accept".into()));
    let down = if directory.source_down() {
        format!("; now {} (its source is down)", recipient::SOURCE_DOWN)
    } else {
        String::new()
    };
    let (route, rule) = match directory.resolve(addr) {
        Resolution::Listed(r) => {
            let verdict = format!("listed: route {}", r.as_str());
            out.push(line(Stage::Recipient, "directory", verdict));
            (r, Rule::Listed)
        }
        Resolution::Unlisted(r) => {
            let verdict = format!("not listed: route {} (directory.unknown){down}", r.as_str());
            out.push(line(Stage::Recipient, "directory", verdict));
            (r, Rule::Unknown)
        }
        Resolution::Reject => {
            let reply = crate::proto::reply::canned::UNKNOWN_USER;
            let verdict = if down.is_empty() {
                format!("not listed: refused {reply}")
            } else {
                // What SMTP answers now comes first: the 550 waits for the source.
                format!(
                    "not listed: deferred {} (its source is down; {reply} once it is back)",
                    recipient::SOURCE_DOWN
                )
            };
            out.push(line(Stage::Recipient, "directory", verdict));
            return out;
        }
    };
    let route = route.as_str();
    let rc = config.routes.get(route);
    let (rcpt_size, data_size, sent_size) = match rc.and_then(|r| r.max_message_size) {
        Some(n) => (
            format!("SIZE= over {n} bytes (route {route}): refused 552 5.3.4"),
            format!("over {n} bytes: refused 552 5.3.4 when no other recipient's route takes it"),
            format!("over {n} bytes: not sent to {route}, fails 552 5.3.4 with a DSN"),
        ),
        None => {
            let none = format!("no limit on route {route}");
            (none.clone(), none.clone(), none)
        }
    };
    out.push(line(Stage::Recipient, "size", rcpt_size));
    out.push(line(Stage::Message, "size", data_size));
    out.push(line(Stage::Delivery, "size", sent_size));
    let grace = config.directory.move_grace;
    let moved = (rule == Rule::Listed && !grace.is_zero())
        .then(|| directory.moved(addr))
        .flatten();
    let verdict = delivery::grace_verdict(route, rule, grace, now, moved);
    out.push(line(Stage::Delivery, "move grace", verdict));
    let senders: Vec<String> = rc
        .map(|r| {
            let hops = r
                .next_hops
                .iter()
                .filter(|h| h.host.parse::<std::net::IpAddr>().is_ok())
                .map(|h| h.host.clone());
            hops.chain(r.returns_from.iter().map(|n| n.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let reached = "an address its deliveries reached";
    let from = if senders.is_empty() {
        reached.to_string()
    } else {
        format!("{}, or {reached}", senders.join(", "))
    };
    let verdict = format!(
        "mail that passed through {} and comes back from {from} is not sent to {route} again: fails 554 5.4.6",
        config.server.hostname
    );
    out.push(line(Stage::Delivery, "loop guard", verdict));
    out
}
