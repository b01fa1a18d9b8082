//! A fleet: several MX nodes sharing one directory through PostgreSQL (`[fleet]`).
//!
//! PostgreSQL holds one ordered change log (`changes`: batches, rollbacks and base imports,
//! each with a gap-free sequence number), the latest bases (`base_rows`) and the nodes
//! table (`nodes`). Every directory change goes to PostgreSQL first: the committing node
//! takes a transaction-scoped advisory lock, brings its own directory up to the head of the
//! log, computes the change against it, inserts it as head + 1 and commits. Holding the lock
//! from reading the head to the commit is what makes the numbers gap-free and ordered by
//! commit, so a follower that reads "everything after my sequence" can never miss a change
//! that commits late with a lower number (the trap of a plain `serial`).
//!
//! Every node, the committing one included, then applies the log in sequence order
//! ([`follow`]): `LISTEN` wakes it at once, and a poll every second catches what a missed
//! notification would lose. A node that starts or reconnects applies everything after its
//! local snapshot's sequence. The directory's own store (snapshot and change log under
//! `directory.store_dir/fleet`) keeps what was applied, so a restart needs only the tail.
//!
//! One routing truth (DESIGN invariant 10). Each change has an identity beyond its number:
//! a random `uid` and its commit time, stored in `changes` and kept in the local change
//! log. At every catch-up and before every commit a node checks that PostgreSQL's change
//! at its `applied` is the very one it applied and that the head is not below it. A log
//! that moved back (failover to a standby that missed the last commits, a restore, a
//! truncated table) fails that check: the node refuses directory changes with an error
//! naming both sides, counts as behind (drains after `max_lag`), logs it and shows it
//! (`fleet status`, `/v1/ready`, `coexist_fleet_log_mismatch`). It never skips the log's
//! change under a number it already has. The repair is a new base above every node's
//! `applied`: `coexist directory import FILE` (through any node, a mismatched one included;
//! the import's number jumps past every applied change in the nodes table), which every
//! node takes since a base decides every mailbox anew. Only the admin's import repairs:
//! the automatic bases (the LDAP leader's, seeding with `directory.file` when the log is
//! empty) are refused on a mismatched node and numbered head + 1, and a node that has
//! applied changes never seeds an empty log (that log moved back too).
//!
//! Nothing waits on PostgreSQL forever: the schema is migrated once per process (columns
//! added only when missing), every connection runs with `lock_timeout` and
//! `statement_timeout`, session set-up is bounded, and lag is evaluated on a timer of its
//! own: a node connected to a log whose head stays above its `applied` for `max_lag`
//! (a change it cannot read, a statement that waits), or connected for `max_lag` without a
//! catch-up that finished, drains like any lagging node. A server that does not answer at
//! all (a stalled network, a half-open connection: PostgreSQL's own timeouts never see
//! it) is bounded here: every directory change, scheduled-batch step, `fleet status` read
//! and the catch-up at start gives up after `fleet.commit_timeout` (a base import after
//! that plus its COPY's bound) as [`FleetError::Unreachable`] naming what waited, and the
//! connections use TCP keepalives and `TCP_USER_TIMEOUT` so the kernel ends a dead one.
//!
//! A node that starts while PostgreSQL is down takes the fleet id from its store's
//! `fleet.id` marker: when PostgreSQL is back it follows on a match, and on a mismatch (the
//! schema was made again) it replaces its store with the new fleet's latest base.
//!
//! When PostgreSQL cannot be reached, nodes keep routing on the state they have (DESIGN
//! invariant 9: no node refuses mail because the shared store is down) and directory changes
//! are refused with an error naming PostgreSQL. A node that knows it is behind the fleet (a
//! peer has applied more than it has) for longer than `fleet.max_lag` drains (`421 4.3.2`,
//! readiness 503) so that sending MTAs use the up-to-date MX hosts, and leaves drain once it
//! has caught up.
//!
//! Files: [`sql`] (schema, migrations, the statements), [`follow`] (following the log,
//! installing bases), [`lag`] (heartbeat, peers, lag and drain), [`commit`] (batches, rollbacks and base imports through the
//! log), [`rollback`] (rollbacks as restore lists, possible across later bases),
//! [`status`] (the nodes table as `fleet status` shows it), [`ldap`] (the LDAP source
//! of a fleet: one node at a time syncs it and imports what changed), [`scheduled`]
//! (batches scheduled for later, kept in PostgreSQL and applied once by whichever node is
//! live at their time), [`peers`] (whether a peer's admin API can be asked from here),
//! [`tls`] (TLS to PostgreSQL: `sslmode` and `sslrootcert` as libpq has them), [`writer`]
//! (the fleet's [`crate::directory::DirectoryWriter`], [`FleetWriter`], which the relay
//! chooses at start on a fleet node).

