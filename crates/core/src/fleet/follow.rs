//! Following the fleet's change log: connect, `LISTEN`, apply every change after the local
//! sequence in order, and write this node's heartbeat.
//!
//! The loop wakes on a notification, on a local commit, or every [`TICK`] (the backstop
//! for a missed notification; also the heartbeat). A broken connection is retried every
//! [`TICK`]; meanwhile the directory in force stays as it is.
//!
//! Before applying, every catch-up checks that the log still holds this node's history
//! (PostgreSQL's change at `applied` has the identity this node logged, and the head is not
//! below it); a repair base above `applied` (the admin's `coexist directory import`) skips
//! that check, since it decides every mailbox anew; an automatic base (LDAP, seeding) does
//! not, so it never hides a log that moved back.
//! A base is read whole or not at all: its header and rows in one REPEATABLE READ snapshot,
//! and a base without its rows is an error, never an empty directory.
//!
//! Whether the node is behind the fleet, its heartbeat and the questions to its peers are
//! in [`super::lag`]; a failed heartbeat is logged and nothing more.

use super::sql::{self, db_err, seq_u32};
use super::{lag, Divergence, FleetError, Inner};
use crate::directory::{batch::BatchRow, Base, BaseRow, Stamp, StateId};
use crate::metrics as m;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tracing::{error, info, warn};

mod base;

use base::{adopt_fleet, install_base, replace_store};

/// Poll and heartbeat interval.
pub(super) const TICK: Duration = Duration::from_secs(1);

/// Changes fetched per round trip while catching up.
const FETCH: i64 = 16;

/// How long connecting, migrating and `LISTEN` may take together.
const SETUP: Duration = Duration::from_secs(20);

