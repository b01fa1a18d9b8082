//! The ESMTP session state machine: greeting, EHLO, STARTTLS, MAIL/RCPT, DATA/BDAT, limits.
//!
//! What to do with recipients and finished messages is decided by a [`Handler`]: the relay's
//! handler checks policy and spools; the test sink's handler records.

use super::budget::{Charge, InflightBudget};
use super::command::{self, Command};
use super::data::{ChunkCollector, DataReader, MessageBuf};
use super::tls::MaybeTls;
use crate::proto::reply::canned;
use crate::proto::{MailParams, RcptDsn, Reply};
use crate::types::{Address, QueueId};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

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
    /// Decides on a recipient at RCPT time (`Ok` means 250).
    fn check_rcpt(
        &self,
        ctx: &Self::Context,
        peer: &Peer,
        from: Option<&Address>,
        to: &Address,
    ) -> Result<(), Reply>;
    /// Takes a finished message; the reply goes to the client as is (250 only once durable).
    fn accept(&self, ctx: &Self::Context, msg: Incoming) -> impl Future<Output = Reply> + Send;
}

struct Transaction {
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

/// Outcome of reading a command line.
enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// Buffered connection with reply batching: replies are queued and written when the
/// session needs more input (RFC 2920), so pipelined commands get their replies together.
struct Conn {
    stream: MaybeTls,
    inbuf: Vec<u8>,
    start: usize,
    out: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    fn buffered(&self) -> &[u8] {
        &self.inbuf[self.start..]
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let res = tokio::time::timeout(self.timeout, async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        })
        .await;
        self.out = out;
        self.out.clear();
        match res {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout")),
        }
    }

    /// Flushes replies, then reads more input. `Ok(0)` is end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.start > 0 && self.start == self.inbuf.len() {
            self.inbuf.clear();
            self.start = 0;
        } else if self.start > 32 * 1024 {
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        let len = self.inbuf.len();
        // Read into what capacity there is, at least 4 KiB: an idle session holds a small
        // buffer, a session in a large DATA keeps the larger one it grew.
        let room = (self.inbuf.capacity() - len).max(4096);
        self.inbuf.resize(len + room, 0);
        let res =
            tokio::time::timeout(self.timeout, self.stream.read(&mut self.inbuf[len..])).await;
        match res {
            Ok(Ok(n)) => {
                self.inbuf.truncate(len + n);
                Ok(n)
            }
            Ok(Err(e)) => {
                self.inbuf.truncate(len);
                Err(e)
            }
            Err(_) => {
                self.inbuf.truncate(len);
                Err(io::Error::new(io::ErrorKind::TimedOut, "read timeout"))
            }
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    /// Reads one command line (without CR LF); over-long lines are read to their end and
    /// reported once.
    async fn read_line(&mut self, max: usize) -> io::Result<Line> {
        let mut discarding = false;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', self.buffered()) {
                let end = self.start + pos;
                let mut line_end = end;
                if line_end > self.start && self.inbuf[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
                let too_long = discarding || end + 1 - self.start > max;
                let line = self.inbuf[self.start..line_end].to_vec();
                self.start = end + 1;
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Text(line)
                });
            }
            if self.buffered().len() > max {
                discarding = true;
                self.start = self.inbuf.len();
            }
            if self.fill().await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }
}

/// Runs one SMTP session to its end. Errors end the session; nothing here panics on input.
pub async fn run<H: Handler>(
    stream: TcpStream,
    peer_addr: SocketAddr,
    cfg: Arc<SessionConfig>,
    handler: Arc<H>,
) {
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        conn: Conn {
            stream: MaybeTls::Plain(stream),
            inbuf: Vec::new(),
            start: 0,
            out: Vec::new(),
            timeout: cfg.command_timeout,
        },
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
    };
    match s.serve().await {
        Ok(()) => debug!(peer = %peer_addr, "session closed"),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            s.conn.out.clear();
            s.conn.reply(&canned::TIMEOUT);
            let _ = s.conn.flush().await;
            info!(peer = %peer_addr, "session timed out");
        }
        Err(e) => debug!(peer = %peer_addr, error = %e, "session ended"),
    }
    let _ = s.conn.stream.shutdown().await;
}

struct Session<H: Handler> {
    conn: Conn,
    cfg: Arc<SessionConfig>,
    ctx: H::Context,
    handler: Arc<H>,
    peer: Peer,
    tx: Option<Transaction>,
    errors: u32,
    rcpt_refusals: u32,
}

/// Whether the session goes on after a command.
enum Next {
    Continue,
    Close,
}

