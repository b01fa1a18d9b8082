//! A fleet of MX nodes sharing one directory through the real PostgreSQL (issue 13): three
//! nodes in one test, a batch through one seen on the others, a stopped node catching up,
//! PostgreSQL cut off behind a proxy while mail keeps flowing, and recovery.
//!
//! Each test works in a schema of its own, dropped afterwards ([`pg::Schema`]).

mod common;

use coexist::admin::client::{AdminClient, BatchUpload};
use coexist::admin::types::{BatchReply, FleetStatus, Ready};
use coexist::config::{Config, FleetConfig};
use coexist::load::sink::{Sink, SinkOptions};
use coexist::relay::{self, Running};
use common::pg::{self, Proxy, Schema};
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Two sinks every node of a test delivers to.
struct Hops {
    onprem: Sink,
    cloud: Sink,
}

async fn hops() -> Hops {
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Hops {
        onprem: Sink::start(lo, SinkOptions::default()).await.unwrap(),
        cloud: Sink::start(lo, SinkOptions::default()).await.unwrap(),
    }
}

/// The config of node `name` in `schema`, its files under `dir`; PostgreSQL at `postgres`.
/// Only a node given `seed` has `directory.file` (the first node seeds the fleet with it).
fn node_config(
    dir: &Path,
    hops: &Hops,
    schema: &Schema,
    name: &str,
    postgres: &str,
    seed: bool,
) -> Config {
    let certs = write_certs(dir);
    let mut cfg = test_config(dir, &certs, hops.onprem.addr, hops.cloud.addr);
    if !seed {
        cfg.directory.file = None;
    }
    cfg.fleet = Some(FleetConfig {
        postgres: postgres.to_string(),
        schema: schema.name.clone(),
        node: name.to_string(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(120),
    });
    cfg
}

/// A started node and its folder.
struct Node {
    relay: Running,
    dir: tempfile::TempDir,
    cfg: Config,
}

impl Node {
    async fn start(cfg: Config, dir: tempfile::TempDir) -> Node {
        let relay = relay::start(cfg.clone()).await.unwrap();
        Node { relay, dir, cfg }
    }

    fn api(&self) -> AdminClient {
        AdminClient::new(self.relay.admin_addr.unwrap(), TOKEN.to_string())
    }

    fn route_of(&self, address: &str) -> (Option<String>, String) {
        let l = self
            .relay
            .directory
            .lookup(&coexist::types::Address::parse(address, true).unwrap());
        (l.state, l.origin)
    }

    /// The config file a CLI would use to talk to this node.
    fn cli_config(&self) -> std::path::PathBuf {
        let mut c = self.cfg.clone();
        c.admin.as_mut().unwrap().listen = self.relay.admin_addr.unwrap();
        let path = self.dir.path().join("cli.toml");
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        path
    }
}

async fn node(hops: &Hops, schema: &Schema, name: &str, postgres: &str, seed: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), hops, schema, name, postgres, seed);
    Node::start(cfg, dir).await
}

async fn apply(n: &Node, csv: &str, state: &str) -> Result<BatchReply, String> {
    let api = n.api();
    let (csv, state) = (csv.to_string(), state.to_string());
    tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: csv.as_bytes(),
            source: "batch.csv",
            state: Some(&state),
            dry_run: false,
            at: None,
            format: Default::default(),
        })
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

async fn status(n: &Node) -> FleetStatus {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.fleet_status().unwrap())
        .await
        .unwrap()
}

async fn ready(n: &Node) -> Ready {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.ready().unwrap())
        .await
        .unwrap()
}

/// Waits until node `n`'s readiness (`GET /v1/ready`) satisfies `ok`, for `what`.
async fn ready_when(n: &Node, what: &str, ok: impl Fn(&Ready) -> bool) {
    eventually_async(what, || async {
        let r = ready(n).await;
        if ok(&r) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
}

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

/// Schedules `csv` on `n` for `at` (RFC 3339).
async fn schedule(n: &Node, csv: &str, at: String) -> Result<BatchReply, String> {
    let api = n.api();
    let csv = csv.to_string();
    tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: csv.as_bytes(),
            source: "weekend.csv",
            state: Some("cloud"),
            dry_run: false,
            at: Some(&at),
            format: Default::default(),
        })
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

async fn scheduled_on(n: &Node) -> Vec<coexist::admin::types::Scheduled> {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.directory_scheduled().unwrap())
        .await
        .unwrap()
}

