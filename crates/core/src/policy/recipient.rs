//! Recipient stage (`RCPT TO`): whether a recipient is accepted, and on which route. In
//! order ([`rcpt`]):
//! 1. the relay restrictions ([`Policy::check_recipient`]): one of our domains, no
//!    sender-specified routing in the local part (`550 5.7.1`);
//! 2. the directory: listed, or `directory.unknown` (a route, or `reject`: `550 5.1.1`);
//!    an address it does not list while its source cannot be read is deferred
//!    (`451 4.4.3`): it may be a mailbox created since;
//! 3. the route size limit ([`super::delivery::route_size`]) for the `SIZE=` the client
//!    declared (`552 5.3.4`).
//!
//! [`admit`] is steps 1 and 2 without the source check: what the message stage uses to find
//! each recipient's route. [`verdict`] is steps 1 and 2 with it: the reply `directory
//! lookup` and `route explain` show, the same one SMTP gives while the source is down.

use super::delivery::{route_size, TooBigForRoute};
use super::Rules;
use crate::directory::Resolution;
use crate::proto::reply::{canned, Reply};
use crate::route::{Decision, Rule};
use crate::types::{Address, Domain};
use std::collections::HashSet;

/// The reply to a recipient the directory does not know while its source cannot be read
/// (RFC 3463 4.4.3: directory server failure): the sender retries, the mail is not lost.
pub const SOURCE_DOWN: Reply = Reply::new(
    451,
    "4.4.3",
    "Directory temporarily unavailable, try again later",
);

/// Recipient checks that do not depend on the directory.
#[derive(Debug, Clone)]
pub struct Policy {
    accepted: HashSet<String>,
}

impl Policy {
    /// A policy accepting exactly these domains (no subdomains).
    pub fn new(domains: &[Domain]) -> Policy {
        Policy {
            accepted: domains.iter().map(|d| d.as_str().to_string()).collect(),
        }
    }

    /// Refuses relaying: the domain must be ours, and the local part must not carry
    /// sender-specified routing (`%`, `!`, or `@` inside quotes) that a next hop might
    /// act on (Postfix's `allow_untrusted_routing = no`).
    pub fn check_recipient(&self, to: &Address) -> Result<(), Reply> {
        if to.domain().is_literal() || !self.accepted.contains(to.domain().as_str()) {
            return Err(canned::RELAY_DENIED);
        }
        if to.local().contains(['%', '!', '@']) {
            return Err(Reply::new(
                550,
                "5.7.1",
                "Relay access denied: sender-specified routing (% ! @) in the local part",
            ));
        }
        Ok(())
    }
}

/// Why a recipient is refused at RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptRefusal {
    /// The relay restrictions refuse it (the reply: `550 5.7.1 ...`).
    Relay(Reply),
    /// The directory does not list it and `directory.unknown` is `reject`.
    Unknown,
    /// The directory does not list it while its source cannot be read.
    SourceDown,
    /// The size the client declared (`SIZE=`) is larger than its route takes.
    TooBig(TooBigForRoute),
}

impl RcptRefusal {
    /// The reply the client gets.
    pub fn reply(&self) -> Reply {
        match self {
            RcptRefusal::Relay(r) => r.clone(),
            RcptRefusal::Unknown => canned::UNKNOWN_USER,
            RcptRefusal::SourceDown => SOURCE_DOWN,
            RcptRefusal::TooBig(t) => t.reply(),
        }
    }
}

/// The route a directory answer gives (`None`: refused as unknown).
fn decision(r: Resolution) -> Option<Decision> {
    match r {
        Resolution::Listed(route) => Some(Decision {
            route,
            rule: Rule::Listed,
        }),
        Resolution::Unlisted(route) => Some(Decision {
            route,
            rule: Rule::Unknown,
        }),
        Resolution::Reject => None,
    }
}

/// The RCPT-time check without the source check: the relay policy (our domains, no source
/// routes), then the directory. `Ok` carries the route the recipient would take now; `Err`
/// the reply a sender gets.
pub fn admit(
    policy: &Policy,
    addr: &Address,
    resolve: impl Fn(&Address) -> Resolution,
) -> Result<Decision, Reply> {
    policy.check_recipient(addr)?;
    decision(resolve(addr)).ok_or(canned::UNKNOWN_USER)
}

/// Steps 1 and 2 with the source check: the reply a client would get at RCPT now (the
/// declared size aside). `source_down` is asked only for an address the directory does not
/// list.
pub fn verdict(
    policy: &Policy,
    addr: &Address,
    resolve: impl Fn(&Address) -> Resolution,
    source_down: impl FnOnce() -> bool,
) -> Result<Decision, Reply> {
    policy.check_recipient(addr)?;
    let r = resolve(addr);
    if !matches!(r, Resolution::Listed(..)) && source_down() {
        return Err(SOURCE_DOWN);
    }
    decision(r).ok_or(canned::UNKNOWN_USER)
}

