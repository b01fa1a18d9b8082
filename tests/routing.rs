//! One routing decision: the queue view shows the route delivery takes (a DSN to an outside
//! sender takes the external route in both), and `route explain` shows the whole delivery
//! (MX, envelope rewrite, TLS policy and name, the DSN route). A mailbox's routing address
//! is where a rewriting route sends mail for any of its aliases. `route explain` also lists
//! every policy decision that applies to an address (size, move grace, loop guard...).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::*;
use std::net::SocketAddr;

/// One JSON request to the admin API with the test token; returns (status, body).
async fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let json = Some("application/json");
    let (code, _, body) = http(addr, method, path, Some(TOKEN), json, body.as_bytes()).await;
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_view_shows_the_external_route_a_dsn_takes() {
    // The cloud route is the external route, and its next hop refuses connections, so the
    // DSN to the outside sender stays queued after its first attempt there. The directory's
    // `unknown` route (onprem) is what an outside address resolves to: the old listing
    // showed it, while delivery took the external route.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let h = harness(|c| {
        c.delivery.external_route = Some("cloud".into());
        c.directory.unknown = "onprem".into();
        c.routes.get_mut("cloud").unwrap().next_hops = vec![closed_addr.into()];
    })
    .await;
    let api_addr = h.relay.admin_addr.unwrap();

    // reject-me is unknown, so it goes on premises, where the sink refuses it with 550:
    // a DSN goes back to the outside sender.
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail(
            "sender@elsewhere.test",
            &["reject-me@nhs.test"],
            &sample("to bounce"),
        )
        .await;
    assert_eq!(r.code, 250, "{}", r.text);

    let dsn = eventually_async("a deferred DSN in the queue", || async {
        let (code, body) = api(api_addr, "GET", "/v1/queue", "").await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let list = v
            .as_array()
            .or_else(|| v["messages"].as_array())
            .cloned()
            .unwrap_or_default();
        list.into_iter().find(|m| {
            m["from"] == "" && m["attempts"].as_u64().unwrap_or(0) >= 1 && m["phase"] == "deferred"
        })
    })
    .await;
    let rcpt = &dsn["recipients"][0];
    assert_eq!(rcpt["address"], "sender@elsewhere.test", "{dsn}");
    // Delivery took the external route: it tried the cloud hop.
    let last = rcpt["last_reply"].as_str().unwrap_or_default();
    assert!(
        last.contains(&closed_addr.to_string()),
        "the attempt went to the cloud hop {closed_addr}: {dsn}"
    );
    // The listing shows that same route.
    assert_eq!(rcpt["route"], "cloud", "{dsn}");
    assert_eq!(
        h.onprem.state.messages().len(),
        0,
        "nothing went on premises"
    );

    // `queue show` (the API's view of one message) agrees.
    let id = dsn["id"].as_str().unwrap();
    let (code, body) = api(api_addr, "GET", &format!("/v1/queue/{id}"), "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["recipients"][0]["route"], "cloud", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_explain_shows_mx_rewrite_tls_and_the_dsn_route() {
    let h = harness(|c| {
        let r = c.routes.get_mut("cloud").unwrap();
        r.next_hops.clear();
        r.mx = Some(
            coexist::types::Domain::parse("tenant-test.mail.protection.outlook.test", false)
                .unwrap(),
        );
        r.port = 2525;
        r.rewrite_domain =
            Some(coexist::types::Domain::parse("tenant.mail.onmicrosoft.test", false).unwrap());
        r.tls = coexist::config::TlsPolicy::Required;
        r.tls_name = Some("mail.protection.outlook.test".into());
        c.delivery.external_route = Some("onprem".into());
    })
    .await;
    let api_addr = h.relay.admin_addr.unwrap();
    let (code, body) = api(
        api_addr,
        "POST",
        "/v1/route/explain",
        r#"{"addresses":["bob@nhs.test","alice@nhs.test","who@elsewhere.test"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();

    let bob = &v[0];
    assert_eq!(bob["route"], "cloud", "{bob}");
    assert_eq!(bob["rule"], "listed", "{bob}");
    assert_eq!(
        bob["mx"], "tenant-test.mail.protection.outlook.test:2525",
        "{bob}"
    );
    assert_eq!(bob["next_hops"], serde_json::json!([]), "{bob}");
    assert_eq!(
        bob["rewritten"], "bob@tenant.mail.onmicrosoft.test",
        "{bob}"
    );
    assert_eq!(bob["tls"], "required", "{bob}");
    assert_eq!(bob["tls_name"], "mail.protection.outlook.test", "{bob}");
    assert_eq!(bob["rcpt"], "accept", "{bob}");

    let alice = &v[1];
    assert_eq!(alice["route"], "onprem", "{alice}");
    assert_eq!(alice["mx"], serde_json::Value::Null, "{alice}");
    assert_eq!(alice["rewritten"], serde_json::Value::Null, "{alice}");
    assert_eq!(
        alice["next_hops"],
        serde_json::json!([h.onprem.addr.to_string()]),
        "{alice}"
    );

    // Mail to an outside address is refused at RCPT, but a DSN to it takes the external route.
    let who = &v[2];
    assert!(
        who["rcpt"].as_str().unwrap().starts_with("550 5.7.1"),
        "{who}"
    );
    assert_eq!(who["dsn_route"], "onprem", "{who}");
}

/// Issue 14, item 3: a mailbox with a routing address gets mail for any of its aliases (here
/// one on a secondary domain, with another local part) at that address on the route that
/// rewrites; a mailbox without one falls back to `rewrite_domain`; the route that does not
/// rewrite sends as received. `route explain` shows the routing address and what is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_to_an_alias_goes_to_the_mailbox_routing_address() {
    let h = harness(|c| {
        std::fs::write(
            c.directory.file.as_ref().unwrap(),
            "address,state,mailbox,routing_address\n\
             john.smith@nhs.test,cloud,jsmith,jsmith@tenant.mail.onmicrosoft.test\n\
             John.Smith@secondary.test,cloud,jsmith,\n\
             bob@nhs.test,cloud,,\n\
             alice@nhs.test,onprem,,alice@tenant.mail.onmicrosoft.test\n",
        )
        .unwrap();
        c.server
            .accepted_domains
            .push(coexist::types::Domain::parse("secondary.test", false).unwrap());
        c.routes.get_mut("cloud").unwrap().rewrite_domain =
            Some(coexist::types::Domain::parse("tenant.mail.onmicrosoft.test", false).unwrap());
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail(
            "x@example.org",
            &[
                "John.Smith@secondary.test",
                "bob@nhs.test",
                "alice@nhs.test",
            ],
            &sample("routing address"),
        )
        .await;
    assert_eq!(r.code, 250, "{}", r.text);
    assert_eq!(wait(&h.cloud, 2).await, 2);
    assert_eq!(wait(&h.onprem, 1).await, 1);
    h.settled().await;
    let rcpts = |sink: &coexist::load::sink::Sink| -> Vec<String> {
        let msgs = sink.state.messages();
        assert_eq!(msgs.len(), 1);
        msgs[0].rcpts.iter().map(|a| a.to_string()).collect()
    };
    assert_eq!(
        rcpts(&h.cloud),
        [
            "jsmith@tenant.mail.onmicrosoft.test",
            "bob@tenant.mail.onmicrosoft.test"
        ],
        "the alias at its mailbox's routing address, bob rewritten"
    );
    assert_eq!(
        rcpts(&h.onprem),
        ["alice@nhs.test"],
        "no rewrite on premises"
    );
    assert_eq!(
        strip_received(&h.cloud.state.messages()[0].body),
        &sample("routing address")[..],
        "headers untouched"
    );

    let (code, body) = api(
        h.relay.admin_addr.unwrap(),
        "POST",
        "/v1/route/explain",
        r#"{"addresses":["John.Smith@secondary.test","bob@nhs.test"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let alias = &v[0];
    assert_eq!(alias["mailbox"], "john.smith@nhs.test", "{alias}");
    assert_eq!(
        alias["routing_address"], "jsmith@tenant.mail.onmicrosoft.test",
        "{alias}"
    );
    assert_eq!(
        alias["rewritten"], "jsmith@tenant.mail.onmicrosoft.test",
        "{alias}"
    );
    let bob = &v[1];
    assert_eq!(bob["routing_address"], serde_json::Value::Null, "{bob}");
    assert_eq!(
        bob["rewritten"], "bob@tenant.mail.onmicrosoft.test",
        "{bob}"
    );
}

/// Issue 25, item 2: `route explain` (the API and the CLI) shows every policy decision that
/// applies to an address, stage by stage, the delivery-time ones (route size, move grace,
/// loop guard) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_explain_shows_every_policy_decision_that_applies() {
    let h = harness(|c| {
        let cloud = c.routes.get_mut("cloud").unwrap();
        cloud.max_message_size = Some(4096);
        cloud.returns_from = vec!["40.92.0.0/15".parse().unwrap()];
    })
    .await;
    let admin = h.relay.admin_addr.unwrap();
    let hostname = h.relay.control.config().server.hostname.clone();
    // dave moves to the cloud by a batch: within the move grace from now on.
    let (code, _, body) = http(
        admin,
        "POST",
        "/v1/directory/batches?source=move.csv",
        Some(TOKEN),
        Some("text/csv"),
        b"address,state\ndave@nhs.test,cloud\n",
    )
    .await;
    assert_eq!(code, 200, "{body}");

    let (code, body) = api(
        admin,
        "POST",
        "/v1/route/explain",
        r#"{"addresses":["dave@nhs.test","alice@nhs.test","who@elsewhere.test"]}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lines = |x: &serde_json::Value| -> Vec<String> {
        x["policy"]
            .as_array()
            .unwrap_or_else(|| panic!("no policy in {x}"))
            .iter()
            .map(|p| format!("{} {}: {}", p["stage"], p["decision"], p["verdict"]).replace('"', ""))
            .collect()
    };
    let dave = lines(&v[0]);
    assert_eq!(
        dave[..5],
        [
            "recipient relay: accept",
            "recipient directory: listed: route cloud",
            "recipient size: SIZE= over 4096 bytes (route cloud): refused 552 5.3.4",
            "message size: over 4096 bytes: refused 552 5.3.4 when no other recipient's route takes it",
            "delivery size: over 4096 bytes: not sent to cloud, fails 552 5.3.4 with a DSN",
        ],
        "{dave:#?}"
    );
    assert!(
        dave[5].starts_with("delivery move grace: 5.1.1, 5.1.10, 5.4.1 from cloud defer until ")
            && dave[5].contains("(moved by batch 1 at "),
        "{dave:#?}"
    );
    assert_eq!(
        dave[6],
        format!(
            "delivery loop guard: mail that passed through {hostname} and comes back from \
             127.0.0.1, 40.92.0.0/15, or an address its deliveries reached is not sent to \
             cloud again: fails 554 5.4.6"
        ),
        "{dave:#?}"
    );
    assert_eq!(dave.len(), 7, "{dave:#?}");
    // alice stays on premises: no size limit there, the loop guard of onprem.
    let alice = lines(&v[1]);
    assert!(
        alice.contains(&"delivery size: no limit on route onprem".to_string()),
        "{alice:#?}"
    );
    assert!(
        alice[alice.len() - 1].ends_with("is not sent to onprem again: fails 554 5.4.6"),
        "{alice:#?}"
    );
    // Mail the relay restrictions refuse meets nothing else.
    assert_eq!(
        lines(&v[2]),
        ["recipient relay: refused: 550 5.7.1 Relay access denied"]
    );

    // The CLI prints the same decisions, one line each.
    let mut cfg = (*h.relay.control.config()).clone();
    cfg.admin.as_mut().unwrap().listen = admin;
    let path = h.dir.path().join("cli.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        bin::cli(&path, &["route", "explain", "dave@nhs.test"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    for want in [
        "\n  dsn     cloud\n  policy  recipient  relay       accept\n",
        "\n          recipient  directory   listed: route cloud\n",
        "\n          recipient  size        SIZE= over 4096 bytes (route cloud): refused 552 5.3.4\n",
        "\n          message    size        over 4096 bytes: refused 552 5.3.4 when no other",
        "\n          delivery   size        over 4096 bytes: not sent to cloud, fails 552 5.3.4 with a DSN\n",
        "\n          delivery   move grace  5.1.1, 5.1.10, 5.4.1 from cloud defer until ",
        "\n          delivery   loop guard  mail that passed through ",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
}
