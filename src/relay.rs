//! Wiring: builds the running relay from a config (listeners, directory, spool, queue, admin
//! API), the session handler that joins policy, directory and spool, and the [`Control`]
//! surface for reload, drain and shutdown.

use crate::certs::TlsError;
use crate::config::Config;
use crate::directory::scheduled::{self, ScheduleStore};
use crate::directory::Directory;
use crate::dirlock::DirLock;
use crate::fleet::Fleet;
use crate::metrics as m;
use crate::policy::Policy;
use crate::proto::reply::{canned, Reply};
use crate::proto::MailParams;
use crate::queue::{unix_now, Queue};
use crate::smtp::server::ServerControl;
use crate::smtp::{server, tls, Handler, Incoming, Peer, SessionConfig};
use crate::spool::{Envelope, Spool};
use crate::types::Address;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Spool unusable.
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// Queue set-up failed (outbound TLS files, DNS).
    #[error("delivery: {0}")]
    Queue(#[from] crate::queue::QueueError),
    /// Directory unusable.
    #[error("directory: {0}")]
    Directory(#[from] crate::directory::DirectoryError),
    /// The fleet could not be joined.
    #[error("fleet: {0}")]
    Fleet(#[from] crate::fleet::FleetError),
    /// The admin API could not start.
    #[error("admin API: {0}")]
    Admin(#[from] crate::admin::AdminError),
    /// A listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// A start-up task failed.
    #[error("start-up task failed: {0}")]
    Task(String),
    /// The spool or the directory store is in use by another process.
    #[error("{0}")]
    Lock(#[from] crate::dirlock::LockError),
}

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

/// What a session keeps from its start: the config and policy in force then.
pub struct SessionRules {
    policy: Policy,
    trusted: Vec<ipnet::IpNet>,
    strip_headers: Vec<String>,
    min_free_space: u64,
    /// `routes.NAME.max_message_size`, for the routes that set one.
    route_sizes: std::collections::HashMap<String, u64>,
    /// Our host name (the loop guard looks for it in `Received:` headers).
    hostname: String,
}

impl SessionRules {
    fn new(c: &Config) -> SessionRules {
        SessionRules {
            policy: Policy::new(&c.server.accepted_domains),
            trusted: c.policy.trusted_networks.clone(),
            strip_headers: c.policy.strip_headers.clone(),
            min_free_space: c.spool.min_free_space,
            route_sizes: c
                .routes
                .iter()
                .filter_map(|(n, r)| r.max_message_size.map(|m| (n.clone(), m)))
                .collect(),
            hostname: c.server.hostname.clone(),
        }
    }

    /// The `552 5.3.4` for a message of `size` bytes to a recipient on `route`, when the
    /// route takes less.
    fn too_big_for(&self, route: &str, size: u64) -> Option<Reply> {
        let limit = *self.route_sizes.get(route)?;
        (size > limit).then(|| {
            Reply::owned(
                552,
                "5.3.4",
                format!(
                    "Message too big for this recipient: its mailbox's side ({route}) takes at most {limit} bytes"
                ),
            )
        })
    }
}

/// The reply to a recipient the directory does not know while its source cannot be read
/// (RFC 3463 4.4.3: directory server failure): the sender retries, the mail is not lost.
const SOURCE_DOWN: Reply = Reply::new(
    451,
    "4.4.3",
    "Directory temporarily unavailable, try again later",
);

/// The reply while the spool's disk is short of space (RFC 3463 4.3.1).
const NO_SPACE: Reply = Reply::new(452, "4.3.1", "Insufficient system storage, try again later");

/// The relay's session handler.
pub struct RelayHandler {
    rules: ArcSwap<SessionRules>,
    directory: Arc<Directory>,
    spool: Arc<Spool>,
    queue: Queue,
}

impl Handler for RelayHandler {
    type Context = Arc<SessionRules>;

    fn context(&self) -> Arc<SessionRules> {
        self.rules.load_full()
    }

    fn check_mail(
        &self,
        rules: &Arc<SessionRules>,
        peer: &Peer,
        _from: Option<&Address>,
        params: &MailParams,
    ) -> Result<(), Reply> {
        let need = rules
            .min_free_space
            .saturating_add(params.size.unwrap_or(0));
        match self.spool.available_space() {
            Ok(free) if free < need => {
                warn!(client = %peer.addr, free, need, "spool disk short of space: refusing mail with 452 4.3.1");
                Err(NO_SPACE)
            }
            Ok(_) => Ok(()),
            Err(e) => {
                error!(error = %e, "cannot read the spool's free space");
                Err(canned::LOCAL_ERROR)
            }
        }
    }

    fn check_rcpt(
        &self,
        rules: &Arc<SessionRules>,
        peer: &Peer,
        _from: Option<&Address>,
        params: &MailParams,
        to: &Address,
    ) -> Result<(), Reply> {
        let listed = std::cell::Cell::new(true);
        let res = crate::route::admit(&rules.policy, to, |a| {
            let t0 = Instant::now();
            let r = self.directory.resolve(a);
            metrics::histogram!(m::LOOKUP_LATENCY).record(t0.elapsed().as_secs_f64());
            listed.set(matches!(r, crate::directory::Resolution::Listed(..)));
            r
        });
        // The source is down: an address it does not know may be a mailbox created since.
        if !listed.get() && self.directory.source_down() {
            info!(client = %peer.addr, to = %to, "recipient not in the directory while its source is down: deferred");
            return Err(SOURCE_DOWN);
        }
        match res {
            Err(r) if r == canned::UNKNOWN_USER => {
                info!(client = %peer.addr, to = %to, "unknown recipient refused");
                Err(r)
            }
            Err(r) => {
                info!(client = %peer.addr, to = %to, reply = %r, "recipient refused");
                Err(r)
            }
            Ok(d) => {
                let route = d.route.as_str().to_string();
                if let Some(r) = params.size.and_then(|s| rules.too_big_for(&route, s)) {
                    info!(client = %peer.addr, to = %to, route, size = params.size, "recipient refused: message too big for its route");
                    metrics::counter!(m::ROUTE_TOO_BIG, "route" => route).increment(1);
                    return Err(r);
                }
                debug!(to = %to, route, "recipient accepted");
                metrics::counter!(m::RCPT_ACCEPTED, "route" => route).increment(1);
                Ok(())
            }
        }
    }

    async fn accept(&self, rules: &Arc<SessionRules>, mut msg: Incoming) -> Reply {
        if !crate::policy::is_trusted(&rules.trusted, msg.peer.addr.ip()) {
            let n = crate::policy::strip_headers(&mut msg.body, &rules.strip_headers);
            if n > 0 {
                info!(qid = %msg.id, client = %msg.peer.addr, removed = n, "removed internal headers from an untrusted client");
            }
        }
        let size = msg.body.len() as u64;
        // Without SIZE=, the size is known only now: refuse a message that none of its
        // recipients' routes takes (when some take it, the others fail at delivery with a
        // DSN, see `queue::attempt`).
        let routes: Vec<String> = if rules.route_sizes.is_empty() {
            Vec::new()
        } else {
            msg.rcpts
                .iter()
                .filter_map(|to| {
                    crate::route::admit(&rules.policy, to, |a| self.directory.resolve(a))
                        .ok()
                        .map(|d| d.route.as_str().to_string())
                })
                .collect()
        };
        if !routes.is_empty() {
            let refusals: Vec<Reply> = routes
                .iter()
                .filter_map(|r| rules.too_big_for(r, size))
                .collect();
            if refusals.len() == routes.len() {
                info!(qid = %msg.id, client = %msg.peer.addr, size, "message refused: too big for every recipient's route");
                for r in &routes {
                    metrics::counter!(m::ROUTE_TOO_BIG, "route" => r.clone()).increment(1);
                }
                return refusals.into_iter().next().unwrap_or(canned::TOO_BIG);
            }
        }
        // The loop guard: a message that passed through us before and now comes from a
        // route's next hop must not go back to that route.
        let returned_from = if crate::policy::passed_through(&msg.body, &rules.hostname) {
            self.queue.routes_sending_from(msg.peer.addr.ip())
        } else {
            Vec::new()
        };
        if !returned_from.is_empty() {
            warn!(qid = %msg.id, client = %msg.peer.addr, routes = ?returned_from, "message came back from a route's next hop after passing through us: it will not be sent to that route again");
        }
        let env = Envelope {
            id: msg.id.clone(),
            from: msg.from,
            rcpts: msg.rcpts,
            smtputf8: msg.params.smtputf8,
            body: msg.params.body,
            received_at: unix_now(),
            size,
            client: msg.peer.addr.to_string(),
            ret: msg.params.ret,
            envid: msg.params.envid,
            rcpt_dsn: msg.rcpt_dsn,
            bounce: false,
            returned_from,
        };
        let body = Arc::new(msg.body);
        // Group commit: this waits for the sync that covers this message (and every other
        // one that arrived meanwhile); only then is the 250 sent.
        match self.spool.store(&env, body.clone()).await {
            Ok(loc) => {
                info!(
                    qid = %env.id,
                    from = %env.from.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                    nrcpt = env.rcpts.len(),
                    size = env.size,
                    client = %env.client,
                    tls = msg.peer.tls.as_deref().unwrap_or("none"),
                    "queued"
                );
                let reply = Reply::owned(250, "2.0.0", format!("Ok: queued as {}", env.id));
                self.queue.submit(env, loc, Some(body));
                reply
            }
            Err(e) if e.is_no_space() => {
                error!(qid = %env.id, error = %e, "spool disk full");
                NO_SPACE
            }
            Err(e) => {
                error!(qid = %env.id, error = %e, "cannot spool message");
                canned::LOCAL_ERROR
            }
        }
    }
}

/// Reload, drain and status: what the admin API and signals act on.
pub struct Control {
    config: ArcSwap<Config>,
    config_file: Option<std::path::PathBuf>,
    server: Arc<ServerControl>,
    handler: Arc<RelayHandler>,
    /// The scheduler.
    pub queue: Queue,
    /// The directory.
    pub directory: Arc<Directory>,
    /// The fleet this node belongs to, if any.
    pub fleet: Option<Fleet>,
    /// Batches scheduled for later.
    pub scheduled: Arc<ScheduleStore>,
    reload_lock: Mutex<()>,
}

impl Control {
    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Re-reads the config file, validates it, and swaps it in at once. Sessions in progress
    /// keep the config they started with; new sessions and the next delivery attempts use
    /// the new one. On any error nothing changes.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let _l = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let res = self.reload_inner();
        let result = if res.is_ok() { "ok" } else { "refused" };
        metrics::counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
        match &res {
            Ok(changed) => info!(changed = ?changed, "config reloaded"),
            Err(e) => warn!(error = %e, "config reload refused; the running config stays in force"),
        }
        res
    }

    fn reload_inner(&self) -> Result<Vec<String>, ReloadError> {
        let file = self.config_file.as_ref().ok_or(ReloadError::NoFile)?;
        let new = Config::load(file)?;
        let old = self.config.load_full();
        let restart = old.restart_keys(&new);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart.join(", ")));
        }
        // Build everything first, so a failure leaves the old config whole.
        let acceptor = match &new.tls {
            Some(t) => Some(tls::load_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let route_tls = crate::deliver::tls::route_tls(&new)?;
        let inflight = self.server.session.load().inflight.clone();
        let session = SessionConfig::from_config(&new, acceptor, inflight);
        let rules = SessionRules::new(&new);
        let changed = changed_sections(&old, &new);
        let new = Arc::new(new);
        self.server.session.store(Arc::new(session));
        self.handler.rules.store(Arc::new(rules));
        self.directory.set_unknown(&new.directory.unknown);
        self.directory.set_max_shrink(new.directory.max_shrink);
        self.queue.set_config(new.clone(), route_tls);
        self.config.store(new);
        Ok(changed)
    }

    /// Turns drain mode on or off: while on, new sessions get `421 4.3.2`.
    pub fn set_draining(&self, on: bool) {
        self.server.draining.store(on, Ordering::SeqCst);
        info!(draining = on, "drain mode");
    }

    /// True while draining.
    pub fn draining(&self) -> bool {
        self.server.draining.load(Ordering::SeqCst)
    }

    /// SMTP sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.server.open_sessions()
    }
}

/// The admin API's view of the relay: the methods above, and the parts it reads.
impl crate::admin::Controls for Control {
    fn config(&self) -> Arc<Config> {
        Control::config(self)
    }
    fn reload(&self) -> Result<Vec<String>, crate::admin::controls::ReloadRefused> {
        Ok(Control::reload(self)?)
    }
    fn set_draining(&self, on: bool) {
        Control::set_draining(self, on)
    }
    fn draining(&self) -> bool {
        Control::draining(self)
    }
    fn open_sessions(&self) -> usize {
        Control::open_sessions(self)
    }
    fn queue(&self) -> &Queue {
        &self.queue
    }
    fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }
    fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }
    fn scheduled(&self) -> &Arc<ScheduleStore> {
        &self.scheduled
    }
}

fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if old.server != new.server {
        v.push("server".into());
    }
    if old.tls != new.tls {
        v.push("tls".into());
    }
    if old.directory != new.directory {
        v.push("directory".into());
    }
    if old.queue != new.queue {
        v.push("queue".into());
    }
    if old.delivery != new.delivery {
        v.push("delivery".into());
    }
    for (name, r) in &new.routes {
        if old.routes.get(name) != Some(r) {
            v.push(format!("routes.{name}"));
        }
    }
    v
}

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
        if let Some(a) = &self.admin {
            a.abort();
        }
        self.schedule_task.abort();
    }
}

/// Starts the relay from `config` (read from `config_file`, if any, which reloads re-read).
/// Runs the start-up checks `check-config` shares ([`crate::preflight::check`]), then loads
/// TLS, directory and spool, re-queues what the spool holds, binds every listen
/// address, and starts the admin API. Must be called inside a tokio runtime.
pub async fn start_with_file(
    config: Config,
    config_file: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    let _ = m::install();
    // The checks `coexist check-config` runs too: TLS material, admin token, writable folders.
    let found = crate::preflight::check(&config)?;
    // One process per spool and per directory store (see `crate::dirlock`).
    let locks = [
        DirLock::take(&config.spool.dir, "spool.dir")?,
        DirLock::take(&config.directory.store_dir, "directory.store_dir")?,
    ];
    let acceptor = found.acceptor;
    let t0 = Instant::now();
    let (directory, fleet) = match &config.fleet {
        Some(_) => {
            let (fleet, directory) = Fleet::start(&config).await?;
            (directory, Some(fleet))
        }
        None => (open_directory(&config).await?, None),
    };
    info!(entries = directory.len(), source = %directory.source_name(), ms = t0.elapsed().as_millis() as u64, "directory loaded");
    let watch_file = config.directory.file.as_ref().filter(|_| fleet.is_none());
    let watch = if let (true, Some(file)) = (config.directory.watch, watch_file) {
        match crate::directory::watch::spawn(directory.clone(), file) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the directory file; use SIGHUP or `coexist directory reload`");
                None
            }
        }
    } else {
        None
    };
    let scheduled = Arc::new(ScheduleStore::open(
        &config.directory.store_dir.join("scheduled"),
    )?);
    // In a fleet, scheduled batches live in PostgreSQL and any live node applies them.
    let schedule_task = match &fleet {
        Some(f) => tokio::spawn(crate::fleet::scheduled::run(
            f.clone(),
            config.route_names(),
            scheduled.clone(),
        )),
        None => tokio::spawn(scheduled::run(
            scheduled.clone(),
            config.route_names(),
            apply_fn(directory.clone()),
        )),
    };
    let opened = {
        let dir = config.spool.dir.clone();
        tokio::task::spawn_blocking(move || Spool::open(&dir))
            .await
            .map_err(|e| StartError::Task(e.to_string()))??
    };
    let spool = Arc::new(opened.spool);
    let config = Arc::new(config);
    let queue = Queue::new(
        spool.clone(),
        directory.clone(),
        config.clone(),
        found.route_tls,
    )?;

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

    let handler = Arc::new(RelayHandler {
        rules: ArcSwap::from_pointee(SessionRules::new(&config)),
        directory: directory.clone(),
        spool,
        queue: queue.clone(),
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
        scheduled: scheduled.clone(),
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
        f.set_admin_addr(a, &config.server.hostname);
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
        _watch: watch,
        _locks: locks,
    })
}

