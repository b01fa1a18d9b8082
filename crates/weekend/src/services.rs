//! The parts of the system, each in its host's namespace: a PostgreSQL primary and a
//! streaming-replication standby (Debian's PostgreSQL 15 binaries, run as `postgres`), a
//! three-server NATS JetStream cluster, an OpenLDAP server with the Exchange attributes, and
//! the coexist nodes (the `coexist` binary beside this one), with the certificates their
//! admin APIs need to ask each other over TLS.

use crate::history::Estate;
use crate::net::{Net, HOST};
use crate::procs::{self, listening, run_to_end, wait_for, As, Proc};
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The PostgreSQL binaries (Debian's package `postgresql-15`).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The LDAP suffix and administrator.
pub const SUFFIX: &str = "dc=corp,dc=test";
/// The LDAP administrator's DN (the nodes bind with it).
pub const ROOT_DN: &str = "cn=admin,dc=corp,dc=test";
/// The mailboxes' domain.
pub const DOMAIN: &str = "corp.test";
/// The Exchange attributes for OpenLDAP (the same schema the LDAP tests load).
const EXCHANGE_SCHEMA: &str = include_str!("../../../tests/ldap/exchange.schema");
/// `msExchRecipientTypeDetails` of an on-premises and of a remote (moved) user mailbox.
pub const ONPREM_TYPE: &str = "1";
/// See [`ONPREM_TYPE`].
pub const CLOUD_TYPE: &str = "2147483648";
/// Ports: SMTP and admin on the nodes, the two next hops in the run's namespace.
pub const SMTP_PORT: u16 = 2525;
/// The nodes' admin port.
pub const ADMIN_PORT: u16 = 8025;
/// The next hop standing in for on-premises Exchange.
pub const ONPREM_SINK: u16 = 2601;
/// The next hop standing in for Exchange Online.
pub const CLOUD_SINK: u16 = 2602;

/// The address of the next hop of `estate`.
pub fn sink_addr(estate: Estate) -> SocketAddr {
    let port = match estate {
        Estate::Onprem => ONPREM_SINK,
        Estate::Cloud => CLOUD_SINK,
    };
    SocketAddr::from((HOST, port))
}

/// Hands `path` (recursively) to the system user `user`.
fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
    let ok = Command::new("chown")
        .args(["-R", &format!("{user}:{user}")])
        .arg(path)
        .status()?
        .success();
    if !ok {
        bail!("chown {user} {}", path.display());
    }
    Ok(())
}

/// One PostgreSQL server.
pub struct Postgres {
    /// Its host.
    pub host: String,
    /// Its address.
    pub addr: SocketAddr,
    data: PathBuf,
    ns: String,
    log: PathBuf,
    proc: Option<Proc>,
}

#[allow(clippy::disallowed_methods)] // Set-up of a test tool: config files written before the servers start.
impl Postgres {
    /// Makes the primary on `host` (initdb, replication allowed from the bridge's network)
    /// and starts it.
    pub fn primary(net: &Net, host: &str, dir: &Path) -> anyhow::Result<Postgres> {
        let args = ["-U", "postgres", "--auth=trust", "-E", "UTF8"];
        Postgres::make(net, host, dir, "initdb", &args, true)
    }

    /// Makes a standby of `primary` on `host` (`pg_basebackup -R`: streaming, not
    /// synchronous, so a failover may lose the last commits) and starts it.
    pub fn standby(
        net: &Net,
        host: &str,
        dir: &Path,
        primary: &Postgres,
    ) -> anyhow::Result<Postgres> {
        let ip = primary.addr.ip().to_string();
        let args = ["-h", &ip, "-U", "postgres", "-R", "-X", "stream"];
        Postgres::make(net, host, dir, "pg_basebackup", &args, false)
    }

