//! One node's part in shadow redundancy: its lease (renewed every `takeover_after / 6`),
//! its fencing (the delivery gate is open only until half of `takeover_after` after the
//! last renewal was sent, and stays closed until what survivors took from this node is
//! dropped), and its takeovers of dead nodes' queues (and of its own copies, when its spool
//! is new).

use super::store::{Copy, Store};
use super::ShadowError;
use crate::clock::now_secs;
use crate::config::ShadowConfig;
use crate::fleet::leases::{Claim, ClaimOnMe, Leases, NodeShadow, ShadowStatus};
use crate::fleet::Fleet;
use crate::metrics as m;
use crate::queue::gate::Gate;
use crate::queue::{Queue, QueueError};
use crate::spool::{Envelope, Spool, SpoolError, TakenFrom};
use crate::types::QueueId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Messages read from a dead node's copies per step (then recorded, then removed there).
const STEP: usize = 64;

#[derive(Default)]
struct Local {
    lease_error: Option<String>,
    last_takeover: Option<String>,
    taken: u64,
    dropped: u64,
}

/// One node's shadow side: the store, its lease, the queue it fences and feeds.
pub struct Shadowing {
    pub(super) cfg: ShadowConfig,
    pub(super) store: Arc<Store>,
    /// The lease's own connection (never waits behind a takeover's statements).
    lease: Leases,
    /// Claims, takeovers and status.
    leases: Leases,
    pub(super) spool: Arc<Spool>,
    pub(super) queue: Queue,
    gate: Arc<Gate>,
    local: Mutex<Local>,
    /// What survivors took from this node is being dropped (the gate stays closed).
    dropping: AtomicBool,
    /// This node's spool is new: its own copies nobody took are still to be taken back.
    recover: AtomicBool,
    /// When this process started (micros, as queue ids carry them): only copies of queue
    /// ids issued before it are an earlier life's to take back.
    started_micros: u64,
    stop: AtomicBool,
}

impl Shadowing {
    /// Connects to JetStream, makes the store the spool's replica, and returns the node's
    /// shadow side with the delivery `gate` it fences (closed until the first renewal).
    /// `fresh`: this node's spool is new (its disk was lost), so its own copies nobody
    /// took are taken back once the lease is held. Call [`Shadowing::first_turn`] before
    /// listening, then [`Shadowing::spawn`].
    pub async fn start(
        cfg: &ShadowConfig,
        fleet: &Fleet,
        spool: Arc<Spool>,
        queue: Queue,
        gate: Arc<Gate>,
        fresh: bool,
    ) -> Result<Arc<Shadowing>, ShadowError> {
        let store = Store::connect(cfg, fleet.node()).await?;
        spool.set_replica(store.clone());
        gate.set(false);
        metrics::gauge!(m::SHADOW_LEASE_HELD).set(0.0);
        Ok(Arc::new(Shadowing {
            cfg: cfg.clone(),
            store,
            lease: fleet.leases(cfg.takeover_after),
            leases: fleet.leases(cfg.takeover_after),
            spool,
            queue,
            gate,
            local: Mutex::new(Local::default()),
            dropping: AtomicBool::new(false),
            recover: AtomicBool::new(fresh),
            started_micros: crate::clock::now_micros(),
            stop: AtomicBool::new(false),
        }))
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> Duration {
        (self.cfg.takeover_after / 6).clamp(Duration::from_millis(300), Duration::from_secs(10))
    }

    /// How long a renewal keeps the gate open, from when it was sent.
    fn validity(&self) -> Duration {
        self.cfg.takeover_after / 2
    }

    /// The first lease turn, before the node listens: renews the lease and drops what
    /// survivors took meanwhile (PostgreSQL is tried for at most 5 s: when it cannot be
    /// reached the node listens fenced, delivering nothing, and keeps trying; dropping what
    /// was taken, once started, is waited for up to 10 minutes).
    pub async fn first_turn(self: &Arc<Self>) {
        // The stream is made (or found) before mail comes in: creating a replicated stream
        // takes the cluster a moment, which the first message should not wait for.
        match tokio::time::timeout(Duration::from_secs(10), self.store.stream()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "shadow: the stream is not there yet; copies fail until it is"),
            Err(_) => warn!("shadow: no answer from JetStream about the stream within 10 s; copies fail until it answers"),
        }
        let until = Instant::now() + (self.cfg.takeover_after / 2).min(Duration::from_secs(5));
        let drop_until = Instant::now() + Duration::from_secs(600);
        loop {
            self.lease_turn().await;
            while self.dropping.load(Ordering::SeqCst) && Instant::now() < drop_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.gate.is_open() || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(self.tick().min(Duration::from_millis(500))).await;
        }
        if !self.gate.is_open() {
            warn!(
                reason = self.local().lease_error.clone().unwrap_or_default(),
                "shadow: starting fenced: no delivery until the lease is renewed"
            );
        }
    }

