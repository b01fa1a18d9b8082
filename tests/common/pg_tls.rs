//! A PostgreSQL server of the test's own with TLS on: a data directory made by `initdb` in a
//! temporary folder, its own loopback port and socket folder, a server certificate from a
//! test CA for the names asked, and a `pg_hba.conf` that takes TCP connections only over
//! TLS and with a password (`hostnossl ... reject`, `hostssl ... scram-sha-256`).
//!
//! PostgreSQL refuses to run as root: when the tests run as root the server runs as the
//! `postgres` user (the folder is handed to it). Stopped by the PID of the process started
//! here, and its folder removed, when dropped. Needs Debian's `postgresql` package
//! (`/usr/lib/postgresql/VERSION/bin/initdb`).

use super::poll_blocking;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The password of the `postgres` role.
pub const PASSWORD: &str = "pg-7d41c9e2b05a83f6";

/// A running server.
pub struct PgTls {
    /// The temporary folder (data directory, certificates, socket, log).
    pub dir: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed the server's certificate.
    pub ca: PathBuf,
    /// PEM of a CA that signed nothing the server shows.
    pub other_ca: PathBuf,
    child: Option<Child>,
}

/// The newest `bin` folder of Debian's PostgreSQL packages.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (Debian package postgresql; .ci/run installs it)")
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("initdb under /usr/lib/postgresql/*/bin")
        .1
}

/// The output of `id ARGS`, as a number.
fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A CA named `ca_name` and a certificate it signed for `names` (host names or IP addresses): (CA PEM,
/// certificate PEM, key PEM).
fn certs(ca_name: &str, names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

impl PgTls {
    /// Makes a data directory and starts the server with a certificate for `names`.
    pub fn start(names: &[&str]) -> PgTls {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap().keep();
        let (ca, cert, key) = certs("coexist test PostgreSQL CA", names);
        let (other_ca, _, _) = certs("another test CA", &["other.test"]);
        std::fs::write(dir.join("ca.pem"), ca).unwrap();
        std::fs::write(dir.join("other-ca.pem"), other_ca).unwrap();
        std::fs::write(dir.join("server.crt"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        std::fs::write(dir.join("pwfile"), PASSWORD).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let as_root = id(&["-u"]) == 0;
        if as_root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres");
        }
        let out = Self::command(&bin.join("initdb"), &dir, as_root)
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C", "--pwfile"])
            .arg(dir.join("pwfile"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            dir.join("data/pg_hba.conf"),
            "local all all trust\nhostnossl all all all reject\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n",
        )
        .unwrap();
        let mut s = PgTls {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            dir,
            port: 0,
            child: None,
        };
        s.run(&bin, as_root);
        s
    }

    fn command(program: &Path, dir: &Path, as_root: bool) -> Command {
        let mut c = Command::new(program);
        c.current_dir(dir);
        if as_root {
            c.uid(id(&["-u", "postgres"])).gid(id(&["-g", "postgres"]));
        }
        c
    }

    /// Starts the server on a free port (another one if the port was taken meanwhile).
    fn run(&mut self, bin: &Path, as_root: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let d = self.dir.display();
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = std::fs::File::create(self.dir.join("log")).unwrap();
            let child = Self::command(&bin.join("postgres"), &self.dir, as_root)
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", &format!("port={port}")])
                .args(["-c", &format!("unix_socket_directories={d}")])
                .args(["-c", "ssl=on"])
                .args(["-c", &format!("ssl_cert_file={d}/server.crt")])
                .args(["-c", &format!("ssl_key_file={d}/server.key")])
                .args(["-c", "fsync=off", "-c", "max_connections=40"])
                .args(["-c", "shared_buffers=16MB"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("postgres");
            self.child = Some(child);
            self.port = port;
            let pidfile = self.dir.join("data/postmaster.pid");
            // Ready (true), or exited (false).
            let ready = poll_blocking(deadline.saturating_duration_since(Instant::now()), || {
                if std::fs::read_to_string(&pidfile)
                    .is_ok_and(|t| t.lines().any(|l| l.trim() == "ready"))
                {
                    Some(true)
                } else if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                    Some(false)
                } else {
                    None
                }
            })
            .expect("postgres did not get ready");
            if ready {
                return;
            }
            self.child = None;
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            assert!(
                log.contains("could not bind") || log.contains("already in use"),
                "postgres did not start:\n{log}"
            );
            // The port was taken: try another.
        }
    }

    /// A `key=value` connection string to 127.0.0.1 as `postgres` with the password,
    /// `host` as the name connected to, then `tls` (e.g. `sslmode=verify-full
    /// sslrootcert=...`).
    pub fn conn(&self, host: &str, tls: &str) -> String {
        format!(
            "host={host} port={} user=postgres password={PASSWORD} dbname=postgres connect_timeout=5 {tls}",
            self.port
        )
    }
}

impl Drop for PgTls {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown (the process started here: the postmaster).
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PgTls {
    /// Runs `sql` with `psql` over the server's Unix socket (trust, as `postgres`) and
    /// returns its unaligned output: the server's own view, whatever the client says.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-h", &self.dir.display().to_string()])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-Atc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}
