//! Who may send to whom: accepted domains and the relay restrictions (no open relay).

use crate::proto::reply::{canned, Reply};
use crate::types::{Address, Domain};
use std::collections::HashSet;

/// Recipient checks that do not depend on the directory.
#[derive(Debug, Clone)]
pub struct Policy {
    accepted: HashSet<String>,
}

impl Policy {
    /// A policy accepting exactly these domains (no subdomains).
    pub fn new(domains: &[Domain]) -> Policy {
        Policy {
            accepted: domains.iter().map(|d| d.as_str().to_string()).collect(),
        }
    }

    /// Refuses relaying: the domain must be ours, and the local part must not carry
    /// sender-specified routing (`%`, `!`, or `@` inside quotes) that a next hop might
    /// act on (Postfix's `allow_untrusted_routing = no`).
    pub fn check_recipient(&self, to: &Address) -> Result<(), Reply> {
        if to.domain().is_literal() || !self.accepted.contains(to.domain().as_str()) {
            return Err(canned::RELAY_DENIED);
        }
        if to.local().contains(['%', '!', '@']) {
            return Err(Reply::new(
                550,
                "5.7.1",
                "Relay access denied: sender-specified routing (% ! @) in the local part",
            ));
        }
        Ok(())
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, a dual-stack listener's view of an IPv4
/// client) as the IPv4 address it is; any other address as it is.
pub fn plain_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// True when `ip` is in one of `networks`.
pub fn is_trusted(networks: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = plain_ip(ip);
    networks.iter().any(|n| n.contains(&ip))
}

/// The end (after its LF) of the header line starting at `pos`, or `None` at the end of the
/// header section (the empty line, or the end of the message). The scans below are streaming
/// scans built on it: nothing is allocated per line, so a header section of millions of
/// tiny fields costs no memory (mailparse would allocate per field).
fn header_line_end(message: &[u8], pos: usize) -> Option<usize> {
    let rest = message.get(pos..).filter(|r| !r.is_empty())?;
    let end = memchr::memchr(b'\n', rest).map_or(message.len(), |i| pos + i + 1);
    let line = &message[pos..end];
    (line != b"\r\n" && line != b"\n").then_some(end)
}

/// The field name of a header line that starts a field (`None` for continuation lines and
/// lines without a colon). Obsolete syntax allows blanks before the colon (RFC 5322 4.5.3).
fn field_name(line: &[u8]) -> Option<&[u8]> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return None;
    }
    let colon = memchr::memchr(b':', line)?;
    let name = &line[..colon];
    let end = name
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    (end > 0).then_some(&name[..end])
}

/// Removes, in place, header fields whose names start with one of `prefixes`
/// (case-insensitive) from the header section, continuation lines included. Every other
/// byte is kept as it was (DESIGN invariant 6), and the message is not copied: kept lines
/// move down over removed ones. Returns the number of fields removed.
pub fn strip_headers(message: &mut Vec<u8>, prefixes: &[String]) -> usize {
    if prefixes.is_empty() {
        return 0;
    }
    let (mut read, mut write) = (0, 0);
    let mut dropping = false;
    let mut removed = 0;
    while let Some(end) = header_line_end(message, read) {
        let line = &message[read..end];
        if let Some(name) = field_name(line) {
            dropping = prefixes.iter().any(|p| {
                name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            });
            removed += usize::from(dropping);
        } else if !matches!(line.first(), Some(b' ' | b'\t')) {
            dropping = false;
        }
        if !dropping {
            if write != read {
                message.copy_within(read..end, write);
            }
            write += end - read;
        }
        read = end;
    }
    if write != read {
        let len = message.len();
        message.copy_within(read..len, write);
        message.truncate(write + len - read);
    }
    removed
}

/// Number of `Received:` headers in a message's header section (the hop count).
pub fn count_hops(message: &[u8]) -> usize {
    let (mut pos, mut hops) = (0, 0);
    while let Some(end) = header_line_end(message, pos) {
        hops += usize::from(
            field_name(&message[pos..end]).is_some_and(|n| n.eq_ignore_ascii_case(b"received")),
        );
        pos = end;
    }
    hops
}