    /// Starts the lease loop and the takeover loop.
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            while !me.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(me.tick()).await;
                me.lease_turn().await;
                if me.store.health().is_err() {
                    me.store.probe().await;
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let mut swept = Instant::now();
            while !me.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(me.tick()).await;
                if !me.gate.is_open() {
                    continue;
                }
                if me.recover.load(Ordering::SeqCst) {
                    match me.recover_own().await {
                        Ok(n) => {
                            me.recover.store(false, Ordering::SeqCst);
                            if n > 0 {
                                warn!(messages = n, "shadow: this node's spool is new; took back {n} of its own shadow copies that nobody had taken");
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "shadow: cannot take back this node's own copies yet (its spool is new); trying again")
                        }
                    }
                }
                if let Err(e) = me.takeover_turn().await {
                    warn!(error = %e, "shadow: takeover check failed; trying again");
                }
                if me.cfg.keep_delivered.is_some() && swept.elapsed() >= super::resubmit::SWEEP {
                    swept = Instant::now();
                    if let Err(e) = me.sweep_kept().await {
                        warn!(error = %e, "shadow: cannot remove expired copies of delivered messages; trying again later");
                    }
                }
            }
        });
    }

    /// Stops both loops (a relay shutting down).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Renews the lease; acts on takeovers of this node's queue; opens the gate until the
    /// renewal's validity ends (a renewal answered after that counts as failed).
    async fn lease_turn(self: &Arc<Self>) {
        let sent = Instant::now();
        let backlog = self.queue.len() as u64;
        metrics::gauge!(m::SHADOW_BACKLOG).set(backlog as f64);
        let res = match self.lease.renew(backlog).await {
            Ok(_) if sent.elapsed() >= self.validity() => {
                Err("the renewal took longer than half of takeover_after".to_string())
            }
            Ok(claims) if claims.is_empty() && !self.dropping.load(Ordering::SeqCst) => Ok(()),
            Ok(claims) => {
                self.gate.set(false);
                self.act_on_claims(claims).await;
                Err("survivors took over this node's queue; dropping what they took".into())
            }
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(()) => {
                self.gate.open_until(sent + self.validity());
                if self.local().lease_error.take().is_some() {
                    info!("shadow: lease renewed; delivering again");
                }
            }
            Err(e) => {
                let mut l = self.local();
                if !self.gate.is_open() && l.lease_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "shadow: lease not held: this node delivers nothing until it is (a survivor may take its queue after takeover_after)");
                    l.lease_error = Some(e);
                }
            }
        }
        let held = self.gate.is_open();
        metrics::gauge!(m::SHADOW_LEASE_HELD).set(if held { 1.0 } else { 0.0 });
    }

    /// Takeovers of this node's queue: once each is done (or cancelled, its taker having
    /// died in the middle), what they took is dropped here, in a task of its own so the
    /// lease goes on being renewed meanwhile.
    async fn act_on_claims(self: &Arc<Self>, claims: Vec<ClaimOnMe>) {
        if self.dropping.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.drop_taken(&claims).await;
            if let Err(e) = res {
                // Kept as the text `/v1/ready` and `fleet status` show.
                let e = e.to_string();
                let mut l = me.local();
                if l.lease_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "shadow: cannot drop yet what survivors took from this node");
                }
                l.lease_error = Some(e);
            }
            me.dropping.store(false, Ordering::SeqCst);
        });
    }

    /// Drops the messages survivors took from this node (never delivered here again), once
    /// each takeover is done, and marks the takeovers seen.
    async fn drop_taken(&self, claims: &[ClaimOnMe]) -> Result<(), DropError> {
        for c in claims.iter().filter(|c| !c.done) {
            if !c.taker_stale {
                return Err(DropError::TakeoverRunning(c.taker.clone()));
            }
            // The taker died in the middle: this node is back, so the claim ends here;
            // what the taker recorded is dropped below, the rest stays this node's.
            if self.leases.cancel(c.id).await? {
                warn!(claim = c.id, taker = %c.taker, "shadow: a survivor died in the middle of taking over this node's queue; the takeover is ended here");
            }
        }
        let ids: Vec<i64> = claims.iter().map(|c| c.id).collect();
        let qids = self.leases.taken_in(&ids).await?;
        let deletes = qids.iter().map(|q| self.queue.delete(q));
        let mut dropped = 0u64;
        for (q, r) in qids
            .iter()
            .zip(futures_util::future::join_all(deletes).await)
        {
            match r {
                Ok(()) => dropped += 1,
                Err(QueueError::NotFound(_)) => {}
                Err(e) => return Err(DropError::Delete(q.clone(), e)),
            }
        }
        self.leases.seen(&ids).await?;
        let takers: Vec<&str> = claims.iter().map(|c| c.taker.as_str()).collect();
        warn!(messages = dropped, takers = ?takers, "shadow: survivors took over this node's queue while it was away; dropped here what they took (they deliver it)");
        metrics::counter!(m::SHADOW_DROPPED).increment(dropped);
        self.local().dropped += dropped;
        Ok(())
    }

    /// Claims dead nodes' queues and carries out open claims (its own, unfinished, and
    /// those of takers that died in turn). A dead node claimed before is claimed again when
    /// it stored copies after that claim (it was cut off from PostgreSQL, not from NATS).
    async fn takeover_turn(&self) -> Result<(), ShadowError> {
        let mut claims = self.leases.open_claims().await?;
        for dead in self.leases.dead().await? {
            if let Some(u) = dead.last_upto {
                if self.store.next_manifest(&dead.node, u + 1).await?.is_none() {
                    continue;
                }
            }
            let upto = self.store.last_sequence().await?;
            if let Some(c) = self.leases.claim(&dead.node, upto, dead.last_upto).await? {
                warn!(node = %dead.node, upto, "shadow: node is dead (lease older than takeover_after): taking over its queue");
                claims.push(c);
            }
        }
        for c in claims {
            let n = self.take(&c).await?;
            if !self.leases.finish(&c, n).await? {
                warn!(node = %c.node, claim = c.id, "shadow: the takeover was no longer this node's when it finished");
                continue;
            }
            metrics::counter!(m::SHADOW_TAKEOVERS).increment(1);
            let at = crate::clock::now_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            warn!(node = %c.node, messages = n, "shadow: took over the queue of a dead node; delivering it as this node's own");
            self.local().last_takeover = Some(format!("{} at {at}: {n} messages", c.node));
        }
        Ok(())
    }

    /// Takes back this node's own copies that are not in its (new) spool and nobody took.
    async fn recover_own(&self) -> Result<u64, ShadowError> {
        let upto = self.store.last_sequence().await?;
        let own = Claim {
            id: 0,
            node: self.store.node().to_string(),
            upto,
        };
        self.take(&own).await
    }

    /// Takes every whole copy of `c.node`'s up to `c.upto` that was not taken before: into
    /// this node's spool (with its own copy), recorded, then removed there. Stops when
    /// this node's lease lapses (another survivor carries on after `takeover_after`).
    async fn take(&self, c: &Claim) -> Result<u64, ShadowError> {
        let mut from = 1u64;
        let mut total = 0u64;
        loop {
            if !self.gate.is_open() {
                return Err(ShadowError::Nats(
                    "this node's lease lapsed in the middle of a takeover".into(),
                ));
            }
            let mut batch = Vec::new();
            while batch.len() < STEP {
                match self.store.next_manifest(&c.node, from).await? {
                    Some((qid, seq)) if seq <= c.upto => {
                        batch.push(qid);
                        from = seq + 1;
                    }
                    _ => break,
                }
            }
            if batch.is_empty() {
                return Ok(total);
            }
            let mut skip = self.leases.already_taken(&c.node, &batch).await?;
            if c.id == 0 {
                // Its own copies: only those of an earlier life (queue ids issued before
                // this process started); this life's messages are in its queue.
                batch.retain(|q| issued_micros(q).is_some_and(|t| t < self.started_micros));
                skip.retain(|q| batch.contains(q));
            }
            let mut rows = Vec::new();
            // What is imported is recorded even when the step stops half-way, so it is
            // never imported twice.
            let mut stopped = None;
            for qid in batch.iter().filter(|q| !skip.contains(*q)) {
                let copy = match self.store.read(&c.node, qid).await {
                    Ok(Some(copy)) => copy,
                    // Not whole: never acknowledged (or removed, or kept as delivered).
                    Ok(None) => continue,
                    Err(ShadowError::Damaged(e)) => {
                        error!(node = %c.node, qid, error = %e, "shadow: a copy cannot be read back; left in the stream for the admin");
                        continue;
                    }
                    Err(e) => {
                        stopped = Some(e);
                        break;
                    }
                };
                match self.import(copy, &c.node).await {
                    Ok(new_id) => rows.push((qid.clone(), new_id)),
                    Err(e) => {
                        stopped = Some(e);
                        break;
                    }
                }
            }
            if !self.record(c, &rows).await? {
                // Another survivor carries the claim on now: what was imported here goes.
                for (_, new_id) in rows.iter().filter(|r| r.1 != "-") {
                    let _ = self.queue.delete(new_id).await;
                }
                return Err(ShadowError::Nats(format!(
                    "the takeover of {}'s queue is no longer this node's",
                    c.node
                )));
            }
            total += rows.len() as u64;
            metrics::counter!(m::SHADOW_TAKEN).increment(rows.len() as u64);
            self.local().taken += rows.len() as u64;
            for qid in rows.iter().map(|r| &r.0).chain(skip.iter()) {
                if let Err(e) = self.store.remove(&c.node, qid).await {
                    warn!(node = %c.node, qid, error = %e, "shadow: cannot remove a copy just taken (it is recorded as taken and never taken again)");
                }
            }
            if let Some(e) = stopped {
                return Err(e);
            }
        }
    }

    /// Records taken messages, trying again a few times (a message taken and not recorded
    /// would be delivered by its node too, if it came back). False when the claim is no
    /// longer this node's.
    async fn record(&self, c: &Claim, rows: &[(String, String)]) -> Result<bool, ShadowError> {
        if rows.is_empty() {
            return Ok(true);
        }
        let mut wait = Duration::from_millis(200);
        loop {
            match self.leases.record_taken(c, rows).await {
                Ok(ours) => return Ok(ours),
                Err(e) if wait < self.tick() * 4 => {
                    warn!(error = %e, "shadow: cannot record the messages taken; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Spools one copy as a message of this node (recipients delivered there left out),
    /// with a copy of its own (required: the dead node's copy goes next), and queues it.
    /// Returns its new queue id ("-" when nothing was left to deliver).
    async fn import(&self, copy: Copy, from: &str) -> Result<String, ShadowError> {
        let Some(env) = taken_envelope(&copy, from, now_secs()) else {
            return Ok("-".into());
        };
        let body = Arc::new(copy.body);
        let loc = match self.spool.store_replicated(&env, body.clone()).await {
            Ok(loc) => loc,
            Err(SpoolError::NoCopy(e)) => {
                return Err(ShadowError::Nats(format!(
                "no copy of a taken message can be stored here ({e}); the dead node's copy stays"
            )))
            }
            Err(e) => return Err(e.into()),
        };
        info!(qid = %env.id, from_node = from, from_qid = %copy.qid, nrcpt = env.rcpts.len(), "shadow: taken over");
        let id = env.id.as_str().to_string();
        self.queue.submit_taken(env, loc, body);
        Ok(id)
    }

    /// What `fleet status`, readiness and the console show (reads the leases table).
    pub async fn status(&self) -> ShadowStatus {
        let nodes = match self.leases.rows().await {
            Ok(rows) => rows.into_iter().map(NodeShadow::from).collect(),
            Err(_) => Vec::new(),
        };
        let l = self.local();
        let store = self.store.health();
        ShadowStatus {
            store_up: store.is_ok(),
            store_error: store.err(),
            lease_held: self.gate.is_open(),
            lease_error: l.lease_error.clone(),
            backlog: self.queue.len() as u64,
            last_takeover: l.last_takeover.clone(),
            taken: l.taken,
            dropped: l.dropped,
            nodes,
        }
    }

    /// True while this node holds its lease (its delivery gate is open).
    pub fn lease_held(&self) -> bool {
        self.gate.is_open()
    }

    /// Why copies cannot be stored now, if they cannot (for readiness).
    pub fn unready(&self) -> Option<String> {
        self.store
            .health()
            .err()
            .map(|e| format!("shadow copies cannot be stored on NATS JetStream: {e}"))
    }
}

/// The envelope a taken copy is spooled with here: a new queue id, only the recipients
/// still to deliver (with their DSN parameters), where it came from. `None` when every
/// recipient has a final outcome.
pub fn taken_envelope(copy: &Copy, from: &str, now: u64) -> Option<Envelope> {
    let mut env = copy.env.clone();
    let keep: Vec<usize> = (0..env.rcpts.len())
        .filter(|i| !copy.done.contains(i))
        .collect();
    if keep.is_empty() {
        return None;
    }
    env.rcpts = keep.iter().map(|&i| copy.env.rcpts[i].clone()).collect();
    if !env.rcpt_dsn.is_empty() {
        env.rcpt_dsn = keep.iter().map(|&i| copy.env.dsn(i)).collect();
    }
    env.id = QueueId::generate();
    env.taken_from = Some(TakenFrom {
        node: from.to_string(),
        queue_id: copy.qid.clone(),
        at: now,
        resubmitted: false,
    });
    Some(env)
}

/// The time (micros) a queue id was issued at, from its first 13 hex digits (the form
/// `QueueId::generate` gives).
fn issued_micros(qid: &str) -> Option<u64> {
    u64::from_str_radix(qid.get(..13)?, 16).ok()
}

/// Why the messages survivors took from this node could not be dropped yet.
#[derive(Debug, thiserror::Error)]
enum DropError {
    /// A survivor is still taking this node's queue over.
    #[error("{0} is taking over this node's queue; waiting for it to finish")]
    TakeoverRunning(String),
    /// PostgreSQL (the claims) could not be read or written.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// A taken message could not be deleted from the queue.
    #[error("cannot drop {0}, taken over by a survivor: {1}")]
    Delete(String, QueueError),
}