mod commit;
mod delta;
mod follow;
mod inner;
mod lag;
mod ldap;
pub mod leases;
mod marker;
pub mod peers;
mod rollback;
pub mod scheduled;
mod shadow_status;
mod sql;
mod status;
pub mod tls;
mod writer;

pub use commit::{FleetBatch, Progress};
pub use status::{probe, FleetStatus, NodeApplied, NodeRow, PgHealth};
pub use writer::FleetWriter;

use marker::{claim_store, read_marker, write_marker};

use crate::config::{Config, FleetConfig};
use crate::directory::{Directory, DirectoryError, Stamp};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

/// A fleet problem.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// PostgreSQL cannot be reached (or the connection broke): changes are refused.
    #[error("PostgreSQL is unreachable ({target}): {reason}; directory changes are refused until it is back (mail keeps flowing on the directory in force)")]
    Unreachable {
        /// Host and database, without credentials.
        target: String,
        /// The driver's error.
        reason: String,
    },
    /// A statement failed.
    #[error("PostgreSQL: {}", sql::describe(.0))]
    Statement(#[source] tokio_postgres::Error),
    /// PostgreSQL holds something this node cannot use (a base without its rows, a
    /// sequence number out of range).
    #[error("PostgreSQL: {0}")]
    Sql(String),
    /// A row of base `seq`, as PostgreSQL's COPY gave it, is not CSV this node reads.
    #[error("PostgreSQL: base {seq}: {source}")]
    BaseCsv {
        /// The base's sequence number.
        seq: u32,
        /// The CSV reader's error.
        source: csv::Error,
    },
    /// `fleet.postgres` is not a connection string the fleet can use.
    #[error("fleet.postgres: {0}")]
    Connection(#[from] crate::config::postgres::PgConnError),
    /// The TLS connector for `fleet.postgres` could not be made.
    #[error("fleet.postgres: {0}")]
    Tls(#[from] tls::PgTlsError),
    /// The directory refused or failed (a bad row, the shrink guard, the local store).
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// Refused by the fleet's rules, with why.
    #[error("{0}")]
    Refused(String),
    /// PostgreSQL's change log no longer holds the history this node applied (it moved
    /// back, or holds other changes under the same numbers): both sides named.
    #[error("{0}")]
    Diverged(#[from] Divergence),
}

/// How PostgreSQL's change log differs from the history this node applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    /// The log ends below the change this node applied.
    #[error("PostgreSQL's change log ends at change {head}, below {here} that this node applied: the log moved back (failover to a standby that missed commits, or a restore); directory changes are refused until repaired (`coexist directory import` of a known-good directory file makes a new base every node takes)")]
    MovedBack {
        /// The log's head.
        head: u32,
        /// The change this node applied last.
        here: Stamp,
    },
    /// The log has no change under the number this node applied last.
    #[error("PostgreSQL's change log has no change {seq} although its head is {head}, while this node applied {here}; directory changes are refused until repaired (`coexist directory import` of a known-good directory file makes a new base every node takes)")]
    Missing {
        /// The number looked for.
        seq: u32,
        /// The log's head.
        head: u32,
        /// The change this node applied last.
        here: Stamp,
    },
    /// The log holds another change under that number.
    #[error("PostgreSQL's change log holds {there} where this node applied {here}: the log moved back and was written again; directory changes are refused until repaired (`coexist directory import` of a known-good directory file makes a new base every node takes)")]
    Rewritten {
        /// The change in the log.
        there: Stamp,
        /// The change this node applied under that number.
        here: Stamp,
    },
    /// A change was committed under a number this node had applied already.
    #[error("change {seq} was committed to PostgreSQL, but this node had applied a change {seq} already: the log moved back; this node counts as behind until repaired")]
    Skipped {
        /// The number committed again.
        seq: u32,
    },
}

impl FleetError {
    /// True when PostgreSQL could not be reached (the caller may retry later).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, FleetError::Unreachable { .. })
    }
}

/// What the relay reports about this node in the nodes table.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeReport {
    /// Drained by an admin.
    pub draining: bool,
    /// Messages in the queue.
    pub queue: u64,
}

