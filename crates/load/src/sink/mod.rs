//! The sink: an SMTP server for next hops in tests, demos and benchmarks. It runs the same
//! session code as the relay and records what it receives.
//!
//! Some next hops the relay must cope with behave differently from our own session code: they
//! lack the SMTPUTF8 extension, or answer errors with multi-line replies. The session code
//! offers one behaviour only (and belongs to the inbound side), so the sink emulates these
//! by serving its clients through a small clear-text front that edits the replies on their
//! way out (see [`SinkOptions::smtputf8`] and [`SinkOptions::multiline_errors`]).
//!
//! Client certificates are recorded per session with a certificate verifier that notes the
//! certificate of the session (task) whose handshake it checks; the message handler of the
//! same session then finds it (see [`client_cert_acceptor`], in `client_certs.rs`); the
//! reply-editing front is in `front.rs`.

mod client_certs;
mod front;

pub use client_certs::{client_cert_acceptor, ClientCerts};
use front::{run_front, ReplyEdit};

use crate::proto::{MailParams, RcptDsn, Reply, Ret};
use crate::smtp::{server, Handler, Incoming, Peer, SessionConfig};
use crate::types::Address;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// How the sink answers at the end of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SinkMode {
    /// 250.
    Accept = 0,
    /// 451 4.3.0.
    Defer = 1,
    /// 554 5.6.0.
    Reject = 2,
    /// Never answer the end of data (the sender times out).
    Hang = 3,
    /// Answer 421 4.3.2 and close the connection.
    Drop = 4,
    /// Answer MAIL with `451 4.7.500 Server busy` (Exchange Online's throttling reply).
    Throttle = 5,
}

/// A message as the sink received it.
#[derive(Clone, Debug)]
pub struct SinkMessage {
    /// Reverse path.
    pub from: Option<Address>,
    /// Envelope recipients.
    pub rcpts: Vec<Address>,
    /// Exact bytes received (empty unless `keep_bodies`).
    pub body: Vec<u8>,
    /// The session was TLS.
    pub tls: bool,
    /// TLS details ("TLSv1_3 with cipher …, client certificate").
    pub tls_summary: Option<String>,
    /// DSN parameters per recipient.
    pub rcpt_dsn: Vec<RcptDsn>,
    /// DSN `RET`.
    pub ret: Option<Ret>,
    /// DSN `ENVID`.
    pub envid: Option<String>,
    /// MAIL FROM carried `SMTPUTF8`.
    pub smtputf8: bool,
    /// The client certificate (DER) presented in the session, when the sink records them
    /// ([`SinkOptions::client_certs`]).
    pub client_cert: Option<Vec<u8>>,
}

/// Sink settings.
#[derive(Clone)]
pub struct SinkOptions {
    /// Greeting name.
    pub hostname: String,
    /// Offer STARTTLS with this acceptor.
    pub tls: Option<TlsAcceptor>,
    /// Offer CHUNKING.
    pub chunking: bool,
    /// Offer PIPELINING.
    pub pipelining: bool,
    /// Keep message bodies (tests); counts only otherwise.
    pub keep_bodies: bool,
    /// Append one line per accepted message to this file: the queue id from the first
    /// `Received:` header (the relay's), the recipient count, the recipients
    /// (comma-separated), a CRC32 digest of the message and the time it was accepted (Unix
    /// milliseconds). Written per message.
    pub record: Option<std::path::PathBuf>,
    /// Share (0..1) of recipients deferred at RCPT with 450 4.2.1, at random.
    pub defer_share: f64,
    /// Share (0..1) of recipients refused at RCPT with 550 5.1.1, at random.
    pub reject_share: f64,
    /// Wait this long before answering the end of data.
    pub delay: Duration,
    /// Most recipients per transaction; further RCPTs get `452 4.5.3 Too many recipients`
    /// (0: every RCPT does).
    pub max_rcpts: usize,
    /// Offer SMTPUTF8 (RFC 6531). Off: EHLO does not list it, and MAIL with `SMTPUTF8` gets
    /// `555 5.5.4`, as from a server that does not know the extension. Served through the
    /// clear-text front: cannot be combined with `tls`.
    pub smtputf8: bool,
    /// Send every error reply (4xx and 5xx) as a three-line reply, the original text on its
    /// first line. Served through the clear-text front: cannot be combined with `tls`.
    pub multiline_errors: bool,
    /// Where the certificates that clients present are recorded; set together with `tls`
    /// from [`client_cert_acceptor`].
    pub client_certs: Option<Arc<ClientCerts>>,
    /// Asked at every RCPT after the built-in test hooks: a reply refuses the recipient
    /// with it (the weekend run's Exchange Online answers `5.1.10` for a mailbox that moved
    /// minutes ago, before its directory sync has it).
    pub rcpt_check: Option<RcptCheck>,
}