/// Issue 23 item 4: a batch scheduled on one node lives in PostgreSQL. The node that took
/// it stops; another lists it, cancels a second one, and applies the first at its time,
/// once, through the fleet log; the first node, back, has it as a change and applies
/// nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_scheduled_on_a_stopped_node_is_applied_once_by_another() {
    use coexist::admin::types::ScheduledStatus;
    let schema = Schema::new("sched").await;
    let hops = hops().await;
    let url = pg::url();
    let a = node(&hops, &schema, "mx1", &url, true).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let first = schedule(&a, "EmailAddress\ndave@nhs.test\n", in_an_hour.clone())
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");
    let second = schedule(&a, "EmailAddress\nalice@nhs.test\n", in_an_hour)
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");
    assert_eq!(first.status, ScheduledStatus::Pending);
    assert_eq!(first.node.as_deref(), Some("mx1"));

    // mx1 stops. mx2 sees both batches and cancels the second.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    let l = scheduled_on(&b).await;
    assert_eq!(
        l.iter().map(|s| (s.id, &s.status)).collect::<Vec<_>>(),
        vec![
            (first.id, &ScheduledStatus::Pending),
            (second.id, &ScheduledStatus::Pending)
        ],
        "{l:?}"
    );
    let (ok, out, err) = bin::cli(
        &b.cli_config(),
        &["directory", "cancel", &second.id.to_string()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("cancelled:"), "{out}");
    let (ok, out, err) = bin::cli(&b.cli_config(), &["directory", "scheduled"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("weekend.csv (on mx1)  pending") && out.contains("  cancelled at "),
        "{out}"
    );

    // The first batch's time comes (moved to now in PostgreSQL, rather than waiting an
    // hour): mx2 applies it.
    schema
        .execute(&format!(
            "UPDATE scheduled SET at = clock_timestamp() WHERE id = {}",
            first.id
        ))
        .await;
    eventually("dave moved by mx2", || {
        b.route_of("dave@nhs.test").0.as_deref() == Some("cloud")
    })
    .await;
    let l = eventually_async("the batch recorded as applied", || async {
        let l = scheduled_on(&b).await;
        match &l[0].status {
            ScheduledStatus::Applied {
                change: Some(c), ..
            } => Ok((l.clone(), *c)),
            _ => Err(format!("{l:?}")),
        }
    })
    .await;
    let (l, change) = l;
    assert!(
        matches!(l[1].status, ScheduledStatus::Cancelled { .. }),
        "{l:?}"
    );
    assert_eq!(
        b.route_of("dave@nhs.test"),
        (Some("cloud".into()), format!("batch {change}"))
    );
    assert_eq!(b.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));
    let committed = schema
        .value(
            "SELECT string_agg(seq || ' ' || node, ',') FROM changes WHERE source = 'weekend.csv'",
        )
        .await;
    assert_eq!(
        committed,
        Some(format!("{change} mx2")),
        "one change, by mx2"
    );

    // mx1 comes back: it has the change, and applies nothing again.
    let a = Node::start(cfg, dir).await;
    assert_eq!(
        a.route_of("dave@nhs.test"),
        (Some("cloud".into()), format!("batch {change}"))
    );
    let l = scheduled_on(&a).await;
    assert!(
        matches!(l[0].status, ScheduledStatus::Applied { change: Some(c), .. } if c == change),
        "{l:?}"
    );
    // A cancel of a batch no longer pending is refused, from any node.
    let (ok, _, err) = bin::cli(
        &a.cli_config(),
        &["directory", "cancel", &first.id.to_string()],
    );
    assert!(!ok);
    assert!(err.contains("is not pending (applied)"), "{err}");
    let history = a.relay.directory.history_snapshot();
    assert_eq!(
        history.iter().filter(|c| c.source == "weekend.csv").count(),
        1,
        "{history:?}"
    );
}

