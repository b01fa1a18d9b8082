//! MX routes resolved through a DNS server on loopback: preference order with failover,
//! the implicit MX, and a null MX that fails the recipient with a DSN.

mod common;

use common::dns::{self, Rec};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_route_follows_preference_and_fails_over() {
    let ns = dns::start(vec![
        ("tenant.test", Rec::Mx(20, "mx2.tenant.test".into())),
        ("tenant.test", Rec::Mx(10, "mx1.tenant.test".into())),
        // The preferred host has no server listening: delivery falls back to mx2.
        ("mx1.tenant.test", Rec::A("127.0.0.2".parse().unwrap())),
        ("mx2.tenant.test", Rec::A("127.0.0.1".parse().unwrap())),
        ("nomx.test", Rec::A("127.0.0.1".parse().unwrap())),
    ])
    .await;
    // tenant.test: MX by preference; nomx.test: no MX record, so the domain's own address
    // is used (implicit MX, RFC 5321 5.1).
    for domain in ["tenant.test", "nomx.test"] {
        let h = harness(|c| {
            c.dns.nameservers = vec![ns];
            let route = c.routes.get_mut("cloud").unwrap();
            route.port = route.next_hops[0].port;
            route.next_hops = Vec::new();
            route.mx = Some(coexist::types::Domain::parse(domain, false).unwrap());
        })
        .await;
        assert_eq!(send_one(h.addr, &["bob@nhs.test"], domain).await.code, 250);
        assert_eq!(wait(&h.cloud, 1).await, 1, "{domain}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_fails_the_recipient_with_a_dsn() {
    let ns = dns::start(vec![("nullmx.test", Rec::Mx(0, ".".into()))]).await;
    let h = harness(|c| {
        c.dns.nameservers = vec![ns];
        let r = c.routes.get_mut("cloud").unwrap();
        r.next_hops = Vec::new();
        r.mx = Some(coexist::types::Domain::parse("nullmx.test", false).unwrap());
    })
    .await;
    assert_eq!(
        send_one(h.addr, &["bob@nhs.test"], "nullmx").await.code,
        250
    );
    // The DSN goes to the sender through the external route (on premises).
    let t0 = std::time::Instant::now();
    loop {
        let msgs = h.onprem.state.messages();
        if let Some(d) = msgs.iter().find(|m| m.from.is_none()) {
            let text = String::from_utf8_lossy(&d.body);
            assert!(
                text.contains("Status: 5.1.10") && text.contains("null MX"),
                "{text}"
            );
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no DSN");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