/// What a node knows about PostgreSQL and the fleet, kept by the follower.
struct Health {
    /// Connected and following.
    up: bool,
    /// When `up` last changed (RFC 3339), and the instant.
    since: String,
    since_at: Instant,
    /// The last connection or statement error.
    error: Option<String>,
    /// Highest sequence seen in the fleet log.
    head: u32,
    /// Since when this node is known to be behind the fleet.
    behind_since: Option<Instant>,
    /// Why it is behind (for status and logs).
    behind_why: Option<String>,
    /// The other nodes' admin addresses, from the last read of the nodes table.
    peers: Vec<Peer>,
    /// The peers the last lag check could not ask while PostgreSQL was unreachable, each
    /// with why (`NAME: reason`); empty while connected.
    peers_not_asked: Vec<String>,
    /// Since when the log's head (as last read while connected) is above `applied`.
    head_above_since: Option<Instant>,
    /// Why PostgreSQL's log does not hold this node's history (a log that moved back).
    diverged: Option<String>,
    /// Since when the follower has been connected without a catch-up that finished (set
    /// at connecting, cleared when a catch-up returns): a session that hangs (a stalled
    /// server) counts as behind after `max_lag`.
    waiting_since: Option<Instant>,
}

/// Another node as the nodes table names it: where its admin API is, and on which host
/// that address is valid ([`peers::reach`]).
#[derive(Debug, Clone, PartialEq)]
struct Peer {
    name: String,
    admin: Option<String>,
    admin_host: Option<String>,
    admin_tls_name: Option<String>,
}

/// Shared state of the fleet client: the config, the directory it feeds, the follower's
/// health and the signals to the relay.
struct Inner {
    cfg: FleetConfig,
    pg: tls::Pg,
    directory: Arc<Directory>,
    health: Mutex<Health>,
    /// Wakes the follower (after a local commit, in tests).
    wake: Notify,
    /// The sequence applied here, for waiters.
    applied: watch::Sender<u32>,
    /// Set while this node drains because it is behind the fleet.
    behind: Arc<AtomicBool>,
    /// Drain state and queue size, read at each heartbeat (set by the relay once started).
    reporter: OnceLock<Box<dyn Fn() -> NodeReport + Send + Sync>>,
    /// The admin token (peers are asked with the same token).
    token: Option<String>,
    /// `admin.tls_ca_file`: what peers' admin certificates must chain to.
    admin_ca: Option<std::path::PathBuf>,
    /// How peers' admin APIs are asked (see [`peers::PeerApi`]).
    peer_api: Arc<dyn peers::PeerApi>,
    /// The name this node's admin certificate carries, when its API is served over TLS.
    admin_tls_name: OnceLock<String>,
    /// This node's admin API address as peers reach it (set once the API listens).
    admin_addr: OnceLock<String>,
    /// The host this node runs on ([`peers::host_scope`]), written with its admin address.
    host: String,
    /// The fleet this node's store belongs to: from PostgreSQL, or the store's `fleet.id`
    /// marker while PostgreSQL has not been reached.
    fleet_id: Mutex<Option<String>>,
    /// The local store (`directory.store_dir/fleet`), where the `fleet.id` marker lives.
    store_dir: std::path::PathBuf,
    /// The schema was migrated by this process (once, at the first connection).
    migrated: AtomicBool,
    /// The store belongs to another fleet: replace it with this fleet's latest base.
    replace: AtomicBool,
    /// Stops the follower.
    stop: AtomicBool,
    /// Held by whoever applies changes from the log (the follower's catch-up, a commit from
    /// reading the head to applying its own change).
    applying: tokio::sync::Mutex<()>,
    /// The fleet's LDAP source can be read (as its sync leader reports it in `meta`).
    ldap_up: Arc<AtomicBool>,
}