/// How a due scheduled batch of a single node is applied: on the directory (a fleet's
/// batches are applied by `crate::fleet::scheduled`).
fn apply_fn(directory: Arc<Directory>) -> scheduled::ApplyFn {
    use scheduled::ApplyError;
    Arc::new(move |rows, source| {
        let directory = directory.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || directory.apply(&rows, &source, false))
                .await
                .map_err(|e| ApplyError::Retry(e.to_string()))?
                .map(|r| r.id)
                .map_err(|e| ApplyError::Fail(e.to_string()))
        })
    })
}

/// Opens the directory of a single node: from `directory.file`, or with `[directory.ldap]`
/// from the LDAP source (a first full sync, bounded by its timeout, then the sync task).
async fn open_directory(config: &Config) -> Result<Arc<Directory>, StartError> {
    use crate::directory::ldap;
    let (cfg, names) = (config.directory.clone(), config.route_names());
    let Some(l) = config.directory.ldap.clone() else {
        let d = tokio::task::spawn_blocking(move || Directory::open(&cfg, names))
            .await
            .map_err(|e| StartError::Task(e.to_string()))??;
        return Ok(Arc::new(d));
    };
    Ok(ldap::open(l, cfg, names)
        .await
        .map_err(|e| StartError::Task(e.to_string()))??)
}

/// Starts the relay from an in-memory config (no reload from file).
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_file(config, None).await
}
