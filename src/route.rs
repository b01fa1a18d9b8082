//! Route planning: the one pure function from (recipients, directory view, config) to
//! complete deliveries. No I/O, so it is cheap to test and to explain.
//!
//! Every caller that needs to know where a recipient goes asks this module:
//! - delivery (`queue::attempt`) sends each [`Delivery`] of [`plan`] as it is;
//! - `queue list/show` and the queue API show the route of [`plan`] for pending recipients;
//! - `route explain` shows [`admit`] (the RCPT verdict) and the [`Delivery`] of [`plan`];
//! - the RCPT check (`relay`) calls [`admit`].
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
use crate::policy::Policy;
use crate::proto::reply::{canned, Reply};
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

impl Delivery {
    /// True when a message of `size` bytes is larger than this route takes.
    pub fn too_big(&self, size: u64) -> bool {
        self.max_message_size.is_some_and(|m| size > m)
    }
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

/// The RCPT-time check: the relay policy (our domains, no source routes), then the
/// directory. `Ok` carries the route the recipient would take now; `Err` the reply a
/// sender gets.
pub fn admit(
    policy: &Policy,
    addr: &Address,
    resolve: impl Fn(&Address) -> Resolution,
) -> Result<Decision, Reply> {
    policy.check_recipient(addr)?;
    match resolve(addr) {
        Resolution::Listed(route) => Ok(Decision {
            route,
            rule: Rule::Listed,
        }),
        Resolution::Unlisted(route) => Ok(Decision {
            route,
            rule: Rule::Unknown,
        }),
        Resolution::Reject => Err(canned::UNKNOWN_USER),
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
mod tests {
    use super::*;

    use crate::config::DEFAULT_CONFIG as CONFIG;

    fn addr(s: &str) -> Address {
        Address::parse(s, false).unwrap()
    }

    fn route(s: &str) -> RouteName {
        RouteName(s.into())
    }

    /// The directory of the table: `a*` cloud, `o*` onprem, `x*` unlisted.
    fn resolve(unknown: Option<&'static str>) -> impl Fn(&Address) -> Resolution {
        move |a: &Address| match a.local().as_bytes()[0] {
            b'a' => Resolution::Listed(route("cloud")),
            b'o' => Resolution::Listed(route("onprem")),
            _ => match unknown {
                Some(u) => Resolution::Unlisted(route(u)),
                None => Resolution::Reject,
            },
        }
    }

    /// `resolve` with no routing addresses, as `plan` takes it.
    fn routed(r: impl Fn(&Address) -> Resolution) -> impl Fn(&Address) -> Resolved {
        move |a: &Address| r(a).into()
    }

    fn config(tweak: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::parse(CONFIG, "test").unwrap();
        tweak(&mut c);
        c
    }

    /// One row of the table: what one recipient of a message of `kind` plans to.
    struct Case {
        name: &'static str,
        tweak: fn(&mut Config),
        unknown: Option<&'static str>,
        kind: Kind,
        rcpt: &'static str,
        /// (route, rule, RCPT TO as sent, target as displayed, tls, tls_name), or `None`:
        /// unroutable.
        want: Option<Want>,
    }

    /// (route, rule, RCPT TO as sent, target as displayed, tls, tls_name).
    type Want = (
        &'static str,
        Rule,
        &'static str,
        &'static str,
        TlsPolicy,
        Option<&'static str>,
    );

    fn nothing(_: &mut Config) {}

    fn cloud_mx(c: &mut Config) {
        let r = c.routes.get_mut("cloud").unwrap();
        r.next_hops.clear();
        r.mx = Some(Domain::parse("tenant-test.mail.protection.outlook.com", false).unwrap());
        r.rewrite_domain = Some(Domain::parse("tenant.mail.onmicrosoft.com", false).unwrap());
        r.tls = TlsPolicy::Verify;
        r.tls_name = Some("mail.protection.outlook.com".into());
    }

    fn external_cloud(c: &mut Config) {
        c.delivery.external_route = Some("cloud".into());
    }

    fn no_external(c: &mut Config) {
        c.delivery.external_route = None;
    }

    #[test]
    fn table() {
        use Kind::*;
        use Rule::*;
        use TlsPolicy::{Opportunistic, Verify};
        let cases = [
            Case {
                name: "listed cloud",
                tweak: nothing,
                unknown: Some("onprem"),
                kind: Relayed,
                rcpt: "a@nhs.test",
                want: Some((
                    "cloud",
                    Listed,
                    "a@nhs.test",
                    "127.0.0.1:2602",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "listed onprem",
                tweak: nothing,
                unknown: Some("onprem"),
                kind: Relayed,
                rcpt: "o@nhs.test",
                want: Some((
                    "onprem",
                    Listed,
                    "o@nhs.test",
                    "127.0.0.1:2601",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "unlisted to unknown route",
                tweak: nothing,
                unknown: Some("onprem"),
                kind: Relayed,
                rcpt: "x@nhs.test",
                want: Some((
                    "onprem",
                    Unknown,
                    "x@nhs.test",
                    "127.0.0.1:2601",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "unlisted, unknown = reject",
                tweak: nothing,
                unknown: None,
                kind: Relayed,
                rcpt: "x@nhs.test",
                want: None,
            },
            Case {
                name: "MX route with rewrite and verify",
                tweak: cloud_mx,
                unknown: Some("onprem"),
                kind: Relayed,
                rcpt: "a@nhs.test",
                want: Some((
                    "cloud",
                    Listed,
                    "a@tenant.mail.onmicrosoft.com",
                    "mx tenant-test.mail.protection.outlook.com:25",
                    Verify,
                    Some("mail.protection.outlook.com"),
                )),
            },
            Case {
                name: "DSN to an outside sender: external route",
                tweak: external_cloud,
                unknown: Some("onprem"),
                kind: Dsn,
                rcpt: "x@elsewhere.test",
                want: Some((
                    "cloud",
                    External,
                    "x@elsewhere.test",
                    "127.0.0.1:2602",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "DSN to an outside sender, rewrite applies on the route",
                tweak: |c| {
                    external_cloud(c);
                    cloud_mx(c)
                },
                unknown: Some("onprem"),
                kind: Dsn,
                rcpt: "x@elsewhere.test",
                want: Some((
                    "cloud",
                    External,
                    "x@tenant.mail.onmicrosoft.com",
                    "mx tenant-test.mail.protection.outlook.com:25",
                    Verify,
                    Some("mail.protection.outlook.com"),
                )),
            },
            Case {
                name: "DSN to one of ours follows the directory",
                tweak: external_cloud,
                unknown: Some("onprem"),
                kind: Dsn,
                rcpt: "o@nhs.test",
                want: Some((
                    "onprem",
                    Listed,
                    "o@nhs.test",
                    "127.0.0.1:2601",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "relayed mail to an outside address: not the external rule",
                tweak: external_cloud,
                unknown: Some("onprem"),
                kind: Relayed,
                rcpt: "x@elsewhere.test",
                want: Some((
                    "onprem",
                    Unknown,
                    "x@elsewhere.test",
                    "127.0.0.1:2601",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "DSN outside, no external_route: the unknown route",
                tweak: |c| {
                    no_external(c);
                    c.directory.unknown = "cloud".into()
                },
                unknown: Some("cloud"),
                kind: Dsn,
                rcpt: "x@elsewhere.test",
                want: Some((
                    "cloud",
                    External,
                    "x@elsewhere.test",
                    "127.0.0.1:2602",
                    Opportunistic,
                    None,
                )),
            },
            Case {
                name: "DSN outside, no external_route, unknown = reject: the first route",
                tweak: |c| {
                    no_external(c);
                    c.directory.unknown = "reject".into()
                },
                unknown: None,
                kind: Dsn,
                rcpt: "x@elsewhere.test",
                want: Some((
                    "cloud",
                    External,
                    "x@elsewhere.test",
                    "127.0.0.1:2602",
                    Opportunistic,
                    None,
                )),
            },
        ];
        for case in cases {
            let cfg = config(case.tweak);
            let a = addr(case.rcpt);
            let p = plan([(0, &a)], case.kind, routed(resolve(case.unknown)), &cfg);
            match case.want {
                None => {
                    assert!(p.deliveries.is_empty(), "{}: {p:?}", case.name);
                    assert_eq!(p.unroutable, vec![0], "{}", case.name);
                }
                Some((r, rule, to, target, tls, tls_name)) => {
                    assert!(p.unroutable.is_empty(), "{}: {p:?}", case.name);
                    let [d] = &p.deliveries[..] else {
                        panic!("{}: {p:?}", case.name)
                    };
                    let got = (
                        d.route.as_str(),
                        d.rules[0],
                        d.to[0].to_string(),
                        d.target.to_string(),
                        d.tls,
                        d.tls_name.as_deref(),
                    );
                    assert_eq!(
                        got,
                        (r, rule, to.to_string(), target.to_string(), tls, tls_name),
                        "{}",
                        case.name
                    );
                    assert_eq!(p.route_of(0), Some(&d.route), "{}", case.name);
                }
            }
        }
    }

    #[test]
    fn splits_by_route_keeps_order_and_reports_unconfigured_routes() {
        let cfg = config(nothing);
        let addrs: Vec<Address> = [
            "a1@nhs.test",
            "o1@nhs.test",
            "a2@nhs.test",
            "x@nhs.test",
            "z@nhs.test",
        ]
        .iter()
        .map(|s| addr(s))
        .collect();
        let resolve = |a: &Address| match a.local() {
            "z" => Resolution::Listed(route("archive")),
            _ => resolve(None)(a),
        };
        let p = plan(
            addrs.iter().enumerate(),
            Kind::Relayed,
            routed(resolve),
            &cfg,
        );
        let got: Vec<(&str, &[usize])> = p
            .deliveries
            .iter()
            .map(|d| (d.route.as_str(), &d.rcpts[..]))
            .collect();
        assert_eq!(got, vec![("cloud", &[0, 2][..]), ("onprem", &[1][..])]);
        assert_eq!(p.unroutable, vec![3]);
        assert_eq!(p.unconfigured, vec![(route("archive"), vec![4])]);
        assert_eq!(p.route_of(4), Some(&route("archive")));
        assert_eq!(p.route_of(3), None);
    }

    #[test]
    fn a_recipient_mx_route_has_one_delivery_per_recipient_domain() {
        let cfg = config(|c| {
            let r = c.routes.get_mut("onprem").unwrap();
            r.next_hops = Vec::new();
            r.recipient_mx = true;
            r.port = 2525;
            r.max_message_size = Some(4096);
        });
        let addrs: Vec<Address> = ["x@b.example", "y@a.example", "z@b.example", "a1@nhs.test"]
            .iter()
            .map(|s| addr(s))
            .collect();
        // DSNs to outside senders take the external route (here the unknown route, onprem).
        let p = plan(
            addrs.iter().enumerate(),
            Kind::Dsn,
            routed(resolve(Some("onprem"))),
            &cfg,
        );
        let got: Vec<(String, Vec<usize>)> = p
            .deliveries
            .iter()
            .map(|d| {
                (
                    format!("{} {}", d.route.as_str(), d.target),
                    d.rcpts.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("cloud 127.0.0.1:2602".to_string(), vec![3]),
                ("onprem mx a.example:2525".to_string(), vec![1]),
                ("onprem mx b.example:2525".to_string(), vec![0, 2]),
            ]
        );
        assert!(p.deliveries[1].too_big(4097) && !p.deliveries[1].too_big(4096));
    }

    /// The directory of the routing-address tests: the mailbox of `jsmith@nhs.test` (aliases
    /// `john.smith@nhs.test` and `John.Smith@other.test`, a secondary domain) is in the cloud
    /// with the routing address `jsmith@tenant.mail.onmicrosoft.com`; `a*` are cloud
    /// mailboxes without one; `o*` on premises with one; the rest unlisted (to onprem).
    fn resolve_routed(a: &Address) -> Resolved {
        let listed = |route: &str, ra: Option<&str>| Resolved {
            resolution: Resolution::Listed(RouteName(route.into())),
            routing_address: ra.map(addr),
        };
        match a.key().as_str() {
            "jsmith@nhs.test" | "john.smith@nhs.test" | "john.smith@other.test" => {
                listed("cloud", Some("jsmith@tenant.mail.onmicrosoft.com"))
            }
            k if k.starts_with('a') => listed("cloud", None),
            k if k.starts_with('o') => listed("onprem", Some("o@tenant.mail.onmicrosoft.com")),
            _ => Resolution::Unlisted(route("onprem")).into(),
        }
    }

    /// The `RCPT TO` each recipient is sent as, by route.
    fn sent(cfg: &Config, kind: Kind, rcpts: &[&str]) -> Vec<(String, Vec<String>)> {
        let addrs: Vec<Address> = rcpts.iter().map(|s| addr(s)).collect();
        let p = plan(addrs.iter().enumerate(), kind, resolve_routed, cfg);
        p.deliveries
            .iter()
            .map(|d| {
                let to = d.to.iter().map(Address::to_string).collect();
                (d.route.as_str().to_string(), to)
            })
            .collect()
    }

    #[test]
    fn a_rewriting_route_sends_to_the_mailbox_routing_address() {
        let owned = |v: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
            v.iter()
                .map(|(r, to)| (r.to_string(), to.iter().map(|t| t.to_string()).collect()))
                .collect()
        };
        let rcpts = [
            "John.Smith@other.test",
            "john.smith@nhs.test",
            "jsmith@nhs.test",
            "Ann@nhs.test",
            "o@nhs.test",
            "x@nhs.test",
        ];
        // The cloud route rewrites: the mailbox's routing address for every alias of it
        // (whatever its domain or local part), the rewrite for a mailbox without one. The
        // onprem route does not rewrite: its routing address is not used; nor is there one
        // for an unlisted address.
        let cfg = config(cloud_mx);
        let ra = "jsmith@tenant.mail.onmicrosoft.com";
        assert_eq!(
            sent(&cfg, Kind::Relayed, &rcpts),
            owned(&[
                ("cloud", &[ra, ra, ra, "Ann@tenant.mail.onmicrosoft.com"]),
                ("onprem", &["o@nhs.test", "x@nhs.test"]),
            ])
        );
        // `use_routing_address = false`: every recipient is rewritten, as before.
        let cfg = config(|c| {
            cloud_mx(c);
            c.routes.get_mut("cloud").unwrap().use_routing_address = false;
        });
        assert_eq!(
            sent(&cfg, Kind::Relayed, &rcpts[..4]),
            owned(&[(
                "cloud",
                &[
                    "John.Smith@tenant.mail.onmicrosoft.com",
                    "john.smith@tenant.mail.onmicrosoft.com",
                    "jsmith@tenant.mail.onmicrosoft.com",
                    "Ann@tenant.mail.onmicrosoft.com"
                ]
            )])
        );
        // No rewrite on the cloud route: every recipient as received.
        let cfg = config(nothing);
        assert_eq!(
            sent(&cfg, Kind::Relayed, &rcpts[..2]),
            owned(&[("cloud", &["John.Smith@other.test", "john.smith@nhs.test"])])
        );
        // A rewriting route on premises uses the routing address of its mailboxes too (the
        // option is per route); unlisted addresses are rewritten.
        let cfg = config(|c| {
            c.routes.get_mut("onprem").unwrap().rewrite_domain =
                Some(Domain::parse("onprem.nhs.test", false).unwrap());
        });
        assert_eq!(
            sent(&cfg, Kind::Relayed, &rcpts[4..]),
            owned(&[(
                "onprem",
                &["o@tenant.mail.onmicrosoft.com", "x@onprem.nhs.test"]
            )])
        );
        // A DSN to an address outside our domains takes the external route without looking
        // at the directory: no routing address (other.test is not an accepted domain here).
        let cfg = config(|c| {
            external_cloud(c);
            cloud_mx(c);
        });
        assert_eq!(
            sent(&cfg, Kind::Dsn, &["John.Smith@other.test"]),
            owned(&[("cloud", &["John.Smith@tenant.mail.onmicrosoft.com"])])
        );
        assert_eq!(
            sent(&cfg, Kind::Dsn, &["john.smith@nhs.test"]),
            owned(&[("cloud", &[ra])]),
            "a DSN to one of ours follows its mailbox"
        );
    }

    #[test]
    fn admit_checks_policy_then_directory() {
        let cfg = config(nothing);
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
}
