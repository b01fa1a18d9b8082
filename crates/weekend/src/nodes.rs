//! The coexist nodes: one `coexist serve` per MX host, each with `[fleet]` (the directory
//! shared through PostgreSQL, primary and standby named so a node follows a promotion),
//! `[shadow]` (a copy of every message on the JetStream cluster before 250),
//! `[directory.ldap]` (the migration state from OpenLDAP) and admin TLS (the nodes ask each
//! other what they have applied when PostgreSQL is out of reach; the token goes only over
//! TLS), and routes to the two next hops in the run's namespace.

use crate::history::Estate;
use crate::net::Net;
use crate::procs::{listening, wait_for, As, Proc};
use crate::services::{
    path_str, sink_addr, ADMIN_PORT, DOMAIN, ROOT_DN, ROOT_PW, SMTP_PORT, SUFFIX,
};
use anyhow::Context;
use coexist_api::client::{AdminClient, Target};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings every node shares.
pub struct NodeSettings {
    /// The `coexist` binary.
    pub bin: PathBuf,
    /// libpq connection string of the fleet (both PostgreSQL hosts).
    pub postgres: String,
    /// The JetStream servers.
    pub nats: Vec<String>,
    /// The LDAP server.
    pub ldap_url: String,
    /// `fleet.max_lag`.
    pub max_lag: Duration,
    /// `shadow.takeover_after`.
    pub takeover_after: Duration,
    /// `delivery.timeout`.
    pub delivery_timeout: Duration,
    /// `directory.ldap.sync_interval`.
    pub sync_interval: Duration,
    /// `queue.max_backoff` (`min_backoff` is a sixth of it).
    pub max_backoff: Duration,
}

/// One node.
pub struct Node {
    /// Its name (`mx1`), also its host's.
    pub name: String,
    /// Its SMTP address.
    pub smtp: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its spool (the directory store and tracking log under it): what a lost disk loses.
    pub spool: PathBuf,
    ns: String,
    bin: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// The run's certificates: a CA, and per node a certificate for its name and address.
struct Certs {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Certs {
    fn new() -> anyhow::Result<Certs> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "coexist weekend CA");
        Ok(Certs {
            ca: rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate()?)?,
        })
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses).
    fn issue(&self, names: &[String]) -> anyhow::Result<(String, String)> {
        let mut p = rcgen::CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        let key = rcgen::KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Makes the nodes' files (configs, certificates, the shared admin token and the LDAP
/// password) under `dir` and returns the nodes, not started.
#[allow(clippy::disallowed_methods)] // Set-up of a test tool: files written before any node starts.
pub fn prepare(
    net: &Net,
    names: &[&str],
    s: &NodeSettings,
    dir: &Path,
) -> anyhow::Result<Vec<Node>> {
    let certs = Certs::new()?;
    std::fs::create_dir_all(dir)?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, certs.ca.pem())?;
    let token = dir.join("admin.token");
    let secret: String = (0..40).map(|_| fastrand::alphanumeric()).collect();
    write_private(&token, &secret)?;
    let ldap_pw = dir.join("ldap.password");
    write_private(&ldap_pw, ROOT_PW)?;
    let mut nodes = Vec::new();
    for name in names {
        let h = net.host(name);
        let base = dir.join(name);
        std::fs::create_dir_all(&base)?;
        let hostname = format!("{name}.{DOMAIN}");
        let (cert, key) = certs.issue(&[hostname.clone(), h.ip.to_string()])?;
        std::fs::write(base.join("admin.crt"), cert)?;
        write_private(&base.join("admin.key"), &key)?;
        let spool = base.join("spool");
        let config = base.join("coexist.toml");
        let nats: Vec<String> = s.nats.iter().map(|u| format!("\"{u}\"")).collect();
        let text = format!(
            r#"# A node of the weekend run (written by coexist-weekend).
[server]
hostname = "{hostname}"
listen = ["{ip}:{SMTP_PORT}"]
accepted_domains = ["{DOMAIN}"]
max_connections = 1000

[spool]
dir = "{spool}"
min_free_space = 0

[directory]
unknown = "reject"
max_shrink = "50%"
move_grace = "2h"

[directory.ldap]
url = "{ldap}"
bind_dn = "{ROOT_DN}"
password_file = "{ldap_pw}"
# The run's slapd speaks plain LDAP on its own bridge (tests/ldap_secrets.rs covers TLS).
allow_plaintext_bind = true
base_dn = "ou=people,{SUFFIX}"
flavor = "openldap"
sync_interval = "{sync}ms"

[queue]
min_backoff = "{min_backoff}ms"
max_backoff = "{max_backoff}ms"
probe_interval = "5s"

[delivery]
timeout = "{timeout}ms"
external_route = "onprem"

[routes.onprem]
next_hops = ["{onprem}"]
tls = "none"
concurrency = 20

[routes.cloud]
next_hops = ["{cloud}"]
tls = "none"
concurrency = 20
throttle_pause = "5s"
throttle_max_pause = "20s"

[policy]
max_connections_per_ip = 1000

[admin]
listen = "{ip}:{ADMIN_PORT}"
token_file = "{token}"
tls_cert = "{base}/admin.crt"
tls_key = "{base}/admin.key"
tls_ca_file = "{ca}"

[fleet]
postgres = "{pg}"
schema = "weekend"
node = "{name}"
max_lag = "{lag}ms"
commit_timeout = "30s"

[shadow]
nats = [{nats}]
replicas = 3
takeover_after = "{takeover}ms"
# publish_timeout stays at its default (10s): longer than a stream's leader election after
# its leader's server is lost (with 3.3 s, a killed NATS server cost 451s for a moment).
on_failure = "defer"
"#,
            ip = h.ip,
            spool = path_str(&spool)?,
            ldap = s.ldap_url,
            ldap_pw = path_str(&ldap_pw)?,
            sync = s.sync_interval.as_millis(),
            min_backoff = s.max_backoff.as_millis() / 6,
            max_backoff = s.max_backoff.as_millis(),
            timeout = s.delivery_timeout.as_millis(),
            onprem = sink_addr(Estate::Onprem),
            cloud = sink_addr(Estate::Cloud),
            token = path_str(&token)?,
            base = path_str(&base)?,
            ca = path_str(&ca)?,
            pg = s.postgres,
            lag = s.max_lag.as_millis(),
            nats = nats.join(", "),
            takeover = s.takeover_after.as_millis(),
        );
        std::fs::write(&config, text)?;
        nodes.push(Node {
            name: name.to_string(),
            smtp: SocketAddr::from((h.ip, SMTP_PORT)),
            config,
            spool,
            ns: h.ns.clone(),
            bin: s.bin.clone(),
            log: base.join("serve.log"),
            proc: None,
        });
    }
    Ok(nodes)
}

