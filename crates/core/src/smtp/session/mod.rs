//! The ESMTP session state machine: greeting, EHLO, STARTTLS, MAIL/RCPT, DATA/BDAT, limits.
//!
//! What to do with recipients and finished messages is decided by a [`Handler`]: the relay's
//! handler checks policy and spools; the test sink's handler records. The session never
//! imports the spool, the queue or delivery.
//!
//! The session is generic over its byte stream ([`SessionStream`]: any `AsyncRead +
//! AsyncWrite`), so the same code serves a TCP socket in production and an in-memory
//! [`tokio::io::duplex`] in the tests below, STARTTLS included: the stream is wrapped in a
//! [`MaybeTls<S>`](crate::smtp::tls::MaybeTls) that the handshake upgrades in place.
//!
//! Layout, one concern per file (after Stalwart's `inbound/`):
//! - this file: the config, the [`Handler`] trait, the session's state and the command loop;
//! - `conn.rs`: buffered reads, command lines with a length limit, reply batching;
//! - `envelope.rs`: EHLO/HELO, MAIL, RCPT;
//! - `body.rs`: DATA, BDAT and the end of a transaction;
//! - `starttls.rs`: the TLS upgrade;
//! - `received.rs`: our Received header.
//!
//! Each session runs in a `session` tracing span with the client's address; the TLS summary
//! and the queue id of the current transaction are recorded in it when known, so every line
//! a session logs can be found by its queue id.

mod body;
mod conn;
mod envelope;
mod received;
mod starttls;
#[cfg(test)]
mod tests;

use self::conn::{Conn, Line};
use super::budget::InflightBudget;
use super::command::{self, Command};
use super::data::ChunkCollector;
use crate::proto::reply::canned;
use crate::proto::{MailParams, RcptDsn, Reply};
use crate::smtp::tls::MaybeTls;
use crate::types::{Address, QueueId};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, Instrument};

/// The byte stream a session runs over: a TCP socket in production, an in-memory duplex in
/// tests. STARTTLS wraps it in TLS, which works over any such stream.
pub trait SessionStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> SessionStream for T {}

/// Limits and identity of the inbound side.
#[derive(Clone)]
pub struct SessionConfig {
    /// Our host name.
    pub hostname: String,
    /// Largest message (SIZE).
    pub max_message_size: u64,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Errors before 421.
    pub max_errors: u32,
    /// Refused recipients before 421 (counted apart from errors, so one message with many
    /// unknown recipients still gets through, while directory harvesting is stopped).
    pub max_rcpt_refusals: u32,
    /// Wait for each read from the client.
    pub command_timeout: Duration,
    /// Most Received headers accepted (loop detection).
    pub max_hops: usize,
    /// STARTTLS acceptor, if TLS is configured.
    pub tls: Option<TlsAcceptor>,
    /// Offer CHUNKING (BDAT).
    pub chunking: bool,
    /// Offer PIPELINING.
    pub pipelining: bool,
    /// Prepend our Received header (the relay does; a test sink records bytes as sent).
    pub add_received: bool,
    /// Longest time for a whole DATA/BDAT transfer.
    pub data_timeout: Duration,
    /// Clients exempt from per-client limits.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Concurrent sessions per client address (0 = no limit).
    pub max_connections_per_ip: usize,
    /// New sessions per minute per client address (0 = no limit).
    pub max_connection_rate_per_ip: u32,
    /// Sessions kept for trusted networks: other clients are refused once the open sessions
    /// reach the listener's total minus this.
    pub reserved_connections: usize,
    /// Prefix lengths (IPv4, IPv6) of the networks whose clients count as one client for
    /// the per-client limits.
    pub client_prefix: (u8, u8),
    /// Longest session; past it, the next command ends it with `421 4.4.2` (zero = none).
    pub max_session_time: Duration,
    /// Junk commands (NOOP, RSET, VRFY, HELP, EHLO, HELO) between accepted messages before
    /// `421 4.7.0` and disconnect (0 = no limit).
    pub junk_command_limit: u32,
    /// Memory budget shared by every session's message buffer.
    pub inflight: Arc<InflightBudget>,
}

impl SessionConfig {
    /// Session settings from the `[server]` and `[policy]` sections; `inflight` is the
    /// budget shared across reloads (its limit is set from `server.max_inflight_bytes`).
    pub fn from_config(
        c: &crate::config::Config,
        tls: Option<TlsAcceptor>,
        inflight: Arc<InflightBudget>,
    ) -> SessionConfig {
        let s = &c.server;
        inflight.set_max(s.max_inflight_bytes);
        SessionConfig {
            inflight,
            max_rcpt_refusals: s.max_rcpt_refusals,
            data_timeout: s.data_timeout,
            trusted_networks: c.policy.trusted_networks.clone(),
            max_connections_per_ip: c.policy.max_connections_per_ip,
            max_connection_rate_per_ip: c.policy.max_connection_rate_per_ip,
            reserved_connections: c.reserved_connections(),
            client_prefix: (c.policy.ipv4_client_prefix, c.policy.ipv6_client_prefix),
            max_session_time: s.max_session_time,
            junk_command_limit: s.junk_command_limit,
            hostname: s.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_line_length: s.max_line_length,
            max_errors: s.max_errors,
            command_timeout: s.command_timeout,
            max_hops: s.max_hops,
            tls,
            chunking: true,
            pipelining: true,
            add_received: true,
        }
    }
}

