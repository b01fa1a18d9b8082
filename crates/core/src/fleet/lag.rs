//! Heartbeat and lag: this node's row of the nodes table, what its peers have applied
//! while PostgreSQL is unreachable, and whether it is behind the fleet (and drains).
//!
//! Behind the fleet: while connected, a node is behind when the log has changes it could
//! not apply, when the log does not hold its history, when the head stays above what it has
//! applied, or when no catch-up has finished, each for `fleet.max_lag`. While PostgreSQL is
//! unreachable a node cannot read the log, so it asks its peers' admin APIs (addresses from
//! the last read of the nodes table, see [`super::peers`]) what they have applied: if one
//! has more, this node is behind since it lost PostgreSQL; a peer it cannot ask is named,
//! never taken for "not ahead". Only a node that knows it is behind drains; when PostgreSQL
//! is down for everyone, nobody can commit a change, no node is behind, and every node
//! keeps taking mail. The lag is evaluated on its own timer ([`lag_timer`]), whatever the
//! follower's session is doing.

use super::follow::TICK;
use super::sql::db_err;
use super::{peers, FleetError, Inner, Peer};
use crate::metrics as m;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tracing::{info, warn};

/// Evaluates the lag every [`TICK`], whatever the session is doing (a statement waiting on
/// a lock, a base being loaded), until the fleet is stopped.
pub(super) async fn lag_timer(inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        evaluate(&inner);
        tokio::time::sleep(TICK).await;
    }
}

