//! Wiring: builds the running relay from a config (listeners, directory, spool, queue, admin
//! API), the session handler that joins policy, directory and spool, and the [`Control`]
//! surface for reload, drain and shutdown.

use crate::certs::TlsError;
use crate::clock::{now_secs, Clock};
use crate::config::Config;
use crate::deliver::{HopRoutes, Transport};
use crate::directory::scheduled::ScheduleStore;
use crate::directory::Resolution;
use crate::directory::{Directory, DirectoryWriter, LocalWriter};
use crate::dirlock::DirLock;
use crate::fleet::{Fleet, FleetWriter};
use crate::metrics as m;
use crate::policy::message;
use crate::policy::recipient::{self, RcptRefusal};
use crate::proto::reply::{canned, Reply};
use crate::proto::MailParams;
use crate::queue::gate::Gate;
use crate::queue::recorder::Recorder;
use crate::queue::{Queue, QueueParts};
use crate::shadow::Shadowing;
use crate::smtp::server::ServerControl;
use crate::smtp::{server, tls, Handler, Incoming, Peer, SessionConfig};
use crate::spool::{Envelope, Spool, SpoolError};
use crate::tracking::{sink::Tee, Tracking};
use crate::types::Address;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub use crate::preflight::StartError;

mod control;
mod handler;
use control::note_cert_expiry;
pub use control::Control;
pub use handler::RelayHandler;

/// Why a reload was refused (the old config stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config does not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS material of the new config is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Keys changed that only a restart can apply.
    #[error("refused: these keys changed and need a restart: {0}")]
    NeedsRestart(String),
    /// The server was started without a config file.
    #[error("refused: the server runs on the embedded config; restart it with --config FILE")]
    NoFile,
}

/// What a session keeps from its start: the policy part of the config in force then.
pub use crate::policy::Rules as SessionRules;

/// A started relay.
pub struct Running {
    /// The addresses actually bound (useful with port 0).
    pub local_addrs: Vec<SocketAddr>,
    /// The admin API's address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The scheduler.
    pub queue: Queue,
    /// The directory in use.
    pub directory: Arc<Directory>,
    /// Reload, drain, status.
    pub control: Arc<Control>,
    listeners: Vec<JoinHandle<()>>,
    admin: Option<JoinHandle<()>>,
    schedule_task: JoinHandle<()>,
    /// A single node's LDAP rounds (stopped with the relay).
    ldap_task: Option<JoinHandle<()>>,
    _watch: Option<crate::directory::watch::FileWatch>,
    /// The spool's and the directory store's locks, held while this relay runs.
    _locks: [DirLock; 2],
}

impl Running {
    /// Stops accepting new sessions (sessions and deliveries in progress go on).
    pub fn stop_listening(&self) {
        for t in &self.listeners {
            t.abort();
        }
    }

    /// Graceful stop: no new sessions, then up to `deadline` for open sessions to end; says
    /// so (an error line) when messages have outcomes the spool could not write.
    /// Returns the sessions still open at the deadline (their messages were not acknowledged
    /// unless spooled; the spool is consistent either way).
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.stop_listening();
        let t0 = Instant::now();
        while self.control.open_sessions() > 0 && t0.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // No new delivery attempts; then the tracking log's last events are written and
        // its file sealed (indexed). Outcomes of attempts still running after this are
        // not logged (counted as lost, reason "closed"); the spool has them.
        self.queue.stop();
        if let Some(t) = self.control.tracking.clone() {
            let _ = tokio::task::spawn_blocking(move || t.close()).await;
        }
        let unwritten = self.queue.stats().unwritten;
        if unwritten > 0 {
            error!(messages = unwritten, "stopping with delivery outcomes the spool could not write (disk full or failing): after the restart these messages resume from their last written state, and recipients that already have them may get them again");
        }
        self.control.open_sessions()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_listening();
        self.queue.stop();
        if let Some(f) = &self.control.fleet {
            f.stop();
        }
        if let Some(s) = &self.control.shadow {
            s.stop();
        }
        if let Some(a) = &self.admin {
            a.abort();
        }
        self.schedule_task.abort();
        if let Some(t) = &self.ldap_task {
            t.abort();
        }
    }
}

/// Starts the relay from `config` (read from `config_file`, if any, which reloads re-read),
/// on the system clock ([`start_with_clock`]).
pub async fn start_with_file(
    config: Config,
    config_file: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    start_with_clock(config, config_file, Clock::system()).await
}

