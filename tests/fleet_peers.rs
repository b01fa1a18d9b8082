//! A fleet node asking its peers (through the real PostgreSQL's nodes table): a peer on
//! another host's loopback is named, not asked; peers with admin TLS are asked over https,
//! clear ones off loopback are not.
//!
//! Each test works in a schema of its own, dropped afterwards ([`pg::Schema`]).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::fleet::*;
use common::pg::{self, Proxy, Schema};
use common::*;

/// A peer whose admin API listens on a loopback address of another host is never asked at
/// that address (from here it would reach some other process, or nothing): `coexist trace`
/// leaves it out and says why, and the lag check, while PostgreSQL is unreachable, names it
/// in `fleet status` instead of counting it as "not ahead". A peer on this host's loopback
/// is asked as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_on_another_hosts_loopback_is_named_not_asked() {
    let schema = Schema::new("peers").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(
        dir.path(),
        &hops,
        &schema,
        "mx1",
        &pg::url_via(proxy.addr),
        true,
    );
    let a = Node::start(cfg, dir).await;
    let b = node(&hops, &schema, "mx2", &pg::url(), false).await;
    let b_admin = b.relay.admin_addr.unwrap();
    // mx3 runs elsewhere with admin.listen on its own loopback (its row as that node's
    // heartbeat writes it). The address here is a port where nothing listens.
    let elsewhere = DownPort::new();
    schema
        .execute(&format!(
            "INSERT INTO nodes (name, admin, admin_host, applied, version) \
             VALUES ('mx3', '{}', 'another-boot-id/net:[1]', 0, 'test')",
            elsewhere.addr
        ))
        .await;
    eventually_async("mx1 to see mx2 and mx3 with their hosts", || async {
        let st = status(&a).await;
        if st.nodes.len() == 3
            && st
                .nodes
                .iter()
                .all(|n| n.admin.is_some() && n.admin_host.is_some())
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let api = a.api();
    let asked: Vec<_> =
        tokio::task::spawn_blocking(move || coexist::cli::trace::nodes(&api).unwrap())
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.addr)
            .collect();
    assert!(
        asked.contains(&b_admin),
        "mx2 (this host) is asked: {asked:?}"
    );
    assert!(
        !asked.contains(&elsewhere.addr),
        "mx3's loopback address is not asked from another host: {asked:?}"
    );

    proxy.cut();
    let st = eventually_async("mx1's lag check to name mx3", || async {
        let st = status(&a).await;
        if st.peers_not_asked.iter().any(|p| p.starts_with("mx3: ")) {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    assert_eq!(st.peers_not_asked.len(), 1, "mx2 answers: {st:?}");
    assert!(
        st.peers_not_asked[0].contains(&format!(
            "listens on {}, a loopback address of another host",
            elsewhere.addr
        )),
        "{st:?}"
    );
    let text = coexist::cli::fleet::status_text(&st);
    assert!(
        text.contains("cannot ask what they have applied") && text.contains("mx3: "),
        "{text}"
    );
    proxy.restore();
    drop(b);
}

/// Issue 24, item 8: a node whose admin API has TLS is written `https://…` with the name its
/// certificate carries, and its peers ask it over https, checking the certificate; a peer
/// in clear HTTP off loopback is named, never sent the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_with_admin_tls_are_asked_over_https_and_clear_ones_off_loopback_are_not() {
    let schema = Schema::new("peertls").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    // mx2: admin over TLS, with a certificate for its own name from its own CA.
    let b_dir = tempfile::tempdir().unwrap();
    let mut b_cfg = node_config(b_dir.path(), &hops, &schema, "mx2", &pg::url(), false);
    b_cfg.server.hostname = "mx2.coexist.test".into();
    let c = coexist::certs::generate("mx2.coexist.test").unwrap();
    let ca = b_dir.path().join("admin-ca.pem");
    std::fs::write(b_dir.path().join("admin.crt"), &c.cert_pem).unwrap();
    std::fs::write(b_dir.path().join("admin.key"), &c.key_pem).unwrap();
    std::fs::write(&ca, &c.ca_pem).unwrap();
    let a = b_cfg.admin.as_mut().unwrap();
    a.tls_cert = Some(b_dir.path().join("admin.crt"));
    a.tls_key = Some(b_dir.path().join("admin.key"));
    a.tls_ca_file = Some(ca.clone());
    let b = Node::start(b_cfg, b_dir).await;
    let b_admin = b.relay.admin_addr.unwrap();
    // mx1: reaches PostgreSQL through a proxy the test cuts; trusts mx2's CA.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(
        dir.path(),
        &hops,
        &schema,
        "mx1",
        &pg::url_via(proxy.addr),
        true,
    );
    cfg.admin.as_mut().unwrap().tls_ca_file = Some(ca);
    let a = Node::start(cfg, dir).await;
    // mx3: clear HTTP on an address off loopback (TEST-NET: never contacted).
    schema
        .execute(
            "INSERT INTO nodes (name, admin, admin_host, applied, version) \
             VALUES ('mx3', '192.0.2.77:8025', 'another-boot-id/net:[1]', 0, 'test')",
        )
        .await;
    let st = eventually_async("mx1 to see mx2 with its https address", || async {
        let st = status(&a).await;
        match st.nodes.iter().find(|n| n.name == "mx2") {
            Some(n) if n.admin.is_some() && st.nodes.len() == 3 => Ok(st),
            _ => Err(format!("{st:?}")),
        }
    })
    .await;
    let mx2 = st.nodes.iter().find(|n| n.name == "mx2").unwrap();
    assert_eq!(mx2.admin, Some(format!("https://{b_admin}")));
    assert_eq!(mx2.admin_tls_name.as_deref(), Some("mx2.coexist.test"));

    // coexist trace asks mx2 over https, and not mx3.
    let api = a.api();
    let asked = tokio::task::spawn_blocking(move || coexist::cli::trace::nodes(&api).unwrap())
        .await
        .unwrap();
    let to_b = asked.iter().find(|t| t.addr == b_admin).expect("mx2 asked");
    assert_eq!(to_b.tls_name.as_deref(), Some("mx2.coexist.test"));
    assert!(!asked.iter().any(|t| t.addr.port() == 8025), "{asked:?}");

    // PostgreSQL cut off from mx1: its lag check asks mx2 (over https, answered) and names
    // mx3 with why (both in the same pass).
    proxy.cut();
    let st = eventually_async("mx1's lag check to name mx3", || async {
        let st = status(&a).await;
        if st.peers_not_asked.iter().any(|p| p.starts_with("mx3: ")) {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    assert_eq!(st.peers_not_asked.len(), 1, "{:?}", st.peers_not_asked);
    assert!(
        st.peers_not_asked[0]
            .starts_with("mx3: not sending the admin token to http://192.0.2.77:8025"),
        "{:?}",
        st.peers_not_asked
    );
    drop(b);
}
