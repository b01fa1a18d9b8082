//! PostgreSQL for fleet tests: a schema of its own per test (dropped afterwards), and a TCP
//! proxy in front of the server that a test can cut and restore.
//!
//! The server is the one the machine runs on 127.0.0.1:5432 (trust auth, database `test`);
//! `COEXIST_TEST_POSTGRES` names another.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The test server's connection string.
pub fn url() -> String {
    std::env::var("COEXIST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// The server's address (for the proxy), from [`url`].
pub fn server_addr() -> SocketAddr {
    let cfg: tokio_postgres::Config = url().parse().expect("COEXIST_TEST_POSTGRES");
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}").parse().expect("a numeric host")
}

/// `url()` with its host and port replaced by `addr` (a proxy), without TLS: the proxy
/// reads the statements it stalls on (`Proxy::stall_on`), and the fleet's default
/// `sslmode=prefer` would encrypt them when the server offers TLS.
pub fn url_via(addr: SocketAddr) -> String {
    let cfg: tokio_postgres::Config = url().parse().unwrap();
    format!(
        "host={} port={} user={} dbname={} sslmode=disable",
        addr.ip(),
        addr.port(),
        cfg.get_user().unwrap_or("postgres"),
        cfg.get_dbname().unwrap_or("test")
    )
}

async fn client() -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (see README: fleet tests need it)");
    tokio::spawn(conn);
    c
}

/// A schema for one test, dropped (with everything in it) when this is dropped.
pub struct Schema {
    pub name: String,
}

impl Schema {
    /// A fresh, unused schema name (the fleet creates the schema itself).
    pub async fn new(test: &str) -> Schema {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{test}_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            fastrand::u32(..)
        );
        let c = client().await;
        c.batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{name}" CASCADE"#))
            .await
            .unwrap();
        Schema { name }
    }

    /// Runs `sql` against the test server (in this schema's search path).
    pub async fn execute(&self, sql: &str) {
        let c = client().await;
        c.batch_execute(&format!(r#"SET search_path TO "{}"; {sql}"#, self.name))
            .await
            .unwrap();
    }
}

impl Schema {
    /// The first column of the first row of `sql` (in this schema's search path), as text.
    pub async fn value(&self, sql: &str) -> Option<String> {
        let c = client().await;
        c.batch_execute(&format!(r#"SET search_path TO "{}""#, self.name))
            .await
            .unwrap();
        c.simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropped inside the test's runtime: a thread with a runtime of its own does it.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{name}" CASCADE"#))
                        .await;
                }
            })
        })
        .join();
    }
}

/// A TCP proxy to PostgreSQL that can be cut (every connection closed, new ones closed at
/// once) and restored, or stalled (connections stay open, nothing is forwarded until
/// resumed: a server that does not answer).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Bytes that, once a client sends them, stall the proxy before they are forwarded.
    trigger: Trigger,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: AbortHandle,
}

/// See [`Proxy::stall_on`].
type Trigger = Arc<Mutex<Option<Vec<u8>>>>;

/// Copies `from` to `to`, holding each chunk while the proxy is stalled. With `arm` (the
/// client's direction): a chunk holding the trigger's bytes stalls the proxy first.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
    arm: Option<(Trigger, tokio::sync::watch::Sender<bool>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((trigger, stall)) = &arm {
            let mut t = trigger.lock().unwrap();
            let hit = t
                .as_ref()
                .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == p.as_slice()));
            if hit {
                *t = None;
                stall.send_replace(true);
            }
        }
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    pub async fn start() -> Proxy {
        Proxy::start_to(server_addr()).await
    }

    /// A proxy to another server (NATS, for the shadow tests).
    #[allow(dead_code)]
    pub async fn start_to(to: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (stalled, _) = tokio::sync::watch::channel(false);
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let trigger: Trigger = Arc::default();
        let (c, k, st, tr) = (cut.clone(), conns.clone(), stalled.clone(), trigger.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (up, down) = (st.subscribe(), st.subscribe());
                let arm = Some((tr.clone(), st.clone()));
                let h = tokio::spawn(async move {
                    if let Ok(out) = TcpStream::connect(to).await {
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = out.into_split();
                        tokio::join!(pump(ir, ow, up, arm), pump(or, iw, down, None));
                    }
                });
                k.lock().unwrap().push(h.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            addr,
            cut,
            stalled,
            trigger,
            conns,
            task,
        }
    }

    /// The proxy stalls (as [`Proxy::stall`]) when a client next sends `pattern` (a
    /// statement's text), before forwarding it: the server stops answering in the middle of
    /// what that client was doing. Once.
    #[allow(dead_code)]
    pub fn stall_on(&self, pattern: &str) {
        *self.trigger.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// Nothing is forwarded (either way) until [`Proxy::resume`]; connections stay open.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwarding goes on where it stopped.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// PostgreSQL becomes unreachable through the proxy: open connections are closed.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// PostgreSQL is reachable again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