impl<H: Handler> Session<H> {
    async fn serve(&mut self) -> io::Result<()> {
        let greeting = Reply::owned(220, "2.0.0", format!("{} ESMTP coexist", self.cfg.hostname));
        self.conn.reply(&greeting);
        loop {
            // One deadline for the whole line, so a line trickled byte by byte times out too.
            let read = self.conn.read_line(self.cfg.max_line_length);
            let line = match tokio::time::timeout(self.cfg.command_timeout, read).await {
                Ok(l) => l?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "command deadline")),
            };
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

    /// Sends an error reply and counts it; closes after too many.
    fn error(&mut self, r: Reply) -> Next {
        self.conn.reply(&r);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            self.conn.reply(&canned::TOO_MANY_ERRORS);
            info!(peer = %self.peer.addr, errors = self.errors, "too many errors, disconnecting");
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

    fn ehlo(&mut self, name: String, extended: bool) -> Next {
        // The name goes into our Received header: keep it printable ASCII.
        self.peer.helo = name
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .take(255)
            .collect();
        self.tx = None;
        let host = &self.cfg.hostname;
        if !extended {
            let r = Reply::owned(250, "2.0.0", host.clone());
            return self.ok(&r);
        }
        let mut lines = vec![format!(
            "{host} Hello {} [{}]",
            self.peer.helo,
            self.peer.addr.ip()
        )];
        if self.cfg.pipelining {
            lines.push("PIPELINING".into());
        }
        lines.push(format!("SIZE {}", self.cfg.max_message_size));
        lines.push("8BITMIME".into());
        lines.push("SMTPUTF8".into());
        lines.push("ENHANCEDSTATUSCODES".into());
        lines.push("DSN".into());
        if self.cfg.tls.is_some() && self.peer.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.cfg.chunking {
            lines.push("CHUNKING".into());
        }
        // EHLO replies carry no enhanced status codes (RFC 2034 3).
        self.ok(&Reply::multiline(250, None, lines))
    }

    fn mail(&mut self, from: Option<Address>, params: MailParams) -> Next {
        if self.peer.helo.is_empty() {
            return self.error(Reply::new(503, "5.5.1", "Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return self.error(canned::TOO_BIG);
        }
        if self.cfg.inflight.exhausted() {
            // The server's condition, not the client's error: not counted against it.
            info!(peer = %self.peer.addr, held = self.cfg.inflight.used(), "memory budget of messages in transfer spent: 452 4.3.1");
            return self.ok(&canned::INFLIGHT_FULL);
        }
        if let Err(r) = self
            .handler
            .check_mail(&self.ctx, &self.peer, from.as_ref(), &params)
        {
            return self.error(r);
        }
        let r = Reply::owned(
            250,
            "2.1.0",
            format!(
                "Sender <{}> ok",
                from.as_ref().map(|a| a.to_string()).unwrap_or_default()
            ),
        );
        self.tx = Some(Transaction {
            id: QueueId::generate(),
            from,
            params,
            rcpts: Vec::new(),
            rcpt_dsn: Vec::new(),
            chunks: None,
            chunk_error: None,
        });
        self.ok(&r)
    }

    fn rcpt(&mut self, to: Address, dsn: RcptDsn) -> Next {
        let Some(tx) = self.tx.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if tx.rcpts.len() >= self.cfg.max_recipients {
            // Not a refusal of the address (the client sends the rest in another
            // transaction, RFC 5321 3.3): counted neither as an error nor as a refusal.
            return self.ok(&Reply::new(452, "4.5.3", "Too many recipients"));
        }
        match self
            .handler
            .check_rcpt(&self.ctx, &self.peer, tx.from.as_ref(), &to)
        {
            Ok(()) => {
                let r = Reply::owned(250, "2.1.5", format!("Recipient <{to}> ok"));
                tx.rcpts.push(to);
                tx.rcpt_dsn.push(dsn);
                self.ok(&r)
            }
            Err(r) => {
                metrics::counter!(crate::metrics::RCPT_REJECTED, "status" => status_label(&r))
                    .increment(1);
                self.rcpt_refused(r)
            }
        }
    }

    /// Sends a recipient refusal and counts it against `max_rcpt_refusals` (not
    /// `max_errors`); closes after too many, which stops directory harvesting.
    fn rcpt_refused(&mut self, r: Reply) -> Next {
        self.conn.reply(&r);
        self.rcpt_refusals += 1;
        if self.rcpt_refusals >= self.cfg.max_rcpt_refusals {
            self.conn.reply(&canned::TOO_MANY_REFUSALS);
            info!(peer = %self.peer.addr, refused = self.rcpt_refusals, "too many refused recipients, disconnecting");
            return Next::Close;
        }
        Next::Continue
    }

    /// Checks that a message body may start now; `Err` carries the reply.
    fn body_allowed(&self) -> Result<(), Reply> {
        match &self.tx {
            None => Err(Reply::new(503, "5.5.1", "Need MAIL and RCPT first")),
            Some(tx) if tx.rcpts.is_empty() => Err(canned::NO_VALID_RECIPIENTS),
            Some(_) => Ok(()),
        }
    }

    /// A buffer for the message of the current transaction: our Received header first (so
    /// the message is never copied to prepend it), the size limit, the memory budget.
    fn message_buf(&self) -> MessageBuf {
        let limit = usize::try_from(self.cfg.max_message_size).unwrap_or(usize::MAX);
        let received = match &self.tx {
            Some(tx) if self.cfg.add_received => {
                received_header(&self.cfg.hostname, &self.peer, &tx.id, tx)
            }
            _ => String::new(),
        };
        let charge = Charge::new(self.cfg.inflight.clone());
        MessageBuf::new(received.as_bytes(), limit, Some(charge))
    }

    async fn data(&mut self) -> io::Result<Next> {
        if let Err(r) = self.body_allowed() {
            return Ok(self.error(r));
        }
        self.conn
            .reply(&Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"));
        let mut reader = DataReader::with_buf(self.message_buf());
        // The whole transfer has a deadline, not only each read: a client trickling one
        // byte per read (slowloris) is cut off after `data_timeout`.
        let conn = &mut self.conn;
        let transfer = async {
            loop {
                let (used, done) = reader.feed(conn.buffered());
                conn.start += used;
                if done {
                    return Ok(());
                }
                if conn.fill().await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in DATA"));
                }
            }
        };
        match tokio::time::timeout(self.cfg.data_timeout, transfer).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "DATA deadline")),
        }
        let tx = self.tx.take();
        Ok(self.finish(tx, reader.finish()).await)
    }