/// A per-recipient answer for [`SinkOptions::rcpt_check`]: `Some(reply)` refuses.
pub type RcptCheck = Arc<dyn Fn(&Address) -> Option<Reply> + Send + Sync>;

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            hostname: "sink.coexist.test".into(),
            tls: None,
            chunking: true,
            pipelining: true,
            keep_bodies: true,
            record: None,
            defer_share: 0.0,
            reject_share: 0.0,
            delay: Duration::ZERO,
            max_rcpts: 100_000,
            smtputf8: true,
            multiline_errors: false,
            client_certs: None,
            rcpt_check: None,
        }
    }
}

/// What the sink received for one recipient domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainCount {
    /// Recipients in the domain.
    pub recipients: u64,
    /// Messages with at least one recipient in the domain.
    pub messages: u64,
    /// Bytes of those messages.
    pub bytes: u64,
}

/// What the sink has seen; shared with the test or tool that started it.
pub struct SinkState {
    mode: AtomicU8,
    keep_bodies: bool,
    messages: Mutex<Vec<SinkMessage>>,
    /// Messages accepted.
    pub accepted: AtomicU64,
    /// Recipients accepted.
    pub recipients: AtomicU64,
    /// Bytes accepted.
    pub bytes: AtomicU64,
    /// SMTP sessions served.
    pub sessions: AtomicU64,
    /// Transactions at their end of data now (being answered, after `delay` if any).
    pub answering: AtomicU64,
    /// The most transactions at their end of data at once: with a `delay`, how many the
    /// sender had in flight together.
    pub peak_answering: AtomicU64,
    /// MAIL commands answered with a throttling reply ([`SinkMode::Throttle`]).
    pub throttled: AtomicU64,
    changed: Notify,
    record: Option<Mutex<std::fs::File>>,
    defer_share: f64,
    reject_share: f64,
    delay: Duration,
    smtputf8: bool,
    client_certs: Option<Arc<ClientCerts>>,
    rcpt_check: Option<RcptCheck>,
    by_domain: Mutex<std::collections::BTreeMap<String, DomainCount>>,
}

/// The queue id in the first `Received:` header (`... id QID ...`), if any.
pub fn received_id(body: &[u8]) -> Option<String> {
    let end = memchr::memmem::find(body, b"\r\n\r\n")
        .unwrap_or(body.len())
        .min(4096);
    let head = String::from_utf8_lossy(&body[..end]);
    let first = head.split("\r\nReceived:").next()?;
    let after = first.split(" id ").nth(1)?;
    after
        .split(|c: char| c.is_whitespace() || c == ';')
        .next()
        .map(str::to_string)
}

impl SinkState {
    /// Sets how the end of data is answered.
    pub fn set_mode(&self, m: SinkMode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }

    /// Counts per envelope recipient domain.
    pub fn by_domain(&self) -> std::collections::BTreeMap<String, DomainCount> {
        self.by_domain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One line of counts: messages, recipients, bytes, recipients per domain.
    pub fn summary(&self) -> String {
        let domains: Vec<String> = self
            .by_domain()
            .iter()
            .map(|(d, c)| format!("{d}={}rcpt/{}msg/{}B", c.recipients, c.messages, c.bytes))
            .collect();
        format!(
            "sink: {} messages, {} recipients, {} bytes, {} sessions; by domain: {}",
            self.accepted.load(Ordering::SeqCst),
            self.recipients.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
            self.sessions.load(Ordering::SeqCst),
            if domains.is_empty() {
                "-".to_string()
            } else {
                domains.join(" ")
            }
        )
    }

    /// A copy of the accepted messages.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until at least `n` recipients were accepted, or `timeout` passes; returns the count.
    pub async fn wait_recipients(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let have = self.recipients.load(Ordering::SeqCst);
            if have >= n {
                return have;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.recipients.load(Ordering::SeqCst);
            }
        }
    }
}

