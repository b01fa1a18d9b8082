//! Route planning: the one pure function from (recipients, directory view, config) to
//! complete deliveries. No I/O, so it is cheap to test and to explain.
//!
//! Every caller that needs to know where a recipient goes asks this module:
//! - delivery (`queue::attempt`) sends each [`Delivery`] of [`plan`] as it is;
//! - `queue list/show` and the queue API show the route of [`plan`] for pending recipients;
//! - `route explain` shows the [`Delivery`] of [`plan`] next to the decisions of
//!   `crate::policy` that apply;
//! - the RCPT check (`policy::recipient`) turns the directory's answer into a [`Decision`].
//!
//! The rules, in order, for one recipient:
//! 1. a DSN (a message from `<>` that we generated) to an address outside our accepted
//!    domains takes `delivery.external_route` ([`Rule::External`]);
//! 2. an address listed in the directory takes the route of its state ([`Rule::Listed`]);
//! 3. anything else takes `directory.unknown`, unless that is `reject` ([`Rule::Unknown`]).
//!
//! A route then gives the target (fixed next hops or the MX hosts of a domain), the
//! envelope rewrite and the TLS policy and expected name.
//!
//! The envelope rewrite (the `RCPT TO` sent, see [`Delivery::to`]): a route with
//! `rewrite_domain` (the route to Exchange Online through the tenant's routing domain)
//! sends a listed recipient whose mailbox has a routing address to that address (the
//! mailbox's own, e.g. `jsmith@tenant.mail.onmicrosoft.com` for mail to
//! `john.smith@other-domain.test`), and rewrites the domain of any other recipient
//! (`user@nhs.test` sent as `user@tenant.mail.onmicrosoft.com`); `use_routing_address =
//! false` on the route rewrites every recipient. A route without `rewrite_domain` sends
//! every recipient as received, routing address or not.

use crate::config::{Config, NextHop, RouteConfig, TlsPolicy};
use crate::directory::{Resolution, Resolved};
use crate::types::{Address, Domain, RouteName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What kind of message the recipients belong to: it decides whether the external-route
/// rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Mail accepted from a client: recipients are in our domains.
    Relayed,
    /// A DSN we generated: its recipient (the original sender) may be outside our domains.
    Dsn,
}

impl Kind {
    /// `Dsn` when `bounce` is set (the envelope's flag), else `Relayed`.
    pub fn of(bounce: bool) -> Kind {
        if bounce {
            Kind::Dsn
        } else {
            Kind::Relayed
        }
    }
}

/// Which rule gave a recipient its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Listed in the directory: the route of its state.
    Listed,
    /// Not listed: the `directory.unknown` route.
    Unknown,
    /// A DSN to an address outside our domains: `delivery.external_route`.
    External,
}

/// The route of one recipient and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The route.
    pub route: RouteName,
    /// Why.
    pub rule: Rule,
}

/// Where a delivery goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The route's `next_hops`, in order.
    Hops(Vec<NextHop>),
    /// The MX hosts of this domain, on this port.
    Mx(Domain, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Hops(h) if h.is_empty() => f.write_str("-"),
            Target::Hops(h) => {
                for (n, hop) in h.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{hop}")?;
                }
                Ok(())
            }
            Target::Mx(d, port) => write!(f, "mx {d}:{port}"),
        }
    }
}

/// One complete delivery: the recipients that go to one route, and everything needed to
/// send them there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The route.
    pub route: RouteName,
    /// Indexes into the message's recipient list.
    pub rcpts: Vec<usize>,
    /// The rule that gave each recipient this route (parallel to `rcpts`).
    pub rules: Vec<Rule>,
    /// The recipients as sent in `RCPT TO` (parallel to `rcpts`): on a route with
    /// `rewrite_domain`, the mailbox's routing address, else the address at
    /// `rewrite_domain`; on other routes unchanged (see the module doc).
    pub to: Vec<Address>,
    /// Next hops or MX domain.
    pub target: Target,
    /// TLS policy of the route.
    pub tls: TlsPolicy,
    /// The name the next hop's certificate must carry, when the route sets one.
    pub tls_name: Option<String>,
    /// Most recipients per transaction (`max_recipients_per_transaction`; `None`: no limit).
    pub max_rcpts: Option<usize>,
    /// Largest message the route takes (`max_message_size`; `None`: no limit).
    pub max_message_size: Option<u64>,
}

/// The result of planning. A route with `recipient_mx` has one delivery per recipient
/// domain; every other route at most one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Deliveries in route-name order.
    pub deliveries: Vec<Delivery>,
    /// Recipients with no route now (unknown and `directory.unknown = "reject"`, or a DSN
    /// to an outside address with no external route).
    pub unroutable: Vec<usize>,
    /// Recipients whose route is not (or no longer) in the configuration, by route.
    pub unconfigured: Vec<(RouteName, Vec<usize>)>,
}

