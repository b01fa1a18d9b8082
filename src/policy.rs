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
    fn counts_received_headers() {
        let m = b"Received: a\r\nReceived: b\r\n\tfolded\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_hops(m), 2);
    }
}
