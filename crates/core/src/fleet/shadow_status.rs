//! What `fleet status`, `/v1/ready` and the console show of the shadow side (`[shadow]`):
//! this node's copies and lease, and every node's lease and takeovers as
//! [`super::leases`] reads them.

/// One node's lease as `fleet status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    /// The node.
    pub node: String,
    /// Its messages with a live shadow copy, at its last renewal.
    pub backlog: u64,
    /// Seconds since its last renewal.
    pub age_seconds: f64,
    /// The last takeover of its queue: taker, time (RFC 3339), messages taken, done.
    pub taken_over: Option<(String, String, u64, bool)>,
    /// The last takeover it made: dead node, time (RFC 3339), messages taken.
    pub took: Option<(String, String, u64)>,
}

/// What `fleet status`, readiness and the console show of this node's shadow side.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShadowStatus {
    /// Copies can be stored (the last one was).
    pub store_up: bool,
    /// Why the last copy could not be stored, while copies cannot be.
    pub store_error: Option<String>,
    /// This node holds its lease: it may deliver.
    pub lease_held: bool,
    /// Why the lease is not held (PostgreSQL unreachable, a takeover of this node's queue
    /// to wait for).
    pub lease_error: Option<String>,
    /// Messages with a live copy (this node's queue).
    pub backlog: u64,
    /// The last takeover this node made: `NODE at TIME: N messages`.
    pub last_takeover: Option<String>,
    /// Messages taken over by this process.
    pub taken: u64,
    /// Messages dropped because a survivor had taken them (this process).
    pub dropped: u64,
    /// Every node's lease and takeovers, as PostgreSQL has them (empty when unreachable).
    pub nodes: Vec<NodeShadow>,
}

/// One node's lease as the fleet's PostgreSQL has it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeShadow {
    /// The node.
    pub node: String,
    /// Its messages with a live copy, at its last renewal.
    pub backlog: u64,
    /// Seconds since its last renewal.
    pub lease_age_seconds: f64,
    /// The last takeover of its queue: `taken over by NODE at TIME: N messages`.
    pub taken_over: Option<String>,
    /// The last takeover it made: `took NODE's queue at TIME: N messages`.
    pub took: Option<String>,
}

impl From<LeaseRow> for NodeShadow {
    fn from(r: LeaseRow) -> NodeShadow {
        NodeShadow {
            node: r.node,
            backlog: r.backlog,
            lease_age_seconds: r.age_seconds,
            taken_over: r.taken_over.map(|(taker, at, n, done)| {
                let state = if done { "" } else { " (in progress)" };
                format!("taken over by {taker} at {at}: {n} messages{state}")
            }),
            took: r
                .took
                .map(|(node, at, n)| format!("took {node}'s queue at {at}: {n} messages")),
        }
    }
}