/// Issue 23 item 4: batches a node kept on its own disk (scheduled before it joined the
/// fleet, or by a version that kept them there) move to the fleet's schedule, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_own_scheduled_batches_move_to_the_fleet() {
    use coexist::admin::types::ScheduledStatus;
    use coexist::directory::scheduled::{parse_at, ScheduleStore};
    let schema = Schema::new("adopt").await;
    let hops = hops().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &hops, &schema, "mx1", &pg::url(), true);
    let local_dir = cfg.directory.store_dir.join("scheduled");
    let at = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    ScheduleStore::open(&local_dir)
        .unwrap()
        .add(
            b"EmailAddress\ncarol@nhs.test\n",
            "old.csv",
            Some("onprem"),
            "auto",
            parse_at(&at).unwrap(),
        )
        .unwrap();
    let a = Node::start(cfg, dir).await;
    let l = eventually_async("the node's own batch in the fleet's schedule", || async {
        let l = scheduled_on(&a).await;
        if l.len() == 1 {
            Ok(l)
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await;
    assert_eq!(
        (l[0].source.as_str(), &l[0].status, l[0].at.as_str()),
        ("old.csv", &ScheduledStatus::Pending, at.as_str())
    );
    let local = ScheduleStore::open(&local_dir).unwrap().list().unwrap();
    assert!(
        matches!(local[0].status, ScheduledStatus::Moved { to, .. } if to == l[0].id),
        "{local:?}"
    );
    // Moved once: a restart does not move it again.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    let a = Node::start(cfg, dir).await;
    let l = scheduled_on(&a).await;
    assert_eq!(l.len(), 1, "{l:?}");
}

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
    let asked = tokio::task::spawn_blocking(move || coexist::cli::trace::nodes(&api).unwrap())
        .await
        .unwrap();
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

/// The first line a new SMTP session gets (`421 4.3.2 ...` while a node drains).
async fn banner(n: &Node) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut c = tokio::net::TcpStream::connect(n.relay.local_addrs[0])
        .await
        .unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(&mut c)
        .read_line(&mut line)
        .await
        .unwrap();
    line
}

/// `node_config` with a short `fleet.max_lag`.
async fn quick_node(hops: &Hops, schema: &Schema, name: &str, postgres: &str, seed: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), hops, schema, name, postgres, seed);
    cfg.fleet.as_mut().unwrap().max_lag = Duration::from_secs(1);
    Node::start(cfg, dir).await
}

async fn metrics(n: &Node) -> String {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.get("/metrics").unwrap())
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every node that takes mail routes `address` alike: the routes of the ready ones.
async fn routes_of_ready(nodes: &[&Node], address: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for n in nodes {
        if ready(n).await.ready {
            out.push((
                n.cfg.fleet.as_ref().unwrap().node.clone(),
                n.route_of(address).0,
            ));
        }
    }
    out
}

