//! One SMTP client session with a next hop: connect, greeting, EHLO and STARTTLS by the
//! route's TLS policy, then transactions on it until QUIT.

use super::*;

enum Client {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

/// An open SMTP client session, ready for transactions.
pub struct Connection {
    client: Client,
    caps: u32,
    addr: SocketAddr,
    timeout: Duration,
    /// In its initial state: fresh, after an answered `RSET`, or after a transaction whose
    /// message the next hop took. Otherwise it needs an `RSET` before it is reused.
    clean: bool,
}

/// What an idle session's socket shows (see [`Connection::look`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Looks {
    /// Nothing to read (as far as a peek at the socket shows).
    Quiet,
    /// The next hop closed or reset it.
    Closed,
    /// Bytes came unasked (a `421` before closing, or TLS records).
    Unread,
}

/// How long [`Connection::open_timed`] took: to connect, and then to the end of greeting,
/// EHLO and STARTTLS (the load tool reports the two).
#[derive(Debug, Clone, Copy)]
pub struct OpenTimes {
    /// Time to connect.
    pub connect: Duration,
    /// Time from connected to the end of greeting, EHLO and STARTTLS.
    pub ehlo: Duration,
}

impl Connection {
    /// Connects, reads the greeting, says EHLO and applies the TLS policy.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        helo: &str,
        tls: &RouteTls,
        timeout: Duration,
    ) -> Result<Connection, HopError> {
        Self::open_timed(addr, host, helo, tls, timeout)
            .await
            .map(|(c, _)| c)
    }

    /// [`Connection::open`], also returning how long connecting and the greeting, EHLO and
    /// STARTTLS took.
    pub async fn open_timed(
        addr: SocketAddr,
        host: &str,
        helo: &str,
        tls: &RouteTls,
        timeout: Duration,
    ) -> Result<(Connection, OpenTimes), HopError> {
        let t0 = std::time::Instant::now();
        let mut c = SmtpClient::connect(addr, timeout)
            .await
            .map_err(|e| HopError::Connect(addr, e.to_string()))?;
        let connected = t0.elapsed();
        // Commands and data are batched into whole writes here, so Nagle only adds delay.
        let _ = c.stream.set_nodelay(true);
        // Read by our parser, as in the transaction: a `421 4.7.500` greeting keeps its code.
        let greeting = match transaction::read_n(&mut c, 1, timeout).await {
            Ok(mut r) => r.remove(0),
            Err(TxError::ReplyTimeout) => {
                return Err(HopError::Refused(addr, "greeting timeout".into()))
            }
            Err(e) => return Err(HopError::Refused(addr, e.to_string())),
        };
        if greeting.code != 220 {
            return Err(HopError::Refused(addr, greeting.to_string()));
        }
        let ehlo = c.ehlo(helo).await.map_err(|e| {
            // A refused EHLO as the reply it was (`421 4.3.2 …`), so throttling is seen.
            let why = match e {
                mail_send::Error::UnexpectedReply(r) => Reply::from(r).to_string(),
                e => e.to_string(),
            };
            HopError::Refused(addr, why)
        })?;
        let offers_tls = ehlo.has_capability(EXT_START_TLS);
        let want_tls = match tls.policy {
            TlsPolicy::None => false,
            // `mta-sts` and `dane` are resolved per next hop (see `resolve`); unresolved
            // (the load tool), they are opportunistic.
            TlsPolicy::Opportunistic | TlsPolicy::MtaSts | TlsPolicy::Dane => offers_tls,
            TlsPolicy::Required | TlsPolicy::Verify if !offers_tls => {
                return Err(HopError::TlsUnavailable(addr, tls.requirer()))
            }
            TlsPolicy::Required | TlsPolicy::Verify => true,
        };
        let ready = |client, caps| {
            let times = OpenTimes {
                connect: connected,
                ehlo: t0.elapsed() - connected,
            };
            let c = Connection {
                client,
                caps,
                addr,
                timeout,
                clean: true,
            };
            (c, times)
        };
        if !want_tls {
            tls.report_clear_text(addr);
            return Ok(ready(Client::Plain(c), ehlo.capabilities()));
        }
        let name = tls.server_name(host);
        let started = c.start_tls(&tls.connector, &name).await;
        let result = if started.is_ok() { "ok" } else { "failed" };
        metrics::counter!(crate::metrics::TLS_HANDSHAKES, "side" => "outbound", "result" => result)
            .increment(1);
        let mut t = started.map_err(|e| HopError::Tls(addr, tls.explain(e.to_string())))?;
        let ehlo = t
            .ehlo(helo)
            .await
            .map_err(|e| HopError::Refused(addr, e.to_string()))?;
        Ok(ready(Client::Tls(Box::new(t)), ehlo.capabilities()))
    }

    /// Stops using extensions the server offers: PIPELINING and/or CHUNKING (load tests).
    pub fn limit_extensions(&mut self, pipelining: bool, chunking: bool) {
        if !pipelining {
            self.caps &= !EXT_PIPELINING;
        }
        if !chunking {
            self.caps &= !EXT_CHUNKING;
        }
    }

    /// True when the session is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.client, Client::Tls(_))
    }

    /// The next hop's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs one transaction; returns one outcome per recipient, in order. Recipients the
    /// next hop refused as too many for one transaction are deferred here; [`deliver`] sends
    /// them in further transactions instead.
    pub async fn send(&mut self, out: &Outbound<'_>) -> Result<Vec<RcptOutcome>, HopError> {
        self.send_phased(out, false).await.map(|(o, _)| o)
    }

    /// [`Connection::send`] for the load tool: with `split`, waits for the MAIL/RCPT replies
    /// before sending the body (delivery pipelines the whole transaction), and returns also
    /// the time from MAIL to its RCPT replies, when measured.
    pub async fn send_phased(
        &mut self,
        out: &Outbound<'_>,
        split: bool,
    ) -> Result<(Vec<RcptOutcome>, Option<Duration>), HopError> {
        let (rcpts, mail_rcpt) = self.transaction(out, split).await?;
        Ok((rcpts.into_iter().map(|r| r.outcome).collect(), mail_rcpt))
    }

    pub(super) async fn transaction(
        &mut self,
        out: &Outbound<'_>,
        split: bool,
    ) -> Result<(Vec<TxRcpt>, Option<Duration>), HopError> {
        let (caps, timeout, addr) = (self.caps, self.timeout, self.addr);
        let (mut mail_rcpt, mut taken) = (None, false);
        let marks = (&mut mail_rcpt, &mut taken);
        let res = match &mut self.client {
            Client::Plain(c) => transaction(c, caps, timeout, out, split, marks).await,
            Client::Tls(c) => transaction(c.as_mut(), caps, timeout, out, split, marks).await,
        };
        self.clean = taken;
        res.map(|r| (r, mail_rcpt))
            .map_err(|e| HopError::Lost(addr, e))
    }

    /// True when the session is in its initial state (see [`Looks`] for the other check a
    /// reuse without `RSET` needs).
    pub fn is_clean(&self) -> bool {
        self.clean
    }

    /// What the socket of this idle session shows now, without waiting (one `recv` with
    /// `MSG_PEEK` at most). Best effort: bytes already read into the TLS layer are not seen,
    /// and an end that has just arrived may not be yet; a reuse that meets one is caught by
    /// [`TxError::Closed`] instead.
    pub fn look(&self) -> Looks {
        use futures_util::FutureExt;
        let tcp = match &self.client {
            Client::Plain(c) => &c.stream,
            Client::Tls(c) => c.stream.get_ref().0,
        };
        let mut byte = [0u8; 1];
        match tcp.peek(&mut byte).now_or_never() {
            None => Looks::Quiet,
            Some(Ok(0) | Err(_)) => Looks::Closed,
            Some(Ok(_)) => Looks::Unread,
        }
    }

    /// Sends RSET; true when the connection is still usable (and then clean).
    pub async fn reset(&mut self) -> bool {
        let ok = match &mut self.client {
            Client::Plain(c) => c.rset().await.is_ok(),
            Client::Tls(c) => c.rset().await.is_ok(),
        };
        self.clean = ok;
        ok
    }

    /// Says QUIT and closes.
    pub async fn quit(self) {
        let _ = match self.client {
            Client::Plain(c) => c.quit().await,
            Client::Tls(c) => (*c).quit().await,
        };
    }
}
