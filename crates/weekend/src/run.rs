//! One run: builds the topology, starts every part, sends load through all three MX nodes
//! while the plan's batches, LDAP changes and faults happen, waits for the queues to empty,
//! and leaves the history in the output folder.

use crate::history::{Estate, Fault, FaultKind, Files, Rules};
use crate::net::Net;
use crate::nodes::{self, Node, NodeSettings};
use crate::plan::{Action, Plan};
use crate::services::{self, sink_addr, Ldap, Nats, Postgres};
use crate::{admin, faults, load, watch};
use anyhow::Context;
use coexist_base::clock::now_ms;
use coexist_base::proto::Reply;
use coexist_load::sink::{Sink, SinkOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The hosts of the topology and their addresses (10.77.0.N).
const HOSTS: [(&str, u8); 9] = [
    ("pg1", 11),
    ("pg2", 12),
    ("nats1", 21),
    ("nats2", 22),
    ("nats3", 23),
    ("ldap", 31),
    ("mx1", 41),
    ("mx2", 42),
    ("mx3", 43),
];
const MX: [&str; 3] = ["mx1", "mx2", "mx3"];

/// Everything a run has started; stopped in reverse order when dropped.
pub(crate) struct World {
    /// The admin's repair after a failover that lost a batch: the directory file to import
    /// (the source's states), set when the batch is lost.
    pub(crate) repair: Option<Vec<u8>>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) ldap: Ldap,
    pub(crate) nats: Nats,
    pub(crate) pg: Vec<Postgres>,
    pub(crate) net: Net,
}

/// The two next hops, in this process: their record files are the history's deliveries.
pub(crate) struct Sinks {
    pub(crate) onprem: Option<Sink>,
    pub(crate) cloud: Option<Sink>,
    /// When each mailbox's move to Exchange Online was made, for its `5.1.10` window.
    pub(crate) moved: Arc<RwLock<HashMap<String, i64>>>,
    pub(crate) unsynced_ms: i64,
    pub(crate) files: PathBuf,
}

