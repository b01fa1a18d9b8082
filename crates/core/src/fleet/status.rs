//! The fleet as `coexist fleet status` and `GET /v1/fleet` show it: this node's view of
//! PostgreSQL, and every node's row of the nodes table with its lag.

use super::sql::{self, db_err};
use super::{Fleet, FleetError};
use serde::{Deserialize, Serialize};

/// This node's connection to PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PgHealth {
    /// Connected and following the log.
    pub up: bool,
    /// Since when (RFC 3339).
    pub since: String,
    /// The last error, while down.
    pub error: Option<String>,
}

/// One node of the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRow {
    /// Node name (`fleet.node`).
    pub name: String,
    /// Its admin API address.
    pub admin: Option<String>,
    /// The host that address is valid on (see `fleet::peers`; absent in rows written by
    /// versions before it).
    #[serde(default)]
    pub admin_host: Option<String>,
    /// The name its admin certificate carries, when its admin API is served over TLS
    /// (`admin` is then `https://ADDRESS`).
    #[serde(default)]
    pub admin_tls_name: Option<String>,
    /// The last change it has applied.
    pub applied: u32,
    /// Changes in the log it has not applied.
    pub lag_changes: u32,
    /// Age in seconds of the oldest change it has not applied (0 when up to date).
    pub lag_seconds: f64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_seconds: f64,
    /// Heartbeat in the last 30 s and not stopped.
    pub alive: bool,
    /// Drained by an admin.
    pub draining: bool,
    /// Draining because it is behind the fleet.
    pub behind: bool,
    /// Messages in its queue.
    pub queue: u64,
    /// Its version.
    pub version: String,
}

/// The fleet as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetStatus {
    /// This node.
    pub node: String,
    /// Its connection to PostgreSQL.
    pub postgres: PgHealth,
    /// The last change in the log (as last read, while PostgreSQL is down).
    pub head: u32,
    /// The last change applied here.
    pub applied: u32,
    /// Draining because it is behind the fleet.
    pub behind: bool,
    /// Why it is (or was last) behind.
    pub behind_why: Option<String>,
    /// Why PostgreSQL's change log does not hold the history applied here (a log that
    /// moved back), while it does not: directory changes are refused meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_mismatch: Option<String>,
    /// Every node, from the nodes table (empty while PostgreSQL is down).
    pub nodes: Vec<NodeRow>,
    /// While PostgreSQL is unreachable: the peers this node could not ask what they have
    /// applied, each as `NAME: why` (its lag check knows nothing about them).
    #[serde(default)]
    pub peers_not_asked: Vec<String>,
    /// This node's shadow side and every node's lease and takeovers (`[shadow]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<super::leases::ShadowStatus>,
}

/// What a node has applied (`GET /v1/fleet/node`), asked by peers that lost PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeApplied {
    /// Node name.
    pub node: String,
    /// The last change applied there.
    pub applied: u32,
}

/// What `check-config` reports about a fleet: the head of its log and its nodes, or why
/// PostgreSQL cannot be asked (a node still starts then, on its local snapshot).
pub async fn probe(cfg: &crate::config::FleetConfig) -> Result<(u32, usize), FleetError> {
    let mut pg = super::tls::Pg::new(cfg.connection()?)?;
    let options = sql::session_options(pg.get_options());
    pg.options(&options);
    let client = sql::connect(&pg).await?;
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'changes')",
            &[&cfg.schema],
        )
        .await
        .map_err(db_err(&pg))?
        .get(0);
    if !exists {
        return Ok((0, 0));
    }
    let head = sql::head(&client, &cfg.schema, &pg).await?;
    let nodes: i64 = client
        .query_one(
            &format!(r#"SELECT count(*) FROM "{}".nodes"#, cfg.schema),
            &[],
        )
        .await
        .map_err(db_err(&pg))?
        .get(0);
    Ok((head, usize::try_from(nodes).unwrap_or(0)))
}

impl Fleet {
    /// What this node has applied, for its peers.
    pub fn node_applied(&self) -> NodeApplied {
        NodeApplied {
            node: self.inner.cfg.node.clone(),
            applied: self.applied(),
        }
    }

    /// The fleet now: the nodes table read from PostgreSQL (on a short-lived connection), or
    /// this node's own view with the error while PostgreSQL cannot be reached.
    pub async fn status(&self) -> FleetStatus {
        let (postgres, head, behind_why, peers_not_asked, log_mismatch) = {
            let h = self.inner.lock_health();
            (
                PgHealth {
                    up: h.up,
                    since: h.since.clone(),
                    error: h.error.clone(),
                },
                h.head,
                h.behind_why.clone(),
                h.peers_not_asked.clone(),
                h.diverged.clone(),
            )
        };
        let mut st = FleetStatus {
            node: self.inner.cfg.node.clone(),
            postgres,
            head,
            applied: self.applied(),
            behind: self.behind(),
            behind_why,
            log_mismatch,
            nodes: Vec::new(),
            peers_not_asked,
            shadow: None,
        };
        let read = self.read_nodes();
        match self
            .inner
            .bounded("fleet status", self.inner.cfg.commit_timeout, read)
            .await
        {
            Ok((head, nodes)) => {
                st.head = head;
                self.inner.lock_health().peers = nodes
                    .iter()
                    .filter(|n| n.name != st.node && n.alive)
                    .map(|n| super::Peer {
                        name: n.name.clone(),
                        admin: n.admin.clone(),
                        admin_host: n.admin_host.clone(),
                        admin_tls_name: n.admin_tls_name.clone(),
                    })
                    .collect();
                st.nodes = nodes;
            }
            Err(e) => {
                st.postgres.up = false;
                st.postgres.error = Some(e.to_string());
            }
        }
        st
    }

    async fn read_nodes(&self) -> Result<(u32, Vec<NodeRow>), FleetError> {
        let client = sql::connect(&self.inner.pg).await?;
        let s = self.inner.schema();
        let head = sql::head(&client, s, &self.inner.pg).await?;
        let rows = client
            .query(
                &format!(
                    r#"SELECT n.name, n.admin, n.applied,
                         extract(epoch FROM clock_timestamp() - n.heartbeat)::float8,
                         n.draining, n.behind, n.queue, n.version, n.stopped, n.admin_host, n.admin_tls_name,
                         coalesce((SELECT extract(epoch FROM clock_timestamp() - min(c.committed_at))::float8
                                   FROM "{s}".changes c WHERE c.seq > n.applied), 0::float8) AS lag
                       FROM "{s}".nodes n ORDER BY n.name"#
                ),
                &[],
            )
            .await
            .map_err(db_err(&self.inner.pg))?;
        let nodes = rows
            .iter()
            .map(|r| {
                let applied = sql::seq_u32(r.get(2)).unwrap_or(0);
                let age: f64 = r.get(3);
                NodeRow {
                    name: r.get(0),
                    admin: r.get(1),
                    admin_host: r.get(9),
                    admin_tls_name: r.get(10),
                    applied,
                    lag_changes: head.saturating_sub(applied),
                    lag_seconds: r.get("lag"),
                    heartbeat_age_seconds: age,
                    alive: age < 30.0 && !r.get::<_, bool>(8),
                    draining: r.get(4),
                    behind: r.get(5),
                    queue: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
                    version: r.get(7),
                }
            })
            .collect();
        Ok((head, nodes))
    }
}
