//! Shadow redundancy (issue 26): a copy of every acknowledged message on a NATS JetStream
//! cluster the tests start (three `nats-server` processes on loopback ports of their own),
//! and survivors that take over a dead node's queue, with the fleet's leases in the real
//! PostgreSQL (a schema per test).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::{Config, FleetConfig, OnFailure, ShadowConfig};
use coexist::load::sink::{Sink, SinkOptions};
use common::bin::{self, Start};
use common::fleet::Node;
use common::nats::NatsCluster;
use common::pg::{self, Proxy, Schema};
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// The tests that start a three-server cluster and time a takeover or a leader election
/// run one at a time: on two cores, four clusters at once make the elections slower than
/// the timeouts the tests set.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a node may be silent before a survivor takes its queue, in these tests.
const TAKEOVER_AFTER: Duration = Duration::from_secs(3);

/// Makes `cfg` node `name` of the fleet in `schema`, with shadow copies on `nats` (the
/// seeding node keeps `directory.file`).
fn shadowed(cfg: &mut Config, name: &str, schema: &Schema, nats: &[String], seed: bool) {
    if !seed {
        cfg.directory.file = None;
    }
    cfg.fleet = Some(FleetConfig {
        postgres: pg::url(),
        schema: schema.name.clone(),
        node: name.to_string(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(120),
    });
    cfg.shadow = Some(ShadowConfig {
        nats: nats.to_vec(),
        stream: format!("s_{}", schema.name),
        replicas: if nats.len() >= 3 { 3 } else { 1 },
        takeover_after: TAKEOVER_AFTER,
        on_failure: OnFailure::Defer,
        publish_timeout: Duration::from_secs(2),
        user: None,
        password_file: None,
        token_file: None,
        creds_file: None,
        tls_ca: None,
        tls_required: false,
        allow_plaintext_auth: false,
        keep_delivered: None,
    });
}

/// A node started in this process.
async fn node_in_process(
    name: &str,
    schema: &Schema,
    nats: &[String],
    onprem: std::net::SocketAddr,
    cloud: std::net::SocketAddr,
    seed: bool,
    tweak: impl FnOnce(&mut Config),
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let mut cfg = test_config(dir.path(), &certs, onprem, cloud);
    shadowed(&mut cfg, name, schema, nats, seed);
    tweak(&mut cfg);
    Node::start(cfg, dir).await
}

/// The message `i` of a test: small ones, and every 50th above JetStream's 1 MB payload
/// limit (1.5 MB, so it travels in parts).
fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <x@example.org>\r\nTo: <bob@nhs.test>\r\nSubject: shadow {i}\r\nMessage-ID: <shadow-{i}@example.org>\r\n\r\n"
    )
    .into_bytes();
    let lines = if i % 50 == 7 { 30_000 } else { 3 };
    for l in 0..lines {
        m.extend_from_slice(format!("line {l} of message {i}, 0123456789abcdef\r\n").as_bytes());
    }
    m
}

/// Sends messages `range` to `addr` over one session; every one must get 250.
async fn send_all(addr: std::net::SocketAddr, range: std::ops::Range<usize>) {
    let mut c = connect(addr).await;
    c.expect("EHLO client.test", 250).await;
    for i in range {
        let rcpts: &[&str] = match i % 3 {
            0 => &["alice@nhs.test"],
            1 => &["bob@nhs.test"],
            _ => &["alice@nhs.test", "carol@nhs.test"],
        };
        let r = c.mail("x@example.org", rcpts, &message(i)).await;
        assert_eq!(r.code, 250, "message {i}: {r:?}");
    }
    c.cmd("QUIT").await;
}

/// Recipients the messages `range` are sent to.
fn recipients(range: std::ops::Range<usize>) -> u64 {
    range.map(|i| if i % 3 == 2 { 2 } else { 1 }).sum()
}

/// Per message number: how many times each sink got it (by Subject), and each body is the
/// message sent, byte for byte, behind the one Received header the first node added.
fn delivered(sinks: &[&Sink]) -> BTreeMap<usize, usize> {
    let mut seen = BTreeMap::new();
    for s in sinks {
        for m in s.state.messages() {
            let body = strip_received(&m.body);
            let text = String::from_utf8_lossy(body);
            let i: usize = text
                .split("Subject: shadow ")
                .nth(1)
                .and_then(|t| t.split("\r\n").next())
                .and_then(|n| n.parse().ok())
                .expect("a test message");
            assert_eq!(body, &message(i)[..], "message {i} arrived changed");
            *seen.entry(i).or_insert(0) += m.rcpts.len();
        }
    }
    seen
}