impl Plan {
    /// The route recipient `i` takes in this plan (`None`: unroutable or not planned).
    pub fn route_of(&self, i: usize) -> Option<&RouteName> {
        self.deliveries
            .iter()
            .find(|d| d.rcpts.contains(&i))
            .map(|d| &d.route)
            .or_else(|| {
                self.unconfigured
                    .iter()
                    .find(|(_, r)| r.contains(&i))
                    .map(|(r, _)| r)
            })
    }
}

/// The route of one recipient now, or `None` when it has none (see the module doc).
pub fn decide(
    addr: &Address,
    kind: Kind,
    resolve: impl Fn(&Address) -> Resolution,
    config: &Config,
) -> Option<Decision> {
    decide_routed(addr, kind, |a| resolve(a).into(), config).map(|(d, _)| d)
}

/// [`decide`], with the routing address of a listed recipient's mailbox.
fn decide_routed(
    addr: &Address,
    kind: Kind,
    resolve: impl Fn(&Address) -> Resolved,
    config: &Config,
) -> Option<(Decision, Option<Address>)> {
    if kind == Kind::Dsn && !config.server.accepted_domains.contains(addr.domain()) {
        return config.external_route().map(|route| {
            let rule = Rule::External;
            (Decision { route, rule }, None)
        });
    }
    let r = resolve(addr);
    match r.resolution {
        Resolution::Listed(route) => Some((
            Decision {
                route,
                rule: Rule::Listed,
            },
            r.routing_address,
        )),
        Resolution::Unlisted(route) => Some((
            Decision {
                route,
                rule: Rule::Unknown,
            },
            None,
        )),
        Resolution::Reject => None,
    }
}

/// The `RCPT TO` a recipient is sent as on route `rc` (see the module doc).
fn sent_as(rc: &RouteConfig, addr: &Address, routing_address: Option<&Address>) -> Address {
    match (&rc.rewrite_domain, routing_address) {
        (Some(_), Some(ra)) if rc.use_routing_address => ra.clone(),
        (Some(domain), _) => addr.with_domain(domain),
        (None, _) => addr.clone(),
    }
}

/// Groups `rcpts` (index, address) into complete deliveries, one per route, from each
/// recipient's state and mailbox routing address now (`resolve`, in practice
/// `Directory::resolve_routed`) and `config`.
pub fn plan<'a>(
    rcpts: impl IntoIterator<Item = (usize, &'a Address)>,
    kind: Kind,
    resolve: impl Fn(&Address) -> Resolved,
    config: &Config,
) -> Plan {
    type Member<'a> = (usize, &'a Address, Rule, Option<Address>);
    let mut groups: BTreeMap<RouteName, Vec<Member<'a>>> = BTreeMap::new();
    let mut unroutable = Vec::new();
    for (i, addr) in rcpts {
        match decide_routed(addr, kind, &resolve, config) {
            Some((d, ra)) => groups
                .entry(d.route)
                .or_default()
                .push((i, addr, d.rule, ra)),
            None => unroutable.push(i),
        }
    }
    let mut plan = Plan {
        unroutable,
        ..Plan::default()
    };
    for (route, members) in groups {
        let Some(rc) = config.routes.get(route.as_str()) else {
            plan.unconfigured
                .push((route, members.iter().map(|m| m.0).collect()));
            continue;
        };
        let delivery = |members: &[Member<'a>], target: Target| Delivery {
            route: route.clone(),
            rcpts: members.iter().map(|m| m.0).collect(),
            rules: members.iter().map(|m| m.2).collect(),
            to: members
                .iter()
                .map(|m| sent_as(rc, m.1, m.3.as_ref()))
                .collect(),
            target,
            tls: rc.tls,
            tls_name: rc.tls_name.clone(),
            max_rcpts: rc.max_recipients_per_transaction,
            max_message_size: rc.max_message_size,
        };
        if rc.recipient_mx {
            // One delivery per recipient domain, to that domain's MX hosts.
            let mut by_domain: BTreeMap<Domain, Vec<Member<'a>>> = BTreeMap::new();
            for m in members {
                let domain = sent_as(rc, m.1, m.3.as_ref()).domain().clone();
                by_domain.entry(domain).or_default().push(m);
            }
            for (domain, members) in by_domain {
                let target = Target::Mx(domain, rc.port);
                plan.deliveries.push(delivery(&members, target));
            }
            continue;
        }
        let target = match &rc.mx {
            Some(d) => Target::Mx(d.clone(), rc.port),
            None => Target::Hops(rc.next_hops.clone()),
        };
        plan.deliveries.push(delivery(&members, target));
    }
    plan
}

#[cfg(test)]
mod tests;
