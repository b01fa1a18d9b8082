//! A real Active Directory domain controller (Samba 4.17's AD DC, Debian's `samba`) for the
//! LDAP source's tests. `tests/samba/recipe.sh` does the work: one provisioned template per
//! test process (the realm `CORP.TEST`, the Exchange attributes `targetAddress` and
//! `msExchRecipientTypeDetails` added to `mailRecipient` with Exchange's own OIDs, the
//! non-admin service account `svc-coexist` allowed to list `CN=Deleted Objects`, a lockout
//! threshold of 5), copied for each DC, which binds one loopback address of its own (so the
//! tests that share port 389 run side by side), with a test CA's certificate for StartTLS
//! and LDAPS, and only the LDAP service. Stopped (by its PID) when dropped.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The domain's naming context.
pub const BASE: &str = "DC=corp,DC=test";
/// The domain administrator and its password.
pub const ADMIN_DN: &str = "CN=Administrator,CN=Users,DC=corp,DC=test";
pub const ADMIN_PW: &str = "Passw0rd!Adm1n";
/// The relay's service account (not an administrator) and its password.
pub const SVC_DN: &str = "CN=svc-coexist,CN=Users,DC=corp,DC=test";
pub const SVC_PW: &str = "Svc-Passw0rd!";

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samba/recipe.sh")
}

/// Runs a recipe step; panics with its output when it fails.
fn step(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .arg(recipe())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("bash {}: {e}", recipe().display()));
    assert!(
        out.status.success(),
        "recipe.sh {args:?} failed (Debian packages samba, samba-ad-dc, ldb-tools; .ci/run installs them): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The provisioned template of this test process (made once: about 10 s).
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let tpl = dir.join("tpl");
        step(&["template", tpl.to_str().unwrap()], &[("TLS", "none")]);
        tpl
    })
}

/// How a DC is set up.
pub struct Options {
    /// Its loopback address (one per test).
    pub ip: &'static str,
    /// Users `user0001`… (odd ones in Exchange Online, even ones on premises), each with
    /// `SMTP:userNNNN@corp.test` and `smtp:userNNNN@trust.test`.
    pub users: usize,
    /// Simple binds over plain LDAP refused ("Transport encryption required": Samba's
    /// default), else allowed.
    pub strong_auth: bool,
}

/// A running domain controller.
pub struct Dc {
    /// Its folder.
    pub dir: PathBuf,
    /// Its loopback address.
    pub ip: &'static str,
    /// The test CA that signed its certificate (SAN: its address and `dc.corp.test`).
    pub ca: PathBuf,
    child: Option<(Child, ChildStdin)>,
}

impl Dc {
    /// Copies the template, adds the users and starts the DC; waits until it answers.
    pub fn start(o: Options) -> Dc {
        let root = tempfile::tempdir().unwrap().keep();
        let (dir, pki) = (root.join("dc"), root.join("pki"));
        step(&["pki", pki.to_str().unwrap(), o.ip], &[]);
        let strong = if o.strong_auth { "yes" } else { "no" };
        step(
            &[
                "clone",
                template().to_str().unwrap(),
                dir.to_str().unwrap(),
                o.ip,
            ],
            &[("STRONG_AUTH", strong), ("TLS", "files")],
        );
        if o.users > 0 {
            step(&["users", dir.to_str().unwrap(), &o.users.to_string()], &[]);
        }
        let mut dc = Dc {
            dir,
            ip: o.ip,
            ca: pki.join("ca.pem"),
            child: None,
        };
        dc.run();
        dc
    }

    /// `ldap://ADDRESS`.
    pub fn url(&self) -> String {
        format!("ldap://{}", self.ip)
    }

    /// `ldaps://ADDRESS`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ip)
    }

    fn run(&mut self) {
        // `samba -i` exits when its stdin closes: the pipe is held here, so the DC never
        // outlives the test process.
        let log = std::fs::File::create(self.dir.join("log/stdout.log")).unwrap();
        let mut child = Command::new("bash")
            .arg(recipe())
            .args(["run", self.dir.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("samba");
        let stdin = child.stdin.take().unwrap();
        let addr: SocketAddr = format!("{}:389", self.ip).parse().unwrap();
        let t0 = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("samba exited at start ({st}): {}", self.log_tail());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "samba does not listen on {addr} after 30 s: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some((child, stdin));
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.dir.join("log/stdout.log"))
            .and_then(|mut f| f.read_to_string(&mut s));
        s.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    }

    /// Stops the DC (SIGTERM to the process it started).
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child this harness spawned and has not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts it again after [`Dc::stop`].
    pub fn start_again(&mut self) {
        self.run();
    }

    /// Gives the stopped DC a new `invocationId`: what a restore from backup does.
    pub fn restore(&mut self) -> String {
        assert!(self.child.is_none(), "stop the DC first");
        step(&["new-invocation-id", self.dir.to_str().unwrap()], &[])
    }
}

impl Drop for Dc {
    fn drop(&mut self) {
        self.stop();
        if let Some(root) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