/// Starts the relay from `config` (read from `config_file`, if any, which reloads re-read),
/// its queue scheduling by `clock` (a test may pass a [`Clock::manual`] one and drive it).
/// Runs the start-up checks `check-config` shares ([`crate::preflight::check`]), then loads
/// TLS, directory and spool, builds the outbound side, the outcome sink and the loop guard's
/// memory and hands them to the queue, re-queues what the spool holds, binds every listen
/// address, and starts the admin API. Must be called inside a tokio runtime.
pub async fn start_with_clock(
    config: Config,
    config_file: Option<std::path::PathBuf>,
    clock: Clock,
) -> Result<Running, StartError> {
    let _ = m::install();
    // The checks `coexist check-config` runs too: TLS material, admin token, writable folders.
    let found = crate::preflight::check(&config)?;
    note_cert_expiry(&config);
    // Descriptors for every cap, so SMTP keeps accepting whatever the admin listener faces.
    crate::descriptors::check(&config);
    for w in &found.readable {
        warn!("{w}");
    }
    // One process per spool and per directory store (see `crate::dirlock`).
    let locks = [
        DirLock::take(&config.spool.dir, "spool.dir")?,
        DirLock::take(&config.directory.store_dir, "directory.store_dir")?,
    ];
    let acceptor = found.acceptor;
    let scheduled = Arc::new(ScheduleStore::open(
        &config.directory.store_dir.join("scheduled"),
    )?);
    let t0 = Instant::now();
    // The one choice between a single node and a fleet node: where directory changes go.
    let (directory, fleet, writer, ldap_task) = match &config.fleet {
        Some(_) => {
            let (fleet, directory) =
                Fleet::start(&config, Arc::new(crate::admin::client::PeerAsker)).await?;
            let writer: Arc<dyn DirectoryWriter> =
                Arc::new(FleetWriter::new(fleet.clone(), scheduled));
            (directory, Some(fleet), writer, None)
        }
        None => {
            let (directory, writer, task) = open_directory(&config, scheduled).await?;
            (directory, None, writer, task)
        }
    };
    info!(entries = directory.len(), source = %directory.source_name(), ms = t0.elapsed().as_millis() as u64, "directory loaded");
    let watch_file = config.directory.file.as_ref().filter(|_| fleet.is_none());
    let watch = if let (true, Some(file)) = (config.directory.watch, watch_file) {
        match crate::directory::watch::spawn(directory.clone(), writer.clone(), file) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the directory file; use SIGHUP or `coexist directory reload`");
                None
            }
        }
    } else {
        None
    };
    // Batches kept for later: on this node's disk, or in a fleet in PostgreSQL (and any
    // live node applies them).
    let schedule_task = tokio::spawn(writer.clone().run_scheduler(config.route_names()));
    let opened = {
        let dir = config.spool.dir.clone();
        tokio::task::spawn_blocking(move || Spool::open(&dir))
            .await
            .map_err(|e| StartError::Task(e.to_string()))??
    };
    let spool = Arc::new(opened.spool);
    let config = Arc::new(config);
    // The queue's collaborators, built here and handed to it.
    let outbound = Arc::new(Transport::new(&config, found.route_tls)?);
    // The tracking log; with it, trace reads the log and no recent outcomes are kept in
    // memory (`queue.recent_outcomes` is for a node without the log).
    let tracking = if config.tracking.enabled {
        let dir = config.tracking_dir();
        let tc = config.tracking.clone();
        let t = tokio::task::spawn_blocking(move || {
            Tracking::open(&dir, &tc).map_err(|e| StartError::Tracking(dir, e))
        })
        .await
        .map_err(|e| StartError::Task(e.to_string()))??;
        Some(Arc::new(t))
    } else {
        None
    };
    let recent = if tracking.is_some() {
        0
    } else {
        config.queue.recent_outcomes
    };
    let outcomes = Arc::new(Recorder::new(recent));
    let sink = Arc::new(Tee {
        recorder: outcomes.clone(),
        tracking: tracking.clone(),
    });
    let hop_routes = Arc::new(HopRoutes::new(&config));
    // With [shadow] the gate starts closed: nothing is delivered before the lease is held
    // and what survivors took from this node is dropped.
    let gate = Arc::new(Gate::new(config.shadow.is_none()));
    let queue = Queue::new(
        config.clone(),
        QueueParts {
            spool: spool.clone(),
            directory: directory.clone(),
            outbound: outbound.clone(),
            outcomes: sink,
            hop_routes: hop_routes.clone(),
            clock,
            gate: gate.clone(),
        },
    );
    // The redundant copies: the spool's replica, the lease and the takeovers.
    let shadowing = match (&config.shadow, &fleet) {
        (Some(sc), Some(f)) => {
            let fresh = opened.fresh;
            Some(Shadowing::start(sc, f, spool.clone(), queue.clone(), gate.clone(), fresh).await?)
        }
        _ => None,
    };

    let mut bound = Vec::new();
    for addr in &config.server.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Bind(*addr, e))?;
        bound.push(l);
    }

    if !opened.queued.is_empty() {
        info!(
            messages = opened.queued.len(),
            segments = spool.segment_count(),
            "re-queued messages from the spool"
        );
    }
    queue.restore(opened.queued);
    // Before listening: the lease, and what survivors took from this node dropped.
    if let Some(s) = &shadowing {
        s.first_turn().await;
        s.spawn();
    }

    let handler = Arc::new(RelayHandler {
        rules: ArcSwap::from_pointee(SessionRules::new(&config)),
        directory: directory.clone(),
        spool: spool.clone(),
        queue: queue.clone(),
        hop_routes: hop_routes.clone(),
        tracking: tracking.clone(),
    });
    let server = Arc::new(ServerControl::new(
        SessionConfig::from_config(
            &config,
            acceptor,
            crate::smtp::budget::InflightBudget::new(config.server.max_inflight_bytes),
        ),
        config.server.max_connections,
        fleet.as_ref().map(|f| f.behind_flag()),
    ));
    let control = Arc::new(Control {
        config: ArcSwap::new(config.clone()),
        config_file,
        server: server.clone(),
        handler: handler.clone(),
        queue: queue.clone(),
        directory: directory.clone(),
        fleet: fleet.clone(),
        shadow: shadowing,
        outbound,
        outcomes,
        tracking,
        hop_routes,
        spool,
        writer,
        reload_lock: Mutex::new(()),
    });
    if let Some(f) = &fleet {
        let c = Arc::downgrade(&control);
        f.set_reporter(move || match c.upgrade() {
            Some(c) => {
                let q = c.queue.stats();
                crate::fleet::NodeReport {
                    draining: c.draining(),
                    queue: (q.active + q.deferred + q.held) as u64,
                }
            }
            None => crate::fleet::NodeReport::default(),
        });
    }
    let (admin_addr, admin) = match crate::admin::start(control.clone()).await? {
        Some((addr, task)) => (Some(addr), Some(task)),
        None => (None, None),
    };
    if let (Some(f), Some(a)) = (&fleet, admin_addr) {
        let tls = config.admin.as_ref().is_some_and(|a| a.tls());
        f.set_admin_addr(a, &config.server.hostname, tls);
    }
    let mut local_addrs = Vec::new();
    let mut listeners = Vec::new();
    for l in bound {
        let addr = l
            .local_addr()
            .map_err(|e| StartError::Bind(config.server.listen[0], e))?;
        info!(%addr, "listening");
        local_addrs.push(addr);
        listeners.push(tokio::spawn(server::serve(
            l,
            server.clone(),
            handler.clone(),
        )));
    }
    Ok(Running {
        local_addrs,
        admin_addr,
        queue,
        directory,
        control,
        listeners,
        admin,
        schedule_task,
        ldap_task,
        _watch: watch,
        _locks: locks,
    })
}

