//! Shared test harness: a real relay on an ephemeral loopback port, two sink next hops, and a
//! raw SMTP client that shows every reply.
//!
//! Tests never sleep to wait. They wait, with a deadline ([`PATIENCE`]), on something the
//! relay or a sink shows: a message deferred or the queue empty ([`Harness::deferred`],
//! [`Harness::settled`]), recipients at a sink ([`wait`]), the relay having read what was sent
//! ([`unread`]), the CLI's or the admin API's answer ([`eventually_blocking`]). A check that
//! something did *not* happen first waits for the event after which it could no longer
//! happen. Ports are bound once and kept (port 0, [`DownPort`], [`forward`]); the binary's
//! configs are written from the typed config ([`bin::write_config`]).
#![allow(dead_code)]

pub mod browser;
pub mod pg;
pub mod slapd;

use coexist::config::{Config, DEFAULT_CONFIG};
use coexist::load::sink::{Sink, SinkOptions};
use coexist::queue::{Phase, QueueEntry};
use coexist::relay::{self, Running};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long a test waits for something that must happen before it fails. Generous on
/// purpose: a busy machine makes the tests slower, not red. Nothing waits this long when
/// the relay works.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Time between two looks at the state a test waits on.
const POLL: Duration = Duration::from_millis(20);

/// A condition a test waits on: `true`, `Some(value)` or `Ok(value)` when met; `Err` carries
/// the last state seen, for the failure message.
pub trait Check {
    /// What the wait returns once the condition is met.
    type Out;
    /// `Ok` when met, else what was seen.
    fn check(self) -> Result<Self::Out, String>;
}

impl Check for bool {
    type Out = ();
    fn check(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err(String::new())
        }
    }
}