struct SinkHandler(Arc<SinkState>);

impl Handler for SinkHandler {
    type Context = ();

    fn context(&self) {
        self.0.sessions.fetch_add(1, Ordering::SeqCst);
    }

    fn check_mail(
        &self,
        _: &(),
        _: &Peer,
        _: Option<&Address>,
        params: &MailParams,
    ) -> Result<(), Reply> {
        if self.0.mode.load(Ordering::SeqCst) == SinkMode::Throttle as u8 {
            self.0.throttled.fetch_add(1, Ordering::SeqCst);
            self.0.changed.notify_waiters();
            return Err(Reply::new(
                451,
                "4.7.500",
                "Server busy. Please try again later (sink throttling on request)",
            ));
        }
        if params.smtputf8 && !self.0.smtputf8 {
            return Err(Reply::new(
                555,
                "5.5.4",
                "Sink: SMTPUTF8 is not supported here",
            ));
        }
        Ok(())
    }

    fn check_rcpt(
        &self,
        _: &(),
        _: &Peer,
        _: Option<&Address>,
        _: &MailParams,
        to: &Address,
    ) -> Result<(), Reply> {
        // Test hooks by local part: `reject…` is refused, `defer…` is deferred, `unsynced…`
        // is unknown as Exchange Online says it for a mailbox its directory does not have yet.
        let local = to.local().to_ascii_lowercase();
        if local.starts_with("reject") {
            return Err(Reply::new(550, "5.1.1", "Sink: mailbox unavailable"));
        }
        if local.starts_with("unsynced") {
            return Err(Reply::new(
                550,
                "5.1.10",
                "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            ));
        }
        if local.starts_with("defer") {
            return Err(Reply::new(450, "4.2.1", "Sink: mailbox busy, try later"));
        }
        let s = &self.0;
        if let Some(reply) = s.rcpt_check.as_ref().and_then(|check| check(to)) {
            return Err(reply);
        }
        if s.reject_share > 0.0 || s.defer_share > 0.0 {
            let x = fastrand::f64();
            if x < s.reject_share {
                return Err(Reply::new(
                    550,
                    "5.1.1",
                    "Sink: refusing a share of recipients on request",
                ));
            }
            if x < s.reject_share + s.defer_share {
                return Err(Reply::new(
                    450,
                    "4.2.1",
                    "Sink: deferring a share of recipients on request",
                ));
            }
        }
        Ok(())
    }

    async fn accept(&self, _: &(), msg: Incoming) -> Reply {
        let s = &self.0;
        let _answering = Answering::new(s);
        match s.mode.load(Ordering::SeqCst) {
            1 => return Reply::new(451, "4.3.0", "Sink: deferring on request"),
            2 => return Reply::new(554, "5.6.0", "Sink: rejecting on request"),
            3 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Reply::new(451, "4.3.0", "Sink: woke up");
            }
            4 => return Reply::new(421, "4.3.2", "Sink: closing on request"),
            _ => {}
        }
        if !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        if let Some(rec) = &s.record {
            use std::io::Write;
            let rcpts: Vec<String> = msg.rcpts.iter().map(|a| a.to_string()).collect();
            let line = format!(
                "{} {} {} {:08x} {}\n",
                received_id(&msg.body).unwrap_or_else(|| "-".into()),
                msg.rcpts.len(),
                rcpts.join(","),
                crc32fast::hash(&msg.body),
                crate::clock::now_ms()
            );
            let mut f = rec.lock().unwrap_or_else(|p| p.into_inner());
            if f.write_all(line.as_bytes()).is_err() {
                return Reply::new(451, "4.3.0", "Sink: cannot write the record file");
            }
        }
        let size = msg.body.len() as u64;
        s.bytes.fetch_add(size, Ordering::SeqCst);
        s.accepted.fetch_add(1, Ordering::SeqCst);
        let n = msg.rcpts.len() as u64;
        let reply = Reply::owned(250, "2.0.0", format!("Sink: queued as {}", msg.id));
        let m = SinkMessage {
            from: msg.from,
            rcpts: msg.rcpts,
            body: if s.keep_bodies { msg.body } else { Vec::new() },
            tls: msg.peer.tls.is_some(),
            tls_summary: msg.peer.tls.clone(),
            rcpt_dsn: msg.rcpt_dsn,
            smtputf8: msg.params.smtputf8,
            ret: msg.params.ret,
            envid: msg.params.envid,
            client_cert: s.client_certs.as_ref().and_then(|c| c.current()),
        };
        {
            let mut d = s.by_domain.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen: Vec<&str> = Vec::new();
            for r in &m.rcpts {
                let c = d.entry(r.domain().to_string()).or_default();
                c.recipients += 1;
                if !seen.contains(&r.domain().as_str()) {
                    seen.push(r.domain().as_str());
                    c.messages += 1;
                    c.bytes += size;
                }
            }
        }
        s.messages.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        s.recipients.fetch_add(n, Ordering::SeqCst);
        s.changed.notify_waiters();
        reply
    }
}

/// Counts a transaction in [`SinkState::answering`] while it lives.
struct Answering<'a>(&'a SinkState);

