//! Small value types shared by every module: mail addresses, domains, queue ids and route names.
//!
//! The mailbox parser is written by hand: the SMTP command crates parse the whole command
//! line but accept source routes and `%`/`!` tricks silently, and a relay must see exactly
//! what the client sent to refuse it with a precise reply.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest local part allowed (RFC 5321 4.5.3.1.1).
const MAX_LOCAL: usize = 64;
/// Longest domain allowed (RFC 5321 4.5.3.1.2).
const MAX_DOMAIN: usize = 255;

/// A DNS domain (or address literal), stored in lower case without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Domain(String);

impl Domain {
    /// Parses a domain as written in config or in an address (case is folded).
    pub fn parse(s: &str, allow_utf8: bool) -> Result<Domain, AddressError> {
        if s.is_empty() {
            return Err(AddressError::EmptyDomain);
        }
        if s.len() > MAX_DOMAIN {
            return Err(AddressError::TooLong);
        }
        if s.starts_with('[') {
            return parse_literal(s).map(|lit| Domain(lit.to_ascii_lowercase()));
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(AddressError::BadDomain);
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(AddressError::BadDomain);
            }
            for c in label.chars() {
                let ok = c.is_ascii_alphanumeric() || c == '-' || (allow_utf8 && !c.is_ascii());
                if !ok {
                    return Err(AddressError::BadDomain);
                }
            }
        }
        Ok(Domain(s.to_lowercase()))
    }

    /// The domain in lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for an address literal such as `[192.0.2.1]`.
    pub fn is_literal(&self) -> bool {
        self.0.starts_with('[')
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Domain::parse(&s, true).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

fn parse_literal(s: &str) -> Result<&str, AddressError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or(AddressError::BadDomain)?;
    let ok = if let Some(v6) = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
    {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        inner.parse::<std::net::Ipv4Addr>().is_ok()
    };
    if ok {
        Ok(s)
    } else {
        Err(AddressError::BadDomain)
    }
}

/// Why a mailbox failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing after the `@`.
    #[error("empty domain")]
    EmptyDomain,
    /// No `@` in the mailbox.
    #[error("missing @domain")]
    NoDomain,
    /// The local part is not a dot-string or quoted string.
    #[error("bad local part syntax")]
    BadLocal,
    /// The domain is not a host name or address literal.
    #[error("bad domain syntax")]
    BadDomain,
    /// A part exceeds the RFC 5321 length limits.
    #[error("address too long")]
    TooLong,
    /// Non-ASCII characters without SMTPUTF8.
    #[error("non-ASCII address needs SMTPUTF8")]
    NeedsUtf8,
}

/// A mailbox `local@domain` as given by the client (local part kept as sent).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    local: String,
    domain: Domain,
}

impl Address {
    /// Parses an RFC 5321 `Mailbox` (no angle brackets). UTF-8 is allowed only with SMTPUTF8.
    pub fn parse(s: &str, smtputf8: bool) -> Result<Address, AddressError> {
        if !smtputf8 && !s.is_ascii() {
            return Err(AddressError::NeedsUtf8);
        }
        let (local, domain) = split_mailbox(s)?;
        if local.len() > MAX_LOCAL {
            return Err(AddressError::TooLong);
        }
        Ok(Address {
            local: local.to_string(),
            domain: Domain::parse(domain, smtputf8)?,
        })
    }

    /// The local part as sent (quotes included when quoted).
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The domain in lower case.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The same local part at another domain (envelope rewrite).
    pub fn with_domain(&self, domain: &Domain) -> Address {
        Address {
            local: self.local.clone(),
            domain: domain.clone(),
        }
    }

    /// True when the local part is a quoted string.
    pub fn is_quoted(&self) -> bool {
        self.local.starts_with('"')
    }

    /// The lower-case form used as the directory key.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain)
    }

    /// Calls `f` with the directory key, built on the stack for ASCII addresses (the lookup
    /// hot path: no allocation).
    pub fn with_key<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let (local, domain) = (self.local.as_bytes(), self.domain.as_str().as_bytes());
        let n = local.len() + 1 + domain.len();
        if self.local.is_ascii() && n <= 320 {
            let mut buf = [0u8; 320];
            for (d, s) in buf.iter_mut().zip(local) {
                *d = s.to_ascii_lowercase();
            }
            buf[local.len()] = b'@';
            buf[local.len() + 1..n].copy_from_slice(domain);
            f(&buf[..n])
        } else {
            f(self.key().as_bytes())
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Splits at the `@` that ends the local part, checking the local part's syntax.
fn split_mailbox(s: &str) -> Result<(&str, &str), AddressError> {
    if let Some(rest) = s.strip_prefix('"') {
        // Quoted-string: qtextSMTP or quoted-pairSMTP up to the closing quote.
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            if escaped {
                if !(' '..='~').contains(&c) {
                    return Err(AddressError::BadLocal);
                }
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                let end = i + 2; // opening quote + this quote
                let after = &s[end..];
                let domain = after.strip_prefix('@').ok_or(AddressError::NoDomain)?;
                return Ok((&s[..end], domain));
            } else if c.is_ascii_control() {
                return Err(AddressError::BadLocal);
            }
        }
        return Err(AddressError::BadLocal);
    }
    let at = s.find('@').ok_or(AddressError::NoDomain)?;
    let (local, domain) = (&s[..at], &s[at + 1..]);
    if local.is_empty() || local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(AddressError::BadLocal);
    }
    if !local.chars().all(is_atext_or_dot) {
        return Err(AddressError::BadLocal);
    }
    Ok((local, domain))
}