/// Opens the directory of a single node and its writer (scheduled batches kept in
/// `scheduled`): from `directory.file`, or with `[directory.ldap]` from the LDAP source (a
/// first round, bounded by its timeout, then the sync task, which writes through the
/// writer, and is returned to be stopped with the relay).
async fn open_directory(
    config: &Config,
    scheduled: Arc<ScheduleStore>,
) -> Result<
    (
        Arc<Directory>,
        Arc<dyn DirectoryWriter>,
        Option<JoinHandle<()>>,
    ),
    StartError,
> {
    use crate::directory::ldap;
    let (cfg, names) = (config.directory.clone(), config.route_names());
    let Some(l) = config.directory.ldap.clone() else {
        let d = tokio::task::spawn_blocking(move || Directory::open(&cfg, names))
            .await
            .map_err(|e| StartError::Task(e.to_string()))??;
        let d = Arc::new(d);
        return Ok((d.clone(), Arc::new(LocalWriter::new(d, scheduled)), None));
    };
    let (d, syncs) = ldap::open(l, cfg, names)
        .await
        .map_err(|e| StartError::Task(e.to_string()))??;
    let writer: Arc<dyn DirectoryWriter> = Arc::new(LocalWriter::new(d.clone(), scheduled));
    let task = tokio::spawn(syncs.run(d.clone(), writer.clone()));
    Ok((d, writer, Some(task)))
}

/// Starts the relay from an in-memory config (no reload from file).
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_file(config, None).await
}