    /// Makes the data folder of `host` with `program` (run as `postgres` in its namespace
    /// with `args` and `-D DATA`), with our `pg_hba.conf` when `hba`, then configures and
    /// starts the server.
    fn make(
        net: &Net,
        host: &str,
        dir: &Path,
        program: &str,
        args: &[&str],
        hba: bool,
    ) -> anyhow::Result<Postgres> {
        let h = net.host(host);
        let base = dir.join(host);
        std::fs::create_dir_all(&base)?;
        chown(&base, "postgres")?;
        let data = base.join("data");
        let mut all = args.to_vec();
        all.extend(["-D", path_str(&data)?]);
        let mut cmd = procs::in_ns(&h.ns, &As::User("postgres"), &format!("{PG_BIN}/{program}"));
        cmd.args(&all);
        run_to_end(cmd, &format!("{program} on {host}"))?;
        if hba {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all all 10.77.0.0/24 trust\nhost replication all 10.77.0.0/24 trust\n",
            )?;
        }
        let mut pg = Postgres::new(net, host, &base, data)?;
        pg.configure()?;
        pg.start()?;
        Ok(pg)
    }

    fn new(net: &Net, host: &str, base: &Path, data: PathBuf) -> anyhow::Result<Postgres> {
        let h = net.host(host);
        Ok(Postgres {
            host: host.to_string(),
            addr: SocketAddr::from((h.ip, 5432)),
            data,
            ns: h.ns.clone(),
            log: base.join("postgres.log"),
            proc: None,
        })
    }

    /// Its own settings, appended to postgresql.conf (the socket in its own folder: the
    /// machine's PostgreSQL has the default one).
    fn configure(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        let sock = self.data.parent().context("data folder")?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?;
        writeln!(
            f,
            "\nlisten_addresses = '{}'\nport = 5432\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 5\nhot_standby = on\nmax_connections = 100\nshared_buffers = 64MB\nfsync = on\n",
            self.addr.ip(),
            sock.display()
        )?;
        Ok(())
    }

    /// Starts the server and waits until it listens.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let data = path_str(&self.data)?.to_string();
        self.proc = Some(Proc::start(
            &format!("postgres on {}", self.host),
            &self.ns,
            As::User("postgres"),
            &format!("{PG_BIN}/postgres"),
            &["-D", &data],
            &[],
            &self.log,
        )?);
        let addr = self.addr;
        wait_for(
            &format!("PostgreSQL on {}", self.host),
            Duration::from_secs(60),
            || listening(addr),
        )
    }

    /// `kill -9` of the server (the postmaster; its backends end with it).
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
        // Backends notice the postmaster's death within a moment; the run does not wait.
        self.proc = None;
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting for it).
    pub fn promote(&self) -> anyhow::Result<()> {
        let mut cmd = procs::in_ns(&self.ns, &As::User("postgres"), &format!("{PG_BIN}/pg_ctl"));
        cmd.args(["promote", "-w", "-t", "60", "-D", path_str(&self.data)?]);
        run_to_end(cmd, &format!("pg_ctl promote on {}", self.host))
    }
}

/// A NATS JetStream cluster of three servers.
pub struct Nats {
    servers: Vec<NatsServer>,
}

struct NatsServer {
    host: String,
    ns: String,
    addr: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Nats {
    /// Starts one server on each of `hosts`, clustered.
    #[allow(clippy::disallowed_methods)] // Set-up: the servers' store folders.
    pub fn start(net: &Net, hosts: &[&str], dir: &Path) -> anyhow::Result<Nats> {
        let routes: Vec<String> = hosts
            .iter()
            .map(|h| format!("nats-route://{}:6222", net.host(h).ip))
            .collect();
        let mut servers = Vec::new();
        for h in hosts {
            let host = net.host(h);
            let store = dir.join(h);
            std::fs::create_dir_all(&store)?;
            let args = vec![
                "-a".to_string(),
                host.ip.to_string(),
                "-p".into(),
                "4222".into(),
                "-n".into(),
                h.to_string(),
                "-js".into(),
                "-sd".into(),
                path_str(&store)?.to_string(),
                "--cluster_name".into(),
                "weekend".into(),
                "--cluster".into(),
                format!("nats://{}:6222", host.ip),
                "--routes".into(),
                routes.join(","),
            ];
            servers.push(NatsServer {
                host: h.to_string(),
                ns: host.ns.clone(),
                addr: SocketAddr::from((host.ip, 4222)),
                args,
                log: dir.join(format!("{h}.log")),
                proc: None,
            });
        }
        let mut nats = Nats { servers };
        for i in 0..nats.servers.len() {
            nats.start_server(i)?;
        }
        Ok(nats)
    }

    /// The client URLs of every server.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://{}", s.addr))
            .collect()
    }

    fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        let s = &mut self.servers[i];
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        s.proc = Some(Proc::start(
            &format!("nats-server on {}", s.host),
            &s.ns,
            As::Root,
            "nats-server",
            &args,
            &[],
            &s.log,
        )?);
        let addr = s.addr;
        wait_for(
            &format!("nats-server on {}", s.host),
            Duration::from_secs(30),
            || listening(addr),
        )
    }

    /// `kill -9` of the server on `host`.
    pub fn kill9(&mut self, host: &str) {
        if let Some(s) = self.servers.iter_mut().find(|s| s.host == host) {
            if let Some(p) = s.proc.as_mut() {
                p.kill9();
            }
            s.proc = None;
        }
    }

    /// Starts the server on `host` again (same store).
    pub fn restart(&mut self, host: &str) -> anyhow::Result<()> {
        match self.servers.iter().position(|s| s.host == host) {
            Some(i) => self.start_server(i),
            None => bail!("no NATS server on {host}"),
        }
    }
}

