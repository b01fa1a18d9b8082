//! Helpers for tests that run the real `coexist` binary.

use super::{eventually_blocking, poll_blocking, test_config, write_certs, PATIENCE, POLL};
use coexist::config::Config;
use coexist::load::sink::{Sink, SinkOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_coexist");

/// A next hop for configs whose mail never leaves (config checks, servers that get no
/// mail): the discard port on loopback, where nothing listens.
pub const NOWHERE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));

/// A loopback port that was free a moment ago. Only for the binary's own listeners,
/// which must be written into its config: [`spawn_with`] starts the server again on
/// fresh ports if one was taken meanwhile. Everything else binds port 0 and keeps it.
fn pick_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A config for the binary: the typed config, and the file it is written to.
pub struct BinConfig {
    pub path: PathBuf,
    pub config: Config,
}

impl BinConfig {
    /// The SMTP address.
    pub fn listen(&self) -> SocketAddr {
        self.config.server.listen[0]
    }

    /// The admin API's address.
    pub fn admin(&self) -> SocketAddr {
        self.config.admin.as_ref().unwrap().listen
    }

    /// Writes `config` to `path` as TOML (serialized from the typed config, and checked
    /// to read back the same; not validated, so a test can write a config the relay
    /// must refuse).
    pub fn write(&self) {
        let text = toml::to_string(&self.config).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(
            back, self.config,
            "the config does not survive TOML:\n{text}"
        );
        std::fs::write(&self.path, text).unwrap();
    }

    /// The config file's text.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    fn new_ports(&mut self) {
        self.config.server.listen = vec![pick_port()];
        self.config.admin.as_mut().unwrap().listen = pick_port();
    }
}

/// Writes certificates, the test directory and a config into `dir`: the in-process
/// tests' [`test_config`](super::test_config) (fast retries, the admin token
/// [`TOKEN`](super::TOKEN) inline) with fixed loopback ports, the directory watcher on,
/// and a 5 s delivery timeout. Change `config` and call [`BinConfig::write`] for more.
pub fn write_config(dir: &Path, onprem: SocketAddr, cloud: SocketAddr) -> BinConfig {
    let certs = write_certs(dir);
    let mut config = test_config(dir, &certs, onprem, cloud);
    config.directory.watch = true;
    config.directory.store_dir = dir.join("store");
    config.delivery.timeout = Duration::from_secs(5);
    let mut cfg = BinConfig {
        path: dir.join("coexist.toml"),
        config,
    };
    cfg.new_ports();
    cfg.write();
    cfg
}

/// A running `coexist serve`; killed (SIGKILL) when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Sends a signal (e.g. "TERM", "HUP") by PID.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGKILL by PID, and reap.
    pub fn kill_9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// Waits (bounded) for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        poll_blocking(timeout, || matches!(self.0.try_wait(), Ok(Some(_)))).is_ok()
    }
}

/// How to run `coexist serve`.
#[derive(Default, Clone, Copy)]
pub struct Start<'a> {
    /// Append the server's log (RUST_LOG=info, text) to this file.
    pub log: Option<&'a Path>,
    /// Working directory (relative paths in the config are taken from it).
    pub cwd: Option<&'a Path>,
    /// Run under a file size limit in KiB (`ulimit -f`, SIGXFSZ ignored), so that writes
    /// past it fail with EFBIG the way they fail with ENOSPC on a full disk.
    pub fsize_kib: Option<u64>,
    /// Run under this file descriptor limit (`ulimit -n`, soft and hard).
    pub nofile: Option<u64>,
}

/// Starts `coexist serve --config` (see [`spawn_with`]).
pub fn spawn(cfg: &mut BinConfig) -> Server {
    spawn_with(cfg, Start::default())
}

/// Starts `coexist serve --config` and returns once the server has logged that it
/// listens on the config's SMTP and admin addresses: its own word, so a test never talks
/// to another process that took the port. If one of the ports was taken before the
/// server could bind it, the server exits ("Address already in use") and is started
/// again on fresh ports: the config file is rewritten, so read `cfg.listen()` and
/// `cfg.admin()` after this call. Panics if the server exits for another reason.
pub fn spawn_with(cfg: &mut BinConfig, how: Start) -> Server {
    for _ in 0..5 {
        match try_spawn(cfg, how) {
            Ok(server) => return server,
            Err(log) if log.contains("Address already in use") => {
                cfg.new_ports();
                cfg.write();
            }
            Err(log) => panic!("the relay exited at start:\n{log}"),
        }
    }
    panic!("five starts in a row found a port taken");
}

/// The addresses in `addr=` fields of a log line.
fn logged_addrs(line: &str) -> impl Iterator<Item = SocketAddr> + '_ {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix("addr=")?.parse().ok())
}