impl<'a> Answering<'a> {
    fn new(s: &'a SinkState) -> Answering<'a> {
        let now = s.answering.fetch_add(1, Ordering::SeqCst) + 1;
        s.peak_answering.fetch_max(now, Ordering::SeqCst);
        Answering(s)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running sink; stops when dropped.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it has seen.
    pub state: Arc<SinkState>,
    task: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Starts a sink on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr, opts: SinkOptions) -> std::io::Result<Sink> {
        let edit = ReplyEdit {
            drop_smtputf8: !opts.smtputf8,
            multiline_errors: opts.multiline_errors,
        };
        let front = edit.drop_smtputf8 || edit.multiline_errors;
        if front && opts.tls.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "sink: no SMTPUTF8 and multi-line errors are clear-text only (no STARTTLS)",
            ));
        }
        let outer = TcpListener::bind(addr).await?;
        let addr = outer.local_addr()?;
        // With reply edits, the session code listens on a private loopback port behind the
        // front; otherwise it serves the public listener itself.
        let (listener, outer) = if front {
            (TcpListener::bind("127.0.0.1:0").await?, Some(outer))
        } else {
            (outer, None)
        };
        let state = Arc::new(SinkState {
            mode: AtomicU8::new(SinkMode::Accept as u8),
            keep_bodies: opts.keep_bodies,
            messages: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            recipients: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            answering: AtomicU64::new(0),
            peak_answering: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            changed: Notify::new(),
            record: match &opts.record {
                Some(p) => Some(Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)?,
                )),
                None => None,
            },
            defer_share: opts.defer_share,
            reject_share: opts.reject_share,
            delay: opts.delay,
            smtputf8: opts.smtputf8,
            client_certs: opts.client_certs.clone(),
            rcpt_check: opts.rcpt_check.clone(),
            by_domain: Mutex::new(std::collections::BTreeMap::new()),
        });
        let cfg = SessionConfig {
            hostname: opts.hostname,
            max_message_size: 1 << 30,
            max_recipients: opts.max_rcpts,
            max_line_length: 4096,
            max_errors: 1000,
            max_rcpt_refusals: u32::MAX,
            inflight: crate::smtp::budget::InflightBudget::new(0),
            command_timeout: Duration::from_secs(60),
            max_hops: usize::MAX,
            tls: opts.tls,
            chunking: opts.chunking,
            pipelining: opts.pipelining,
            add_received: false,
            data_timeout: Duration::from_secs(600),
            trusted_networks: Vec::new(),
            max_connections_per_ip: 0,
            max_connection_rate_per_ip: 0,
            reserved_connections: 0,
            client_prefix: (32, 128),
            max_session_time: Duration::ZERO,
            junk_command_limit: 0,
        };
        let inner = listener.local_addr()?;
        let serve = server::serve(
            listener,
            Arc::new(server::ServerControl::new(cfg, 10_000, None)),
            Arc::new(SinkHandler(state.clone())),
        );
        let task = match outer {
            None => tokio::spawn(serve),
            Some(outer) => tokio::spawn(async move {
                tokio::join!(serve, run_front(outer, inner, edit));
            }),
        };
        Ok(Sink { addr, state, task })
    }
}