/// The OpenLDAP server.
pub struct Ldap {
    /// Its `ldap://` URL.
    pub url: String,
    ns: String,
    conf: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    proc: Option<Proc>,
}

/// The LDAP administrator's password (the nodes read it from a file).
pub const ROOT_PW: &str = "5c1f8e2a9b7d4306";

/// The LDIF of mailbox `i` in `estate` (one address: `user{i}@corp.test`).
pub fn user_ldif(i: usize, estate: Estate) -> String {
    let kind = match estate {
        Estate::Onprem => ONPREM_TYPE,
        Estate::Cloud => CLOUD_TYPE,
    };
    format!(
        "dn: cn=user{i},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nobjectClass: msExchRecipient\ncn: user{i}\nsn: User {i}\nmail: user{i}@{DOMAIN}\nmsExchRecipientTypeDetails: {kind}\nproxyAddresses: SMTP:user{i}@{DOMAIN}\n\n"
    )
}

#[allow(clippy::disallowed_methods)] // Set-up of a test tool: slapd's config and its database.
impl Ldap {
    /// Loads `entries` (LDIF) with slapadd and starts slapd on `host`.
    pub fn start(net: &Net, host: &str, dir: &Path, entries: &str) -> anyhow::Result<Ldap> {
        let h = net.host(host);
        let base = dir.join(host);
        std::fs::create_dir_all(base.join("db"))?;
        std::fs::write(base.join("exchange.schema"), EXCHANGE_SCHEMA)?;
        let conf = base.join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\ninclude /etc/ldap/schema/inetorgperson.schema\ninclude {b}/exchange.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {b}/slapd.pid\ndatabase mdb\nmaxsize 4294967296\nsuffix \"{SUFFIX}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\ndirectory {b}/db\nindex objectClass eq\nindex entryCSN,entryUUID eq\n",
                b = base.display()
            ),
        )?;
        let ldif = base.join("entries.ldif");
        std::fs::write(
            &ldif,
            format!(
                "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: corp\no: Corp\n\ndn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n{entries}"
            ),
        )?;
        let out = Command::new("/usr/sbin/slapadd")
            .args(["-q", "-f"])
            .arg(&conf)
            .arg("-l")
            .arg(&ldif)
            .output()
            .context("slapadd (Debian package slapd)")?;
        if !out.status.success() {
            bail!("slapadd: {}", String::from_utf8_lossy(&out.stderr));
        }
        let addr = SocketAddr::from((h.ip, 389));
        let mut l = Ldap {
            url: format!("ldap://{addr}"),
            ns: h.ns.clone(),
            conf,
            log: base.join("slapd.log"),
            addr,
            proc: None,
        };
        l.run()?;
        Ok(l)
    }

    /// Starts slapd (again) and waits until it listens.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let conf = path_str(&self.conf)?.to_string();
        let url = format!("{}/", self.url);
        self.proc = Some(Proc::start(
            "slapd",
            &self.ns,
            As::Root,
            "/usr/sbin/slapd",
            &["-f", &conf, "-h", &url, "-d", "0"],
            &[],
            &self.log,
        )?);
        let addr = self.addr;
        wait_for("slapd", Duration::from_secs(30), || listening(addr))
    }

    /// Stops slapd (SIGTERM: it closes its database cleanly, as an admin's restart).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Moves the mailboxes `user{i}` of `indexes` to `estate` (one modify each, as the
    /// mailbox replication service's final step changes the recipient type).
    pub async fn move_mailboxes(&self, indexes: &[usize], estate: Estate) -> anyhow::Result<()> {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&self.url).await?;
        ldap3::drive!(conn);
        ldap.simple_bind(ROOT_DN, ROOT_PW).await?.success()?;
        let kind = match estate {
            Estate::Onprem => ONPREM_TYPE,
            Estate::Cloud => CLOUD_TYPE,
        };
        for i in indexes {
            let dn = format!("cn=user{i},ou=people,{SUFFIX}");
            ldap.modify(
                &dn,
                vec![ldap3::Mod::Replace(
                    "msExchRecipientTypeDetails",
                    std::collections::HashSet::from([kind]),
                )],
            )
            .await?
            .success()
            .with_context(|| format!("modify {dn}"))?;
        }
        let _ = ldap.unbind().await;
        Ok(())
    }
}

/// A path as UTF-8 (every path of a run is).
pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