/// One start: the server, or its log if it exited before listening.
fn try_spawn(cfg: &BinConfig, how: Start) -> Result<Server, String> {
    let mut limits = String::new();
    if let Some(kib) = how.fsize_kib {
        limits.push_str(&format!("trap '' XFSZ; ulimit -f {kib} && "));
    }
    if let Some(n) = how.nofile {
        limits.push_str(&format!("ulimit -n {n} && "));
    }
    let mut cmd = if limits.is_empty() {
        Command::new(BIN)
    } else {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("{limits}exec \"$0\" \"$@\""))
            .arg(BIN);
        c
    };
    if let Some(dir) = how.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .args(["serve", "--config", cfg.path.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A thread reads the log for as long as the server runs: into the log file if asked,
    // and to this function until the server is up.
    let stderr = child.stderr.take().unwrap();
    let mut file = how.log.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = &mut file {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let (smtp, admin) = (cfg.listen(), cfg.admin());
    let (mut smtp_up, mut admin_up) = (false, false);
    let mut log = String::new();
    let t0 = Instant::now();
    while !(smtp_up && admin_up) {
        match rx.recv_timeout(POLL) {
            Ok(line) => {
                for a in logged_addrs(&line) {
                    smtp_up |= a == smtp;
                    admin_up |= a == admin;
                }
                log.push_str(&line);
                log.push('\n');
            }
            // The log ended: the server exited.
            Err(RecvTimeoutError::Disconnected) => return Err(log),
            Err(RecvTimeoutError::Timeout) => assert!(
                t0.elapsed() < PATIENCE,
                "the relay did not start listening:\n{log}"
            ),
        }
    }
    Ok(server)
}

/// `text` (a config file) with the value of `key` in `[table]` replaced by `raw` (TOML as
/// written): for the tests of how a bad value is reported, which the typed config cannot
/// hold. Returns the new text and the 1-based line changed.
pub fn with_raw_value(text: &str, table: &str, key: &str, raw: &str) -> (String, usize) {
    let (mut current, mut changed) = (String::new(), None);
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_string();
        }
        let (k, _) = line.split_once(" = ").unwrap_or_default();
        if current == table && k == key && changed.is_none() {
            out.push(format!("{key} = {raw}"));
            changed = Some(i + 1);
        } else {
            out.push(line.to_string());
        }
    }
    let line = changed.unwrap_or_else(|| panic!("no {key} in [{table}]:\n{text}"));
    (out.join("\n") + "\n", line)
}

/// Runs `coexist ARGS --config CONFIG`; returns (success, stdout, stderr).
pub fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Waits (bounded) until `coexist queue list` shows an empty queue: every message the
/// server holds has its final outcome.
pub fn wait_queue_empty(cfg: &BinConfig) {
    eventually_blocking("an empty queue", || {
        let (ok, out, err) = cli(&cfg.path, &["queue", "list"]);
        assert!(ok, "{err}");
        if out.starts_with("0 message(s)") {
            Ok(())
        } else {
            Err(out)
        }
    })
}

/// How `coexist serve` ended when a test expected it to refuse to start.
pub struct Exit {
    /// It exited on its own within [`PATIENCE`] (a server that did start is killed).
    pub exited: bool,
    /// Its exit status was success.
    pub success: bool,
    /// What it wrote to stderr.
    pub stderr: String,
}

/// Runs `coexist serve --config CONFIG` (in `cwd` when given, `RUST_LOG=log`) for a test of
/// a refusal to start: waits (bounded) for it to exit, killing it by PID if it does not.
pub fn serve_exit(config: &Path, cwd: Option<&Path>, log: &str) -> Exit {
    let mut cmd = Command::new(BIN);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let exited = server.wait_exit(PATIENCE);
    let success = exited && server.0.try_wait().unwrap().is_some_and(|s| s.success());
    let mut stderr = String::new();
    if exited {
        use std::io::Read;
        let _ = server.0.stderr.take().unwrap().read_to_string(&mut stderr);
    }
    Exit {
        exited,
        success,
        stderr,
    }
}

/// A config for the binary in a temporary folder whose next hops are two sinks: what every
/// test that runs `coexist serve` and delivers mail starts from ([`with_sinks`]).
pub struct Setup {
    /// The on-premises next hop.
    pub onprem: Sink,
    /// The Exchange Online next hop.
    pub cloud: Sink,
    /// The config, written (see [`write_config`]).
    pub cfg: BinConfig,
    /// The folder of the config, certificates, directory, spool and store.
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// A path in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `coexist serve` on the config (see [`spawn`]).
    pub fn spawn(&mut self) -> Server {
        spawn(&mut self.cfg)
    }
}

/// [`with_sinks_in`] a fresh temporary folder.
pub async fn with_sinks(sinks: SinkOptions, tweak: impl FnOnce(&mut Config)) -> Setup {
    with_sinks_in(tempfile::tempdir().unwrap(), sinks, tweak).await
}

/// Two sinks with `sinks` options on loopback, and the binary's config in `dir`
/// ([`write_config`]) delivering to them, changed by `tweak` and written again. The server
/// is not started ([`Setup::spawn`]).
pub async fn with_sinks_in(
    dir: tempfile::TempDir,
    sinks: SinkOptions,
    tweak: impl FnOnce(&mut Config),
) -> Setup {
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, sinks.clone()).await.unwrap();
    let cloud = Sink::start(lo, sinks).await.unwrap();
    let mut cfg = write_config(dir.path(), onprem.addr, cloud.addr);
    tweak(&mut cfg.config);
    cfg.write();
    Setup {
        onprem,
        cloud,
        cfg,
        dir,
    }
}