/// DESIGN invariant 10, issue 23 item 1: a failover to a standby that missed the last change
/// leaves a log whose head is below what the nodes applied. No batch is committed under the
/// lost number as if it were new (every node would skip it as "applied"): commits are
/// refused naming both sides, the nodes count as behind and drain, and show why. A fresh
/// node follows PostgreSQL's log; when it commits a change under the lost number, the old
/// nodes see a different change there (its id), never take it for theirs. At no moment do
/// two nodes that take mail route a recipient differently. A base import through a node
/// repairs the fleet: every node takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_that_moved_back_is_refused_and_drains_never_followed_silently() {
    let schema = Schema::new("moved").await;
    let hops = hops().await;
    let url = pg::url();
    let a = quick_node(&hops, &schema, "mx1", &url, true).await;
    let b = quick_node(&hops, &schema, "mx2", &url, false).await;
    let r = apply(&a, "EmailAddress\nalice@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    eventually("batch 2 on mx2", || {
        b.route_of("alice@nhs.test") == (Some("cloud".into()), "batch 2".into())
    })
    .await;

    // The failover: PostgreSQL's log no longer has change 2.
    schema.execute("DELETE FROM changes WHERE seq = 2").await;
    let e = apply(&a, "EmailAddress\nbob@nhs.test\n", "onprem")
        .await
        .unwrap_err();
    assert!(
        e.contains("ends at change 1, below change 2 (id ") && e.contains("refused"),
        "{e}"
    );
    for n in [&a, &b] {
        let r = eventually_async("the node to drain for the log that moved back", || async {
            let r = ready(n).await;
            if !r.ready && r.fleet_behind && r.fleet_log_mismatch.is_some() {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        })
        .await;
        assert!(
            r.fleet_log_mismatch.unwrap().contains("the log moved back"),
            "readiness names the mismatch"
        );
        assert!(banner(n).await.starts_with("421 4.3.2 "));
        let st = status(n).await;
        assert!(st.behind, "{st:?}");
        assert!(
            st.log_mismatch
                .as_deref()
                .unwrap_or("")
                .contains("change 2"),
            "{st:?}"
        );
        assert!(metrics(n).await.contains("coexist_fleet_log_mismatch 1"));
    }
    assert_eq!(b.route_of("bob@nhs.test").0.as_deref(), Some("cloud"));
    let (ok, out, err) = bin::cli(&a.cli_config(), &["fleet", "status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("BEHIND, draining")
            && out.contains("LOG MISMATCH (directory changes refused): PostgreSQL's change log ends at change 1"),
        "{out}"
    );

    // A fresh node follows PostgreSQL's log: base 1, alice on premises, and takes mail.
    let c = quick_node(&hops, &schema, "mx3", &url, false).await;
    assert_eq!(
        c.route_of("alice@nhs.test"),
        (Some("onprem".into()), "base 1".into())
    );
    assert!(ready(&c).await.ready);
    // It commits a change under the lost number: the old nodes see another change 2.
    let r = apply(&c, "EmailAddress\ncarol@nhs.test\n", "onprem")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    for n in [&a, &b] {
        eventually_async(
            "the old nodes to name PostgreSQL's other change 2",
            || async {
                let m = status(n).await.log_mismatch.unwrap_or_default();
                if m.contains("holds change 2 (id ")
                    && m.contains("where this node applied change 2 (id ")
                {
                    Ok(())
                } else {
                    Err(m)
                }
            },
        )
        .await;
        assert_eq!(n.route_of("carol@nhs.test").0.as_deref(), Some("cloud"));
        assert!(!ready(n).await.ready);
    }
    for address in ["alice@nhs.test", "carol@nhs.test"] {
        let routes = routes_of_ready(&[&a, &b, &c], address).await;
        assert_eq!(routes.len(), 1, "{address}: {routes:?}");
    }

    // The repair: mx1's directory file imported as a new base, through mx1 (its batch 2 is
    // kept: the file did not change alice's row). Every node takes it and takes mail again.
    let file = a.cfg.directory.file.clone().unwrap();
    let (ok, out, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("imported as base 3:"), "{out}");
    for n in [&a, &b, &c] {
        ready_when(n, "every node on base 3 and ready", |r| {
            r.ready && r.fleet_log_mismatch.is_none() && n.relay.directory.applied() == 3
        })
        .await;
        assert_eq!(
            n.route_of("alice@nhs.test"),
            (Some("cloud".into()), "batch 2".into())
        );
        assert_eq!(n.route_of("carol@nhs.test").0.as_deref(), Some("cloud"));
    }
    let r = apply(&b, "EmailAddress\nbob@nhs.test\n", "onprem")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(4));
    assert!(metrics(&a).await.contains("coexist_fleet_log_mismatch 0"));

    // Review item 2: rolling back batch 2 through mx1 undoes PostgreSQL's batch 2 (mx3's,
    // carol), not the batch mx1 logged under that number before the log moved back
    // (alice): alice stays in the cloud on every node.
    let api = a.api();
    let r = tokio::task::spawn_blocking(move || api.directory_rollback(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.report.id, Some(5));
    for n in [&a, &b, &c] {
        eventually("the rollback applied", || n.relay.directory.applied() == 5).await;
        assert_eq!(
            n.route_of("alice@nhs.test"),
            (Some("cloud".into()), "batch 2".into())
        );
    }
}

/// Review item 1: an automatic base is no repair. The log moved back (a truncated
/// `changes`); a node that applied changes and starts with `directory.file` does not seed
/// the empty log with it (which would make its state the fleet's truth and hide the lost
/// batch from every node): the log stays empty, the mismatch stays shown on both nodes.
/// Nor do they take a later automatic base (a fresh node's seed, an LDAP sync's) over the
/// history the log lost; the admin's import is still the repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_emptied_log_is_not_seeded_by_a_node_that_applied_changes() {
    let schema = Schema::new("reseed").await;
    let hops = hops().await;
    let url = pg::url();
    let a = quick_node(&hops, &schema, "mx1", &url, true).await;
    let b = quick_node(&hops, &schema, "mx2", &url, false).await;
    let r = apply(&a, "EmailAddress\nalice@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    eventually("batch 2 on mx2", || {
        b.route_of("alice@nhs.test") == (Some("cloud".into()), "batch 2".into())
    })
    .await;

    // mx1 stops; the change log is emptied meanwhile; mx1 starts again with its file.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    schema.execute("DELETE FROM changes").await;
    let a = Node::start(cfg, dir).await;
    assert_eq!(
        schema
            .value("SELECT count(*) FROM changes")
            .await
            .as_deref(),
        Some("0"),
        "an automatic base was committed over the emptied log"
    );
    let st = status(&a).await;
    assert!(
        st.log_mismatch
            .as_deref()
            .unwrap_or("")
            .contains("below change 2 (id "),
        "{st:?}"
    );
    assert_eq!(
        a.route_of("alice@nhs.test"),
        (Some("cloud".into()), "batch 2".into())
    );
    for n in [&a, &b] {
        ready_when(n, "the mismatch shown and the node drained", |r| {
            !r.ready && r.fleet_log_mismatch.is_some()
        })
        .await;
    }
    let e = apply(&a, "EmailAddress\nbob@nhs.test\n", "cloud")
        .await
        .unwrap_err();
    assert!(e.contains("refused"), "{e}");

    // A fresh node seeds the emptied log (it applied nothing: no history to hide). Then an
    // automatic base above what mx1 and mx2 applied (written as the LDAP leader writes
    // one: not a repair): neither takes it for the fleet's truth, both still name the
    // mismatch.
    let c = quick_node(&hops, &schema, "mx3", &url, true).await;
    assert_eq!(c.relay.directory.applied(), 1);
    schema
        .execute(
            "INSERT INTO base_rows (seq, address, mailbox, state, file_state, origin, routing_address)
               SELECT 3, address, mailbox, state, file_state, origin, routing_address FROM base_rows WHERE seq = 1;
             INSERT INTO changes (seq, kind, node, source, rows, changed, repair)
               VALUES (3, 'base', 'mx3', 'ldap usn 9', (SELECT count(*) FROM base_rows WHERE seq = 3), 0, false)",
        )
        .await;
    eventually("mx3 on the automatic base", || {
        c.relay.directory.applied() == 3
    })
    .await;
    for n in [&a, &b] {
        eventually_async("the mismatch named against the new head", || async {
            let m = status(n).await.log_mismatch.unwrap_or_default();
            if m.contains("has no change 2 although its head is 3") {
                Ok(())
            } else {
                Err(m)
            }
        })
        .await;
        assert_eq!(n.relay.directory.applied(), 2);
        assert_eq!(
            n.route_of("alice@nhs.test"),
            (Some("cloud".into()), "batch 2".into())
        );
    }

    // The admin's import repairs: above every applied change, taken by all.
    let file = a.cfg.directory.file.clone().unwrap();
    let (ok, out, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("imported as base 4:"), "{out}");
    for n in [&a, &b, &c] {
        ready_when(n, "every node on base 4 and ready", |r| {
            r.ready && r.fleet_log_mismatch.is_none() && n.relay.directory.applied() == 4
        })
        .await;
    }
}