/// The fleet client of one node. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node", &self.inner.cfg.node)
            .finish()
    }
}

/// Host, port and database of a connection config, never its password.
fn target(pg: &tokio_postgres::Config) -> String {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{host}:{port}/{}",
        pg.get_dbname().unwrap_or("")
    )
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long data sent to PostgreSQL may stay unacknowledged before the kernel closes the
/// connection (`TCP_USER_TIMEOUT`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long any statement may take: PostgreSQL's `statement_timeout` on every fleet
/// connection (a base's COPY in excepted), and the bound of the follower's steps.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

impl Fleet {
    /// Opens this node's directory and joins the fleet: migrates the schema, checks that the
    /// local store belongs to this fleet, seeds a new fleet with `directory.file` when it has
    /// no base yet, catches up, and starts following. When PostgreSQL is unreachable the
    /// node starts on its local snapshot (draining if it has none) and keeps trying.
    /// `peer_api` asks peers' admin APIs while PostgreSQL is unreachable. Must be called
    /// inside a tokio runtime.
    pub async fn start(
        config: &Config,
        peer_api: Arc<dyn peers::PeerApi>,
    ) -> Result<(Fleet, Arc<Directory>), FleetError> {
        let cfg = config
            .fleet
            .clone()
            .ok_or_else(|| FleetError::Refused("no [fleet] section".into()))?;
        let mut pg = tls::Pg::new(cfg.connection()?)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        let options = sql::session_options(pg.get_options());
        pg.options(&options);
        pg.application_name(format!("coexist {}", cfg.node));
        pg.keepalives_idle(Duration::from_secs(10));
        // A half-open connection (the server's host gone, a firewall dropping the flow) is
        // noticed by the kernel: unanswered keepalives, unacknowledged data.
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval(Duration::from_secs(5));
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(3);
        }
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let store_dir = config.directory.store_dir.join("fleet");
        // A schema newer than this build stops the start; a migration that cannot finish
        // (a lock held past `lock_timeout`) is retried by the follower, as when PostgreSQL
        // is unreachable.
        let first = match sql::connect(&pg).await {
            Ok(client) => match sql::migrate(&client, &cfg.schema, &pg).await {
                Ok(id) => {
                    claim_store(&store_dir, &id)?;
                    Ok(client)
                }
                Err(e @ FleetError::Refused(_)) => return Err(e),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &first {
            error!(error = %e, "fleet: PostgreSQL unreachable (or its schema cannot be migrated) at start; serving the local snapshot of the directory until it is back");
        }
        // The fleet the store belongs to: just claimed, or as its marker says.
        let fleet_id = read_marker(&store_dir);
        let migrated = first.is_ok();
        let ldap_up = Arc::new(AtomicBool::new(true));
        let directory = {
            let (dcfg, names, dir) = (
                config.directory.clone(),
                config.route_names(),
                store_dir.clone(),
            );
            let source = crate::directory::FleetSource {
                up: ldap_up.clone(),
            };
            tokio::task::spawn_blocking(move || Directory::open_local(&dcfg, names, &dir, source))
                .await
                .map_err(|e| FleetError::Refused(e.to_string()))??
        };
        let directory = Arc::new(directory);
        let token = config.admin.as_ref().and_then(|a| a.token().ok());
        let now = Instant::now();
        let (applied, _) = watch::channel(directory.applied());
        let fleet = Fleet {
            inner: Arc::new(Inner {
                pg,
                directory: directory.clone(),
                health: Mutex::new(Health {
                    up: false,
                    since: now_rfc3339(),
                    since_at: now,
                    error: first.as_ref().err().map(|e| e.to_string()),
                    head: 0,
                    behind_since: None,
                    behind_why: None,
                    peers: Vec::new(),
                    peers_not_asked: Vec::new(),
                    head_above_since: None,
                    diverged: None,
                    waiting_since: None,
                }),
                wake: Notify::new(),
                applied,
                behind: Arc::new(AtomicBool::new(false)),
                reporter: OnceLock::new(),
                token,
                admin_ca: config.admin.as_ref().and_then(|a| a.tls_ca_file.clone()),
                peer_api,
                admin_tls_name: OnceLock::new(),
                admin_addr: OnceLock::new(),
                host: peers::host_scope(),
                fleet_id: Mutex::new(fleet_id),
                store_dir,
                migrated: AtomicBool::new(migrated),
                replace: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                applying: tokio::sync::Mutex::new(()),
                ldap_up,
                cfg,
            }),
        };
        match first {
            Ok(client) => {
                if let Some(file) = &config.directory.file {
                    let bound = fleet.inner.cfg.commit_timeout + commit::COPY_BOUND;
                    fleet
                        .inner
                        .bounded("seeding the fleet", bound, fleet.seed(&client, file))
                        .await?;
                }
                let bound = fleet.inner.cfg.commit_timeout;
                let catch_up = follow::catch_up(&fleet.inner, &client);
                match fleet
                    .inner
                    .bounded("catching up at start", bound, catch_up)
                    .await
                {
                    Ok(applied) => {
                        info!(node = %fleet.inner.cfg.node, applied, entries = directory.len(), "fleet: caught up with the change log")
                    }
                    Err(e) if e.is_unreachable() => {
                        error!(error = %e, "fleet: lost PostgreSQL while catching up at start")
                    }
                    Err(e) => {
                        // Not a reason to stay down: the node follows (and says why it is
                        // behind) once the log can be applied; with nothing applied yet it
                        // drains at once.
                        error!(error = %e, "fleet: cannot apply the change log at start");
                        fleet.inner.mark_behind(&e.to_string());
                    }
                }
                lag::evaluate(&fleet.inner);
            }
            Err(_) if directory.applied() == 0 => {
                fleet
                    .inner
                    .mark_behind("no directory yet and PostgreSQL is unreachable");
                fleet.inner.behind.store(true, Ordering::SeqCst);
                warn!("fleet: this node has no directory yet; draining until it has caught up with the fleet");
            }
            Err(_) => {}
        }
        tokio::spawn(follow::run(fleet.inner.clone()));
        tokio::spawn(lag::lag_timer(fleet.inner.clone()));
        if let Some(l) = config.directory.ldap.clone() {
            let source = crate::directory::ldap::LdapSource::new(&l);
            directory.attach_ldap(source.clone());
            tokio::spawn(ldap::lead(fleet.clone(), l, source));
        }
        Ok((fleet, directory))
    }

    /// Imports `directory.file` as the first base of a fleet that has none yet.
    /// Not a repair: a node that has applied changes does not seed a log that is empty (the
    /// log moved back: a truncated `changes`, a restore); it says so and counts as behind.
    async fn seed(&self, client: &tokio_postgres::Client, file: &Path) -> Result<(), FleetError> {
        if sql::head(client, &self.inner.cfg.schema, &self.inner.pg).await? > 0 {
            info!(file = %file.display(), "fleet: the fleet has a directory already; directory.file is not read (use `coexist directory import` for a new base)");
            return Ok(());
        }
        let here = self.inner.directory.applied_stamp();
        if here.seq > 0 {
            let why = format!(
                "PostgreSQL's change log is empty, while this node applied {here}: the log moved back (a truncated or restored `changes`); directory.file is not imported, directory changes are refused until repaired (`coexist directory import` of a known-good directory file makes a new base every node takes)"
            );
            self.inner.diverge(&why);
            return Ok(());
        }
        let text = match tokio::fs::read(file).await {
            Ok(t) => t,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "fleet: cannot read directory.file to seed the fleet");
                return Ok(());
            }
        };
        let source = file.display().to_string();
        match self.import_auto(text, source.clone(), false).await {
            Ok(b) => {
                info!(file = %source, change = ?b.id, "fleet: seeded the fleet's first base from directory.file")
            }
            Err(FleetError::Refused(why)) => info!(why, "fleet: not seeded"),
            // Logged and shown by `diverge`; the node counts as behind.
            Err(FleetError::Diverged(why)) => warn!(why = %why, "fleet: not seeded"),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The flag the SMTP listener reads: set while this node drains for lag.
    pub fn behind_flag(&self) -> Arc<AtomicBool> {
        self.inner.behind.clone()
    }

    /// Sets what the heartbeat reports about drain and queue (the relay, once started).
    pub fn set_reporter(&self, f: impl Fn() -> NodeReport + Send + Sync + 'static) {
        let _ = self.inner.reporter.set(Box::new(f));
    }

    /// Records the address the admin API listens on, as the nodes table shows it to peers
    /// and `coexist trace` (an unspecified address is replaced by `server.hostname`). With
    /// `tls`, the address is written `https://ADDRESS` and `server.hostname` is the name
    /// peers check the certificate against.
    pub fn set_admin_addr(&self, addr: std::net::SocketAddr, hostname: &str, tls: bool) {
        let shown = if addr.ip().is_unspecified() {
            format!("{hostname}:{}", addr.port())
        } else {
            addr.to_string()
        };
        let shown = if tls {
            let _ = self.inner.admin_tls_name.set(hostname.to_string());
            format!("https://{shown}")
        } else {
            shown
        };
        let _ = self.inner.admin_addr.set(shown);
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    /// The fleet sequence applied here.
    pub fn applied(&self) -> u32 {
        self.inner.directory.applied()
    }

    /// True while this node drains because it is behind the fleet.
    pub fn behind(&self) -> bool {
        self.inner.behind.load(Ordering::SeqCst)
    }

    /// True while the follower is connected to PostgreSQL.
    pub fn postgres_up(&self) -> bool {
        self.inner.lock_health().up
    }

    /// Why PostgreSQL's change log does not hold the history this node applied (a log that
    /// moved back), while it does not.
    pub fn log_mismatch(&self) -> Option<String> {
        self.inner.lock_health().diverged.clone()
    }

    /// Waits until this node has applied `seq` (or `timeout` passes): true when it has.
    pub async fn wait_applied(&self, seq: u32, timeout: Duration) -> bool {
        let mut rx = self.inner.applied.subscribe();
        self.inner.wake.notify_one();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops following (the relay is shutting down).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

fn now_rfc3339() -> String {
    crate::clock::now_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_target_never_shows_the_password() {
        let pg: tokio_postgres::Config = "postgresql://coexist:secret@db.example:6432/mail"
            .parse()
            .unwrap();
        assert_eq!(target(&pg), "postgresql://db.example:6432/mail");
    }
}
