//! What the admins do during the weekend: migration batches through a node's API, LDAP
//! changes, and the repair of a log that moved back; each change of the directory's truth
//! written to the history (`moves.jsonl`).

use crate::history::{Estate, Files, Move};
use crate::nodes::Node;
use crate::plan::Plan;
use crate::run::{say, Sinks, World};
use crate::services::DOMAIN;
use coexist_base::clock::now_ms;
use std::time::{Duration, Instant};

/// The mailboxes and where they are, as the run moves them.
pub(crate) struct Mailboxes {
    /// Each mailbox's estate now (the truth).
    pub(crate) estate: Vec<Estate>,
    /// Each mailbox's state at the source (LDAP: the start and LDAP's moves, not batches).
    pub(crate) source: Vec<Estate>,
    /// On-premises mailboxes not yet picked for a move, in a seeded order.
    pub(crate) to_move: Vec<usize>,
    /// Mailboxes read back from every node after the run whatever the sample (those of
    /// LDAP's changes and of the batch a failover lost).
    pub(crate) pinned: Vec<usize>,
}

impl Mailboxes {
    pub(crate) fn new(plan: &Plan, seed: u64) -> Mailboxes {
        let estate: Vec<Estate> = (0..plan.mailboxes)
            .map(|i| {
                if i % plan.cloud_every == 0 {
                    Estate::Cloud
                } else {
                    Estate::Onprem
                }
            })
            .collect();
        let mut to_move: Vec<usize> = (0..plan.mailboxes)
            .filter(|i| estate[*i] == Estate::Onprem)
            .collect();
        fastrand::Rng::with_seed(seed).shuffle(&mut to_move);
        Mailboxes {
            source: estate.clone(),
            estate,
            to_move,
            pinned: Vec::new(),
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Vec<usize> {
        let at = self.to_move.len().saturating_sub(n);
        self.to_move.split_off(at)
    }
}

/// The address of mailbox `i`.
pub(crate) fn address(i: usize) -> String {
    format!("user{i}@{DOMAIN}")
}

/// A migration batch of `size` mailboxes through `node`'s API (the others when it cannot
/// take it): a report with a few users not completed, or a plain CSV; returns the
/// mailboxes moved. When no node takes it the mailboxes go back to the pool.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply_batch(
    w: &World,
    mb: &mut Mailboxes,
    sinks: &Sinks,
    files: &Files,
    name: &str,
    size: usize,
    report: bool,
    node: &str,
) -> anyhow::Result<Vec<usize>> {
    let picked = mb.take(size);
    // A report lists a few users whose move did not complete: they stay where they are.
    let mut left = Vec::new();
    let mut csv = String::new();
    let mut moving = Vec::new();
    if report {
        csv.push_str("#TYPE Microsoft.Exchange.Migration.MigrationUser\r\n\"Identity\",\"EmailAddress\",\"Status\",\"BatchId\"\r\n");
        for (k, i) in picked.iter().enumerate() {
            let status = match k % 500 {
                7 => "Failed",
                13 => "Syncing",
                _ => "Completed",
            };
            if status == "Completed" {
                moving.push(*i);
            } else {
                left.push(*i);
            }
            csv.push_str(&format!(
                "\"{a}\",\"{a}\",\"{status}\",\"{name}\"\r\n",
                a = address(*i)
            ));
        }
    } else {
        csv.push_str("EmailAddress\r\n");
        for i in &picked {
            csv.push_str(&format!("{}\r\n", address(*i)));
            moving.push(*i);
        }
    }
    let from_ms = now_ms() as i64;
    // Through the node the plan names; when it cannot take it (dead, cut off), through the
    // others, as an admin would.
    let mut order: Vec<&Node> = w.nodes.iter().filter(|n| n.name == node).collect();
    order.extend(w.nodes.iter().filter(|n| n.name != node));
    let mut last = None;
    {
        for n in &order {
            let client = n.client(Duration::from_secs(60))?;
            let body = csv.clone().into_bytes();
            let source = format!("{name}.csv");
            let r = tokio::task::spawn_blocking(move || {
                client.directory_apply(&coexist_api::client::BatchUpload {
                    body: &body,
                    source: &source,
                    state: Some("cloud"),
                    dry_run: false,
                    at: None,
                    format: if report {
                        coexist_api::types::BatchFormat::MigrationUsers
                    } else {
                        coexist_api::types::BatchFormat::Auto
                    },
                })
            })
            .await?;
            match r {
                Ok(reply) => {
                    last = Some((n.name.clone(), reply.report.id));
                    break;
                }
                Err(e) => say(&format!("batch {name} through {}: {e}", n.name)),
            }
        }
    }
    let Some((through, id)) = last else {
        // The mailboxes go back to the pool: the run tries the same batch again later.
        mb.to_move.extend_from_slice(&picked);
        anyhow::bail!("batch {name}: no node took it");
    };
    // Users whose move did not complete stay where they are, for a later batch.
    for i in left {
        mb.to_move.insert(0, i);
    }
    let to_ms = now_ms() as i64;
    record_move(
        mb,
        sinks,
        files,
        &moving,
        Estate::Cloud,
        from_ms,
        to_ms,
        format!(
            "batch {} ({name}, {} mailboxes, through {through})",
            id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
            moving.len()
        ),
    )?;
    say(&format!(
        "batch {name}: {} mailboxes moved through {through} in {} ms",
        moving.len(),
        to_ms - from_ms
    ));
    Ok(moving)
}

/// `count` mailboxes moved to Exchange Online in LDAP (their recipient type changed).
pub(crate) async fn ldap_move(
    w: &World,
    mb: &mut Mailboxes,
    sinks: &Sinks,
    files: &Files,
    count: usize,
    plan: &Plan,
) -> anyhow::Result<()> {
    let picked = mb.take(count);
    let from_ms = now_ms() as i64;
    if let Err(e) = w.ldap.move_mailboxes(&picked, Estate::Cloud).await {
        // Some may have moved before the error: their truth is "either" from now on; the
        // checker cannot know which, so the whole set is recorded as moving.
        say(&format!("ldap move: {e:#}"));
    }
    // In force once a sync has read it and the fleet has it: a sync interval, the sync
    // itself and the base's commit (generous: 3 intervals and 10 s).
    let to_ms = now_ms() as i64 + 3 * plan.sync_interval.as_millis() as i64 + 10_000;
    for i in &picked {
        mb.source[*i] = Estate::Cloud;
    }
    mb.pinned.extend_from_slice(&picked);
    record_move(
        mb,
        sinks,
        files,
        &picked,
        Estate::Cloud,
        from_ms,
        to_ms,
        format!("ldap modify ({} mailboxes)", picked.len()),
    )?;
    say(&format!("ldap: {} mailboxes moved", picked.len()));
    Ok(())
}

/// Records a change of the truth: the mailboxes' new estate, the cloud next hop's
/// `5.1.10` window, and the move in `moves.jsonl`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_move(
    mb: &mut Mailboxes,
    sinks: &Sinks,
    files: &Files,
    moving: &[usize],
    state: Estate,
    from_ms: i64,
    to_ms: i64,
    source: String,
) -> anyhow::Result<()> {
    for i in moving {
        mb.estate[*i] = state;
    }
    let addresses: Vec<String> = moving.iter().map(|i| address(*i)).collect();
    // Exchange Online's own directory learns of the move some time after it was made.
    if state == Estate::Cloud {
        if let Ok(mut m) = sinks.moved.write() {
            for a in &addresses {
                m.insert(a.clone(), from_ms);
            }
        }
    }
    files.append(
        crate::history::MOVES,
        &Move {
            from_ms,
            to_ms,
            state,
            source,
            addresses,
        },
    )?;
    Ok(())
}

