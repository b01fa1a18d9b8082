//! MX routes resolved through a DNS server on loopback: preference order with failover,
//! the implicit MX, a null MX that fails the recipient with a DSN, and MX hosts on loopback
//! or private addresses refused unless `delivery.allow_private_destinations`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::dns::{self, Rec};
use common::*;

/// Two recording sinks on the same port of two loopback addresses (127.0.0.2 and 127.0.0.1),
/// since an MX route has one port for all its hosts.
async fn sinks_on_one_port() -> (Sink, Sink) {
    for _ in 0..20 {
        let a = Sink::start("127.0.0.2:0".parse().unwrap(), SinkOptions::default())
            .await
            .expect("127.0.0.2 is loopback on Linux");
        let same_port = std::net::SocketAddr::new([127, 0, 0, 1].into(), a.addr.port());
        if let Ok(b) = Sink::start(same_port, SinkOptions::default()).await {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn mx_route(c: &mut coexist::config::Config, ns: std::net::SocketAddr, port: u16, domain: &str) {
    c.dns.nameservers = vec![ns];
    // The MX hosts here are sinks on loopback addresses.
    c.delivery.allow_private_destinations = true;
    let route = c.routes.get_mut("cloud").unwrap();
    route.port = port;
    route.next_hops = Vec::new();
    route.mx = Some(coexist::types::Domain::parse(domain, false).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_route_follows_preference_and_fails_over() {
    // Both MX hosts of tenant.test listen and record; the less preferred one is listed first
    // in the DNS answer, so neither answer order nor a reversed sort picks the right one.
    let (preferred, other) = sinks_on_one_port().await;
    let port = preferred.addr.port();
    let ns = dns::start(vec![
        ("tenant.test", Rec::Mx(20, "mx2.tenant.test".into())),
        ("tenant.test", Rec::Mx(10, "mx1.tenant.test".into())),
        ("mx1.tenant.test", Rec::A("127.0.0.2".parse().unwrap())),
        ("mx2.tenant.test", Rec::A("127.0.0.1".parse().unwrap())),
        // failover.test: the preferred host (127.0.0.3) has no listener on the port.
        ("failover.test", Rec::Mx(20, "mx2.failover.test".into())),
        ("failover.test", Rec::Mx(10, "mx1.failover.test".into())),
        ("mx1.failover.test", Rec::A("127.0.0.3".parse().unwrap())),
        ("mx2.failover.test", Rec::A("127.0.0.1".parse().unwrap())),
        // nomx.test: no MX record, so the domain's own address is used (implicit MX,
        // RFC 5321 5.1).
        ("nomx.test", Rec::A("127.0.0.1".parse().unwrap())),
    ])
    .await;

    let h = harness(|c| mx_route(c, ns, port, "tenant.test")).await;
    for i in 0..3 {
        let subject = format!("preference{i}");
        assert_eq!(
            send_one(h.addr, &["bob@nhs.test"], &subject).await.code,
            250
        );
    }
    assert_eq!(
        wait(&preferred, 3).await,
        3,
        "mail goes to the preferred MX"
    );
    assert!(
        other.state.messages().is_empty(),
        "the less preferred MX got mail while the preferred one was up"
    );
    drop(h);

    for (domain, n) in [("failover.test", 1), ("nomx.test", 2)] {
        let h = harness(|c| mx_route(c, ns, port, domain)).await;
        assert_eq!(send_one(h.addr, &["bob@nhs.test"], domain).await.code, 250);
        assert_eq!(wait(&other, n).await, n, "{domain}");
        assert_eq!(preferred.state.messages().len(), 3, "{domain}");
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
    let dsn = eventually("a DSN", || {
        h.onprem
            .state
            .messages()
            .into_iter()
            .find(|m| m.from.is_none())
    })
    .await;
    let text = String::from_utf8_lossy(&dsn.body);
    assert!(
        text.contains("Status: 5.1.10") && text.contains("null MX"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internet_route_delivers_each_dsn_to_its_senders_own_mx() {
    // Two outside senders' domains, each with its MX host on its own loopback address.
    let (a, b) = sinks_on_one_port().await;
    let port = a.addr.port();
    let ns = dns::start(vec![
        ("example.org", Rec::Mx(10, "mx.example.org".into())),
        ("mx.example.org", Rec::A("127.0.0.2".parse().unwrap())),
        ("example.net", Rec::Mx(10, "mx.example.net".into())),
        ("mx.example.net", Rec::A("127.0.0.1".parse().unwrap())),
    ])
    .await;
    let h = harness(|c| {
        c.dns.nameservers = vec![ns];
        // The MX hosts here are sinks on loopback addresses.
        c.delivery.allow_private_destinations = true;
        let mut internet = c.routes["onprem"].clone();
        internet.next_hops = Vec::new();
        internet.recipient_mx = true;
        internet.port = port;
        c.routes.insert("internet".into(), internet);
        c.delivery.external_route = Some("internet".into());
        unknown_onprem(c);
    })
    .await;
    // Unknown, so sent on premises, and refused there (`reject…`): each sender gets a DSN
    // at its own MX.
    for sender in ["x@example.org", "y@example.net"] {
        let mut c = connect(h.addr).await;
        c.expect("EHLO client.test", 250).await;
        c.expect(&format!("MAIL FROM:<{sender}>"), 250).await;
        c.expect("RCPT TO:<reject-me@nhs.test>", 250).await;
        c.expect("DATA", 354).await;
        let mut body = Vec::new();
        coexist::deliver::dot_stuff(&sample("to bounce"), &mut body);
        c.send(&body).await;
        assert_eq!(c.reply().await.code, 250);
    }
    assert_eq!(wait(&a, 1).await, 1);
    assert_eq!(wait(&b, 1).await, 1);
    h.settled().await;
    let rcpt = |s: &Sink| s.state.messages()[0].rcpts[0].to_string();
    assert_eq!(rcpt(&a), "x@example.org", "127.0.0.2 is example.org's MX");
    assert_eq!(rcpt(&b), "y@example.net", "127.0.0.1 is example.net's MX");
    assert!(a.state.messages()[0].from.is_none(), "a DSN, from <>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_host_on_a_private_address_is_refused_unless_allowed() {
    let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let ns = dns::start(vec![
        ("inward.test", Rec::Mx(10, "mx.inward.test".into())),
        ("mx.inward.test", Rec::A(std::net::Ipv4Addr::LOCALHOST)),
    ])
    .await;
    let h = harness(|c| {
        mx_route(c, ns, sink.addr.port(), "inward.test");
        c.delivery.allow_private_destinations = false;
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "inward").await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = queue_id(&r);
    let entry = h.deferred(&id).await;
    let reply = entry.state.rcpts[0]
        .last_reply
        .as_ref()
        .map(|l| l.to_string());
    assert_eq!(
        reply.as_deref(),
        Some(
            "451 4.4.1 MX host mx.inward.test resolves to loopback address 127.0.0.1; \
             delivery.allow_private_destinations is off"
        )
    );
    assert!(sink.state.messages().is_empty(), "connected to loopback");

    // A lab allows it (the setting follows a reload): the next attempt delivers.
    let mut cfg = (*h.relay.control.config()).clone();
    cfg.delivery.allow_private_destinations = true;
    h.relay.control.set_delivery_config(cfg).unwrap();
    h.relay.queue.flush(&id).unwrap();
    assert_eq!(wait(&sink, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internet_route_refuses_a_recipient_domain_whose_mx_is_this_machine() {
    // A recipient domain whose MX points at this machine (127.0.0.3: nothing listens, and
    // should the check ever fail, no traffic leaves loopback; `destination`'s unit tests
    // cover the private ranges).
    let ns = dns::start(vec![
        ("nhs.test", Rec::Mx(10, "mx.nhs.test".into())),
        ("mx.nhs.test", Rec::A("127.0.0.3".parse().unwrap())),
    ])
    .await;
    let h = harness(|c| {
        c.dns.nameservers = vec![ns];
        let route = c.routes.get_mut("cloud").unwrap();
        route.next_hops = Vec::new();
        route.recipient_mx = true;
    })
    .await;
    let r = send_one(h.addr, &["bob@nhs.test"], "inward").await;
    assert_eq!(r.code, 250, "{r:?}");
    let entry = h.deferred(&queue_id(&r)).await;
    let reply = entry.state.rcpts[0]
        .last_reply
        .as_ref()
        .map(|l| l.to_string());
    assert_eq!(
        reply.as_deref(),
        Some(
            "451 4.4.1 MX host mx.nhs.test resolves to loopback address 127.0.0.3; \
             delivery.allow_private_destinations is off"
        )
    );
}
