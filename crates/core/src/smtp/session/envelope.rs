//! The envelope verbs: EHLO/HELO, MAIL and RCPT.
//!
//! They only change the session's state and queue a reply; none of them waits for I/O, so a
//! pipelined group of them is answered in one write. Policy is not decided here: MAIL and
//! RCPT ask the [`Handler`], and count what it refuses (errors against `max_errors`,
//! refused recipients against `max_rcpt_refusals`, which stops directory harvesting).

use super::{status_label, Handler, Next, Session, SessionStream, Transaction};
use crate::proto::reply::canned;
use crate::proto::{MailParams, RcptDsn, Reply};
use crate::types::{Address, QueueId};
use tracing::info;

impl<S: SessionStream, H: Handler> Session<S, H> {
    /// EHLO (`extended`) or HELO: records the client's name and lists our extensions.
    pub(super) fn ehlo(&mut self, name: String, extended: bool) -> Next {
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

    /// MAIL FROM: opens a transaction with a new queue id, if the handler agrees.
    pub(super) fn mail(&mut self, from: Option<Address>, params: MailParams) -> Next {
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
            info!(
                held = self.cfg.inflight.used(),
                "memory budget of messages in transfer spent: 452 4.3.1"
            );
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
        let id = QueueId::generate();
        tracing::Span::current().record("qid", tracing::field::display(&id));
        self.tx = Some(Transaction {
            id,
            from,
            params,
            rcpts: Vec::new(),
            rcpt_dsn: Vec::new(),
            chunks: None,
            chunk_error: None,
        });
        self.ok(&r)
    }

    /// RCPT TO: adds a recipient, if the handler agrees.
    pub(super) fn rcpt(&mut self, to: Address, dsn: RcptDsn) -> Next {
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
            .check_rcpt(&self.ctx, &self.peer, tx.from.as_ref(), &tx.params, &to)
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
            info!(
                refused = self.rcpt_refusals,
                "too many refused recipients, disconnecting"
            );
            return Next::Close;
        }
        Next::Continue
    }
}
