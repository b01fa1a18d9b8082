//! A fleet of MX nodes sharing one directory through the real PostgreSQL (issue 13): three
//! nodes in one test, a batch through one seen on the others, a stopped node catching up,
//! PostgreSQL cut off behind a proxy while mail keeps flowing, and recovery.
//!
//! Each test works in a schema of its own, dropped afterwards ([`pg::Schema`]).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::fleet::*;
use common::pg::{self, Proxy, Schema};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_through_one_node_is_seen_on_every_node() {
    let schema = Schema::new("seen").await;
    let hops = hops().await;
    let url = pg::url();
    let a = node(&hops, &schema, "mx1", &url, true).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    let c = node(&hops, &schema, "mx3", &url, false).await;

    // mx1 seeded the fleet with its file; the others started from PostgreSQL, before
    // listening, so the state is there at once.
    for n in [&a, &b, &c] {
        assert_eq!(
            n.route_of("alice@nhs.test"),
            (Some("onprem".into()), "base 1".into())
        );
        assert_eq!(n.route_of("bob@nhs.test").0.as_deref(), Some("cloud"));
    }
    eventually_async("three live nodes in the nodes table", || async {
        let st = status(&b).await;
        let live = st.nodes.iter().filter(|n| n.alive).count();
        if live == 3 {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;

    let reply = send_one(a.relay.local_addrs[0], &["alice@nhs.test"], "before-batch").await;
    assert_eq!(reply.code, 250, "{reply:?}");
    wait(&hops.onprem, 1).await;

    let r = apply(&a, "EmailAddress\nalice@nhs.test\nzed@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(
        (r.report.id, r.report.changed, r.report.not_found_count),
        (Some(2), 1, 1)
    );
    let p = r.fleet.expect("fleet progress");
    assert_eq!((p.seq, p.live), (2, 3));
    assert!(p.applied >= 1, "{p:?}");
    assert_eq!(
        a.route_of("alice@nhs.test"),
        (Some("cloud".into()), "batch 2".into())
    );
    for n in [&b, &c] {
        eventually("the batch on every node", || {
            n.route_of("alice@nhs.test") == (Some("cloud".into()), "batch 2".into())
        })
        .await;
    }
    // Mail through another node follows the batch.
    let reply = send_one(c.relay.local_addrs[0], &["alice@nhs.test"], "after-batch").await;
    assert_eq!(reply.code, 250, "{reply:?}");
    wait(&hops.cloud, 1).await;

    // `coexist trace` through mx2 asks every node: mx1 sent alice's first message on
    // premises (the base decided), mx3 the second to the cloud (batch 2 decided).
    eventually_blocking("both deliveries in the trace", || {
        let (ok, out, err) = bin::cli(&b.cli_config(), &["trace", "alice@nhs.test"]);
        assert!(ok, "{err}");
        let first = out.lines().any(|l| {
            l.contains(" mx1 ")
                && l.contains("delivered")
                && l.contains("route=onprem")
                && l.contains("origin=\"base 1\"")
        });
        let second = out.lines().any(|l| {
            l.contains(" mx3 ")
                && l.contains("delivered")
                && l.contains("route=cloud")
                && l.contains("origin=\"batch 2\"")
        });
        if first && second {
            Ok(())
        } else {
            Err(out)
        }
    });

    // fleet status through any node: every node with its lag, once each has reported.
    eventually_async("every node at change 2 in fleet status", || async {
        let st = status(&c).await;
        let all = st.nodes.len() == 3
            && st
                .nodes
                .iter()
                .all(|n| n.applied == 2 && n.lag_changes == 0 && n.alive);
        if all && st.head == 2 && st.postgres.up {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;

    // The CLI: a rollback through mx2 says how many nodes have it.
    let (ok, out, err) = bin::cli(&b.cli_config(), &["directory", "rollback", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("fleet change 3: applied on"), "{out}");
    for n in [&a, &b, &c] {
        eventually("the rollback on every node", || {
            n.route_of("alice@nhs.test") == (Some("onprem".into()), "base 1".into())
        })
        .await;
    }
    let (ok, out, err) = bin::cli(&c.cli_config(), &["fleet", "status"]);
    assert!(ok, "{err}");
    for name in ["mx1", "mx2", "mx3"] {
        assert!(out.contains(name), "{out}");
    }

    // A change whose notification is lost (here: written with no NOTIFY at all) is still
    // applied everywhere: nodes poll the log by sequence.
    schema
        .execute(
            "INSERT INTO changes (seq, kind, node, source, rows, changed, body) \
             VALUES (4, 'apply', 'sql', 'silent.csv', 1, 1, convert_to(E'dave@nhs.test\\tcloud\\n', 'UTF8'))",
        )
        .await;
    for n in [&a, &b, &c] {
        eventually("the silent change on every node", || {
            n.route_of("dave@nhs.test") == (Some("cloud".into()), "batch 4".into())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_catches_up_when_it_starts_again() {
    let schema = Schema::new("restart").await;
    let hops = hops().await;
    let url = pg::url();
    let a = node(&hops, &schema, "mx1", &url, true).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    assert_eq!(b.route_of("dave@nhs.test").0.as_deref(), Some("onprem"));

    // mx2 stops; meanwhile a batch and a new base go through mx1.
    let Node { relay, dir, cfg } = b;
    drop(relay);
    eventually_async("mx2 to be seen as stopped", || async {
        let st = status(&a).await;
        let stopped = st.nodes.iter().any(|n| n.name == "mx2" && !n.alive);
        if stopped {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    apply(&a, "EmailAddress\ndave@nhs.test\n", "cloud")
        .await
        .unwrap();
    let newer = a.dir.path().join("newer.csv");
    std::fs::write(
        &newer,
        format!("{DIRECTORY}erin@nhs.test,cloud\n")
            .replace("carol@nhs.test,cloud", "carol@nhs.test,onprem"),
    )
    .unwrap();
    let (ok, out, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", newer.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("imported as base 3:"), "{out}");
    assert!(out.contains("changed 1, added 1, removed 0"), "{out}");
    assert!(
        out.contains("applied on 1 of 1 live nodes so far; silent (they apply it when back): mx2"),
        "{out}"
    );
    // The batch survives the base (the file did not change dave's row); carol's row changed.
    assert_eq!(
        a.route_of("dave@nhs.test"),
        (Some("cloud".into()), "batch 2".into())
    );
    assert_eq!(
        a.route_of("carol@nhs.test"),
        (Some("onprem".into()), "base 3".into())
    );

    // mx2 starts again from its own snapshot and catches up before it listens.
    let b = Node::start(cfg, dir).await;
    assert_eq!(b.relay.directory.applied(), 3);
    assert_eq!(
        b.route_of("dave@nhs.test"),
        (Some("cloud".into()), "batch 2".into())
    );
    assert_eq!(
        b.route_of("carol@nhs.test"),
        (Some("onprem".into()), "base 3".into())
    );
    assert_eq!(b.route_of("erin@nhs.test").0.as_deref(), Some("cloud"));

    // Batch 2 came before base 3, and mx2 never applied it (it jumped to base 3): it is
    // rolled back all the same, from mx2, with the undo entries the fleet kept with it
    // (issue 23 item 6c). Dave goes back on both nodes; carol, decided by base 3, stays.
    let rb = {
        let api = b.api();
        tokio::task::spawn_blocking(move || api.directory_rollback(2).unwrap())
            .await
            .unwrap()
    };
    assert_eq!(
        (rb.report.id, rb.report.changed, rb.report.changed_since),
        (Some(4), 1, 0),
        "{rb:?}"
    );
    for n in [&a, &b] {
        eventually("dave back on every node", || {
            n.route_of("dave@nhs.test") == (Some("onprem".into()), "base 1".into())
        })
        .await;
        assert_eq!(
            n.route_of("carol@nhs.test"),
            (Some("onprem".into()), "base 3".into())
        );
    }

    // A bad import is refused with file and line; nothing changes.
    let bad = a.dir.path().join("bad.csv");
    std::fs::write(&bad, "address,state\nx@nhs.test,mars\n").unwrap();
    let (ok, _, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", bad.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("bad.csv:2: unknown state \"mars\""), "{err}");
    // One that drops most addresses is refused by the shrink guard.
    let small = a.dir.path().join("small.csv");
    std::fs::write(&small, "address,state\nalice@nhs.test,onprem\n").unwrap();
    let (ok, _, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", small.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("more than directory.max_shrink"), "{err}");
    assert_eq!(a.relay.directory.applied(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cut_off_mail_flows_batches_refused_lagging_node_drains_then_recovers() {
    let schema = Schema::new("cut").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(
        dir.path(),
        &hops,
        &schema,
        "mx1",
        &pg::url_via(proxy.addr),
        true,
    );
    cfg.fleet.as_mut().unwrap().max_lag = Duration::from_secs(2);
    let a = Node::start(cfg, dir).await;
    let b = node(&hops, &schema, "mx2", &pg::url(), false).await;
    // mx1 knows its peer and the peer's admin API (from the nodes table) before the cut:
    // a node's row shows its admin address from its first heartbeat after the API listens.
    eventually_async("mx1 to see mx2 and its admin API", || async {
        let st = status(&a).await;
        if st.nodes.len() == 2 && st.nodes.iter().all(|n| n.admin.is_some()) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;

    proxy.cut();
    ready_when(&a, "mx1 to notice PostgreSQL is gone", |r| {
        r.fleet_postgres_up == Some(false)
    })
    .await;
    // Mail keeps flowing on the state in force.
    let reply = send_one(a.relay.local_addrs[0], &["alice@nhs.test"], "cut-1").await;
    assert_eq!(reply.code, 250, "{reply:?}");
    wait(&hops.onprem, 1).await;
    // A batch through mx1 is refused, naming PostgreSQL, with a non-zero exit.
    let batch = a.dir.path().join("b.csv");
    std::fs::write(&batch, "EmailAddress\nalice@nhs.test\n").unwrap();
    let (ok, _, err) = bin::cli(
        &a.cli_config(),
        &[
            "directory",
            "apply",
            batch.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("503") && err.contains("PostgreSQL is unreachable"),
        "{err}"
    );
    let st = status(&a).await;
    assert!(!st.postgres.up && st.postgres.error.is_some(), "{st:?}");
    // fleet status still answers, with this node's view and the error.
    assert_eq!(st.node, "mx1");

    // The same batch through mx2, which reaches PostgreSQL: mx1 is now behind. It learns so
    // from mx2's admin API and, after max_lag (2 s), drains.
    let r = apply(&b, "EmailAddress\nalice@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    ready_when(&a, "mx1 to drain for lag", |r| r.fleet_behind && !r.ready).await;
    let mut c = tokio::net::TcpStream::connect(a.relay.local_addrs[0])
        .await
        .unwrap();
    let mut banner = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(&mut c)
        .read_line(&mut banner)
        .await
        .unwrap();
    assert!(banner.starts_with("421 4.3.2 "), "{banner}");
    assert!(banner.contains("behind the fleet"), "{banner}");
    assert_eq!(a.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));

    // PostgreSQL is back: mx1 catches up and leaves drain.
    proxy.restore();
    ready_when(&a, "mx1 to catch up and take mail again", |r| {
        r.ready && r.fleet_postgres_up == Some(true)
    })
    .await;
    assert_eq!(
        a.route_of("alice@nhs.test"),
        (Some("cloud".into()), "batch 2".into())
    );
    let reply = send_one(a.relay.local_addrs[0], &["alice@nhs.test"], "back").await;
    assert_eq!(reply.code, 250, "{reply:?}");
    wait(&hops.cloud, 1).await;
    let m = {
        let api = a.api();
        tokio::task::spawn_blocking(move || api.get("/metrics").unwrap())
            .await
            .unwrap()
    };
    let text = m.as_str().unwrap_or_default().to_string();
    assert!(text.contains("coexist_fleet_postgres_up 1"), "{text}");
    assert!(text.contains("coexist_fleet_behind 0"), "{text}");
}

/// Routing addresses travel with a base: in a schema made before them (its `base_rows`
/// without the column) the first node adds the column at start and writes the base with
/// them; a node that has no file and loads the base from PostgreSQL sends mail for an alias
/// to its mailbox's routing address, and the rewrite for a mailbox without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_carries_routing_addresses_to_every_node() {
    let schema = Schema::new("routing").await;
    schema
        .execute(&format!(
            r#"CREATE SCHEMA "{0}";
               CREATE TABLE "{0}".base_rows (seq bigint NOT NULL, address text NOT NULL,
                   mailbox text NOT NULL, state text NOT NULL, file_state text NOT NULL,
                   origin bigint NOT NULL);"#,
            schema.name
        ))
        .await;
    let hops = hops().await;
    let url = pg::url();
    let start = |name: &'static str, file: Option<&'static str>| {
        let (hops, schema, url) = (&hops, &schema, &url);
        async move {
            let dir = tempfile::tempdir().unwrap();
            if let Some(text) = file {
                std::fs::write(dir.path().join("directory.csv"), text).unwrap();
            }
            let mut cfg = node_config(dir.path(), hops, schema, name, url, file.is_some());
            cfg.routes.get_mut("cloud").unwrap().rewrite_domain =
                Some(coexist::types::Domain::parse("tenant.mail.onmicrosoft.test", false).unwrap());
            Node::start(cfg, dir).await
        }
    };
    let a = start(
        "mx1",
        Some(
            "address,state,mailbox,routing_address\n\
             john.smith@nhs.test,cloud,js,jsmith@tenant.mail.onmicrosoft.test\n\
             js@nhs.test,cloud,js,\n\
             bob@nhs.test,cloud,,\n",
        ),
    )
    .await;
    let b = start("mx2", None).await;
    for n in [&a, &b] {
        let l = n
            .relay
            .directory
            .lookup(&coexist::types::Address::parse("js@nhs.test", false).unwrap());
        assert_eq!(
            (l.origin.as_str(), l.routing_address.as_deref()),
            ("base 1", Some("jsmith@tenant.mail.onmicrosoft.test"))
        );
    }
    let reply = send_one(
        b.relay.local_addrs[0],
        &["js@nhs.test", "bob@nhs.test"],
        "routing",
    )
    .await;
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(wait(&hops.cloud, 2).await, 2);
    let got: Vec<String> = hops.cloud.state.messages()[0]
        .rcpts
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        got,
        [
            "jsmith@tenant.mail.onmicrosoft.test",
            "bob@tenant.mail.onmicrosoft.test"
        ]
    );
}

/// A node of a new fleet with no base yet (no directory file, nothing imported, as a fleet
/// whose LDAP leader has not committed its first sync) knows no mailbox: it defers every
/// recipient with `451 4.4.3` and says so in readiness, never refusing a mailbox with
/// `550 5.1.1` (found by the weekend run of issue 28: nodes listening before the first
/// base refused valid mailboxes). The first base ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_a_base_defers_recipients_instead_of_refusing_them() {
    let schema = Schema::new("no_base").await;
    let hops = hops().await;
    let a = node(&hops, &schema, "mx1", &pg::url(), false).await;
    let mut c = connect(a.relay.local_addrs[0]).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<alice@nhs.test>").await;
    assert_eq!((r.code, r.status()), (451, "4.4.3"), "{r:?}");
    assert!(!ready(&a).await.directory_source_up);

    let api = a.api();
    tokio::task::spawn_blocking(move || {
        api.directory_import(b"address,state\nalice@nhs.test,cloud\n", "first.csv", false)
    })
    .await
    .unwrap()
    .unwrap();
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@nhs.test>").await;
    assert_eq!((r.code, r.status()), (550, "5.1.1"), "{r:?}");
    assert!(ready(&a).await.directory_source_up);
}
