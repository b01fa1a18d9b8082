//! Who may send to whom: accepted domains and the relay restrictions (no open relay).

use crate::smtp::reply::{canned, Reply};
use crate::types::{Address, Domain};
use mailparse::MailHeaderMap;
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

/// True when `ip` is in one of `networks`.
pub fn is_trusted(networks: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// Removes header fields whose names start with one of `prefixes` (case-insensitive) from the
/// header section, continuation lines included. Every other byte is kept as it was (DESIGN
/// invariant 6). Returns `None` when nothing matched, else the new message and the count.
pub fn strip_headers(message: &[u8], prefixes: &[String]) -> Option<(Vec<u8>, usize)> {
    if prefixes.is_empty() {
        return None;
    }
    let mut out: Option<Vec<u8>> = None;
    let mut removed = 0;
    let mut pos = 0;
    let mut dropping = false;
    while pos < message.len() {
        let end = memchr::memchr(b'\n', &message[pos..])
            .map(|i| pos + i + 1)
            .unwrap_or(message.len());
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break; // end of the header section
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
            let name = &line[..name_end];
            dropping = name_end > 0
                && prefixes.iter().any(|p| {
                    name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                });
            if dropping {
                removed += 1;
                if out.is_none() {
                    out = Some(message[..pos].to_vec());
                }
            }
        }
        if !dropping {
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(line);
            }
        }
        pos = end;
    }
    let mut out = out?;
    out.extend_from_slice(&message[pos..]);
    Some((out, removed))
}

/// Number of `Received:` headers in a message's header section (the hop count).
pub fn count_hops(message: &[u8]) -> usize {
    match mailparse::parse_headers(message) {
        Ok((headers, _)) => headers.get_all_headers("Received").len(),
        // Malformed headers are passed on unchanged (transparency); count by hand then.
        Err(_) => message
            .split(|&b| b == b'\n')
            .take_while(|l| !l.is_empty() && *l != b"\r")
            .filter(|l| l.len() >= 9 && l[..9].eq_ignore_ascii_case(b"received:"))
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!((r.code, r.status), (550, "5.7.1"), "{bad}");
        }
    }

    #[test]
    fn strips_forged_internal_headers_and_keeps_the_rest() {
        let p = vec!["X-MS-Exchange-Organization-".to_string()];
        let m = b"Received: x\r\nx-ms-exchange-organization-AuthAs: Internal\r\n\tcontinued\r\nSubject: hi\r\nX-MS-Exchange-Organization-SCL: -1\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n";
        let (out, n) = strip_headers(m, &p).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            b"Received: x\r\nSubject: hi\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n"
        );
        assert!(strip_headers(b"Subject: x\r\n\r\nbody", &p).is_none());
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
        let m = b"Received: a\r\nReceived: b\r\n\tfolded\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_hops(m), 2);
    }
}