/// Issue 23 item 2: a node restarted while PostgreSQL is down starts on its store and, when
/// PostgreSQL is back, recognises its fleet by the store's `fleet.id` marker and follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_while_postgres_is_down_follows_when_it_is_back() {
    let schema = Schema::new("downstart").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let a = node(&hops, &schema, "mx1", &pg::url(), true).await;
    let b = node(&hops, &schema, "mx2", &pg::url_via(proxy.addr), false).await;
    assert_eq!(b.relay.directory.applied(), 1);
    let Node { relay, dir, cfg } = b;
    drop(relay);
    proxy.cut();
    let b = Node::start(cfg, dir).await;
    assert_eq!(ready(&b).await.fleet_postgres_up, Some(false));
    assert_eq!(b.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));

    let r = apply(&a, "EmailAddress\nalice@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    proxy.restore();
    eventually_async("mx2 to follow the fleet again", || async {
        let r = ready(&b).await;
        let route = b.route_of("alice@nhs.test");
        if r.ready
            && r.fleet_postgres_up == Some(true)
            && route == (Some("cloud".into()), "batch 2".into())
        {
            Ok(())
        } else {
            Err(format!("{r:?} {route:?}"))
        }
    })
    .await;
}

/// Issue 23 item 3: a backup's lock on the base table while a node reconnects. The node
/// cannot read the new base; it does not wait forever routing on the old directory: after
/// `max_lag` it drains, and when the lock is gone it loads the base and takes mail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_base_table_drains_the_node_instead_of_routing_stale() {
    let schema = Schema::new("locked").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let a = node(&hops, &schema, "mx1", &pg::url(), true).await;
    let b = quick_node(&hops, &schema, "mx2", &pg::url_via(proxy.addr), false).await;
    assert_eq!(b.relay.directory.applied(), 1);
    ready_when(&b, "mx2 connected", |r| {
        r.ready && r.fleet_postgres_up == Some(true)
    })
    .await;

    // mx2's PostgreSQL stops answering; meanwhile a new base goes through mx1.
    proxy.stall();
    let newer = a.dir.path().join("newer.csv");
    std::fs::write(
        &newer,
        DIRECTORY.replace("alice@nhs.test,onprem", "alice@nhs.test,cloud"),
    )
    .unwrap();
    let (ok, out, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", newer.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("imported as base 2:"), "{out}");
    // A backup takes the base table; then mx2's connection answers again.
    let (locker, conn) = tokio_postgres::connect(&pg::url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute(&format!(
            r#"BEGIN; LOCK TABLE "{}".base_rows IN ACCESS EXCLUSIVE MODE"#,
            schema.name
        ))
        .await
        .unwrap();
    proxy.resume();
    let r = eventually_async("mx2 to drain", || async {
        let r = ready(&b).await;
        if !r.ready && r.fleet_behind {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert!(r.fleet_log_mismatch.is_none(), "{r:?}");
    assert!(banner(&b).await.starts_with("421 4.3.2 "));

    locker.batch_execute("COMMIT").await.unwrap();
    eventually_async("mx2 to load base 2 and take mail", || async {
        let r = ready(&b).await;
        let route = b.route_of("alice@nhs.test");
        if r.ready && route == (Some("cloud".into()), "base 2".into()) {
            Ok(())
        } else {
            Err(format!("{r:?} {route:?}"))
        }
    })
    .await;
}

/// Issue 23 item 5: a base whose rows are gone is an error, never an empty directory: a
/// fresh node installs nothing and drains, and takes the next good base.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_without_its_rows_is_never_installed() {
    let schema = Schema::new("norows").await;
    let hops = hops().await;
    let url = pg::url();
    let a = node(&hops, &schema, "mx1", &url, true).await;
    schema.execute("DELETE FROM base_rows WHERE seq = 1").await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    assert_eq!(b.relay.directory.applied(), 0);
    assert_eq!(b.relay.directory.len(), 0);
    let r = ready(&b).await;
    assert!(!r.ready && r.fleet_behind, "{r:?}");
    assert!(banner(&b).await.starts_with("421 4.3.2 "));
    let why = status(&b).await.behind_why.unwrap_or_default();
    assert!(
        why.contains("base 1: the change log says 4 rows, base_rows holds 0"),
        "{why}"
    );

    let file = a.cfg.directory.file.clone().unwrap();
    let (ok, out, err) = bin::cli(
        &a.cli_config(),
        &["directory", "import", file.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("imported as base 2:"), "{out}");
    ready_when(&b, "mx2 on base 2 and ready", |r| {
        r.ready && b.route_of("alice@nhs.test").0.as_deref() == Some("onprem")
    })
    .await;
}

/// Issue 23 item 2, the other side: while a node was down with PostgreSQL out of reach, its
/// fleet's schema was made again (a new fleet id). When PostgreSQL is back the node sees its
/// store belongs to another fleet and replaces it with the new fleet's base, even though it
/// had applied more changes than the new fleet has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_a_fleet_made_again_replaces_its_store_when_postgres_is_back() {
    let schema = Schema::new("remade").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let a = node(&hops, &schema, "mx1", &pg::url(), true).await;
    let b = node(&hops, &schema, "mx2", &pg::url_via(proxy.addr), false).await;
    for s in ["cloud", "onprem", "cloud"] {
        apply(&a, "EmailAddress\nalice@nhs.test\n", s)
            .await
            .unwrap();
    }
    eventually("mx2 at change 4", || b.relay.directory.applied() == 4).await;
    let Node { relay, dir, cfg } = b;
    drop(relay);
    proxy.cut();
    let b = Node::start(cfg, dir).await;
    assert_eq!(b.relay.directory.applied(), 4);
    drop(a);
    schema
        .execute(&format!(r#"DROP SCHEMA "{}" CASCADE"#, schema.name))
        .await;
    let c = node(&hops, &schema, "mx3", &pg::url(), true).await;
    assert_eq!(c.relay.directory.applied(), 1);
    proxy.restore();
    eventually_async("mx2 on the new fleet's base", || async {
        let r = ready(&b).await;
        let route = b.route_of("alice@nhs.test");
        if r.ready
            && b.relay.directory.applied() == 1
            && route == (Some("onprem".into()), "base 1".into())
        {
            Ok(())
        } else {
            Err(format!("{r:?} {route:?}"))
        }
    })
    .await;
    let r = apply(&c, "EmailAddress\nbob@nhs.test\n", "onprem")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    eventually("mx2 follows the new fleet", || {
        b.route_of("bob@nhs.test") == (Some("onprem".into()), "batch 2".into())
    })
    .await;
    // The store's marker names the new fleet.
    let marker = b.cfg.directory.store_dir.join("fleet").join("fleet.id");
    let (pgc, conn) = tokio_postgres::connect(&pg::url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let id: String = pgc
        .query_one(
            &format!(
                r#"SELECT value FROM "{}".meta WHERE key = 'fleet_id'"#,
                schema.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), id);
}

/// Issue 23 item 3: a heartbeat that fails (the nodes table locked past `lock_timeout`)
/// says nothing about the node's directory: a caught-up node keeps taking mail, although
/// `max_lag` is short. Seen through PostgreSQL: the node's heartbeat waits on the lock and
/// gives up, twice, and the node is still ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_heartbeat_does_not_drain_a_node_that_is_caught_up() {
    let schema = Schema::new("beat").await;
    let hops = hops().await;
    let url = pg::url();
    let b = quick_node(&hops, &schema, "mx2", &url, true).await;
    assert!(ready(&b).await.ready);
    let (pgc, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute(&format!(
            r#"BEGIN; LOCK TABLE "{}".nodes IN ACCESS EXCLUSIVE MODE"#,
            schema.name
        ))
        .await
        .unwrap();
    let waiting = || async {
        let n: i64 = pgc
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.application_name = 'coexist mx2'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    for round in 0..2 {
        eventually_async("mx2's heartbeat waiting on the lock", || async {
            match waiting().await {
                0 => Err(format!("round {round}: not waiting")),
                _ => Ok(()),
            }
        })
        .await;
        eventually_async("mx2's heartbeat to give up", || async {
            match waiting().await {
                0 => Ok(()),
                n => Err(format!("round {round}: {n} waiting")),
            }
        })
        .await;
    }
    let r = ready(&b).await;
    assert!(r.ready && !r.fleet_behind, "{r:?}");
    assert_eq!(banner(&b).await.get(..4), Some("220 "));
    locker.batch_execute("COMMIT").await.unwrap();
}

/// Review item 3: a server that stops answering in the middle of a commit (a stalled
/// network: no reset, nothing forwarded, which PostgreSQL's own `statement_timeout` never
/// sees) does not hang `directory apply`: after `fleet.commit_timeout` it is refused as
/// unreachable, naming why, and the directory in force is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_to_a_stalled_postgres_is_refused_instead_of_hanging() {
    let schema = Schema::new("stalled").await;
    let hops = hops().await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = pg::url_via(proxy.addr);
    let mut cfg = node_config(dir.path(), &hops, &schema, "mx1", &url, true);
    cfg.fleet.as_mut().unwrap().commit_timeout = Duration::from_secs(5);
    let a = Node::start(cfg, dir).await;
    assert_eq!(a.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));

    // The commit's transaction asks for the log's lock: the server stops answering there.
    proxy.stall_on("pg_advisory_xact_lock");
    let batch = apply(&a, "EmailAddress\nalice@nhs.test\n", "cloud");
    let e = tokio::time::timeout(Duration::from_secs(90), batch)
        .await
        .expect("directory apply hung on a stalled PostgreSQL")
        .unwrap_err();
    assert!(
        e.contains("PostgreSQL is unreachable")
            && e.contains("directory apply: no answer from PostgreSQL within 5 s"),
        "{e}"
    );
    assert_eq!(a.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));
    proxy.resume();
}

/// Review item 5: during a rolling config change one node lacking a route must not fail a
/// valid scheduled batch for the whole fleet. A batch to state `exo` (a route only mx1 has
/// yet) comes due while only mx2 is up: mx2 leaves it pending, and the next one (valid
/// everywhere) waits behind it, so the schedule's order holds; mx1, back, applies it, then
/// the next one follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_batch_to_a_route_one_node_lacks_stays_pending_for_another() {
    use coexist::admin::types::ScheduledStatus;
    let schema = Schema::new("schedroute").await;
    let hops = hops().await;
    let url = pg::url();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), &hops, &schema, "mx1", &url, true);
    let cloud = cfg.routes["cloud"].clone();
    cfg.routes.insert("exo".into(), cloud);
    let a = Node::start(cfg, dir).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let api = a.api();
    let at = in_an_hour.clone();
    let exo = tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: b"EmailAddress\ndave@nhs.test\n",
            source: "exo.csv",
            state: Some("exo"),
            dry_run: false,
            at: Some(&at),
            format: Default::default(),
        })
    })
    .await
    .unwrap()
    .unwrap()
    .scheduled
    .expect("scheduled");
    let valid = schedule(&a, "EmailAddress\nalice@nhs.test\n", in_an_hour)
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");

    // mx1 stops; both batches come due (the same time: taken in id order, exo first). mx2
    // cannot apply exo's and must not let the later batch overtake it: a few of its rounds
    // (one a second) pass with mx1 down.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    schema.execute("UPDATE scheduled SET at = now()").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let l = scheduled_on(&b).await;
    let status = |id: u32| l.iter().find(|s| s.id == id).map(|s| s.status.clone());
    assert_eq!(status(exo.id), Some(ScheduledStatus::Pending), "{l:?}");
    assert_eq!(
        status(valid.id),
        Some(ScheduledStatus::Pending),
        "the later batch overtook the one left pending: {l:?}"
    );

    // mx1, which has the route, comes back and applies it; then the later one follows, in
    // the schedule's order.
    let a = Node::start(cfg, dir).await;
    eventually_async("dave moved to exo and alice to the cloud", || async {
        if a.route_of("dave@nhs.test").0.as_deref() == Some("exo")
            && a.route_of("alice@nhs.test").0.as_deref() == Some("cloud")
        {
            Ok(())
        } else {
            Err(format!("{:?}", scheduled_on(&a).await))
        }
    })
    .await;
    let l = scheduled_on(&a).await;
    let change = |id: u32| {
        l.iter().find(|s| s.id == id).and_then(|s| match s.status {
            ScheduledStatus::Applied { change, .. } => change,
            _ => None,
        })
    };
    let (first, second) = (change(exo.id), change(valid.id));
    assert!(
        first.is_some() && second.is_some() && first < second,
        "applied out of order: {l:?}"
    );
}