/// Writes this node's row of the nodes table and reads the peers' admin addresses.
pub(super) async fn beat(inner: &Inner, client: &Client) -> Result<(), FleetError> {
    let s = inner.schema();
    let report = inner.reporter.get().map(|f| f()).unwrap_or_default();
    let admin = inner.admin_addr.get().cloned();
    client
        .execute(
            &format!(
                r#"INSERT INTO "{s}".nodes (name, admin, applied, heartbeat, draining, behind, queue, version, admin_host, admin_tls_name)
                   VALUES ($1, $2, $3, clock_timestamp(), $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (name) DO UPDATE SET admin = excluded.admin, applied = excluded.applied,
                     admin_host = excluded.admin_host, admin_tls_name = excluded.admin_tls_name,
                     stopped = false,
                     heartbeat = excluded.heartbeat, draining = excluded.draining,
                     behind = excluded.behind, queue = excluded.queue, version = excluded.version"#
            ),
            &[
                &inner.cfg.node,
                &admin,
                &i64::from(inner.directory.applied()),
                &report.draining,
                &inner.behind.load(Ordering::SeqCst),
                &i64::try_from(report.queue).unwrap_or(i64::MAX),
                &env!("CARGO_PKG_VERSION"),
                &inner.host,
                &inner.admin_tls_name.get().cloned(),
            ],
        )
        .await
        .map_err(db_err(&inner.pg))?;
    let peers = client
        .query(
            &format!(
                r#"SELECT name, admin, admin_host, admin_tls_name FROM "{s}".nodes WHERE name <> $1 AND NOT stopped"#
            ),
            &[&inner.cfg.node],
        )
        .await
        .map_err(db_err(&inner.pg))?
        .iter()
        .map(|r| Peer {
            name: r.get(0),
            admin: r.get(1),
            admin_host: r.get(2),
            admin_tls_name: r.get(3),
        })
        .collect();
    inner.lock_health().peers = peers;
    let ldap: Option<String> = client
        .query_opt(
            &format!(r#"SELECT value FROM "{s}".meta WHERE key = 'ldap_healthy'"#),
            &[],
        )
        .await
        .map_err(db_err(&inner.pg))?
        .map(|r| r.get(0));
    inner
        .ldap_up
        .store(ldap.as_deref() != Some("false"), Ordering::SeqCst);
    Ok(())
}

/// While PostgreSQL is unreachable: asks the peers what they have applied; one that has
/// more means this node is behind since it lost PostgreSQL.
pub(super) async fn check_peers(inner: &Arc<Inner>) {
    let (peers, since) = {
        let h = inner.lock_health();
        if h.up {
            return;
        }
        (h.peers.clone(), h.since_at)
    };
    let Some(token) = inner.token.clone() else {
        return;
    };
    let ours = inner.directory.applied();
    let here = inner.host.clone();
    let ca = inner.admin_ca.clone();
    let api = inner.peer_api.clone();
    // Each peer's answer, or why it could not be asked (said, not taken for "not ahead").
    let answers = tokio::task::spawn_blocking(move || {
        peers
            .iter()
            .map(|p| {
                let asked = peers::reach(
                    p.admin.as_deref(),
                    p.admin_tls_name.as_deref(),
                    p.admin_host.as_deref(),
                    &here,
                )
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    // Refused, with why, when the token would cross the network in clear.
                    api.applied(&t, &token, Duration::from_secs(2), ca.as_deref())
                        .map_err(|e| e.to_string())
                });
                (p.name.clone(), asked)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut asked = Vec::new();
    let mut not_asked = Vec::new();
    for (name, answer) in answers {
        match answer {
            Ok(applied) => asked.push((name, applied)),
            Err(why) => not_asked.push(format!("{name}: {why}")),
        }
    }
    {
        let mut h = inner.lock_health();
        if h.peers_not_asked != not_asked {
            if !not_asked.is_empty() {
                warn!(
                    peers = not_asked.join("; "),
                    answered = asked.len(),
                    "fleet: PostgreSQL unreachable and these peers cannot be asked what they have applied: whether this node is behind is unknown for them"
                );
            }
            h.peers_not_asked = not_asked;
        }
    }
    if let Some((name, theirs)) = asked.into_iter().find(|(_, a)| *a > ours) {
        let mut h = inner.lock_health();
        if h.behind_since.is_none() {
            warn!(peer = name, theirs, ours, "fleet: a peer has applied changes this node cannot read (PostgreSQL unreachable from here)");
            h.behind_since = Some(since);
        }
        h.behind_why = Some(format!(
            "PostgreSQL unreachable and node {name} has applied change {theirs} (here: {ours})"
        ));
    }
}

/// Sets or clears the drain for lag from what is known now.
pub(super) fn evaluate(inner: &Inner) {
    let (behind, why) = {
        let mut h = inner.lock_health();
        let applied = inner.directory.applied();
        // A node with no directory at all while PostgreSQL is unreachable, or while the
        // fleet has one, has nothing to route with: it drains at once.
        let empty = applied == 0 && (!h.up || h.head > 0);
        // Connected, and the head (as last read) above what is applied: since when.
        if h.up && h.head > applied {
            h.head_above_since.get_or_insert_with(Instant::now);
        } else {
            h.head_above_since = None;
        }
        let late = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() >= inner.cfg.max_lag);
        // Connected, but no catch-up has finished for max_lag (a server that does not
        // answer): what the log holds now is unknown, so this node counts as behind.
        let stuck = h.up && late(h.waiting_since);
        let behind = empty || late(h.behind_since) || late(h.head_above_since) || stuck;
        let why = h.behind_why.clone().or_else(|| {
            if empty {
                Some(if h.up {
                    format!("no directory yet: the fleet's log is at change {} and nothing is applied here", h.head)
                } else {
                    "no directory yet and PostgreSQL is unreachable".to_string()
                })
            } else if late(h.head_above_since) {
                Some(format!(
                    "the fleet's log is at change {} and this node has applied {applied}",
                    h.head
                ))
            } else {
                stuck.then(|| {
                    format!(
                        "connected to PostgreSQL, but no catch-up with the fleet's log has finished for {} s",
                        h.waiting_since.map(|t| t.elapsed().as_secs()).unwrap_or(0)
                    )
                })
            }
        });
        (behind, why)
    };
    let was = inner.behind.swap(behind, Ordering::SeqCst);
    metrics::gauge!(m::FLEET_BEHIND).set(if behind { 1.0 } else { 0.0 });
    if behind && !was {
        warn!(why = why.unwrap_or_default(), max_lag = ?inner.cfg.max_lag, "fleet: behind the fleet for longer than fleet.max_lag; draining (421 4.3.2) until caught up");
    } else if was && !behind {
        info!(
            applied = inner.directory.applied(),
            "fleet: caught up with the fleet; drain for lag ended"
        );
    }
}
