//! One run: builds the topology, starts every part, sends load through all three MX nodes
//! while the plan's batches, LDAP changes and faults happen, waits for the queues to empty,
//! and leaves the history in the output folder.

use crate::history::{
    Delivery, Estate, Fault, FaultKind, Files, Move, Refusal, Rules, Sample, Sent,
};
use crate::net::Net;
use crate::nodes::{self, Node, NodeSettings};
use crate::plan::{due_times, Action, Plan};
use crate::services::{self, sink_addr, Ldap, Nats, Postgres, DOMAIN};
use anyhow::Context;
use coexist_base::clock::now_ms;
use coexist_base::proto::{RcptOutcome, Reply};
use coexist_load::client::{self, Generator, LoadOptions, Observed, Offsets, Traffic};
use coexist_load::sink::{Sink, SinkMode, SinkOptions};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
struct World {
    /// The admin's repair after a failover that lost a batch: the directory file to import
    /// (the source's states), set when the batch is lost.
    repair: Option<Vec<u8>>,
    nodes: Vec<Node>,
    ldap: Ldap,
    nats: Nats,
    pg: Vec<Postgres>,
    net: Net,
}

/// The mailboxes and where they are, as the run moves them.
struct Mailboxes {
    estate: Vec<Estate>,
    /// Each mailbox's state at the source (LDAP: the start and LDAP's moves, not batches).
    source: Vec<Estate>,
    /// On-premises mailboxes not yet picked for a move, in a seeded order.
    to_move: Vec<usize>,
    /// Mailboxes read back from every node after the run whatever the sample (those of
    /// LDAP's changes and of the batch a failover lost).
    pinned: Vec<usize>,
}