/// Writes a file only its owner can read.
#[allow(clippy::disallowed_methods)] // Set-up: secrets written before the nodes start.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

impl Node {
    /// Starts `coexist serve` and waits until it takes SMTP connections (a node listens
    /// only once it has caught up with the fleet's log), at most `limit`.
    pub fn start(&mut self, limit: Duration) -> anyhow::Result<()> {
        let config = path_str(&self.config)?.to_string();
        self.proc = Some(Proc::start(
            &format!("coexist on {}", self.name),
            &self.ns,
            As::Root,
            path_str(&self.bin)?,
            &["serve", "--config", &config],
            &[("RUST_LOG", "info")],
            &self.log,
        )?);
        let smtp = self.smtp;
        let name = self.name.clone();
        let proc = self.proc.as_mut().context("just started")?;
        wait_for(&format!("{name} listening for SMTP"), limit, || {
            listening(smtp) || proc.exited()
        })?;
        if proc.exited() {
            anyhow::bail!(
                "coexist on {name} exited at start; see {}",
                self.log.display()
            );
        }
        Ok(())
    }

    /// Its PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
        self.proc = None;
    }

    /// Deletes its spool (with the directory store and tracking log under it): a lost disk.
    #[allow(clippy::disallowed_methods)] // The fault itself: a wiped disk, done while the node is dead.
    pub fn wipe(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(&self.spool) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// A graceful stop (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut p) = self.proc.take() {
            p.stop(grace);
        }
    }

    /// A client for its admin API whose calls give up after `timeout`.
    pub fn client(&self, timeout: Duration) -> anyhow::Result<AdminClient> {
        let cfg = coexist_core::config::Config::load(&self.config)?;
        let admin = cfg.admin.as_ref().context("[admin]")?;
        let target = Target::of_config(&cfg).context("admin address")?;
        Ok(AdminClient::connect(
            &target,
            admin.token()?,
            timeout,
            admin.tls_ca_file.as_deref(),
        )?)
    }
}
