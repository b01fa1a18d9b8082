//! NATS JetStream servers for the shadow tests: a cluster of `nats-server` processes on
//! loopback ports of their own, each with its store in a temporary folder, killed (by PID)
//! when dropped. A node can be killed and started again during a test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// True when a NATS server on `port` answers PING with PONG.
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"CONNECT {}\r\nPING\r\n").is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"PONG") {
            return true;
        }
    }
    false
}

/// One JetStream API request over a plain NATS connection: the reply's payload, or `None`
/// when none came within 2 s.
fn js_request(port: u16, subject: &str, payload: &str) -> Option<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let msg = format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.probe 1\r\nPUB {subject} _INBOX.probe {}\r\n{payload}\r\n",
        payload.len()
    );
    s.write_all(msg.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest.split_whitespace().last()?.parse().ok()?;
            let mut body = vec![0u8; len + 2];
            r.read_exact(&mut body).ok()?;
            body.truncate(len);
            return Some(String::from_utf8_lossy(&body).to_string());
        }
        if line.starts_with("PING") {
            r.get_mut().write_all(b"PONG\r\n").ok()?;
        }
    }
}

/// The machine's NATS server (Debian's `nats-server`).
pub const NATS_SERVER: &str = "nats-server";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node of a test cluster.
struct NatsNode {
    name: String,
    /// Extra command-line options (TLS, authentication).
    extra: Vec<String>,
    port: u16,
    route_port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster (or a single server) started for one test.
pub struct NatsCluster {
    nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers (a cluster when `n > 1`) and waits until JetStream answers on
    /// each (a metadata leader elected).
    pub fn start(n: usize) -> NatsCluster {
        NatsCluster::start_with(n, &[])
    }

    /// [`NatsCluster::start`] with extra `nats-server` options for every server (TLS,
    /// authentication); with any, readiness is only the port answering (the probes here
    /// speak plain NATS without credentials).
    pub fn start_with(n: usize, extra: &[&str]) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..n)
            .map(|i| NatsNode {
                extra: extra.iter().map(|s| s.to_string()).collect(),
                name: format!("n{i}"),
                port: free_port(),
                route_port: free_port(),
                store: dir.path().join(format!("n{i}")),
                child: None,
            })
            .collect();
        let mut c = NatsCluster { nodes, _dir: dir };
        for i in 0..n {
            c.start_node(i);
        }
        c.wait_ready();
        c
    }

    fn start_node(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats-route://127.0.0.1:{}", n.route_port))
            .collect();
        let n = &mut self.nodes[i];
        let mut cmd = Command::new(NATS_SERVER);
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &n.port.to_string(),
            "-n",
            &n.name,
            "-js",
        ])
        .args(["-sd", n.store.to_str().unwrap()])
        .args(&n.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if routes.len() > 1 {
            cmd.args(["--cluster_name", "coexist_test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", n.route_port)])
                .args(["--routes", &routes.join(",")]);
        }
        n.child = Some(
            cmd.spawn()
                .expect("nats-server (Debian package nats-server)"),
        );
    }

    /// Waits until every running server has JetStream with a leader (a stream can be made).
    fn wait_ready(&self) {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let (port, plain) = (n.port, n.extra.is_empty());
            let up = super::poll_blocking(Duration::from_secs(30), || {
                if plain {
                    answers(port)
                } else {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                }
            });
            assert!(up.is_ok(), "nats-server {} did not answer", n.name);
        }
        // Then JetStream itself: a stream with a replica on every server can be made (the
        // cluster has elected its metadata leader and every peer answers).
        let running: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect();
        let Some(&port) = running.first() else { return };
        if self.nodes.iter().any(|n| !n.extra.is_empty()) {
            return;
        }
        let create = format!(
            r#"{{"name":"probe","subjects":["probe.x"],"num_replicas":{},"storage":"memory"}}"#,
            running.len()
        );
        let ready = super::poll_blocking(Duration::from_secs(60), || {
            let answer = js_request(port, "$JS.API.STREAM.CREATE.probe", &create);
            if answer
                .as_deref()
                .is_some_and(|a| !a.contains("\"error\"") || a.contains("already in use"))
            {
                Ok(())
            } else {
                Err(format!("{answer:?}"))
            }
        });
        if let Err(last) = ready {
            panic!("JetStream not ready: {last}");
        }
        let _ = js_request(port, "$JS.API.STREAM.DELETE.probe", "");
    }

    /// Every server's URL, as `shadow.nats` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Server `i`'s address.
    #[allow(dead_code)]
    pub fn addr(&self, i: usize) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.nodes[i].port).parse().unwrap()
    }

    /// Kills server `i` (SIGKILL, by PID).
    #[allow(dead_code)]
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts server `i` again (same port and store).
    #[allow(dead_code)]
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_node(i);
        self.wait_ready();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