impl Sinks {
    pub(crate) async fn start(
        estate: Estate,
        files: &Path,
        moved: Arc<RwLock<HashMap<String, i64>>>,
        unsynced_ms: i64,
    ) -> anyhow::Result<Sink> {
        let check: Option<coexist_load::sink::RcptCheck> = match estate {
            Estate::Onprem => None,
            Estate::Cloud => Some(Arc::new(move |a: &coexist_base::types::Address| {
                let at = *moved.read().ok()?.get(&a.to_string())?;
                (now_ms() as i64 - at < unsynced_ms).then(|| {
                    Reply::new(
                        550,
                        "5.1.10",
                        "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                    )
                })
            })),
        };
        let opts = SinkOptions {
            hostname: format!("{}.sink.test", estate.as_str()),
            keep_bodies: false,
            record: Some(files.join(crate::history::record_file(estate))),
            rcpt_check: check,
            ..Default::default()
        };
        Ok(Sink::start(sink_addr(estate), opts).await?)
    }

    pub(crate) fn get(&self, e: Estate) -> Option<&Sink> {
        match e {
            Estate::Onprem => self.onprem.as_ref(),
            Estate::Cloud => self.cloud.as_ref(),
        }
    }

    pub(crate) fn slot(&mut self, e: Estate) -> &mut Option<Sink> {
        match e {
            Estate::Onprem => &mut self.onprem,
            Estate::Cloud => &mut self.cloud,
        }
    }
}

/// Options of a run.
pub struct RunOptions {
    /// The plan.
    pub plan: Plan,
    /// The seed (mailboxes moved, message contents).
    pub seed: u64,
    /// The output folder (history, logs, report).
    pub out: PathBuf,
    /// The `coexist` binary.
    pub coexist: PathBuf,
}

/// Runs the weekend and writes its history under `o.out`; returns when every queue is
/// empty (or the plan's drain time is over) and every part is stopped.
pub async fn run(o: &RunOptions) -> anyhow::Result<()> {
    let plan = &o.plan;
    let files = Files::new(&o.out);
    let started = now_ms() as i64;
    say(&format!(
        "{} run, seed {}, output in {}",
        plan.name,
        o.seed,
        o.out.display()
    ));
    let mut world = build(o).await?;
    say("topology up: 2 PostgreSQL, 3 NATS, slapd, 3 coexist nodes");

    // The next hops.
    let moved = Arc::new(RwLock::new(HashMap::new()));
    let unsynced_ms = plan.unsynced_for.as_millis() as i64;
    let mut sinks = Sinks {
        onprem: Some(Sinks::start(Estate::Onprem, &o.out, moved.clone(), unsynced_ms).await?),
        cloud: Some(Sinks::start(Estate::Cloud, &o.out, moved.clone(), unsynced_ms).await?),
        moved,
        unsynced_ms,
        files: o.out.clone(),
    };

    // Every node, every second.
    let polling = Arc::new(AtomicBool::new(true));
    let poller = watch::start_poller(&world.nodes, &files, polling.clone())?;

    // The load: the day's curve through all three MX hosts.
    let mut mb = admin::Mailboxes::new(plan, o.seed);
    let load = load::start_load(plan, &world.nodes, &mb, &files)?;
    let t0 = Instant::now();

    // The schedule.
    let mut open: Vec<(Instant, Fault)> = Vec::new();
    // A batch no node takes (every node refusing changes until a repair) is tried again
    // 5 s later, at most 12 times, while the other steps and the faults' ends go on.
    let mut steps: Vec<(crate::plan::Step, u32)> =
        plan.steps.iter().cloned().map(|s| (s, 0)).collect();
    let mut next = 0;
    while next < steps.len() {
        let (step, tries) = steps[next].clone();
        next += 1;
        while t0.elapsed() < step.at {
            faults::end_due(&mut world, &mut sinks, &mut open, &files, false).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        faults::end_due(&mut world, &mut sinks, &mut open, &files, false).await;
        let step_ms = now_ms() as i64;
        let r = match &step.action {
            Action::Batch {
                name,
                size,
                report,
                node,
            } => admin::apply_batch(&world, &mut mb, &sinks, &files, name, *size, *report, node)
                .await
                .map(|_| ()),
            Action::LdapMove { count } => {
                admin::ldap_move(&world, &mut mb, &sinks, &files, *count, plan).await
            }
            Action::Fault {
                kind,
                target,
                length,
            } => match if *kind == FaultKind::PgFailoverLost {
                admin::lose_a_batch(&mut world, &mut mb, &sinks, &files).await
            } else {
                faults::begin_fault(&mut world, &mut sinks, *kind, target).await
            } {
                Ok(detail) => {
                    let f = Fault {
                        start_ms: step_ms,
                        end_ms: 0,
                        kind: *kind,
                        target: target.clone(),
                        detail,
                    };
                    say(&format!(
                        "fault: {:?} on {target} for {} s",
                        kind,
                        length.as_secs()
                    ));
                    open.push((Instant::now() + *length, f));
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            say(&format!(
                "step {:?} at +{} s failed: {e:#}",
                step.action,
                step.at.as_secs()
            ));
            if matches!(step.action, Action::Batch { .. }) && tries < 12 {
                let again = crate::plan::Step {
                    at: t0.elapsed() + Duration::from_secs(5),
                    action: step.action.clone(),
                };
                let at = steps[next..].partition_point(|(s, _)| s.at <= again.at) + next;
                steps.insert(at, (again, tries + 1));
            }
        }
    }
    // The rest of the load; faults end on time meanwhile.
    while !load.is_finished() {
        faults::end_due(&mut world, &mut sinks, &mut open, &files, false).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    faults::end_due(&mut world, &mut sinks, &mut open, &files, true).await;
    let report = load.await.context("load task")?;
    say(&format!(
        "load done: {} sent, {} accepted ({} recipients), {} session errors",
        report.sent, report.accepted, report.accepted_rcpts, report.errors
    ));
    load::write_load_report(&report, plan, &o.out)?;

    // Drain: every node's queue empty for three samples in a row.
    let drained = watch::drain(&world.nodes, plan.drain).await;
    say(&match drained {
        Ok(()) => "every queue is empty".to_string(),
        Err(left) => format!("drain time over: {left}"),
    });
    if let Err(e) = watch::read_finals(&world.nodes, &mb, o.seed, &files).await {
        say(&format!(
            "reading the nodes' directories after the run: {e:#}"
        ));
    }
    polling.store(false, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    for n in world.nodes.iter_mut() {
        n.stop(Duration::from_secs(20));
    }
    drop(sinks);
    let rules = Rules {
        max_lag_ms: plan.max_lag.as_millis() as i64,
        attempt_ms: plan.delivery_timeout.as_millis() as i64,
        slack_ms: 5_000,
    };
    files.write_rules(&rules, (started, now_ms() as i64))?;
    drop(world);
    Ok(())
}

/// Prints a line of progress with the time.
pub fn say(what: &str) {
    println!("{} {what}", chrono::Utc::now().format("%H:%M:%S"));
}

async fn build(o: &RunOptions) -> anyhow::Result<World> {
    let plan = &o.plan;
    let dir = o.out.join("hosts");
    #[allow(clippy::disallowed_methods)] // Set-up: the folder the servers keep their data in.
    {
        std::fs::create_dir_all(&dir)?;
        // PostgreSQL runs as `postgres`: it must be able to walk down to its folder.
        use std::os::unix::fs::PermissionsExt;
        for p in [o.out.as_path(), dir.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    crate::disk::sweep();
    let net = Net::build(&HOSTS)?;
    let pg1 = Postgres::primary(&net, "pg1", &dir)?;
    let pg2 = Postgres::standby(&net, "pg2", &dir, &pg1)?;
    let nats = Nats::start(&net, &["nats1", "nats2", "nats3"], &dir)?;
    let mb = admin::Mailboxes::new(plan, o.seed);
    let mut ldif = String::with_capacity(plan.mailboxes * 200);
    let mut initial = Vec::with_capacity(plan.mailboxes);
    for (i, e) in mb.estate.iter().enumerate() {
        ldif.push_str(&services::user_ldif(i, *e));
        initial.push((admin::address(i), *e));
    }
    Files::new(&o.out).write_initial(&initial)?;
    let ldap = Ldap::start(&net, "ldap", &dir, &ldif)?;
    let settings = NodeSettings {
        bin: o.coexist.clone(),
        postgres: format!(
            "host={},{} port=5432 user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=3 sslmode=disable",
            pg1.addr.ip(),
            pg2.addr.ip()
        ),
        nats: nats.urls(),
        ldap_url: ldap.url.clone(),
        max_lag: plan.max_lag,
        takeover_after: plan.takeover_after,
        delivery_timeout: plan.delivery_timeout,
        sync_interval: plan.sync_interval,
        max_backoff: plan.max_backoff,
    };
    let mut nodes = nodes::prepare(&net, &MX, &settings, &dir)?;
    // The first node makes the fleet's schema and imports LDAP as base 1; the others load it.
    for n in nodes.iter_mut() {
        let name = n.name.clone();
        tokio::task::block_in_place(|| n.start(Duration::from_secs(180)))
            .with_context(|| format!("starting {name}"))?;
        say(&format!("{name} listening"));
    }
    Ok(World {
        repair: None,
        nodes,
        ldap,
        nats,
        pg: vec![pg1, pg2],
        net,
    })
}