impl Mailboxes {
    fn new(plan: &Plan, seed: u64) -> Mailboxes {
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

    fn take(&mut self, n: usize) -> Vec<usize> {
        let at = self.to_move.len().saturating_sub(n);
        self.to_move.split_off(at)
    }
}

fn address(i: usize) -> String {
    format!("user{i}@{DOMAIN}")
}

/// The two next hops, in this process: their record files are the history's deliveries.
struct Sinks {
    onprem: Option<Sink>,
    cloud: Option<Sink>,
    /// When each mailbox's move to Exchange Online was made, for its `5.1.10` window.
    moved: Arc<RwLock<HashMap<String, i64>>>,
    unsynced_ms: i64,
    files: PathBuf,
}

impl Sinks {
    async fn start(
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

    fn get(&self, e: Estate) -> Option<&Sink> {
        match e {
            Estate::Onprem => self.onprem.as_ref(),
            Estate::Cloud => self.cloud.as_ref(),
        }
    }

    fn slot(&mut self, e: Estate) -> &mut Option<Sink> {
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
    let poller = start_poller(&world.nodes, &files, polling.clone())?;

    // The load: the day's curve through all three MX hosts.
    let mut mb = Mailboxes::new(plan, o.seed);
    let load = start_load(plan, &world.nodes, &mb, &files)?;
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
            end_due(&mut world, &mut sinks, &mut open, &files, false).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        end_due(&mut world, &mut sinks, &mut open, &files, false).await;
        let step_ms = now_ms() as i64;
        let r = match &step.action {
            Action::Batch {
                name,
                size,
                report,
                node,
            } => apply_batch(&world, &mut mb, &sinks, &files, name, *size, *report, node)
                .await
                .map(|_| ()),
            Action::LdapMove { count } => {
                ldap_move(&world, &mut mb, &sinks, &files, *count, plan).await
            }
            Action::Fault {
                kind,
                target,
                length,
            } => match if *kind == FaultKind::PgFailoverLost {
                lose_a_batch(&mut world, &mut mb, &sinks, &files).await
            } else {
                begin_fault(&mut world, &mut sinks, *kind, target).await
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
        end_due(&mut world, &mut sinks, &mut open, &files, false).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    end_due(&mut world, &mut sinks, &mut open, &files, true).await;
    let report = load.await.context("load task")?;
    say(&format!(
        "load done: {} sent, {} accepted ({} recipients), {} session errors",
        report.sent, report.accepted, report.accepted_rcpts, report.errors
    ));
    write_load_report(&report, plan, &o.out)?;

    // Drain: every node's queue empty for three samples in a row.
    let drained = drain(&world.nodes, plan.drain).await;
    say(&match drained {
        Ok(()) => "every queue is empty".to_string(),
        Err(left) => format!("drain time over: {left}"),
    });
    if let Err(e) = read_finals(&world.nodes, &mb, o.seed, &files).await {
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
    let mb = Mailboxes::new(plan, o.seed);
    let mut ldif = String::with_capacity(plan.mailboxes * 200);
    let mut initial = Vec::with_capacity(plan.mailboxes);
    for (i, e) in mb.estate.iter().enumerate() {
        ldif.push_str(&services::user_ldif(i, *e));
        initial.push((address(i), *e));
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

fn start_poller(
    nodes: &[Node],
    files: &Files,
    on: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let clients: Vec<(String, coexist_api::client::AdminClient)> = nodes
        .iter()
        .map(|n| Ok((n.name.clone(), n.client(Duration::from_secs(2))?)))
        .collect::<anyhow::Result<_>>()?;
    let path = files.path(crate::history::SAMPLES);
    Ok(std::thread::spawn(move || {
        #[allow(clippy::disallowed_methods)] // The poller's own thread: one history file.
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        else {
            return;
        };
        let mut w = std::io::LineWriter::new(f);
        while on.load(Ordering::SeqCst) {
            let tick = Instant::now();
            for (name, c) in &clients {
                let ready = c.ready().ok();
                let applied = c.fleet_node().ok().map(|n| n.applied);
                let queue = c.get("/v1/overview").ok().map(|v| {
                    ["active", "deferred", "held"]
                        .iter()
                        .map(|k| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0))
                        .sum()
                });
                let s = Sample {
                    at_ms: now_ms() as i64,
                    node: name.clone(),
                    up: ready.is_some(),
                    ready: ready.as_ref().is_some_and(|r| r.ready),
                    applied,
                    postgres_up: ready.as_ref().and_then(|r| r.fleet_postgres_up),
                    queue,
                };
                if let Ok(line) = serde_json::to_string(&s) {
                    let _ = writeln!(w, "{line}");
                }
            }
            std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
        }
    }))
}

fn start_load(
    plan: &Plan,
    nodes: &[Node],
    mb: &Mailboxes,
    files: &Files,
) -> anyhow::Result<tokio::task::JoinHandle<client::LoadReport>> {
    let due = due_times(plan.load, plan.peak_rate);
    let count = due.len() as u64;
    let rcpts = (0..mb.estate.len())
        .filter_map(|i| coexist_base::types::Address::parse(&address(i), true).ok())
        .collect();
    let traffic = Arc::new(Traffic::Synthetic(Generator {
        rcpts,
        max_rcpts: plan.max_rcpts,
        size: 3000,
        ..Default::default()
    }));
    let names: HashMap<SocketAddr, String> =
        nodes.iter().map(|n| (n.smtp, n.name.clone())).collect();
    #[allow(clippy::disallowed_methods)] // The history file the observer appends to.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.path(crate::history::SENT))?;
    let out = Arc::new(Mutex::new(std::io::BufWriter::new(f)));
    let observer: client::Observer = Arc::new(move |o: Observed<'_>| {
        let sent = sent_of(&o, &names);
        if let (Ok(line), Ok(mut w)) = (serde_json::to_string(&sent), out.lock()) {
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    });
    let opts = LoadOptions {
        target: nodes[0].smtp,
        more_targets: nodes[1..].iter().map(|n| n.smtp).collect(),
        messages: count,
        concurrency: 24,
        per_session: 10,
        tls: coexist_core::config::TlsPolicy::None,
        max_duration: plan.load + Duration::from_secs(10),
        pipelining: true,
        chunking: true,
        rate: None,
        offsets: Some(Offsets {
            at: due,
            lap: plan.load + Duration::from_secs(3600),
        }),
        phases: false,
        progress: false,
        observer: Some(observer),
    };
    Ok(tokio::spawn(client::run(opts, traffic)))
}

/// A load generator's view of one message.
fn sent_of(o: &Observed<'_>, names: &HashMap<SocketAddr, String>) -> Sent {
    let mut s = Sent {
        at_ms: now_ms() as i64,
        node: names
            .get(&o.target)
            .cloned()
            .unwrap_or_else(|| o.target.to_string()),
        qid: None,
        accepted: Vec::new(),
        refused: Vec::new(),
        error: None,
    };
    match &o.result {
        Err(e) => s.error = Some(e.clone()),
        Ok(outcomes) => {
            for (rcpt, out) in o.rcpts.iter().zip(outcomes.iter()) {
                match out {
                    RcptOutcome::Delivered(reply) => {
                        if s.qid.is_none() {
                            s.qid = reply
                                .text()
                                .rsplit_once("queued as ")
                                .map(|(_, id)| id.trim().to_string());
                        }
                        s.accepted.push(rcpt.to_string());
                    }
                    RcptOutcome::Deferred(f) | RcptOutcome::Failed(f) => s.refused.push(Refusal {
                        rcpt: rcpt.to_string(),
                        code: f.code().unwrap_or(0),
                        reply: f.to_string(),
                    }),
                }
            }
        }
    }
    s
}

#[allow(clippy::too_many_arguments)]
async fn apply_batch(
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

async fn ldap_move(
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

#[allow(clippy::too_many_arguments)]
fn record_move(
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

async fn begin_fault(
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

/// The failover that loses a commit: the standby is cut off from the primary, a batch is
/// committed on the primary alone (and applied by the nodes), the primary is killed and
/// the standby promoted. The nodes find PostgreSQL's log behind what they applied: they
/// refuse directory changes and drain after `fleet.max_lag` (README, Failure modes) until
/// the admin's import at the end of the fault.
async fn lose_a_batch(
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
async fn repair_by_import(w: &mut World) -> anyhow::Result<()> {
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

async fn end_fault(w: &mut World, sinks: &mut Sinks, f: &Fault) -> anyhow::Result<()> {
    match f.kind {
        FaultKind::PgFailover => {}
        FaultKind::PgFailoverLost => repair_by_import(w).await?,
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
async fn end_due(
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

fn node<'a>(w: &'a mut World, name: &str) -> anyhow::Result<&'a mut Node> {
    w.nodes
        .iter_mut()
        .find(|n| n.name == name)
        .with_context(|| format!("no node {name}"))
}

fn estate(target: &str) -> anyhow::Result<Estate> {
    match target {
        "onprem" => Ok(Estate::Onprem),
        "cloud" => Ok(Estate::Cloud),
        other => anyhow::bail!("no next hop {other}"),
    }
}

/// Waits until every node's queue is empty in three samples in a row, at most `limit`;
/// the error says what is left.
async fn drain(nodes: &[Node], limit: Duration) -> Result<(), String> {
    let clients: Vec<_> = nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), n.client(Duration::from_secs(5)).ok()?)))
        .collect();
    let deadline = Instant::now() + limit;
    let mut empty_rounds = 0;
    let mut left = String::new();
    while Instant::now() < deadline {
        let mut total = 0u64;
        left.clear();
        for (name, c) in &clients {
            let q = c
                .get("/v1/overview")
                .ok()
                .map(|v| {
                    ["active", "deferred", "held"]
                        .iter()
                        .map(|k| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0))
                        .sum::<u64>()
                })
                .unwrap_or(u64::MAX / 4);
            total += q;
            left.push_str(&format!("{name}: {q} queued; "));
        }
        empty_rounds = if total == 0 { empty_rounds + 1 } else { 0 };
        if empty_rounds >= 3 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(left)
}

/// Reads back from every node the state of a sample of mailboxes (every pinned one, 3,000
/// others that moved, 2,000 that never did) into the history's `final.jsonl`.
async fn read_finals(
    nodes: &[Node],
    mb: &Mailboxes,
    seed: u64,
    files: &Files,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xF1A1);
    let mut moved: Vec<usize> = (0..mb.estate.len())
        .filter(|i| mb.estate[*i] != mb.source[*i])
        .collect();
    let mut still: Vec<usize> = (0..mb.estate.len())
        .filter(|i| mb.estate[*i] == mb.source[*i] && !mb.pinned.contains(i))
        .collect();
    rng.shuffle(&mut moved);
    rng.shuffle(&mut still);
    let mut sample: Vec<String> = mb.pinned.iter().copied().map(address).collect();
    sample.extend(moved.into_iter().take(3_000).map(address));
    sample.extend(still.into_iter().take(2_000).map(address));
    sample.sort();
    sample.dedup();
    let mut count = 0;
    for n in nodes {
        let client = n.client(Duration::from_secs(60))?;
        for chunk in sample.chunks(500) {
            let answers = tokio::task::block_in_place(|| client.route_explain(chunk))?;
            for (address, e) in chunk.iter().zip(answers) {
                files.append(
                    crate::history::FINAL,
                    &crate::history::Final {
                        node: n.name.clone(),
                        address: address.clone(),
                        state: e.lookup.state,
                        origin: e.lookup.origin,
                    },
                )?;
                count += 1;
            }
        }
    }
    say(&format!("read {count} mailbox states back from the nodes"));
    Ok(())
}

/// The load's report document (JSON), for `coexist-report` to chart.
fn write_load_report(r: &client::LoadReport, plan: &Plan, out: &Path) -> anyhow::Result<()> {
    let doc = r.document(
        format!("weekend ({})", plan.name),
        coexist_load::report::Parameters::default(),
        None,
        None,
    );
    #[allow(clippy::disallowed_methods)] // The run's report file.
    std::fs::write(out.join("load.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

/// Reads the deliveries back (for the summary printed at the end).
pub fn count_deliveries(h: &[Delivery]) -> usize {
    h.iter().map(|d| d.rcpts.len()).sum()
}
