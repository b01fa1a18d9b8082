//! `coexist fleet status`: every node of the fleet, with its lag, through the admin API.

use super::Api;
use crate::admin::types::FleetStatus;
use clap::Subcommand;

/// The fleet commands.
#[derive(Subcommand)]
pub enum FleetCmd {
    /// Every node: applied change, lag, heartbeat, drain, queue, version.
    Status {
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
}

/// Runs a fleet command.
pub fn run(cmd: FleetCmd) -> anyhow::Result<()> {
    match cmd {
        FleetCmd::Status { api } => {
            let st = api.client()?.fleet_status()?;
            api.print(&st, status_text)
        }
    }
}

/// The fleet as a table, headed by this node's view of PostgreSQL.
pub fn status_text(st: &FleetStatus) -> String {
    let pg = if st.postgres.up {
        format!("PostgreSQL connected since {}", st.postgres.since)
    } else {
        format!(
            "PostgreSQL UNREACHABLE since {}: {}",
            st.postgres.since,
            st.postgres.error.as_deref().unwrap_or("")
        )
    };
    let mut out = format!(
        "node {}: {pg}\nfleet log head {}, applied here {}{}",
        st.node,
        st.head,
        st.applied,
        if st.behind {
            format!(
                "; BEHIND, draining: {}",
                st.behind_why.as_deref().unwrap_or("")
            )
        } else {
            String::new()
        }
    );
    if !st.peers_not_asked.is_empty() {
        out.push_str(
            "\npeers this node cannot ask what they have applied (their lag is unknown here):",
        );
        for p in &st.peers_not_asked {
            out.push_str(&format!("\n  {p}"));
        }
    }
    if let Some(why) = &st.log_mismatch {
        out.push_str(&format!(
            "\nLOG MISMATCH (directory changes refused): {why}"
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:>8} {:>6} {:>9} {:>10} {:<8} {:>7}  {:<8} admin",
        "node", "applied", "lag", "lag_s", "heartbeat", "state", "queue", "version"
    ));
    for n in &st.nodes {
        let state = if !n.alive {
            "silent"
        } else if n.behind {
            "behind"
        } else if n.draining {
            "draining"
        } else {
            "up"
        };
        out.push_str(&format!(
            "\n{:<16} {:>8} {:>6} {:>9.1} {:>9.1}s {:<8} {:>7}  {:<8} {}",
            n.name,
            n.applied,
            n.lag_changes,
            n.lag_seconds,
            n.heartbeat_age_seconds,
            state,
            n.queue,
            n.version,
            n.admin.as_deref().unwrap_or("-")
        ));
    }
    if let Some(sh) = &st.shadow {
        out.push_str(&shadow_text(sh));
    }
    out
}

/// The shadow side: this node's copies and lease, then every node's lease, backlog and
/// last takeover.
fn shadow_text(sh: &crate::shadow::ShadowStatus) -> String {
    let mut out = format!(
        "
shadow copies: {}; lease: {}; backlog here {}",
        match &sh.store_error {
            None => "stored on NATS JetStream".to_string(),
            Some(e) => format!("CANNOT BE STORED: {e}"),
        },
        match (&sh.lease_held, &sh.lease_error) {
            (true, _) => "held".to_string(),
            (false, e) => format!(
                "NOT HELD, delivering nothing: {}",
                e.as_deref().unwrap_or("not renewed yet")
            ),
        },
        sh.backlog
    );
    if let Some(t) = &sh.last_takeover {
        out.push_str(&format!("; last takeover here: {t}"));
    }
    out.push_str(&format!(
        "
{:<16} {:>8} {:>9}  last takeover",
        "node", "backlog", "lease"
    ));
    for n in &sh.nodes {
        let last = [n.taken_over.as_deref(), n.took.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            "
{:<16} {:>8} {:>8.1}s  {}",
            n.node,
            n.backlog,
            n.lease_age_seconds,
            if last.is_empty() { "-" } else { &last }
        ));
    }
    out
}
