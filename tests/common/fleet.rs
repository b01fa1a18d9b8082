//! Helpers of the fleet tests (`tests/fleet*.rs`): nodes of one fleet in a schema of their
//! own, started in this process, the sinks they deliver to, and the admin API calls the
//! tests make.

use super::pg::Schema;
use super::{eventually_async, test_config, write_certs, TOKEN};
use coexist::admin::client::{AdminClient, BatchUpload};
use coexist::admin::types::{BatchReply, FleetStatus, Ready};
use coexist::config::{Config, FleetConfig};
use coexist::load::sink::{Sink, SinkOptions};
use coexist::relay::{self, Running};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Two sinks every node of a test delivers to.
pub struct Hops {
    pub onprem: Sink,
    pub cloud: Sink,
}

pub async fn hops() -> Hops {
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Hops {
        onprem: Sink::start(lo, SinkOptions::default()).await.unwrap(),
        cloud: Sink::start(lo, SinkOptions::default()).await.unwrap(),
    }
}

/// The config of node `name` in `schema`, its files under `dir`; PostgreSQL at `postgres`.
/// Only a node given `seed` has `directory.file` (the first node seeds the fleet with it).
pub fn node_config(
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
    cfg.fleet = Some(member(postgres, &schema.name, name));
    cfg
}

/// `[fleet]` for node `name` in schema `schema` (PostgreSQL at `postgres`), with the tests'
/// lag and commit bounds.
pub fn member(postgres: &str, schema: &str, name: &str) -> FleetConfig {
    FleetConfig {
        postgres: postgres.to_string(),
        schema: schema.to_string(),
        node: name.to_string(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(120),
    }
}

/// A started node and its folder.
pub struct Node {
    pub relay: Running,
    pub dir: tempfile::TempDir,
    pub cfg: Config,
}

impl Node {
    pub async fn start(cfg: Config, dir: tempfile::TempDir) -> Node {
        let relay = relay::start(cfg.clone()).await.unwrap();
        Node { relay, dir, cfg }
    }

    pub fn api(&self) -> AdminClient {
        AdminClient::new(self.relay.admin_addr.unwrap(), TOKEN.to_string())
    }

    pub fn route_of(&self, address: &str) -> (Option<String>, String) {
        let l = self
            .relay
            .directory
            .lookup(&coexist::types::Address::parse(address, true).unwrap());
        (l.state, l.origin)
    }

    /// The config file a CLI would use to talk to this node.
    pub fn cli_config(&self) -> std::path::PathBuf {
        let mut c = self.cfg.clone();
        c.admin.as_mut().unwrap().listen = self.relay.admin_addr.unwrap();
        let path = self.dir.path().join("cli.toml");
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        path
    }
}

pub async fn node(hops: &Hops, schema: &Schema, name: &str, postgres: &str, seed: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), hops, schema, name, postgres, seed);
    Node::start(cfg, dir).await
}

pub async fn apply(n: &Node, csv: &str, state: &str) -> Result<BatchReply, String> {
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

pub async fn status(n: &Node) -> FleetStatus {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.fleet_status().unwrap())
        .await
        .unwrap()
}

pub async fn ready(n: &Node) -> Ready {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.ready().unwrap())
        .await
        .unwrap()
}

/// Waits until node `n`'s readiness (`GET /v1/ready`) satisfies `ok`, for `what`.
pub async fn ready_when(n: &Node, what: &str, ok: impl Fn(&Ready) -> bool) {
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

/// Schedules `csv` on `n` for `at` (RFC 3339).
pub async fn schedule(n: &Node, csv: &str, at: String) -> Result<BatchReply, String> {
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

pub async fn scheduled_on(n: &Node) -> Vec<coexist::admin::types::Scheduled> {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.directory_scheduled().unwrap())
        .await
        .unwrap()
}

/// The first line a new SMTP session gets (`421 4.3.2 ...` while a node drains).
pub async fn banner(n: &Node) -> String {
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
pub async fn quick_node(
    hops: &Hops,
    schema: &Schema,
    name: &str,
    postgres: &str,
    seed: bool,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), hops, schema, name, postgres, seed);
    cfg.fleet.as_mut().unwrap().max_lag = Duration::from_secs(1);
    Node::start(cfg, dir).await
}

/// Two quick nodes of `schema` (mx1 seeds the fleet), and batch 2 (alice to the cloud)
/// committed through mx1 and applied on mx2: where the tests of a log that moves back start.
pub async fn two_nodes_after_batch_2(hops: &Hops, schema: &Schema) -> (Node, Node) {
    let url = super::pg::url();
    let a = quick_node(hops, schema, "mx1", &url, true).await;
    let b = quick_node(hops, schema, "mx2", &url, false).await;
    let r = apply(&a, "EmailAddress\nalice@nhs.test\n", "cloud")
        .await
        .unwrap();
    assert_eq!(r.report.id, Some(2));
    super::eventually("batch 2 on mx2", || {
        b.route_of("alice@nhs.test") == (Some("cloud".into()), "batch 2".into())
    })
    .await;
    (a, b)
}

pub async fn metrics(n: &Node) -> String {
    let api = n.api();
    tokio::task::spawn_blocking(move || api.get("/metrics").unwrap())
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every node that takes mail routes `address` alike: the routes of the ready ones.
pub async fn routes_of_ready(nodes: &[&Node], address: &str) -> Vec<(String, Option<String>)> {
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
