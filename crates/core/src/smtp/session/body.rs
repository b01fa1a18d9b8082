//! The message body: DATA and BDAT, and the end of a transaction.
//!
//! Both readers feed the bytes the connection already holds into a
//! [`MessageBuf`](crate::smtp::data::MessageBuf) that starts with our Received header and
//! charges the shared memory budget. Each transfer has one deadline for the whole of it (a
//! client trickling a byte at a time is cut off). A BDAT chunk is always read to its end,
//! even when the transaction is refused (RFC 3030 2), or the stream would lose its framing.
//! At the end the body is checked (size, budget, bare CR/LF, hop count) and handed to the
//! [`Handler`], whose reply goes to the client as it is: 250 only once the message is
//! durable.

use super::conn::BODY_ROOM;
use super::{status_label, Handler, Incoming, Next, Session, SessionStream, Transaction};
use crate::proto::reply::canned;
use crate::proto::Reply;
use crate::smtp::budget::Charge;
use crate::smtp::data::{BodyFlags, ChunkCollector, DataReader, MessageBuf};
use std::io;

impl<S: SessionStream, H: Handler> Session<S, H> {
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
                super::received::received_header(&self.cfg.hostname, &self.peer, &tx.id, tx)
            }
            _ => String::new(),
        };
        let charge = Charge::new(self.cfg.inflight.clone());
        MessageBuf::new(received.as_bytes(), limit, Some(charge))
    }

    /// DATA: reads a dot-terminated body and ends the transaction.
    pub(super) async fn data(&mut self) -> io::Result<Next> {
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
                if conn.fill(BODY_ROOM).await? == 0 {
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

    /// BDAT: reads one chunk of `size` octets; the `last` one ends the transaction.
    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> io::Result<Next> {
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
                if conn.buffered().is_empty() && conn.fill(BODY_ROOM).await? == 0 {
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
            // Mail moved: the junk count starts over (as Postfix's does).
            self.junk = 0;
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
        if let Err(r) = crate::policy::message::hops(buf.message(), self.cfg.max_hops) {
            return r;
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
}

/// The refusal a message's anomalies call for, if any.
fn body_reply(f: &BodyFlags) -> Option<Reply> {
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
