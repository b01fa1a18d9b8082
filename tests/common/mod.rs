//! Shared test harness: a real relay on an ephemeral loopback port, two sink next hops, and a
//! raw SMTP client that shows every reply.
#![allow(dead_code)]

use coexist::config::{Config, DEFAULT_CONFIG};
use coexist::load::sink::{Sink, SinkOptions};
use coexist::relay::{self, Running};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
    cfg.directory.file = dfile;
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

/// A relay with two sinks.
pub struct Harness {
    pub relay: Running,
    pub addr: SocketAddr,
    pub onprem: Sink,
    pub cloud: Sink,
    pub dir: tempfile::TempDir,
    pub certs: TestCerts,
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
    sink.state.wait_recipients(n, Duration::from_secs(30)).await
}

/// Helpers for tests that run the real `coexist` binary.
pub mod bin {
    use super::{write_certs, DIRECTORY, TOKEN};
    use std::net::{SocketAddr, TcpListener};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The binary under test.
    pub const BIN: &str = env!("CARGO_BIN_EXE_coexist");

    /// A free loopback port (bound and released; good enough on a test machine).
    pub fn free_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Ports and paths of a config written for the binary.
    pub struct BinConfig {
        pub path: PathBuf,
        pub listen: SocketAddr,
        pub admin: SocketAddr,
        pub onprem: SocketAddr,
        pub cloud: SocketAddr,
    }

    /// Writes certificates, the test directory and a config into `dir`: the default config
    /// with these ports, temp paths, fast retries, and the admin token [`TOKEN`] inline.
    pub fn write_config(dir: &Path, onprem: SocketAddr, cloud: SocketAddr) -> BinConfig {
        let (listen, admin) = (free_port(), free_port());
        let certs = write_certs(dir);
        if !dir.join("directory.csv").exists() {
            std::fs::write(dir.join("directory.csv"), DIRECTORY).unwrap();
        }
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        let text = coexist::config::DEFAULT_CONFIG
            .replace("127.0.0.1:2525", &listen.to_string())
            .replace("127.0.0.1:2601", &onprem.to_string())
            .replace("127.0.0.1:2602", &cloud.to_string())
            .replace("127.0.0.1:8025", &admin.to_string())
            .replace(
                "token_file = \"var/admin.token\"",
                &format!("token = \"{TOKEN}\""),
            )
            .replace("var/directory", &p("store"))
            .replace("certs/server.crt", certs.cert.to_str().unwrap())
            .replace("certs/server.key", certs.key.to_str().unwrap())
            .replace("var/spool", &p("spool"))
            .replace("config/directory.csv", &p("directory.csv"))
            .replace("min_backoff = \"300s\"", "min_backoff = \"1s\"")
            .replace("max_backoff = \"4000s\"", "max_backoff = \"2s\"")
            .replace("timeout = \"60s\"", "timeout = \"5s\"");
        let path = dir.join("coexist.toml");
        std::fs::write(&path, text).unwrap();
        BinConfig {
            path,
            listen,
            admin,
            onprem,
            cloud,
        }
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
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        }
    }

    /// Starts `coexist serve --config` and waits until SMTP and admin ports answer.
    pub fn spawn(cfg: &BinConfig) -> Server {
        spawn_logged(cfg, None)
    }

    /// Like [`spawn`], with the server's log (warnings and errors) appended to `log`.
    pub fn spawn_logged(cfg: &BinConfig, log: Option<&Path>) -> Server {
        let stderr = match log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let child = Command::new(BIN)
            .args(["serve", "--config", cfg.path.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let server = Server(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(cfg.listen).is_err()
            || std::net::TcpStream::connect(cfg.admin).is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "relay did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
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