    async fn bdat(&mut self, size: u64, last: bool) -> io::Result<Next> {
        // The chunk is always read, even when the transaction is refused (RFC 3030 2).
        let early = self.body_allowed().err();
        if early.is_none() && self.tx.as_ref().is_some_and(|t| t.chunks.is_none()) {
            let buf = self.message_buf();
            if let Some(tx) = self.tx.as_mut() {
                tx.chunks = Some(ChunkCollector::with_buf(buf));
            }
        }
        let (conn, tx) = (&mut self.conn, &mut self.tx);
        let keep = early.is_none();
        let transfer = async {
            let mut remaining = size;
            while remaining > 0 {
                if conn.buffered().is_empty() && conn.fill().await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in BDAT"));
                }
                let avail = conn.buffered();
                let take = avail
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                if keep {
                    if let Some(c) = tx.as_mut().and_then(|t| t.chunks.as_mut()) {
                        c.push(&avail[..take]);
                    }
                }
                conn.start += take;
                remaining -= take as u64;
            }
            Ok(())
        };
        // Same deadline per chunk as for a whole DATA transfer.
        match tokio::time::timeout(self.cfg.data_timeout, transfer).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "BDAT deadline")),
        }
        if let Some(r) = early {
            return Ok(self.error(r));
        }
        let Some(tx) = self.tx.as_mut() else {
            return Ok(self.error(canned::BAD_SEQUENCE));
        };
        if tx.chunk_error.is_none() {
            tx.chunk_error = tx.chunks.as_ref().and_then(|c| {
                let f = c.flags();
                (f.too_big || f.over_budget)
                    .then(|| body_reply(f))
                    .flatten()
            });
        }
        if !last {
            if let Some(r) = tx.chunk_error.clone() {
                // The server's own condition (memory budget) is not the client's error.
                if r == canned::INFLIGHT_FULL {
                    return Ok(self.ok(&r));
                }
                return Ok(self.error(r));
            }
            let r = Reply::owned(250, "2.0.0", format!("{size} octets received"));
            return Ok(self.ok(&r));
        }
        let mut tx = self.tx.take();
        let buf = match tx.as_mut().and_then(|t| t.chunks.take()) {
            Some(c) => c.finish(),
            None => self.message_buf(),
        };
        Ok(self.finish(tx, buf).await)
    }

    /// Ends a transaction: checks the body and hands it over.
    async fn finish(&mut self, tx: Option<Transaction>, buf: MessageBuf) -> Next {
        let Some(tx) = tx else {
            return self.error(canned::BAD_SEQUENCE);
        };
        let size = buf.message().len() as u64;
        let reply = self.message_reply(tx, buf).await;
        let result = if reply.is_positive() {
            "accepted"
        } else {
            "rejected"
        };
        metrics::counter!(crate::metrics::MESSAGES, "result" => result, "status" => status_label(&reply))
            .increment(1);
        if reply.is_positive() {
            metrics::counter!(crate::metrics::MESSAGE_BYTES).increment(size);
            self.ok(&reply)
        } else if reply.code == 421 {
            // 421: the service is closing the channel (RFC 5321 3.8).
            self.conn.reply(&reply);
            Next::Close
        } else {
            self.error(reply)
        }
    }

    async fn message_reply(&mut self, tx: Transaction, buf: MessageBuf) -> Reply {
        if let Some(r) = body_reply(buf.flags()) {
            return r;
        }
        let hops = crate::policy::count_hops(buf.message());
        if hops > self.cfg.max_hops {
            return Reply::owned(
                554,
                "5.4.6",
                format!(
                    "Too many hops ({hops} Received headers, limit {}): mail loop?",
                    self.cfg.max_hops
                ),
            );
        }
        // The buffer's budget charge is held until the handler is done with the bytes.
        let (body, _, _charge) = buf.into_parts();
        self.handler
            .accept(
                &self.ctx,
                Incoming {
                    id: tx.id,
                    from: tx.from,
                    rcpts: tx.rcpts,
                    rcpt_dsn: tx.rcpt_dsn,
                    params: tx.params,
                    body,
                    peer: self.peer.clone(),
                },
            )
            .await
    }

    async fn starttls(&mut self) -> io::Result<Next> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            return Ok(self.error(Reply::new(502, "5.5.1", "STARTTLS not available")));
        };
        if self.peer.tls.is_some() {
            return Ok(self.error(Reply::new(503, "5.5.1", "TLS already active")));
        }
        self.conn
            .reply(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.conn.flush().await?;
        // Anything the client pipelined after STARTTLS was sent in clear text before the
        // handshake: it must not be read as if it came over TLS (CVE-2011-0411).
        let injected = self.conn.buffered().len();
        if injected > 0 {
            info!(peer = %self.peer.addr, bytes = injected, "discarded plaintext pipelined after STARTTLS");
        }
        self.conn.inbuf.clear();
        self.conn.start = 0;
        let plain = match std::mem::replace(&mut self.conn.stream, MaybeTls::Closed) {
            MaybeTls::Plain(s) => s,
            other => {
                self.conn.stream = other;
                return Ok(Next::Close);
            }
        };
        let handshake =
            tokio::time::timeout(self.cfg.command_timeout, acceptor.accept(plain)).await;
        match handshake {
            Ok(Ok(tls)) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "inbound", "result" => "ok").increment(1);
                self.conn.stream = MaybeTls::Tls(Box::new(tls));
                self.peer.tls = self.conn.stream.tls_summary();
                // RFC 3207 4.2: forget everything learnt before TLS.
                self.peer.helo.clear();
                self.tx = None;
                Ok(Next::Continue)
            }
            Ok(Err(e)) => {
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "inbound", "result" => "failed").increment(1);
                info!(peer = %self.peer.addr, error = %e, "TLS handshake failed");
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "TLS handshake failed",
                ))
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS handshake timeout",
            )),
        }
    }
}