/// Facts about the client, given to the handler.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// EHLO/HELO name.
    pub helo: String,
    /// TLS summary when STARTTLS is on.
    pub tls: Option<String>,
}

/// A complete message, ready to be queued.
#[derive(Debug)]
pub struct Incoming {
    /// Queue id, already in the Received header.
    pub id: QueueId,
    /// Reverse path (`None` for `<>`).
    pub from: Option<Address>,
    /// Accepted recipients.
    pub rcpts: Vec<Address>,
    /// DSN parameters of each recipient (same order).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// MAIL parameters.
    pub params: MailParams,
    /// Message bytes, our Received header first.
    pub body: Vec<u8>,
    /// The client.
    pub peer: Peer,
}

/// What the session asks of its owner.
pub trait Handler: Send + Sync + 'static {
    /// What a session keeps from its start to its end (e.g. the config in force then), so a
    /// reload does not change the rules in the middle of a session.
    type Context: Send + Sync + 'static;
    /// Taken once when a session starts.
    fn context(&self) -> Self::Context;
    /// Decides on MAIL FROM (`Ok` means 250); e.g. refuses while the disk is full.
    fn check_mail(
        &self,
        _ctx: &Self::Context,
        _peer: &Peer,
        _from: Option<&Address>,
        _params: &MailParams,
    ) -> Result<(), Reply> {
        Ok(())
    }
    /// Decides on a recipient at RCPT time (`Ok` means 250), given the transaction's
    /// sender and MAIL parameters (`SIZE=`).
    fn check_rcpt(
        &self,
        ctx: &Self::Context,
        peer: &Peer,
        from: Option<&Address>,
        params: &MailParams,
        to: &Address,
    ) -> Result<(), Reply>;
    /// Takes a finished message; the reply goes to the client as is (250 only once durable).
    fn accept(&self, ctx: &Self::Context, msg: Incoming) -> impl Future<Output = Reply> + Send;
}

/// The mail transaction in progress, from MAIL to the end of its body (or RSET).
pub(super) struct Transaction {
    /// Queue id, given at MAIL (it goes into the Received header written before the data).
    id: QueueId,
    from: Option<Address>,
    params: MailParams,
    rcpts: Vec<Address>,
    rcpt_dsn: Vec<RcptDsn>,
    chunks: Option<ChunkCollector>,
    /// A BDAT in this transaction failed: the rest of its chunks are read and dropped.
    chunk_error: Option<Reply>,
}

/// Runs one SMTP session to its end. Errors end the session; nothing here panics on input.
pub async fn run<S: SessionStream, H: Handler>(
    stream: S,
    peer_addr: SocketAddr,
    cfg: Arc<SessionConfig>,
    handler: Arc<H>,
) {
    // The session's span: every line logged while serving it carries the client's address,
    // and, once known, the TLS summary and the queue id of the current transaction.
    let span = tracing::info_span!(
        "session",
        peer = %peer_addr,
        tls = tracing::field::Empty,
        qid = tracing::field::Empty,
    );
    let mut s = Session {
        conn: Conn::new(stream, cfg.command_timeout),
        cfg,
        ctx: handler.context(),
        handler,
        peer: Peer {
            addr: peer_addr,
            helo: String::new(),
            tls: None,
        },
        tx: None,
        errors: 0,
        rcpt_refusals: 0,
        junk: 0,
        started: Instant::now(),
    };
    async move {
        match s.serve().await {
            Ok(()) => debug!("session closed"),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                s.conn.out.clear();
                s.conn.reply(&canned::TIMEOUT);
                let _ = s.conn.flush().await;
                info!("session timed out");
            }
            Err(e) => debug!(error = %e, "session ended"),
        }
        // TLS ends with its close_notify. A clear-text stream is just dropped: closing it
        // sends the FIN, one syscall fewer per session than `shutdown` and then `close`.
        if matches!(s.conn.stream, MaybeTls::Tls(_)) {
            let _ = s.conn.stream.shutdown().await;
        }
    }
    .instrument(span)
    .await
}

/// One session's state; the verbs are methods in the files of this folder.
pub(super) struct Session<S, H: Handler> {
    conn: Conn<S>,
    cfg: Arc<SessionConfig>,
    ctx: H::Context,
    handler: Arc<H>,
    peer: Peer,
    tx: Option<Transaction>,
    errors: u32,
    rcpt_refusals: u32,
    /// Junk commands since the session started or last had a message accepted.
    junk: u32,
    /// When the session started (for `max_session_time`).
    started: Instant,
}

/// Whether the session goes on after a command.
pub(super) enum Next {
    Continue,
    Close,
}

