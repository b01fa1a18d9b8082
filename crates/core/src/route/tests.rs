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
                Verify,
                Some("mail.protection.outlook.com"),
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
                Verify,
                Some("mail.protection.outlook.com"),
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
                Verify,
                Some("mail.protection.outlook.com"),
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
                Verify,
                Some("mail.protection.outlook.com"),
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
    assert_eq!(p.deliveries[1].max_message_size, Some(4096));
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
