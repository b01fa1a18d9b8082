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

pub mod bin;
pub mod browser;
pub mod dns;
pub mod fleet;
pub mod nats;
pub mod pg;
pub mod pg_tls;
pub mod samba;
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
    cond: impl FnMut() -> F,
) -> C::Out {
    poll_async(PATIENCE, cond)
        .await
        .unwrap_or_else(|last| gave_up(what, &last))
}

/// [`eventually`] for tests without a runtime, or where the condition blocks (the CLI, the
/// admin client).
pub fn eventually_blocking<C: Check>(what: &str, cond: impl FnMut() -> C) -> C::Out {
    poll_blocking(PATIENCE, cond).unwrap_or_else(|last| gave_up(what, &last))
}

/// Polls `cond` until it is met (its value) or `limit` has passed (`Err` with the last state
/// seen): for a caller that does not fail the test when the wait is over (a fixture that
/// starts a server again, a process given a grace period before SIGKILL).
pub async fn poll_async<C: Check, F: Future<Output = C>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> Result<C::Out, String> {
    let t0 = Instant::now();
    loop {
        match cond().await.check() {
            Ok(v) => return Ok(v),
            Err(last) if t0.elapsed() >= limit => return Err(last),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// [`poll_async`] for blocking conditions and callers without a runtime.
pub fn poll_blocking<C: Check>(
    limit: Duration,
    mut cond: impl FnMut() -> C,
) -> Result<C::Out, String> {
    let t0 = Instant::now();
    loop {
        match cond().check() {
            Ok(v) => return Ok(v),
            Err(last) if t0.elapsed() >= limit => return Err(last),
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
    let cloud_route = cfg.routes.get_mut("cloud").unwrap();
    cloud_route.next_hops = vec![cloud.into()];
    // The shipped cloud route verifies Exchange Online's certificate (`tls = "verify"`,
    // `tls_name = "mail.protection.outlook.com"`); the loopback test doubles here have no
    // such certificate (most offer no STARTTLS at all), so the tests that use this config
    // deliver to them as to the on-premises double. tests/cloud_tls.rs tests the shipped
    // route itself.
    cloud_route.tls = coexist::config::TlsPolicy::Opportunistic;
    cloud_route.tls_name = None;
    cfg
}

/// Sends addresses the test directory does not list on premises (`directory.unknown =
/// "onprem"`) instead of refusing them at RCPT as the shipped config does: for tests whose
/// recipients only the next hop refuses (the sinks refuse local parts starting with
/// `reject`), so that a bounce is made.
pub fn unknown_onprem(c: &mut Config) {
    c.directory.unknown = "onprem".into();
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
    http_request_for(addr, &addr.to_string(), method, path, headers, body).await
}

/// [`http_request`] with `Host: host`.
pub async fn http_request_for(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
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