impl<S: SessionStream, H: Handler> Session<S, H> {
    async fn serve(&mut self) -> io::Result<()> {
        let greeting = Reply::owned(220, "2.0.0", format!("{} ESMTP coexist", self.cfg.hostname));
        self.conn.reply(&greeting);
        loop {
            // One deadline for the whole line, so a line trickled byte by byte times out too;
            // never later than the end of the session's time.
            let left = self.session_time_left();
            let wait = left.map_or(self.cfg.command_timeout, |l| {
                l.min(self.cfg.command_timeout)
            });
            let read = self.conn.read_line(self.cfg.max_line_length);
            let line = match tokio::time::timeout(wait, read).await {
                Ok(l) => l?,
                Err(_) if self.session_time_left() == Some(Duration::ZERO) => {
                    return self.session_time_exceeded().await;
                }
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "command deadline")),
            };
            if !matches!(line, Line::Eof) && self.session_time_left() == Some(Duration::ZERO) {
                return self.session_time_exceeded().await;
            }
            let next = match line {
                Line::Eof => return Ok(()),
                Line::TooLong => self.error(canned::LINE_TOO_LONG),
                Line::Text(text) => self.command(&text).await?,
            };
            if let Next::Close = next {
                self.conn.flush().await?;
                return Ok(());
            }
        }
    }

    /// Time left before `max_session_time` (zero once past it); `None` without a limit.
    fn session_time_left(&self) -> Option<Duration> {
        let max = self.cfg.max_session_time;
        (!max.is_zero()).then(|| max.saturating_sub(self.started.elapsed()))
    }

    /// Ends a session that has lasted `max_session_time`: `421 4.4.2`, then close. Called
    /// only between commands, so a transfer under way is never cut.
    async fn session_time_exceeded(&mut self) -> io::Result<()> {
        let r = Reply::owned(
            421,
            "4.4.2",
            format!("{} Error: session time limit exceeded", self.cfg.hostname),
        );
        self.conn.reply(&r);
        info!(
            limit = ?self.cfg.max_session_time,
            "session time limit exceeded, disconnecting"
        );
        self.conn.flush().await
    }

    /// Counts a junk command (one that can be repeated without end to hold a session
    /// open); `Some` is the reply that ends the session past `junk_command_limit`.
    fn junk_command(&mut self) -> Option<Reply> {
        self.junk = self.junk.saturating_add(1);
        let limit = self.cfg.junk_command_limit;
        if limit == 0 || self.junk <= limit {
            return None;
        }
        info!(limit, "too many junk commands, disconnecting");
        Some(Reply::owned(
            421,
            "4.7.0",
            format!("{} Error: too many junk commands", self.cfg.hostname),
        ))
    }

    /// Sends an error reply and counts it; closes after too many.
    fn error(&mut self, r: Reply) -> Next {
        self.conn.reply(&r);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            self.conn.reply(&canned::TOO_MANY_ERRORS);
            info!(errors = self.errors, "too many errors, disconnecting");
            return Next::Close;
        }
        Next::Continue
    }

    fn ok(&mut self, r: &Reply) -> Next {
        self.conn.reply(r);
        Next::Continue
    }

    async fn command(&mut self, line: &[u8]) -> io::Result<Next> {
        let utf8 = self.tx.as_ref().is_some_and(|t| t.params.smtputf8);
        let cmd = match command::parse(line, utf8) {
            Ok(c) => c,
            Err(r) => {
                // A BDAT line we cannot parse leaves its chunk unread: the stream is lost.
                if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") {
                    self.conn.reply(&r);
                    return Ok(Next::Close);
                }
                return Ok(self.error(r));
            }
        };
        if self.tx.as_ref().is_some_and(|t| t.chunks.is_some())
            && !matches!(
                cmd,
                Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop
            )
        {
            return Ok(self.error(Reply::new(
                503,
                "5.5.1",
                "Only BDAT, RSET, NOOP or QUIT during a BDAT transfer",
            )));
        }
        // NOOP, RSET, VRFY, HELP, EHLO and HELO move no mail (Postfix's junk commands).
        if matches!(
            cmd,
            Command::Noop
                | Command::Rset
                | Command::Vrfy
                | Command::Help
                | Command::Ehlo(_)
                | Command::Helo(_)
        ) {
            if let Some(r) = self.junk_command() {
                self.conn.reply(&r);
                return Ok(Next::Close);
            }
        }
        Ok(match cmd {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, dsn } => self.rcpt(to, dsn),
            Command::Data => self.data().await?,
            Command::Bdat { size, last } => self.bdat(size, last).await?,
            Command::Rset => {
                self.tx = None;
                self.ok(&canned::OK)
            }
            Command::Noop => self.ok(&canned::OK),
            Command::Quit => {
                self.conn.reply(&Reply::new(221, "2.0.0", "Bye"));
                Next::Close
            }
            Command::Help => self.ok(&Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS",
            )),
            Command::Vrfy => self.ok(&Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.error(Reply::new(502, "5.5.1", "EXPN not available")),
            Command::StartTls => self.starttls().await?,
        })
    }
}

/// The enhanced status code of `r` as a metrics label (empty when it has none).
fn status_label(r: &Reply) -> String {
    r.status.map(|s| s.to_string()).unwrap_or_default()
}