fn is_atext_or_dot(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii()
}

/// The name of a route in the config, which is also a migration state in the directory.
/// Shared (`Arc<str>`): lookups hand it out on the hot path without allocating.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(pub std::sync::Arc<str>);

impl RouteName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A spool queue id: time-ordered, unique within this host (hex micros + counter).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueId(String);

static QUEUE_COUNTER: AtomicU32 = AtomicU32::new(0);

impl QueueId {
    /// A new id; the spool still creates files with `create_new`, so a clash cannot overwrite.
    pub fn generate() -> QueueId {
        let micros = crate::clock::now_micros();
        let n = QUEUE_COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFFF;
        QueueId(format!("{micros:013X}{n:04X}"))
    }

    /// Accepts an id read back from a spool file name (hex digits only, so it is path-safe).
    pub fn from_file_stem(s: &str) -> Option<QueueId> {
        if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(QueueId(s.to_string()))
        } else {
            None
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a 16-byte number for compact indexes, when it has the form
    /// [`generate`](QueueId::generate) gives (17 upper-case hex digits), which
    /// [`QueueKey::id`] turns back into the same text. Keys sort as the ids do.
    pub fn key(&self) -> Option<QueueKey> {
        let s = self.0.as_bytes();
        if s.len() != 17
            || !s
                .iter()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
        {
            return None;
        }
        let v = u128::from_str_radix(&self.0, 16).ok()?;
        Some(QueueKey {
            hi: (v >> 64) as u64,
            lo: v as u64,
        })
    }
}

/// A [`QueueId`] as a number: what the queue's index keys its entries by. Ordered like the
/// ids, so oldest first (ids begin with the time they were made).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    hi: u64,
    lo: u64,
}

impl QueueKey {
    /// The key as one number (for compact files).
    pub fn to_u128(self) -> u128 {
        ((self.hi as u128) << 64) | self.lo as u128
    }

    /// The key [`QueueKey::to_u128`] gave, when it stands for an id of the generated form
    /// (at most 17 hex digits).
    pub fn from_u128(v: u128) -> Option<QueueKey> {
        (v >> 68 == 0).then_some(QueueKey {
            hi: (v >> 64) as u64,
            lo: v as u64,
        })
    }

    /// The id this key stands for.
    pub fn id(self) -> QueueId {
        let v = ((self.hi as u128) << 64) | self.lo as u128;
        QueueId(format!("{v:017X}"))
    }

    /// Unix time in milliseconds at which the id was made (its first 13 hex digits are
    /// microseconds).
    pub fn made_at_ms(self) -> u64 {
        let v = ((self.hi as u128) << 64) | self.lo as u128;
        ((v >> 16) / 1000) as u64
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_quoted() {
        let a = Address::parse("John.Doe@NHS.test", false).unwrap();
        assert_eq!(a.key(), "john.doe@nhs.test");
        assert_eq!(a.with_key(|k| k.to_vec()), b"john.doe@nhs.test");
        let u = Address::parse("Jö@nhs.test", true).unwrap();
        assert_eq!(u.with_key(|k| k.to_vec()), "jö@nhs.test".as_bytes());
        assert_eq!(a.to_string(), "John.Doe@nhs.test");
        let q = Address::parse("\"a b@c\"@nhs.test", false).unwrap();
        assert!(q.is_quoted());
        assert_eq!(q.domain().as_str(), "nhs.test");
    }

    #[test]
    fn refuses_bad_syntax() {
        for bad in [
            "a@",
            "@b",
            "a..b@c",
            ".a@c",
            "a@b.",
            "a@-b.c",
            "a b@c",
            "a@b@c",
            "a@[1.2.3]",
            "\"x@c",
        ] {
            assert!(Address::parse(bad, true).is_err(), "{bad}");
        }
        assert_eq!(
            Address::parse("jö@nhs.test", false),
            Err(AddressError::NeedsUtf8)
        );
        assert!(Address::parse("jö@nhs.test", true).is_ok());
        assert!(Address::parse("a@[IPv6:::1]", false).is_ok());
    }

    #[test]
    fn queue_ids_are_unique_and_path_safe() {
        let a = QueueId::generate();
        let b = QueueId::generate();
        assert_ne!(a, b);
        assert!(QueueId::from_file_stem(a.as_str()).is_some());
        let (ka, kb) = (a.key().unwrap(), b.key().unwrap());
        assert_eq!(ka.id(), a);
        assert_eq!(ka.cmp(&kb), a.cmp(&b));
        assert!(QueueId::from_file_stem("abc").unwrap().key().is_none());
        assert!(QueueId::from_file_stem("../x").is_none());
    }
}
