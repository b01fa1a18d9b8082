//! The faults: how each kind is injected and repaired, and the record of each in the
//! history (`faults.jsonl`) once it is repaired.

use crate::history::{Estate, Fault, FaultKind, Files};
use crate::nodes::Node;
use crate::run::{say, Sinks, World};
use anyhow::Context;
use coexist_base::clock::now_ms;
use coexist_load::sink::SinkMode;
use std::time::{Duration, Instant};

/// Injects a fault of `kind` on `target`; returns what was done, for the history.
pub(crate) async fn begin_fault(
    w: &mut World,
    sinks: &mut Sinks,
    kind: FaultKind,
    target: &str,
) -> anyhow::Result<String> {
    Ok(match kind {
        FaultKind::PgFailover | FaultKind::PgFailoverLost => {
            w.pg[0].kill9();
            let t = Instant::now();
            let pg2 = &w.pg[1];
            tokio::task::block_in_place(|| pg2.promote())?;
            format!(
                "pg1 killed (-9); pg2 promoted in {} ms",
                t.elapsed().as_millis()
            )
        }
        FaultKind::LdapDown => {
            w.ldap.stop();
            "slapd stopped".into()
        }
        FaultKind::NodeKill => {
            let n = node(w, target)?;
            n.kill9();
            n.wipe()?;
            format!("{target} killed (-9), its spool and directory store deleted")
        }
        FaultKind::NodePartition => {
            w.net.partition(target, "pg1")?;
            w.net.partition(target, "pg2")?;
            format!("{target} cut off from pg1 and pg2 (blackhole routes)")
        }
        FaultKind::HopThrottle => {
            let e = estate(target)?;
            sinks
                .get(e)
                .context("next hop is down")?
                .state
                .set_mode(SinkMode::Throttle);
            format!("{target} answers MAIL with 451 4.7.500")
        }
        FaultKind::HopRefuse => {
            let e = estate(target)?;
            *sinks.slot(e) = None;
            format!("{target} refuses connections (listener closed)")
        }
        FaultKind::NatsDown => {
            w.nats.kill9(target);
            format!("nats-server on {target} killed (-9)")
        }
        FaultKind::SlowLink => {
            w.net.slow(target, 2_000)?;
            format!("{target}'s link limited to 2 Mbit/s")
        }
        FaultKind::SlowDisk => {
            let n = node(w, target)?;
            let pid = n.pid().context("node not running")?;
            let disk = crate::disk::slow(target, pid, &n.spool, 20, 1 << 20)?;
            format!("{target}'s writes to disk {disk} held to 20 a second and 1 MB/s")
        }
    })
}

/// Repairs fault `f` (for a lossy failover: the admin's import).
pub(crate) async fn end_fault(w: &mut World, sinks: &mut Sinks, f: &Fault) -> anyhow::Result<()> {
    match f.kind {
        FaultKind::PgFailover => {}
        FaultKind::PgFailoverLost => crate::admin::repair_by_import(w).await?,
        FaultKind::LdapDown => tokio::task::block_in_place(|| w.ldap.run())?,
        FaultKind::NodeKill => {
            let n = node(w, &f.target)?;
            tokio::task::block_in_place(|| n.start(Duration::from_secs(180)))?;
        }
        FaultKind::NodePartition => {
            w.net.heal(&f.target, "pg1")?;
            w.net.heal(&f.target, "pg2")?;
        }
        FaultKind::HopThrottle => {
            if let Some(s) = sinks.get(estate(&f.target)?) {
                s.state.set_mode(SinkMode::Accept);
            }
        }
        FaultKind::HopRefuse => {
            let e = estate(&f.target)?;
            let s = Sinks::start(e, &sinks.files, sinks.moved.clone(), sinks.unsynced_ms).await?;
            *sinks.slot(e) = Some(s);
        }
        FaultKind::NatsDown => tokio::task::block_in_place(|| w.nats.restart(&f.target))?,
        FaultKind::SlowLink => w.net.unslow(&f.target)?,
        FaultKind::SlowDisk => crate::disk::unslow(&f.target)?,
    }
    Ok(())
}

/// Ends the faults whose time is up (all of them with `all`), recording each.
pub(crate) async fn end_due(
    w: &mut World,
    sinks: &mut Sinks,
    open: &mut Vec<(Instant, Fault)>,
    files: &Files,
    all: bool,
) {
    let now = Instant::now();
    let mut i = 0;
    while i < open.len() {
        if all || open[i].0 <= now {
            let (_, mut f) = open.remove(i);
            if let Err(e) = end_fault(w, sinks, &f).await {
                say(&format!("repairing {:?} on {}: {e:#}", f.kind, f.target));
            }
            f.end_ms = now_ms() as i64;
            say(&format!("repaired: {:?} on {}", f.kind, f.target));
            if let Err(e) = files.append(crate::history::FAULTS, &f) {
                say(&format!("writing the fault: {e}"));
            }
        } else {
            i += 1;
        }
    }
}

/// The node named `name`.
pub(crate) fn node<'a>(w: &'a mut World, name: &str) -> anyhow::Result<&'a mut Node> {
    w.nodes
        .iter_mut()
        .find(|n| n.name == name)
        .with_context(|| format!("no node {name}"))
}

/// The estate whose next hop is named `target` (`onprem`, `cloud`).
pub(crate) fn estate(target: &str) -> anyhow::Result<Estate> {
    match target {
        "onprem" => Ok(Estate::Onprem),
        "cloud" => Ok(Estate::Cloud),
        other => anyhow::bail!("no next hop {other}"),
    }
}
