//! A real OpenLDAP server (Debian's `slapd`) for the LDAP source's tests: a database under
//! a temporary folder, the Exchange attributes from `tests/ldap/exchange.schema`, entries
//! loaded with `slapadd`, listening on a loopback port. Stopped (by its PID) when dropped.
//! [`Slapd::start_tls`] adds StartTLS with a certificate, and refuses simple binds
//! without TLS (`security simple_bind=`): a bind that works there went encrypted.

use super::poll_blocking;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The suffix of the test directory.
pub const SUFFIX: &str = "dc=corp,dc=test";
/// The administrator (root DN) and its password.
pub const ROOT_DN: &str = "cn=admin,dc=corp,dc=test";
pub const ROOT_PW: &str = "3f9a1c7e5b2d4086";

/// A running slapd.
pub struct Slapd {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// The LDIF of one user: `state` is the `msExchRecipientTypeDetails` value.
pub fn user_ldif(i: usize, state: &str, target: Option<&str>) -> String {
    let mut s = format!(
        "dn: cn=user{i},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nobjectClass: msExchRecipient\ncn: user{i}\nsn: User {i}\nmail: user{i}@corp.test\nmsExchRecipientTypeDetails: {state}\nproxyAddresses: SMTP:user{i}@corp.test\nproxyAddresses: smtp:u{i}@trust.test\n"
    );
    if let Some(t) = target {
        s.push_str(&format!("targetAddress: SMTP:{t}\n"));
    }
    s
}

fn config(dir: &Path, tls: Option<(&Path, &Path)>) -> String {
    let tls = match tls {
        Some((cert, key)) => format!(
            "TLSCertificateFile {}\nTLSCertificateKeyFile {}\nsecurity simple_bind=128\n",
            cert.display(),
            key.display()
        ),
        None => String::new(),
    };
    format!("{tls}{}", base_config(dir))
}

fn base_config(dir: &Path) -> String {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ldap/exchange.schema");
    format!(
        "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\ninclude /etc/ldap/schema/inetorgperson.schema\ninclude {schema}\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {dir}/slapd.pid\ndatabase mdb\nmaxsize 1073741824\nsuffix \"{SUFFIX}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\ndirectory {dir}/db\nindex objectClass eq\n",
        schema = schema.display(),
        dir = dir.display()
    )
}

impl Slapd {
    /// Loads `entries` (LDIF, after the base and `ou=people` entries) and starts slapd.
    pub fn start(entries: &str) -> Slapd {
        Self::start_with(entries, None)
    }

    /// Like [`Slapd::start`], with StartTLS (the PEM certificate `cert` and key `key`), and
    /// simple binds refused without TLS.
    pub fn start_tls(entries: &str, cert: &Path, key: &Path) -> Slapd {
        Self::start_with(entries, Some((cert, key)))
    }

    fn start_with(entries: &str, tls: Option<(&Path, &Path)>) -> Slapd {
        let tmp = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir_all(tmp.join("db")).unwrap();
        std::fs::write(tmp.join("slapd.conf"), config(&tmp, tls)).unwrap();
        let ldif = format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: corp\no: Corp\n\ndn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n{entries}"
        );
        std::fs::write(tmp.join("entries.ldif"), ldif).unwrap();
        let out = Command::new("/usr/sbin/slapadd")
            .args(["-q", "-f"])
            .arg(tmp.join("slapd.conf"))
            .arg("-l")
            .arg(tmp.join("entries.ldif"))
            .output()
            .expect("slapadd (Debian package slapd; .ci/run installs it)");
        assert!(
            out.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Slapd {
            dir: tmp,
            addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
        };
        s.run();
        s
    }

    /// Starts slapd on a fresh loopback port (or the one it had, after [`Slapd::stop`]).
    pub fn run(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let port = if self.addr.port() == 0 {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            } else {
                self.addr.port()
            };
            let child = Command::new("/usr/sbin/slapd")
                .arg("-f")
                .arg(self.dir.join("slapd.conf"))
                .arg("-h")
                .arg(format!("ldap://127.0.0.1:{port}/"))
                .args(["-d", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("slapd");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            self.child = Some(child);
            // Listening (true), or exited (false): the port was taken.
            let up = poll_blocking(deadline.saturating_duration_since(Instant::now()), || {
                if std::net::TcpStream::connect(addr).is_ok() {
                    Some(true)
                } else if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                    Some(false)
                } else {
                    None
                }
            })
            .expect("slapd did not start");
            if up {
                self.addr = addr;
                return;
            }
            // Try another port, or the same one again once it is free (after a stop).
            if self.addr.port() != 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                poll_blocking(left, || std::net::TcpListener::bind(addr).is_ok())
                    .expect("slapd's port did not become free");
            }
        }
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ldap://{}", self.addr)
    }

    /// Stops slapd (by the PID of the process this fixture started) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
