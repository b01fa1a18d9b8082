//! Wiring: builds the running relay from a config (listeners, directory, spool, queue) and
//! the session handler that joins policy, directory and spool.

use crate::config::Config;
use crate::directory::{Directory, Resolution};
use crate::policy::Policy;
use crate::queue::{unix_now, Queue};
use crate::smtp::reply::{canned, Reply};
use crate::smtp::{server, tls, Handler, Incoming, Peer, SessionConfig};
use crate::spool::{DeliveryState, Envelope, Spool};
use crate::types::Address;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Spool unusable.
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// Directory unusable.
    #[error("directory: {0}")]
    Directory(#[from] crate::directory::DirectoryError),
    /// The admin API could not start.
    #[error("admin API: {0}")]
    Admin(std::io::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// A start-up task failed.
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// The relay's session handler.
pub struct RelayHandler {
    policy: Policy,
    directory: Arc<Directory>,
    spool: Arc<Spool>,
    queue: Queue,
}

impl Handler for RelayHandler {
    fn check_rcpt(&self, peer: &Peer, _from: Option<&Address>, to: &Address) -> Result<(), Reply> {
        if let Err(r) = self.policy.check_recipient(to) {
            info!(client = %peer.addr, to = %to, reply = %r, "recipient refused");
            return Err(r);
        }
        match self.directory.resolve(to) {
            Resolution::Reject => {
                info!(client = %peer.addr, to = %to, "unknown recipient refused");
                Err(canned::UNKNOWN_USER)
            }
            res => {
                debug!(to = %to, route = ?res.route(), "recipient accepted");
                Ok(())
            }
        }
    }

    async fn accept(&self, msg: Incoming) -> Reply {
        let env = Envelope {
            id: msg.id.clone(),
            from: msg.from,
            rcpts: msg.rcpts,
            smtputf8: msg.params.smtputf8,
            body: msg.params.body,
            received_at: unix_now(),
            size: msg.body.len() as u64,
            client: msg.peer.addr.to_string(),
        };
        let body = Arc::new(msg.body);
        let (spool, env2, body2) = (self.spool.clone(), env.clone(), body.clone());
        let stored = tokio::task::spawn_blocking(move || spool.store(&env2, &body2)).await;
        match stored {
            Ok(Ok(())) => {
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
                let n = env.rcpts.len();
                self.queue.submit(env, DeliveryState::new(n), Some(body));
                reply
            }
            Ok(Err(e)) => {
                error!(qid = %env.id, error = %e, "cannot spool message");
                canned::LOCAL_ERROR
            }
            Err(e) => {
                error!(qid = %env.id, error = %e, "spool task failed");
                canned::LOCAL_ERROR
            }
        }
    }
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
    tasks: Vec<JoinHandle<()>>,
    _watch: Option<crate::directory::watch::FileWatch>,
}

impl Running {
    /// Stops accepting new sessions (sessions and deliveries in progress go on).
    pub fn stop_listening(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

/// Starts the relay: loads TLS, directory and spool, re-queues what the spool holds, binds
/// every listen address. Must be called inside a tokio runtime.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let acceptor = match &config.tls {
        Some(t) => Some(tls::load_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let directory = {
        let (cfg, names) = (config.directory.clone(), config.route_names());
        tokio::task::spawn_blocking(move || Directory::open(&cfg, names))
            .await
            .map_err(|e| StartError::Task(e.to_string()))??
    };
    let directory = Arc::new(directory);
    info!(entries = directory.len(), file = %config.directory.file.display(), ms = t0.elapsed().as_millis() as u64, "directory loaded");
    let watch = if config.directory.watch {
        match crate::directory::watch::spawn(directory.clone(), &config.directory.file) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the directory file; use SIGHUP or `coexist directory reload`");
                None
            }
        }
    } else {
        None
    };
    let spool = Arc::new(Spool::open(&config.spool.dir)?);
    let config = Arc::new(config);
    let queue = Queue::new(spool.clone(), directory.clone(), config.clone());

    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Bind(*addr, e))?;
        listeners.push(l);
    }

    let recovered = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.recover())
            .await
            .map_err(|e| StartError::Task(e.to_string()))??
    };
    if !recovered.is_empty() {
        info!(
            messages = recovered.len(),
            "re-queued messages from the spool"
        );
    }
    for (env, state) in recovered {
        queue.submit(env, state, None);
    }

    let handler = Arc::new(RelayHandler {
        policy: Policy::new(&config.server.accepted_domains),
        directory: directory.clone(),
        spool,
        queue: queue.clone(),
    });
    let session_cfg = Arc::new(SessionConfig::from_server(&config.server, acceptor));
    let limit = Arc::new(Semaphore::new(config.server.max_connections));
    let mut local_addrs = Vec::new();
    let mut tasks = Vec::new();
    let admin_addr = match crate::admin::start(directory.clone(), config.clone())
        .await
        .map_err(StartError::Admin)?
    {
        Some((addr, task)) => {
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };
    for l in listeners {
        let addr = l
            .local_addr()
            .map_err(|e| StartError::Bind(config.server.listen[0], e))?;
        info!(%addr, "listening");
        local_addrs.push(addr);
        tasks.push(tokio::spawn(server::serve(
            l,
            session_cfg.clone(),
            handler.clone(),
            limit.clone(),
        )));
    }
    Ok(Running {
        local_addrs,
        admin_addr,
        queue,
        directory,
        tasks,
        _watch: watch,
    })
}