impl<T> Check for Option<T> {
    type Out = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Check for Result<T, String> {
    type Out = T;
    fn check(self) -> Result<T, String> {
        self
    }
}

fn gave_up(what: &str, last: &str) -> ! {
    if last.is_empty() {
        panic!("gave up after {PATIENCE:?} waiting for {what}");
    }
    panic!("gave up after {PATIENCE:?} waiting for {what}; last seen: {last}");
}

/// Polls `cond` until it is met (see [`Check`]) and returns its value; panics naming `what`
/// after [`PATIENCE`].
pub async fn eventually<C: Check>(what: &str, mut cond: impl FnMut() -> C) -> C::Out {
    eventually_async(what, || std::future::ready(cond())).await
}

/// [`eventually`] for a condition that has to await (connect, read a reply).
pub async fn eventually_async<C: Check, F: Future<Output = C>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) -> C::Out {
    let t0 = Instant::now();
    loop {
        match cond().await.check() {
            Ok(v) => return v,
            Err(last) if t0.elapsed() >= PATIENCE => gave_up(what, &last),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`eventually`] for tests without a runtime, or where the condition blocks (the CLI, the
/// admin client).
pub fn eventually_blocking<C: Check>(what: &str, mut cond: impl FnMut() -> C) -> C::Out {
    let t0 = Instant::now();
    loop {
        match cond().check() {
            Ok(v) => return v,
            Err(last) if t0.elapsed() >= PATIENCE => gave_up(what, &last),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// The test directory: alice and dave on premises, bob and carol in the cloud.
pub const DIRECTORY: &str = "address,state\nalice@nhs.test,onprem\nbob@nhs.test,cloud\ncarol@nhs.test,cloud\ndave@nhs.test,onprem\n";

/// The admin token of every test config (random hex: placeholders and short tokens are
/// refused).
pub const TOKEN: &str = "3f9a1c7e5b2d4086a1e9c3b7d5f20486";

/// Certificates written for a test.
pub struct TestCerts {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: String,
}

pub fn write_certs(dir: &Path) -> TestCerts {
    let c = coexist::certs::generate("mx1.coexist.test").unwrap();
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    TestCerts {
        cert,
        key,
        ca_pem: c.ca_pem,
    }
}

/// A config for tests: the default config with loopback ports and temp paths.
pub fn test_config(dir: &Path, certs: &TestCerts, onprem: SocketAddr, cloud: SocketAddr) -> Config {
    let mut cfg = Config::parse(DEFAULT_CONFIG, "default").unwrap();
    cfg.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    let admin = cfg.admin.as_mut().unwrap();
    admin.listen = "127.0.0.1:0".parse().unwrap();
    admin.token = Some(TOKEN.to_string());
    admin.token_file = None;
    cfg.directory.watch = false;
    cfg.spool.dir = dir.join("spool");
    let dfile = dir.join("directory.csv");
    if !dfile.exists() {
        std::fs::write(&dfile, DIRECTORY).unwrap();
    }
    cfg.directory.file = Some(dfile);
    cfg.directory.store_dir = dir.join("directory-store");
    let tls = cfg.tls.as_mut().unwrap();
    tls.cert = certs.cert.clone();
    tls.key = certs.key.clone();
    cfg.queue.min_backoff = Duration::from_secs(1);
    cfg.queue.max_backoff = Duration::from_secs(2);
    cfg.delivery.timeout = Duration::from_secs(10);
    cfg.routes.get_mut("onprem").unwrap().next_hops = vec![onprem.into()];
    cfg.routes.get_mut("cloud").unwrap().next_hops = vec![cloud.into()];
    cfg
}

/// Waits until `relay`'s queue is empty: every message it accepted has its final outcome
/// (delivered, or failed with its DSN spooled and delivered in turn, or kept in `failed/`).
/// After this, whatever the relay was going to send has reached the sinks, and what is not
/// there was never sent: the positive event that "nothing (else) arrived" checks wait on.
/// (A message is queued before its `250` is sent; one refused at SMTP never is.)
pub async fn queue_settled(relay: &Running) {
    eventually("the relay's queue to empty", || {
        let left = relay.queue.list();
        if left.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = left
            .iter()
            .map(|e| format!("{} {:?}", e.envelope.id, e.phase))
            .collect();
        Err(ids.join(", "))
    })
    .await
}

/// The queued messages the spool under `spool` holds on disk, with each one's last written
/// delivery state as JSON text (read from the log; the relay may be running or stopped).
pub fn spooled(spool: &std::path::Path) -> Vec<(String, String)> {
    let reader = coexist::spool::Reader::new(spool);
    coexist::spool::inspect(spool)
        .expect("spool readable")
        .into_iter()
        .map(|q| {
            let state = q
                .state
                .map(|l| serde_json::to_string(&reader.read_state(l).expect("state")).unwrap())
                .unwrap_or_default();
            (q.id.to_string(), state)
        })
        .collect()
}

/// Waits until message `qid` has finished a delivery attempt and waits for its retry (its
/// state, with every recipient's last reply, is saved by then); returns the queue entry.
pub async fn queue_deferred(relay: &Running, qid: &str) -> QueueEntry {
    eventually(&format!("message {qid} to be deferred"), || {
        match relay.queue.get(qid) {
            Some(e) if e.phase == Phase::Deferred => Ok(e),
            Some(e) => Err(format!(
                "{:?} after {} attempt(s)",
                e.phase, e.state.attempts
            )),
            None => Err("not in the queue".into()),
        }
    })
    .await
}

/// A relay with two sinks.
pub struct Harness {
    pub relay: Running,
    pub addr: SocketAddr,
    pub onprem: Sink,
    pub cloud: Sink,
    pub dir: tempfile::TempDir,
    pub certs: TestCerts,
}

impl Harness {
    /// [`queue_settled`] for this relay.
    pub async fn settled(&self) {
        queue_settled(&self.relay).await
    }

    /// [`queue_deferred`] for this relay.
    pub async fn deferred(&self, qid: &str) -> QueueEntry {
        queue_deferred(&self.relay, qid).await
    }

    /// Stops this relay and starts a new one with the same config and spool (as a restart
    /// of the process would); the sinks stay.
    pub async fn restart(self) -> Harness {
        let cfg = self.relay.control.config();
        drop(self.relay);
        let relay = relay::start((*cfg).clone()).await.unwrap();
        Harness {
            addr: relay.local_addrs[0],
            relay,
            ..self
        }
    }
}

pub async fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    harness_with(SinkOptions::default(), tweak).await
}

pub async fn harness_with(sink_opts: SinkOptions, tweak: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, sink_opts.clone()).await.unwrap();
    let cloud = Sink::start(lo, sink_opts).await.unwrap();
    let mut cfg = test_config(dir.path(), &certs, onprem.addr, cloud.addr);
    tweak(&mut cfg);
    let relay = relay::start(cfg).await.unwrap();
    let addr = relay.local_addrs[0];
    Harness {
        relay,
        addr,
        onprem,
        cloud,
        dir,
        certs,
    }
}

/// A raw SMTP client: writes exactly what the test says, reads whole replies.
pub struct Client<S> {
    pub io: BufReader<S>,
}

/// One reply: code and all its lines joined.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    /// The enhanced status code of the last line.
    pub fn status(&self) -> &str {
        self.text
            .lines()
            .last()
            .and_then(|l| l.get(4..))
            .and_then(|t| t.split(' ').next())
            .unwrap_or("")
    }
}

pub async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut c = Client {
        io: BufReader::new(s),
    };
    let r = c.reply().await;
    assert_eq!(r.code, 220, "{r:?}");
    c
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// Reads one (possibly multi-line) reply; panics after 20 s without one.
    pub async fn reply(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(20), self.try_reply())
            .await
            .expect("no reply within 20 s")
            .expect("connection closed instead of a reply")
    }

    /// Reads one reply, or `None` at end of stream.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.io.read_line(&mut line).await.ok()?;
            if n == 0 {
                return None;
            }
            text.push_str(&line);
            let b = line.as_bytes();
            if b.len() < 4 || b[3] != b'-' {
                let code = line.get(..3)?.parse().ok()?;
                return Some(Reply { code, text });
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Asserts the next command gets `code`.
    pub async fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line).await;
        assert_eq!(r.code, code, "{line} -> {r:?}");
        r
    }

    /// A whole DATA transaction; returns the final reply.
    pub async fn mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250).await;
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250).await;
        }
        self.expect("DATA", 354).await;
        let mut stuffed = Vec::new();
        coexist::deliver::dot_stuff(body, &mut stuffed);
        self.send(&stuffed).await;
        self.reply().await
    }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, content type, body). Bounded
