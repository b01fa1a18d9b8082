//! The running relay's control surface: reload (with the keys a reload may change), drain,
//! status, and what the admin API reads (the [`crate::admin::Controls`] it implements).

use super::*;

/// Reload, drain and status: what the admin API and signals act on.
pub struct Control {
    pub(super) config: ArcSwap<Config>,
    pub(super) config_file: Option<std::path::PathBuf>,
    pub(super) server: Arc<ServerControl>,
    pub(super) handler: Arc<RelayHandler>,
    /// The scheduler.
    pub queue: Queue,
    /// The directory.
    pub directory: Arc<Directory>,
    /// The fleet this node belongs to, if any.
    pub fleet: Option<Fleet>,
    /// This node's shadow side (`[shadow]`), if any.
    pub shadow: Option<Arc<Shadowing>>,
    /// The outbound side (pool, resolver, route TLS, next-hop states).
    pub outbound: Arc<Transport>,
    /// The per-minute rates, and the recent outcomes when there is no tracking log.
    pub outcomes: Arc<Recorder>,
    /// The tracking log (`[tracking]`), if on.
    pub tracking: Option<Arc<Tracking>>,
    pub(super) hop_routes: Arc<HopRoutes>,
    pub(super) spool: Arc<Spool>,
    /// Where directory changes go (this node's directory, or the fleet's log).
    pub writer: Arc<dyn DirectoryWriter>,
    pub(super) reload_lock: Mutex<()>,
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
        let (new, warnings) = Config::load_with_warnings(file)?;
        for w in &warnings {
            warn!("config: {w}");
        }
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
        self.outbound.set_config(&new, route_tls);
        self.hop_routes.set_config(&new);
        self.queue.set_config(new.clone());
        note_cert_expiry(&new);
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

    /// Gives `config` to the delivery side at once (the outbound side, the loop guard and
    /// the queue), as a reload would, without reading a file; sessions and the config shown
    /// keep the one in force. For tests.
    #[doc(hidden)]
    pub fn set_delivery_config(&self, config: Config) -> Result<(), ReloadError> {
        let route_tls = crate::deliver::tls::route_tls(&config)?;
        let config = Arc::new(config);
        self.outbound.set_config(&config, route_tls);
        self.hop_routes.set_config(&config);
        self.queue.set_config(config);
        Ok(())
    }

    /// Test hook: see [`Spool::inject_faults`].
    #[doc(hidden)]
    pub fn inject_spool_faults(&self, faults: crate::spool::InjectedFaults) {
        self.spool.inject_faults(faults);
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
    fn outcomes(&self) -> &Recorder {
        &self.outcomes
    }
    fn tracking(&self) -> Option<&Arc<Tracking>> {
        self.tracking.as_ref()
    }
    fn outbound(&self) -> &Transport {
        &self.outbound
    }
    fn spool_stats(&self) -> (u64, u64, usize) {
        let (syncs, records) = self.spool.commit_stats();
        (syncs, records, self.spool.segment_count())
    }
    fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }
    fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }
    fn shadow(&self) -> Option<&Arc<Shadowing>> {
        self.shadow.as_ref()
    }
    fn writer(&self) -> &Arc<dyn DirectoryWriter> {
        &self.writer
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
    if old.bounce != new.bounce {
        v.push("bounce".into());
    }
    if old.policy != new.policy {
        v.push("policy".into());
    }
    for (name, r) in &new.routes {
        if old.routes.get(name) != Some(r) {
            v.push(format!("routes.{name}"));
        }
    }
    v
}

/// Sets `coexist_tls_cert_expiry_timestamp_seconds` for the STARTTLS and admin
/// certificates `config` names (at start and at each reload; a certificate whose validity
/// cannot be read is logged and left out).
pub(super) fn note_cert_expiry(config: &Config) {
    let certs = [
        ("smtp", config.tls.as_ref().map(|t| t.cert.clone())),
        (
            "admin",
            config.admin.as_ref().and_then(|a| a.tls_cert.clone()),
        ),
    ];
    for (name, path) in certs {
        let Some(path) = path else { continue };
        match crate::certs::not_after(&path) {
            Ok(t) => metrics::gauge!(m::TLS_CERT_EXPIRY, "cert" => name).set(t as f64),
            Err(e) => {
                warn!(error = %e, cert = name, "cannot read a certificate's end of validity for the expiry metric")
            }
        }
    }
}