/// True when a `Received:` header other than the first (ours, just written) says the
/// message was received `by HOSTNAME` (case-insensitive): it has passed through this relay
/// (or a fleet node with the same name) before. Part of the loop guard.
pub fn passed_through(message: &[u8], hostname: &str) -> bool {
    let host = hostname.as_bytes();
    let (mut pos, mut received) = (0, 0usize);
    // Inside a Received field (its continuation lines too).
    let mut inside = false;
    while let Some(end) = header_line_end(message, pos) {
        let line = &message[pos..end];
        match field_name(line) {
            Some(n) => {
                inside = n.eq_ignore_ascii_case(b"received");
                received += usize::from(inside);
            }
            None if matches!(line.first(), Some(b' ' | b'\t')) => {}
            None => inside = false,
        }
        if inside && received > 1 && says_by(line, host) {
            return true;
        }
        pos = end;
    }
    false
}

/// True when `line` holds the word `by` followed by `host` (then a blank, `;`, `(` or the
/// end of the line).
fn says_by(line: &[u8], host: &[u8]) -> bool {
    let words: Vec<&[u8]> = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).any(|w| {
        w[0].eq_ignore_ascii_case(b"by") && {
            let name = w[1]
                .split(|&b| b == b';' || b == b'(')
                .next()
                .unwrap_or_default();
            name.eq_ignore_ascii_case(host)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_through_reads_received_headers_after_ours() {
        let ours = b"Received: from a ([127.0.0.1])\r\n\tby mx.nhs.test (coexist) with ESMTP id X; date\r\n";
        let back = [
            &ours[..],
            b"Received: from onprem ([10.0.0.5])\r\n\tby exch01.nhs.test with ESMTP; d\r\n",
            b"Received: from x ([127.0.0.1])\r\n by MX.nhs.test (coexist) with ESMTP id Y; d\r\n",
            b"Subject: hi\r\n\r\nbody by mx.nhs.test\r\n",
        ]
        .concat();
        assert!(passed_through(&back, "mx.nhs.test"));
        // Only our fresh header, a look-alike name, or the name in the body: not.
        let fresh = [
            &ours[..],
            b"Subject: by mx.nhs.test\r\n\r\nby mx.nhs.test\r\n",
        ]
        .concat();
        assert!(!passed_through(&fresh, "mx.nhs.test"));
        let other = [
            &ours[..],
            b"Received: from x by mx.nhs.test.evil with ESMTP; d\r\n\r\n",
        ]
        .concat();
        assert!(!passed_through(&other, "mx.nhs.test"));
    }

    fn policy() -> Policy {
        Policy::new(&[Domain::parse("nhs.test", false).unwrap()])
    }

    fn check(s: &str) -> Result<(), Reply> {
        policy().check_recipient(&Address::parse(s, true).unwrap())
    }

    #[test]
    fn accepts_own_domain_only() {
        assert!(check("a@NHS.test").is_ok());
        for bad in [
            "a@evil.test",
            "a@sub.nhs.test",
            "a@nhs.test.evil",
            "a%evil.test@nhs.test",
            "evil.test!a@nhs.test",
            "\"a@evil.test\"@nhs.test",
            "a@[127.0.0.1]",
            "a@nhѕ.test",
        ] {
            let r = check(bad).unwrap_err();
            assert_eq!(
                (r.code, r.status.map(|s| s.to_string())),
                (550, Some("5.7.1".into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn strips_forged_internal_headers_and_keeps_the_rest() {
        let p = vec!["X-MS-Exchange-Organization-".to_string()];
        let m = b"Received: x\r\nx-ms-exchange-organization-AuthAs: Internal\r\n\tcontinued\r\nSubject: hi\r\nX-MS-Exchange-Organization-SCL: -1\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n";
        let mut out = m.to_vec();
        assert_eq!(strip_headers(&mut out, &p), 2);
        assert_eq!(
            out,
            b"Received: x\r\nSubject: hi\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n"
        );
        let mut kept = b"Subject: x\r\n\r\nbody".to_vec();
        assert_eq!(strip_headers(&mut kept, &p), 0);
        assert_eq!(kept, b"Subject: x\r\n\r\nbody");
    }

    #[test]
    fn trusted_networks_match_mapped_addresses() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(&nets, "10.1.2.3".parse().unwrap()));
        assert!(is_trusted(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!is_trusted(&nets, "11.1.2.3".parse().unwrap()));
    }

    #[test]
    fn counts_received_headers() {
        let m = b"Received: a\r\nReceived: b\r\n\tfolded\r\nReceived : c\r\nX-Received: d\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_hops(m), 3);
    }
}