/// The failover that loses a commit: the standby is cut off from the primary, a batch is
/// committed on the primary alone (and applied by the nodes), the primary is killed and
/// the standby promoted. The nodes find PostgreSQL's log behind what they applied: they
/// refuse directory changes and drain after `fleet.max_lag` (README, Failure modes) until
/// the admin's import at the end of the fault.
pub(crate) async fn lose_a_batch(
    w: &mut World,
    mb: &mut Mailboxes,
    sinks: &Sinks,
    files: &Files,
) -> anyhow::Result<String> {
    w.net.partition("pg1", "pg2")?;
    let r = apply_batch(w, mb, sinks, files, "lost", 500, false, "mx1").await;
    if let Ok(moved) = &r {
        mb.pinned.extend_from_slice(moved);
    }
    // Every node applies it within a moment (NOTIFY, else the poll each second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.pg[0].kill9();
    w.net.heal("pg1", "pg2")?;
    r?;
    let t = Instant::now();
    let pg2 = &w.pg[1];
    tokio::task::block_in_place(|| pg2.promote())?;
    let mut csv = String::from("address,state\n");
    for (i, e) in mb.source.iter().enumerate() {
        csv.push_str(&format!("{},{}\n", address(i), e.as_str()));
    }
    w.repair = Some(csv.into_bytes());
    Ok(format!(
        "pg2 cut off from pg1, batch `lost` (500 mailboxes) committed on pg1 alone, pg1 killed (-9), pg2 promoted in {} ms",
        t.elapsed().as_millis()
    ))
}

/// The admin's repair of a log that moved back: `coexist directory import` of the source's
/// states through a node that has the lost batch (rows the file does not change keep that
/// node's batch states), retried through the others.
pub(crate) async fn repair_by_import(w: &mut World) -> anyhow::Result<()> {
    let Some(csv) = w.repair.take() else {
        return Ok(());
    };
    let mut last = String::new();
    for _round in 0..6 {
        for n in &w.nodes {
            let client = n.client(Duration::from_secs(120))?;
            let body = csv.clone();
            let r = tokio::task::spawn_blocking(move || {
                client.directory_import(&body, "repair-after-failover.csv", false)
            })
            .await?;
            match r {
                Ok(reply) => {
                    let text: String = format!("{reply:?}").chars().take(300).collect();
                    say(&format!(
                        "repair: directory import through {}: {text}",
                        n.name
                    ));
                    return Ok(());
                }
                Err(e) => last = format!("{}: {e}", n.name),
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    anyhow::bail!("repair: no node took the import ({last})")
}