/// by 20 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    if let Some(ct) = content_type {
        headers.push(("Content-Type", ct));
    }
    let (status, head, body) = http_request(addr, method, path, &headers, body).await;
    let ct = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ct, body)
}

/// One HTTP/1.1 request with extra headers; (status, response head, body). Bounded by 20 s.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let fut = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out)
            .await
            .unwrap();
        out
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("no HTTP response within 20 s");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("no header end");
    (
        head[9..12].parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

/// Strips the first header (our Received header, folded) from delivered bytes.
pub fn strip_received(msg: &[u8]) -> &[u8] {
    assert!(msg.starts_with(b"Received: "), "no Received header first");
    let mut pos = 0;
    loop {
        let nl = pos + memchr_nl(&msg[pos..]).expect("unterminated header");
        pos = nl + 1;
        if !(msg.get(pos) == Some(&b'\t') || msg.get(pos) == Some(&b' ')) {
            return &msg[pos..];
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// The first delivered Received header, unfolded.
pub fn received_header(msg: &[u8]) -> String {
    let rest = strip_received(msg);
    String::from_utf8_lossy(&msg[..msg.len() - rest.len()]).replace("\r\n\t", " ")
}

/// A rustls client that trusts the test CA.
pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(coexist::certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A sample message with CRLF lines.
pub fn sample(subject: &str) -> Vec<u8> {
    format!("From: <x@example.org>\r\nTo: <bob@nhs.test>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nHello.\r\n").into_bytes()
}

/// Waits (bounded) until `sink` has accepted `n` recipients; returns its count.
pub async fn wait(sink: &Sink, n: u64) -> u64 {
    sink.state.wait_recipients(n, PATIENCE).await
}

/// Forwards every connection accepted on `listener` to `to`, byte for byte, both ways.
/// Lets a test hand out a listening port (bound once, never released) before the server
/// behind it exists.
pub fn forward(listener: TcpListener, to: SocketAddr) {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// A loopback port the test holds that refuses connections, like a next hop that is down:
/// bound but not listening, so no other test or process can take it meanwhile.
pub struct DownPort {
    socket: TcpSocket,
    pub addr: SocketAddr,
}

impl DownPort {
    pub fn new() -> DownPort {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        DownPort { socket, addr }
    }

    /// The next hop comes up: the port starts listening (it was never released) and
    /// forwards to `to`, e.g. a sink.
    pub fn forward_to(self, to: SocketAddr) {
        forward(self.socket.listen(128).unwrap(), to);
    }
}

/// Bytes written on the loopback connection `local` → `peer` that the peer's process has
/// not read yet: `local`'s send queue plus `peer`'s receive queue (Linux `/proc/net/tcp`).
/// Zero means the other side has read everything sent so far.
pub fn unread(local: SocketAddr, peer: SocketAddr) -> u64 {
    fn hex(a: SocketAddr) -> String {
        let SocketAddr::V4(a) = a else {
            panic!("IPv4 only: {a}")
        };
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        )
    }
    let (l, p) = (hex(local), hex(peer));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut total = 0;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some((tx, rx)) = f.get(4).and_then(|q| q.split_once(':')) else {
            continue;
        };
        let queued = |q: &str| u64::from_str_radix(q, 16).unwrap_or(0);
        if f[1] == l && f[2] == p {
            total += queued(tx);
        } else if f[1] == p && f[2] == l {
            total += queued(rx);
        }
    }
    total
}

/// Helpers for tests that run the real `coexist` binary.
pub mod bin {
    use super::{eventually_blocking, test_config, write_certs, PATIENCE, POLL};
    use coexist::config::Config;
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

        /// Waits (bounded) for the process to exit; returns whether it did.
        pub fn wait_exit(&mut self, timeout: Duration) -> bool {
            let t0 = Instant::now();
            while t0.elapsed() < timeout {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return true;
                }
                std::thread::sleep(POLL);
            }
            false
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
        let mut cmd = match how.fsize_kib {
            Some(kib) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "trap '' XFSZ; ulimit -f {kib} && exec \"$0\" \"$@\""
                    ))
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
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
}

/// A tiny authoritative DNS server on loopback for MX tests (UDP; A and MX records).
/// Written for the tests only: enough of RFC 1035 to answer hickory's queries.
pub mod dns {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use tokio::net::UdpSocket;

    /// One record.
    #[derive(Clone, Debug)]
    pub enum Rec {
        /// MX with preference and exchange (`"."` for a null MX).
        Mx(u16, String),
        /// IPv4 address.
        A(Ipv4Addr),
    }

    /// Starts the server; `zone` maps lower-case names (no trailing dot) to records.
    pub async fn start(zone: Vec<(&str, Rec)>) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let mut map: HashMap<String, Vec<Rec>> = HashMap::new();
        for (name, rec) in zone {
            map.entry(name.to_string()).or_default().push(rec);
        }
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                if let Some(resp) = answer(&buf[..n], &map) {
                    let _ = sock.send_to(&resp, peer).await;
                }
            }
        });
        addr
    }

    fn encode_name(name: &str, out: &mut Vec<u8>) {
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }

    fn answer(q: &[u8], zone: &HashMap<String, Vec<Rec>>) -> Option<Vec<u8>> {
        if q.len() < 12 {
            return None;
        }
        let mut pos = 12;
        let mut labels = Vec::new();
        loop {
            let len = *q.get(pos)? as usize;
            pos += 1;
            if len == 0 {
                break;
            }
            labels.push(String::from_utf8_lossy(q.get(pos..pos + len)?).to_lowercase());
            pos += len;
        }
        let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
        let question = &q[12..pos + 4];
        let name = labels.join(".");
        let recs = zone.get(&name);
        let mut answers = Vec::new();
        let mut count = 0u16;
        for r in recs.into_iter().flatten() {
            let (rtype, rdata) = match r {
                Rec::A(ip) if qtype == 1 => (1u16, ip.octets().to_vec()),
                Rec::Mx(pref, host) if qtype == 15 => {
                    let mut d = pref.to_be_bytes().to_vec();
                    encode_name(host, &mut d);
                    (15u16, d)
                }
                _ => continue,
            };
            answers.extend_from_slice(&[0xC0, 0x0C]);
            answers.extend_from_slice(&rtype.to_be_bytes());
            answers.extend_from_slice(&1u16.to_be_bytes());
            answers.extend_from_slice(&60u32.to_be_bytes());
            answers.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            answers.extend_from_slice(&rdata);
            count += 1;
        }
        let rcode: u8 = if recs.is_none() { 3 } else { 0 };
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&q[0..2]);
        out.push(0x84 | (q[2] & 0x01)); // QR, AA, RD copied
        out.push(0x80 | rcode); // RA, rcode
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(question);
        out.extend_from_slice(&answers);
        Some(out)
    }
}

/// Connects, says EHLO and sends one sample message; returns the final reply.
pub async fn send_one(addr: SocketAddr, rcpts: &[&str], subject: &str) -> Reply {
    let mut c = connect(addr).await;
    c.expect("EHLO client.test", 250).await;
    c.mail("x@example.org", rcpts, &sample(subject)).await
}

/// The queue id in a `250 ... queued as ID` reply.
pub fn queue_id(r: &Reply) -> String {
    r.text.trim().rsplit(' ').next().unwrap_or("").to_string()
}