/// The refusal a message's anomalies call for, if any.
fn body_reply(f: &super::data::BodyFlags) -> Option<Reply> {
    if f.too_big {
        Some(canned::TOO_BIG)
    } else if f.over_budget {
        Some(canned::INFLIGHT_FULL)
    } else if f.bare_lf {
        Some(Reply::new(
            550,
            "5.5.2",
            "Bare LF in message text is not accepted; end lines with CRLF (RFC 5321 2.3.8)",
        ))
    } else if f.bare_cr {
        Some(Reply::new(
            550,
            "5.5.2",
            "Bare CR in message text is not accepted; end lines with CRLF (RFC 5321 2.3.8)",
        ))
    } else {
        None
    }
}

/// The enhanced status code of `r` as a metrics label (empty when it has none).
fn status_label(r: &Reply) -> String {
    r.status.map(|s| s.to_string()).unwrap_or_default()
}

/// Builds our `Received:` header (RFC 5321 4.4), folded, ending in CRLF.
fn received_header(hostname: &str, peer: &Peer, id: &QueueId, tx: &Transaction) -> String {
    let utf8 = if tx.params.smtputf8 { "UTF8" } else { "" };
    let proto = match (&peer.tls, utf8) {
        (Some(_), "") => "ESMTPS".to_string(),
        (None, "") => "ESMTP".to_string(),
        (Some(_), u) => format!("{u}SMTPS"),
        (None, u) => format!("{u}SMTP"),
    };
    let mut h = format!(
        "Received: from {} ([{}])\r\n\tby {} (coexist) with {} id {}",
        peer.helo,
        peer.addr.ip(),
        hostname,
        proto,
        id
    );
    if let Some(tls) = &peer.tls {
        h.push_str(&format!("\r\n\t(using {tls})"));
    }
    if tx.rcpts.len() == 1 {
        h.push_str(&format!("\r\n\tfor <{}>", tx.rcpts[0]));
    }
    h.push_str(&format!("; {}\r\n", chrono::Utc::now().to_rfc2822()));
    h
}
