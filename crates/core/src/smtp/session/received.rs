//! Our `Received:` header (RFC 5321 4.4).
//!
//! It is written before the message arrives, into the start of the message buffer, so the
//! accepted bytes are never copied to prepend it (DESIGN.md invariants 6 and 8). It names
//! the client's HELO and address, the protocol (ESMTP, ESMTPS, UTF8SMTP…), the queue id a
//! reader greps for, the TLS summary and, for a single recipient, the recipient.

use super::{Peer, Transaction};
use crate::types::QueueId;

/// Builds our `Received:` header (RFC 5321 4.4), folded, ending in CRLF.
pub(super) fn received_header(
    hostname: &str,
    peer: &Peer,
    id: &QueueId,
    tx: &Transaction,
) -> String {
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
    h.push_str(&format!("; {}\r\n", crate::clock::now_utc().to_rfc2822()));
    h
}