/// The whole RCPT decision for `to` under the session's `rules` (see the module doc):
/// `declared` is the message's `SIZE=`, `resolve` the directory, `source_down` whether
/// the directory's source cannot be read (asked only for an address it does not list).
pub fn rcpt(
    rules: &Rules,
    to: &Address,
    declared: Option<u64>,
    resolve: impl Fn(&Address) -> Resolution,
    source_down: impl FnOnce() -> bool,
) -> Result<Decision, RcptRefusal> {
    rules
        .policy
        .check_recipient(to)
        .map_err(RcptRefusal::Relay)?;
    let r = resolve(to);
    // The source is down: an address it does not know may be a mailbox created since.
    if !matches!(r, Resolution::Listed(..)) && source_down() {
        return Err(RcptRefusal::SourceDown);
    }
    let d = decision(r).ok_or(RcptRefusal::Unknown)?;
    if let Some(size) = declared {
        let route = d.route.as_str();
        route_size(route, rules.route_limit(route), size).map_err(RcptRefusal::TooBig)?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_CONFIG};
    use crate::types::RouteName;

    fn policy() -> Policy {
        Policy::new(&[Domain::parse("nhs.test", false).unwrap()])
    }

    fn check(s: &str) -> Result<(), Reply> {
        policy().check_recipient(&Address::parse(s, true).unwrap())
    }

    fn addr(s: &str) -> Address {
        Address::parse(s, false).unwrap()
    }

    fn route(s: &str) -> RouteName {
        RouteName(s.into())
    }

    /// `a*` listed in the cloud, the rest unlisted: to `unknown`, or refused.
    fn resolve(unknown: Option<&'static str>) -> impl Fn(&Address) -> Resolution {
        move |a: &Address| match a.local().as_bytes()[0] {
            b'a' => Resolution::Listed(route("cloud")),
            _ => match unknown {
                Some(u) => Resolution::Unlisted(route(u)),
                None => Resolution::Reject,
            },
        }
    }

    #[test]
    fn accepts_own_domain_only() {
        assert!(check("a@NHS.test").is_ok());
        for bad in [
            "a@evil.test",
            "a@sub.nhs.test",
            "a@nhs.test.evil",
            "a%evil.test@nhs.test",
            "evil.test!a@nhs.test",
            "\"a@evil.test\"@nhs.test",
            "a@[127.0.0.1]",
            "a@nhѕ.test",
        ] {
            let r = check(bad).unwrap_err();
            assert_eq!(
                (r.code, r.status.map(|s| s.to_string())),
                (550, Some("5.7.1".into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn admit_checks_policy_then_directory() {
        let cfg = Config::parse(DEFAULT_CONFIG, "test").unwrap();
        let policy = Policy::new(&cfg.server.accepted_domains);
        let r = resolve(None);
        assert_eq!(
            admit(&policy, &addr("a@nhs.test"), &r),
            Ok(Decision {
                route: route("cloud"),
                rule: Rule::Listed
            })
        );
        assert_eq!(
            admit(&policy, &addr("x@nhs.test"), &r),
            Err(canned::UNKNOWN_USER)
        );
        assert_eq!(
            admit(&policy, &addr("a@elsewhere.test"), &r),
            Err(canned::RELAY_DENIED)
        );
    }

    #[test]
    fn the_verdict_defers_unlisted_addresses_while_the_source_is_down() {
        let cfg = Config::parse(DEFAULT_CONFIG, "test").unwrap();
        let policy = Policy::new(&cfg.server.accepted_domains);
        let r = resolve(None);
        let down = || true;
        assert_eq!(
            verdict(&policy, &addr("x@nhs.test"), &r, down),
            Err(SOURCE_DOWN)
        );
        assert_eq!(
            verdict(&policy, &addr("x@nhs.test"), &r, || false),
            Err(canned::UNKNOWN_USER)
        );
        assert!(verdict(&policy, &addr("a@nhs.test"), &r, down).is_ok());
        assert_eq!(
            verdict(&policy, &addr("a@elsewhere.test"), &r, down),
            Err(canned::RELAY_DENIED)
        );
    }

    #[test]
    fn rcpt_asks_the_source_only_for_unlisted_addresses_and_checks_the_declared_size() {
        let mut cfg = Config::parse(DEFAULT_CONFIG, "test").unwrap();
        cfg.routes.get_mut("cloud").unwrap().max_message_size = Some(1000);
        let rules = Rules::new(&cfg);
        let up = || false;
        let down = || true;
        let r = |a: &str, size, unknown, source: fn() -> bool| {
            rcpt(&rules, &addr(a), size, resolve(unknown), source)
        };
        assert_eq!(
            r("a@nhs.test", Some(1000), None, down).unwrap().rule,
            Rule::Listed
        );
        assert_eq!(
            r("x@nhs.test", None, Some("onprem"), up).unwrap().rule,
            Rule::Unknown
        );
        assert_eq!(
            r("x@nhs.test", None, Some("onprem"), down),
            Err(RcptRefusal::SourceDown)
        );
        assert_eq!(r("x@nhs.test", None, None, up), Err(RcptRefusal::Unknown));
        assert_eq!(
            r("x@elsewhere.test", None, None, down),
            Err(RcptRefusal::Relay(canned::RELAY_DENIED))
        );
        let big = r("a@nhs.test", Some(1001), None, up).unwrap_err();
        assert_eq!(
            big.reply().to_string(),
            "552 5.3.4 Message too big for this recipient: its mailbox's side (cloud) takes at most 1000 bytes"
        );
        assert!(r("x@nhs.test", Some(1 << 30), Some("onprem"), up).is_ok());
    }
}