fn rcpts(s: &Sink) -> u64 {
    s.state.recipients.load(std::sync::atomic::Ordering::SeqCst)
}

fn sinks_up(a: DownPort, b: DownPort, onprem: &Sink, cloud: &Sink) {
    a.forward_to(onprem.addr);
    b.forward_to(cloud.addr);
}

async fn sinks() -> (Sink, Sink) {
    let lo = "127.0.0.1:0".parse().unwrap();
    let opts = SinkOptions {
        keep_bodies: true,
        ..Default::default()
    };
    (
        Sink::start(lo, opts.clone()).await.unwrap(),
        Sink::start(lo, opts).await.unwrap(),
    )
}

/// A cluster, a fleet schema, both next hops down, mx1 (the binary, so it can be killed with
/// `kill -9`; its log in `log`) and mx2 (in this process): the set-up of the takeover tests.
struct TwoNodes {
    nats: NatsCluster,
    schema: Schema,
    onprem_port: DownPort,
    cloud_port: DownPort,
    d1: tempfile::TempDir,
    c1: bin::BinConfig,
    log: std::path::PathBuf,
    mx1: bin::Server,
    mx2: Node,
}

async fn two_nodes(test: &str) -> TwoNodes {
    let nats = NatsCluster::start(3);
    let schema = Schema::new(test).await;
    let (onprem_port, cloud_port) = (DownPort::new(), DownPort::new());
    let (onprem, cloud) = (onprem_port.addr, cloud_port.addr);
    let d1 = tempfile::tempdir().unwrap();
    let mut c1 = bin::write_config(d1.path(), onprem, cloud);
    shadowed(&mut c1.config, "mx1", &schema, &nats.urls(), true);
    c1.write();
    let log = d1.path().join("mx1.log");
    let mx1 = bin::spawn_with(
        &mut c1,
        Start {
            log: Some(&log),
            ..Default::default()
        },
    );
    let mx2 = node_in_process("mx2", &schema, &nats.urls(), onprem, cloud, false, |_| {}).await;
    TwoNodes {
        nats,
        schema,
        onprem_port,
        cloud_port,
        d1,
        c1,
        log,
        mx1,
        mx2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_whose_disk_is_gone_has_its_acknowledged_mail_delivered_by_a_survivor() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let TwoNodes {
        nats: _nats,
        schema: _schema,
        onprem_port,
        cloud_port,
        d1: _d1,
        c1,
        log,
        mut mx1,
        mx2,
    } = two_nodes("shadow_takeover").await;

    // Both next hops are down: mx1 holds everything it acknowledged.
    let n = 300;
    let addr = c1.listen();
    let a = tokio::spawn(send_all(addr, 0..n / 2));
    let b = tokio::spawn(send_all(addr, n / 2..n));
    a.await.unwrap();
    b.await.unwrap();
    mx1.kill_9();
    std::fs::remove_dir_all(&c1.config.spool.dir).unwrap();

    let (s_onprem, s_cloud) = sinks().await;
    sinks_up(onprem_port, cloud_port, &s_onprem, &s_cloud);
    let want = recipients(0..n);
    let got = async {
        poll_async(TAKEOVER_AFTER + Duration::from_secs(60), || async {
            let got = rcpts(&s_onprem) + rcpts(&s_cloud);
            (got >= want).then_some(got)
        })
        .await
    }
    .await;
    assert!(
        got.is_ok(),
        "{} of {want} recipients delivered; mx1's log:\n{}",
        rcpts(&s_onprem) + rcpts(&s_cloud),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let seen = delivered(&[&s_onprem, &s_cloud]);
    assert_eq!(seen.len(), n, "every acknowledged message delivered");
    for (i, count) in &seen {
        let want = if i % 3 == 2 { 2 } else { 1 };
        assert_eq!(*count, want, "message {i}: recipients delivered once each");
    }
    // The takeover is on record, and the messages say where they came from.
    let st = common::fleet::status(&mx2).await;
    let sh = st.shadow.expect("fleet status shows the shadow side");
    let row = sh
        .nodes
        .iter()
        .find(|r| r.node == "mx1")
        .expect("mx1's lease");
    let taken = row.taken_over.clone().unwrap_or_default();
    assert!(
        taken.starts_with("taken over by mx2") && taken.contains(&format!("{n} messages")),
        "{taken}"
    );
    assert!(sh.last_takeover.unwrap_or_default().starts_with("mx1 at "));
    assert_eq!(sh.taken, n as u64);
}

/// Waits until `node`'s fleet status shows `dead`'s queue taken over (done).
async fn taken_over(node: &Node, dead: &str) -> String {
    let dead = dead.to_string();
    eventually_async("the takeover", || {
        let (api, dead) = (node.api(), dead.clone());
        async move {
            let st = tokio::task::spawn_blocking(move || api.fleet_status().ok())
                .await
                .unwrap()?;
            let row = st.shadow?.nodes.into_iter().find(|r| r.node == dead)?;
            row.taken_over.filter(|t| !t.contains("in progress"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_back_after_a_takeover_drops_what_was_taken_before_it_listens() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let TwoNodes {
        nats: _nats,
        schema: _schema,
        onprem_port,
        cloud_port,
        d1: _d1,
        mut c1,
        log,
        mut mx1,
        mx2,
    } = two_nodes("shadow_return").await;
    let n = 60;
    send_all(c1.listen(), 0..n).await;
    // Killed with its spool kept: it comes back with every message it acknowledged.
    mx1.kill_9();
    let taken = taken_over(&mx2, "mx1").await;
    assert!(taken.contains(&format!("{n} messages")), "{taken}");

    let mut mx1 = bin::spawn_with(
        &mut c1,
        Start {
            log: Some(&log),
            ..Default::default()
        },
    );
    // Listening now: it dropped what mx2 took before it opened its port.
    let api = coexist::admin::client::AdminClient::new(c1.admin(), TOKEN.to_string());
    let left = tokio::task::spawn_blocking(move || api.queue_list(&Default::default()).unwrap())
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "mx1 kept {} taken messages: {left:?}; its log:\n{}",
        left.len(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The next hops come back: each message is delivered once, by mx2.
    let (s_onprem, s_cloud) = sinks().await;
    sinks_up(onprem_port, cloud_port, &s_onprem, &s_cloud);
    let want = recipients(0..n);
    wait_rcpts(&s_onprem, &s_cloud, want).await;
    // mx1's queue was empty and stays so; mx2's queue drains: nothing else is sent.
    eventually("mx2's queue empty", || mx2.relay.queue.is_empty()).await;
    let seen = delivered(&[&s_onprem, &s_cloud]);
    assert_eq!(seen.len(), n);
    assert_eq!(rcpts(&s_onprem) + rcpts(&s_cloud), want, "no duplicate");
    // What survived on mx2 says where it came from.
    let trace = tokio::task::spawn_blocking({
        let api = mx2.api();
        move || api.trace("alice@nhs.test", None).unwrap()
    })
    .await
    .unwrap();
    assert!(
        trace
            .entries
            .iter()
            .any(|e| e.outcome.as_str() == "taken_over" && e.origin.starts_with("from mx1 ")),
        "{trace:?}"
    );
    mx1.kill_9();
}

async fn wait_rcpts(a: &Sink, b: &Sink, want: u64) {
    let got = poll_async(Duration::from_secs(60), || async {
        let got = rcpts(a) + rcpts(b);
        (got >= want).then_some(got)
    })
    .await;
    assert!(
        got.is_ok(),
        "{} of {want} recipients delivered",
        rcpts(a) + rcpts(b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_quorum_defer_answers_451_and_accept_takes_the_mail_on_one_copy() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::start(3);
    let schema = Schema::new("shadow_quorum").await;
    let (s_onprem, s_cloud) = sinks().await;
    let urls = nats.urls();
    // Long enough for the stream to elect a new leader when the server it led on is
    // killed (a few seconds of Raft election).
    let patient = |c: &mut Config| {
        let sh = c.shadow.as_mut().unwrap();
        sh.publish_timeout = Duration::from_secs(12);
        sh.takeover_after = Duration::from_secs(60);
    };
    let defer = node_in_process(
        "mxd",
        &schema,
        &urls,
        s_onprem.addr,
        s_cloud.addr,
        true,
        patient,
    )
    .await;
    let accept = node_in_process(
        "mxa",
        &schema,
        &urls,
        s_onprem.addr,
        s_cloud.addr,
        false,
        |c| {
            patient(c);
            c.shadow.as_mut().unwrap().on_failure = OnFailure::Accept;
        },
    )
    .await;
    let (d, a) = (defer.relay.local_addrs[0], accept.relay.local_addrs[0]);
    assert_eq!(send_one(d, &["bob@nhs.test"], "all up").await.code, 250);

    // One server of three down: the stream keeps its quorum, nothing is refused.
    nats.kill(0);
    for i in 0..5 {
        let r = send_one(d, &["bob@nhs.test"], &format!("two of three {i}")).await;
        assert_eq!(r.code, 250, "{r:?}");
    }

    // All down: no copy can be made.
    nats.kill(1);
    nats.kill(2);
    let r = send_one(d, &["bob@nhs.test"], "no quorum, defer").await;
    assert_eq!(r.code, 451, "{r:?}");
    assert!(r.text.contains("4.3.0"), "{r:?}");
    let r = send_one(a, &["bob@nhs.test"], "no quorum, accept").await;
    assert_eq!(r.code, 250, "{r:?}");
    let ready = |n: &Node| {
        let api = n.api();
        async move {
            tokio::task::spawn_blocking(move || api.ready().unwrap())
                .await
                .unwrap()
        }
    };
    let rd = ready(&defer).await;
    assert!(!rd.ready && rd.shadow_unavailable.is_some(), "{rd:?}");
    let ra = ready(&accept).await;
    assert!(ra.ready && ra.shadow_unavailable.is_some(), "{ra:?}");
    // The 451'd message is not delivered (its sender keeps it); the others are.
    wait_rcpts(&s_onprem, &s_cloud, 7).await;
    eventually("queues empty", || {
        defer.relay.queue.is_empty() && accept.relay.queue.is_empty()
    })
    .await;
    let subjects: Vec<String> = s_cloud
        .state
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).to_string())
        .collect();
    assert!(!subjects.iter().any(|b| b.contains("no quorum, defer")));
    assert!(subjects.iter().any(|b| b.contains("no quorum, accept")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_postgresql_and_nats_stops_delivering_before_a_survivor_takes_over() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let nats = NatsCluster::start(3);
    let schema = Schema::new("shadow_fence").await;
    let (onprem_port, cloud_port) = (DownPort::new(), DownPort::new());
    let (onprem, cloud) = (onprem_port.addr, cloud_port.addr);
    // mx1 reaches PostgreSQL and NATS through proxies the test cuts.
    let pg_proxy = Proxy::start().await;
    let nats_proxy = Proxy::start_to(nats.addr(0)).await;
    let mx1 = node_in_process("mx1", &schema, &nats.urls(), onprem, cloud, true, |c| {
        c.fleet.as_mut().unwrap().postgres = pg::url_via(pg_proxy.addr);
        c.shadow.as_mut().unwrap().nats = vec![format!("nats://{}", nats_proxy.addr)];
    })
    .await;
    let mx2 = node_in_process("mx2", &schema, &nats.urls(), onprem, cloud, false, |_| {}).await;
    let n = 40;
    send_all(mx1.relay.local_addrs[0], 0..n).await;
    pg_proxy.cut();
    nats_proxy.cut();
    // mx1 fences itself (no lease for half of takeover_after) before mx2 may take over.
    eventually("mx1 fenced", || {
        !mx1.relay.control.shadow.as_ref().unwrap().lease_held()
    })
    .await;
    taken_over(&mx2, "mx1").await;
    // The next hops come back while mx1 is still cut off: only mx2 delivers.
    let (s_onprem, s_cloud) = sinks().await;
    sinks_up(onprem_port, cloud_port, &s_onprem, &s_cloud);
    let want = recipients(0..n);
    wait_rcpts(&s_onprem, &s_cloud, want).await;
    assert_eq!(
        mx1.relay.queue.len(),
        n,
        "mx1 delivered nothing while fenced"
    );
    // mx1 reconnects: it drops what mx2 took instead of delivering it again.
    pg_proxy.restore();
    nats_proxy.restore();
    eventually("mx1 dropped what was taken", || mx1.relay.queue.is_empty()).await;
    eventually("mx1 holds its lease again", || {
        mx1.relay.control.shadow.as_ref().unwrap().lease_held()
    })
    .await;
    eventually("mx2's queue empty", || mx2.relay.queue.is_empty()).await;
    assert_eq!(rcpts(&s_onprem) + rcpts(&s_cloud), want, "no duplicate");
    assert_eq!(delivered(&[&s_onprem, &s_cloud]).len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resubmit_delivers_again_what_went_to_one_route_in_the_window_and_nothing_else() {
    let nats = NatsCluster::start(1);
    let schema = Schema::new("shadow_resubmit").await;
    let (s_onprem, s_cloud) = sinks().await;
    let mx = node_in_process(
        "mx1",
        &schema,
        &nats.urls(),
        s_onprem.addr,
        s_cloud.addr,
        true,
        |c| {
            c.shadow.as_mut().unwrap().keep_delivered = Some(Duration::from_secs(3600));
        },
    )
    .await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(2);
    // 0, 3: alice (onprem); 1, 4: bob (cloud); 2, 5: alice and carol (both routes).
    send_all(mx.relay.local_addrs[0], 0..6).await;
    wait_rcpts(&s_onprem, &s_cloud, 8).await;
    eventually("queue empty", || mx.relay.queue.is_empty()).await;
    let (onprem_before, cloud_before) = (rcpts(&s_onprem), rcpts(&s_cloud));
    assert_eq!((onprem_before, cloud_before), (4, 4));

    // The preview counts and changes nothing.
    let cli = mx.cli_config();
    let since_text = since.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let run = |extra: &'static [&'static str]| {
        let (cli, since_text) = (cli.clone(), since_text.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(bin::BIN)
                    .args([
                        "queue",
                        "resubmit",
                        "--route",
                        "onprem",
                        "--since",
                        &since_text,
                    ])
                    .args(extra)
                    .args(["--config", cli.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                String::from_utf8_lossy(&out.stdout).to_string()
            })
            .await
            .unwrap()
        }
    };
    let preview = run(&[]).await;
    assert!(
        preview.starts_with(
            "would queue again: 4 message(s), 4 recipient(s) delivered through route onprem"
        ),
        "{preview}"
    );
    // A window before the mail: nothing.
    let api = mx.api();
    let before = since.timestamp() - 100;
    let none = tokio::task::spawn_blocking(move || {
        api.queue_resubmit("onprem", before, before + 50, true)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(none.messages, 0);
    assert_eq!(rcpts(&s_onprem), onprem_before);

    // Done: the on-premises recipients get their mail again, nobody else does.
    let done = run(&["--yes"]).await;
    assert!(
        done.starts_with("queued again: 4 message(s), 4 recipient(s)"),
        "{done}"
    );
    wait_rcpts(&s_onprem, &s_cloud, 12).await;
    eventually("queue empty", || mx.relay.queue.is_empty()).await;
    assert_eq!(rcpts(&s_onprem), onprem_before + 4);
    assert_eq!(rcpts(&s_cloud), cloud_before);
    let again = delivered(&[&s_onprem]);
    for i in [0, 2, 3, 5] {
        assert_eq!(again.get(&i), Some(&2), "message {i} to alice twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_go_to_nats_over_verified_tls_with_a_token_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let ca = dir.path().join("nats-ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    let token = dir.path().join("nats.token");
    std::fs::write(&token, "5e3c7a9d1f2b4c6e8a0b\n").unwrap();
    let nats = NatsCluster::start_with(
        1,
        &[
            "--tls",
            "--tlscert",
            certs.cert.to_str().unwrap(),
            "--tlskey",
            certs.key.to_str().unwrap(),
            "--auth",
            "5e3c7a9d1f2b4c6e8a0b",
        ],
    );
    let urls: Vec<String> = nats
        .urls()
        .iter()
        .map(|u| u.replace("nats://", "tls://"))
        .collect();
    let schema = Schema::new("shadow_tls").await;
    let (s_onprem, s_cloud) = sinks().await;
    // A node of this fleet that reaches NATS over TLS checked against `ca`, with the token.
    let tls_node = |name: &'static str, seed: bool, ca: std::path::PathBuf| {
        let (schema, urls, token) = (&schema, urls.clone(), token.clone());
        let (onprem, cloud) = (s_onprem.addr, s_cloud.addr);
        async move {
            node_in_process(name, schema, &urls, onprem, cloud, seed, move |c| {
                let sh = c.shadow.as_mut().unwrap();
                sh.tls_ca = Some(ca);
                sh.token_file = Some(token);
            })
            .await
        }
    };
    let good = tls_node("mxt", true, ca.clone()).await;
    let r = send_one(good.relay.local_addrs[0], &["bob@nhs.test"], "over tls").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait_rcpts(&s_onprem, &s_cloud, 1).await;
    // A node that trusts another CA never sends its token to that server: no copy, 451.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("ca.pem");
    std::fs::write(&other_ca, write_certs(other.path()).ca_pem).unwrap();
    let wary = tls_node("mxu", false, other_ca).await;
    let r = send_one(wary.relay.local_addrs[0], &["bob@nhs.test"], "wrong ca").await;
    assert_eq!(r.code, 451, "{r:?}");
}