/// Follows the log until the fleet is stopped.
pub(super) async fn run(inner: Arc<Inner>) {
    let mut last_peer_check = Instant::now();
    while !inner.stop.load(Ordering::SeqCst) {
        let ended = session(&inner).await;
        // A new session starts its own wait for a catch-up (see `evaluate`).
        inner.lock_health().waiting_since = None;
        if let Err(e) = ended {
            let first = {
                let mut h = inner.lock_health();
                let was_up = h.up;
                h.up = false;
                h.error = Some(e.to_string());
                if was_up {
                    h.since = super::now_rfc3339();
                    h.since_at = Instant::now();
                }
                was_up
            };
            metrics::gauge!(m::FLEET_POSTGRES_UP).set(0.0);
            if first {
                error!(error = %e, "fleet: lost PostgreSQL; routing on the directory in force, directory changes refused until it is back");
            }
        }
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        if last_peer_check.elapsed() >= TICK * 2 {
            last_peer_check = Instant::now();
            lag::check_peers(&inner).await;
        }
        lag::evaluate(&inner);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

/// One connection's life: listen, then catch up and beat until it fails.
async fn session(inner: &Arc<Inner>) -> Result<(), FleetError> {
    let setup = async {
        let (client, notes) = sql::connect_listening(&inner.pg).await?;
        // Migrated once per process (at start, or at the first connection when PostgreSQL
        // was down then); a reconnect only reads the fleet id.
        let id = if inner.migrated.load(Ordering::SeqCst) {
            sql::fleet_id(&client, inner.schema(), &inner.pg).await?
        } else {
            let id = sql::migrate(&client, inner.schema(), &inner.pg).await?;
            inner.migrated.store(true, Ordering::SeqCst);
            id
        };
        client
            .batch_execute(&format!(r#"LISTEN "{}""#, sql::channel(inner.schema())))
            .await
            .map_err(db_err(&inner.pg))?;
        Ok::<_, FleetError>((client, notes, id))
    };
    let (client, mut notes, id) =
        tokio::time::timeout(SETUP, setup)
            .await
            .map_err(|_| FleetError::Unreachable {
                target: super::target(&inner.pg),
                reason: format!("session set-up took longer than {} s", SETUP.as_secs()),
            })??;
    if adopt_fleet(inner, &id) {
        let (dir, marker) = (inner.store_dir.clone(), id.clone());
        super::commit::blocking(move || super::write_marker(&dir, &marker)).await??;
        *inner.fleet_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
    }
    {
        let mut h = inner.lock_health();
        h.waiting_since.get_or_insert_with(Instant::now);
        if !h.up {
            h.up = true;
            h.error = None;
            h.peers_not_asked.clear();
            h.since = super::now_rfc3339();
            h.since_at = Instant::now();
            info!("fleet: connected to PostgreSQL; following the change log");
        }
    }
    metrics::gauge!(m::FLEET_POSTGRES_UP).set(1.0);
    loop {
        let step = async {
            let res = catch_up(inner, &client).await;
            let beat = match res {
                Err(ref e) if e.is_unreachable() => Ok(()),
                _ => lag::beat(inner, &client).await,
            };
            (res, beat)
        };
        let (res, beat) = tokio::time::timeout(super::STATEMENT_TIMEOUT * 2, step)
            .await
            .map_err(|_| FleetError::Unreachable {
                target: super::target(&inner.pg),
                reason: format!(
                    "no answer within {} s",
                    (super::STATEMENT_TIMEOUT * 2).as_secs()
                ),
            })?;
        if !matches!(res, Err(ref e) if e.is_unreachable()) {
            inner.lock_health().waiting_since = None;
        }
        match res {
            Err(e) if e.is_unreachable() => return Err(e),
            // Logged and shown by `diverge`; counted as behind there.
            Err(FleetError::Diverged(_)) => {}
            Err(e) => {
                // The log has a change this node cannot apply: it stays behind (and drains
                // after max_lag) rather than skip it.
                error!(error = %e, "fleet: cannot apply the change log");
                inner.mark_behind(&e.to_string());
            }
            Ok(_) => {}
        }
        match beat {
            Err(e) if e.is_unreachable() => return Err(e),
            // The heartbeat is for the others' view of this node: its failure says nothing
            // about this node's directory.
            Err(e) => warn!(error = %e, "fleet: heartbeat failed"),
            Ok(()) => {}
        }
        lag::evaluate(inner);
        if inner.stop.load(Ordering::SeqCst) {
            // Stopped on purpose: say so, so that the others do not count it as live.
            let _ = client
                .execute(
                    &format!(
                        r#"UPDATE "{}".nodes SET stopped = true WHERE name = $1"#,
                        inner.schema()
                    ),
                    &[&inner.cfg.node],
                )
                .await;
            return Ok(());
        }
        tokio::select! {
            n = notes.recv() => {
                if n.is_none() {
                    return Err(FleetError::Unreachable {
                        target: super::target(&inner.pg),
                        reason: "connection closed".into(),
                    });
                }
            }
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Applies every change after the local sequence, in order; returns the sequence applied.
/// One applier at a time (the follower, a commit).
/// A base later than the changes applied here makes them moot: the node jumps to it (its
/// rows are the whole state at that point), whatever its history before.
pub(super) async fn catch_up(inner: &Inner, client: &Client) -> Result<u32, FleetError> {
    let _one = inner.applying.lock().await;
    catch_up_locked(inner, client, false).await
}

/// [`catch_up`] for a caller that holds `inner.applying` (a commit, which keeps it until it
/// has applied its own change, so the follower does not fetch that change meanwhile).
/// `in_commit`: `client` is inside the commit's transaction, which holds the log's lock (no
/// change can commit meanwhile, so a base is read there; else in a snapshot of its own).
pub(super) async fn catch_up_locked(
    inner: &Inner,
    client: &Client,
    in_commit: bool,
) -> Result<u32, FleetError> {
    let s = inner.schema().to_string();
    let err = db_err(&inner.pg);
    if inner.replace.load(Ordering::SeqCst) {
        replace_store(inner, client, in_commit).await?;
    }
    loop {
        let here = inner.directory.applied_stamp();
        let applied = here.seq;
        let (head, there) = sql::head_and(client, &s, applied, &inner.pg).await?;
        inner.lock_health().head = head;
        let row = client
            .query_one(
                &format!(
                    r#"SELECT max(seq), coalesce(bool_or(repair), false) FROM "{s}".changes WHERE kind = 'base' AND seq > $1"#
                ),
                &[&i64::from(applied)],
            )
            .await
            .map_err(&err)?;
        let (base, repair): (Option<i64>, bool) = (row.get(0), row.get(1));
        if let Some(b) = base {
            let b = seq_u32(b)?;
            // Only an admin's base (a repair) is taken over a history the log does not
            // hold: an automatic one (LDAP, seeding) would hide the lost changes.
            if !repair {
                if let Err(why) = same_history(&here, head, there.as_ref()) {
                    inner.diverge(&why.to_string());
                    return Err(FleetError::Diverged(why));
                }
            }
            if b > applied + 1 {
                info!(
                    from = applied,
                    to = b,
                    "fleet: a later base makes the changes before it moot; loading it"
                );
            }
            install_base(inner, client, b, in_commit, false).await?;
            inner.converged();
            continue;
        }
        if let Err(why) = same_history(&here, head, there.as_ref()) {
            inner.diverge(&why.to_string());
            return Err(FleetError::Diverged(why));
        }
        inner.converged();
        if head <= applied {
            let mut h = inner.lock_health();
            if h.behind_since.is_some() && inner.directory.applied() >= head {
                h.behind_since = None;
                h.behind_why = None;
            }
            return Ok(applied);
        }
        let rows = client
            .query(
                &format!(
                    r#"SELECT seq, kind, source, rolls_back, body, extract(epoch FROM committed_at)::float8, {}
                       FROM "{s}".changes WHERE seq > $1 ORDER BY seq LIMIT {FETCH}"#,
                    sql::STAMP_COLUMNS
                ),
                &[&i64::from(applied)],
            )
            .await
            .map_err(&err)?;
        for row in rows {
            let seq = seq_u32(row.get(0))?;
            let at = sql::stamp(seq, &row, 6);
            let kind: &str = row.get(1);
            let source: String = row.get(2);
            let committed: f64 = row.get(5);
            match kind {
                "apply" => {
                    let body: Vec<u8> = row.get(4);
                    apply_rows(inner, at, body, source).await?;
                }
                "delta" => {
                    let body: Vec<u8> = row.get(4);
                    super::delta::apply_delta(inner, at, body, source).await?;
                }
                "rollback" => {
                    let batch = seq_u32(row.get::<_, Option<i64>>(3).unwrap_or(0))?;
                    super::rollback::apply_rollback(inner, at, batch, source, row.get(4)).await?;
                }
                // Bases are taken at the top of the loop; one that committed since is
                // taken there on the next turn.
                "base" => break,
                other => {
                    return Err(FleetError::Refused(format!(
                        "change {seq} has unknown kind {other:?}: upgrade this node"
                    )))
                }
            }
            applied_now(inner, committed);
        }
    }
}

/// Whether PostgreSQL's log (head `head`, its change at this node's `applied` being
/// `there`) still holds the history this node applied (`here`): `Err` with both sides named
/// when it does not. A change logged here before identities existed is taken on its number.
pub(super) fn same_history(
    here: &Stamp,
    head: u32,
    there: Option<&Stamp>,
) -> Result<(), Divergence> {
    if here.seq == 0 {
        return Ok(());
    }
    let here = here.clone();
    if head < here.seq {
        return Err(Divergence::MovedBack { head, here });
    }
    match there {
        None => Err(Divergence::Missing {
            seq: here.seq,
            head,
            here,
        }),
        Some(t) if here.uid.is_some() && t.uid != here.uid => Err(Divergence::Rewritten {
            there: t.clone(),
            here,
        }),
        Some(_) => Ok(()),
    }
}

/// Records that a change committed at `committed` (epoch seconds) is applied here now.
fn applied_now(inner: &Inner, committed: f64) {
    let now = crate::clock::now_secs_f64();
    metrics::histogram!(m::FLEET_APPLY_DELAY).record((now - committed).max(0.0));
    inner.published();
}

/// The rows of an `apply` change, as the directory takes them. A state that is not a route
/// on this node fails the change: nodes of one fleet must have the same routes.
pub(super) fn decode_rows(
    body: &[u8],
    names: &[crate::types::RouteName],
    seq: u32,
) -> Result<Vec<BatchRow>, FleetError> {
    let mut rows = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(line).map_err(|_| {
            FleetError::Refused(format!("change {seq}: row {} is not UTF-8", i + 1))
        })?;
        let (address, state) = text.split_once('\t').ok_or_else(|| {
            FleetError::Refused(format!("change {seq}: row {} has no state", i + 1))
        })?;
        let state = StateId::find(names, state).ok_or_else(|| {
            FleetError::Refused(format!(
                "change {seq} moves mailboxes to {state:?}, which is not a route on this node (every node of a fleet needs the same routes)"
            ))
        })?;
        rows.push(BatchRow {
            line: i as u64 + 1,
            address: address.to_string(),
            key: address.to_string(),
            state,
        });
    }
    Ok(rows)
}

/// The body of an `apply` change: one `address TAB state` line per row.
pub(super) fn encode_rows(rows: &[BatchRow], names: &[crate::types::RouteName]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 40);
    for r in rows {
        out.extend_from_slice(r.key.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(
            names
                .get(r.state.index())
                .map(|n| n.as_str())
                .unwrap_or_default()
                .as_bytes(),
        );
        out.push(b'\n');
    }
    out
}

async fn apply_rows(
    inner: &Inner,
    at: Stamp,
    body: Vec<u8>,
    source: String,
) -> Result<(), FleetError> {
    let dir = inner.directory.clone();
    tokio::task::spawn_blocking(move || {
        let rows = decode_rows(&body, dir.states(), at.seq)?;
        dir.apply_at(&at, &rows, &source)?;
        Ok::<_, FleetError>(())
    })
    .await
    .map_err(|e| FleetError::Refused(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RouteName;

    fn names() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    #[test]
    fn a_log_that_moved_back_or_holds_another_change_is_told_apart() {
        let here = Stamp {
            seq: 5,
            uid: Some("aaa".into()),
            committed: Some("2026-12-01T10:00:00.000000Z".into()),
        };
        let same = here.clone();
        assert_eq!(same_history(&here, 5, Some(&same)), Ok(()));
        assert_eq!(same_history(&here, 9, Some(&same)), Ok(()));
        let e = same_history(&here, 4, None).unwrap_err().to_string();
        assert!(
            e.starts_with("PostgreSQL's change log ends at change 4, below change 5 (id aaa, committed 2026-12-01T10:00:00.000000Z)"),
            "{e}"
        );
        let other = Stamp {
            uid: Some("bbb".into()),
            ..here.clone()
        };
        let e = same_history(&here, 6, Some(&other)).unwrap_err();
        assert!(matches!(e, Divergence::Rewritten { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("holds change 5 (id bbb, ") && e.contains("applied change 5 (id aaa, "),
            "{e}"
        );
        assert!(same_history(&here, 6, None).is_err());
        // Logged before identities: taken on its number; nothing applied: nothing to check.
        assert_eq!(same_history(&Stamp::seq(5), 6, Some(&other)), Ok(()));
        assert_eq!(same_history(&Stamp::seq(0), 0, None), Ok(()));
    }

    #[test]
    fn batch_rows_round_trip_and_unknown_states_fail_the_change() {
        let rows = crate::directory::batch::parse(
            b"EmailAddress\nAlice@NHS.test\nbob@nhs.test\n",
            "b.csv",
            &names(),
            Some("onprem"),
        )
        .unwrap();
        let body = encode_rows(&rows, &names());
        assert_eq!(body, b"alice@nhs.test\tonprem\nbob@nhs.test\tonprem\n");
        let back = decode_rows(&body, &names(), 7).unwrap();
        assert_eq!(
            back.iter()
                .map(|r| (r.key.as_str(), r.state.index()))
                .collect::<Vec<_>>(),
            vec![("alice@nhs.test", 1), ("bob@nhs.test", 1)]
        );
        let e = decode_rows(b"a@nhs.test\tarchive\n", &names(), 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("change 7 moves mailboxes to \"archive\""), "{e}");
        let e = decode_rows(b"a@nhs.test\n", &names(), 8)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "change 8: row 1 has no state");
    }
}
