//! The value types of the config that are more than a number or a string: percentages,
//! the `directory.unknown` choice, TLS policies and next hops, with their parsing and the
//! errors it gives (serde reports them with the line and key).

use crate::types::{Domain, RouteName};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A share written as a percentage, `"10%"`, between 0% and 100%.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub(super) f64);

impl Percent {
    /// The share as a fraction between 0 and 1.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }

    /// Parses `"N%"` (N from 0 to 100, decimals allowed).
    pub fn parse(s: &str) -> Result<Percent, ValueError> {
        let n = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .ok_or_else(|| ValueError::NotAPercentage(s.to_string()))?;
        if !(0.0..=100.0).contains(&n) {
            return Err(ValueError::PercentOutOfRange(s.to_string()));
        }
        // Kept as written (7, not 0.07), so messages print "7%", not "7.000000000000001%".
        Ok(Percent(n))
    }
}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a percentage such as \"10%\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Percent, E> {
                Percent::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A config value that does not parse (the key and file are added by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// `N%` expected.
    #[error("{0:?} is not a percentage such as \"10%\"")]
    NotAPercentage(String),
    /// A percentage over 100% or below 0%.
    #[error("{0:?} must be between 0% and 100%")]
    PercentOutOfRange(String),
    /// `host:port` with a port that is not a number.
    #[error("{value:?}: bad port {port:?}")]
    BadPort {
        /// The value as written.
        value: String,
        /// The port part.
        port: String,
    },
    /// Port 0.
    #[error("{0:?}: port 0")]
    PortZero(String),
    /// Neither a host name nor an IP address.
    #[error("{0:?}: not a host name or IP address")]
    NotAHost(String),
    /// Not `http(s)://host[:port]`.
    #[error("{0:?} is not a URL such as \"https://coexist-admin.example.org\" (http or https, a host, an optional port, no path)")]
    NotAUrl(String),
}

/// `directory.unknown`: what happens to an address the directory does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// Refused at RCPT with 550 5.1.1 (written `reject`).
    Reject,
    /// Sent on this route (written as the route's name).
    Route(RouteName),
}

impl Unknown {
    /// The route, unless unknown addresses are rejected.
    pub fn route(&self) -> Option<&RouteName> {
        match self {
            Unknown::Reject => None,
            Unknown::Route(r) => Some(r),
        }
    }
}

/// `reject`, or a route name (checked against `[routes]` by `validate`).
impl From<&str> for Unknown {
    fn from(s: &str) -> Unknown {
        if s == "reject" {
            Unknown::Reject
        } else {
            Unknown::Route(RouteName(s.into()))
        }
    }
}

/// As written in the config: `reject` or the route's name.
impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unknown::Reject => f.write_str("reject"),
            Unknown::Route(r) => write!(f, "{r}"),
        }
    }
}

impl Serialize for Unknown {
    /// Written as in the file: `reject` or the route name.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Unknown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Unknown::from(s.as_str()))
    }
}
/// TLS policy for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never use TLS.
    None,
    /// Use STARTTLS when offered (no certificate check), else clear text.
    Opportunistic,
    /// Use STARTTLS or defer; never send in clear text.
    Required,
    /// Like `required`, and the certificate must be valid for the expected name (system
    /// roots, or `tls_ca_file`).
    Verify,
    /// MTA-STS (RFC 8461), for routes that deliver by MX: the MX domain's published policy
    /// decides (`enforce`: only listed MX hosts, STARTTLS and a certificate valid for the
    /// host; `testing` or no policy: opportunistic).
    #[serde(rename = "mta-sts")]
    MtaSts,
    /// DANE (RFC 7672), for routes that deliver by MX: DNSSEC-secure TLSA records of an MX
    /// host make STARTTLS mandatory and pin its certificate; without them, opportunistic.
    Dane,
}

impl TlsPolicy {
    /// The name written in the config (`opportunistic`, `mta-sts`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verify => "verify",
            TlsPolicy::MtaSts => "mta-sts",
            TlsPolicy::Dane => "dane",
        }
    }
}

/// A next hop written `host:port`, `ip:port` or `[ipv6]:port` (port 25 when omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl NextHop {
    /// Parses `host[:port]`.
    pub fn parse(s: &str) -> Result<NextHop, ValueError> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(NextHop::from(sa));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(NextHop::from(SocketAddr::new(ip, 25)));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().map_err(|_| ValueError::BadPort {
                    value: s.to_string(),
                    port: p.to_string(),
                })?,
            ),
            None => (s, 25),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if port == 0 {
            return Err(ValueError::PortZero(s.to_string()));
        }
        if Domain::parse(host, false).is_err() && host.parse::<std::net::IpAddr>().is_err() {
            return Err(ValueError::NotAHost(s.to_string()));
        }
        Ok(NextHop {
            host: host.to_string(),
            port,
        })
    }
}

impl From<SocketAddr> for NextHop {
    fn from(sa: SocketAddr) -> NextHop {
        NextHop {
            host: sa.ip().to_string(),
            port: sa.port(),
        }
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for NextHop {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NextHop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NextHop::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `admin.public_url`: the scheme, host and port the console is reached at, e.g.
/// `https://coexist-admin.example.org` (no path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    https: bool,
    /// Host, lower case (an IPv6 address in brackets).
    host: String,
    /// Port, the scheme's default when none is written.
    port: u16,
}

impl PublicUrl {
    /// Parses `http://host[:port]` or `https://host[:port]`, with an optional final `/`.
    pub fn parse(s: &str) -> Result<PublicUrl, ValueError> {
        let bad = || ValueError::NotAUrl(s.to_string());
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(bad()),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = authority(rest, if https { 443 } else { 80 }).ok_or_else(bad)?;
        Ok(PublicUrl { https, host, port })
    }

    /// The origin a browser sends for pages under this URL (`https://host`, with `:port`
    /// when it is not the scheme's default).
    pub fn origin(&self) -> String {
        let (scheme, default) = if self.https {
            ("https", 443)
        } else {
            ("http", 80)
        };
        if self.port == default {
            format!("{scheme}://{}", self.host)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// True when a `Host` header value names this URL's host and port.
    pub fn is_host(&self, host: &str) -> bool {
        let default = if self.https { 443 } else { 80 };
        authority(host, default).is_some_and(|(h, p)| h == self.host && p == self.port)
    }

    /// True when a `Host` header value names `localhost` or a loopback address (any port).
    pub fn is_loopback_host(host: &str) -> bool {
        let Some((h, _)) = authority(host, 80) else {
            return false;
        };
        let bare = h.trim_start_matches('[').trim_end_matches(']');
        h == "localhost"
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback())
    }

    /// True when an `Origin` header value is this URL's origin.
    pub fn is_origin(&self, origin: &str) -> bool {
        PublicUrl::parse(origin).is_ok_and(|o| o == *self)
    }
}

/// `host[:port]` (host a name, an IPv4 address or an IPv6 address in brackets) as the host
/// in lower case and the port (`default` when none is written); `None` when it is not that.
fn authority(s: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']')?;
            addr.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (format!("[{}]", addr.to_ascii_lowercase()), port)
        }
        None => {
            let (h, p) = match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            };
            let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
            if h.is_empty() || !h.chars().all(name_char) {
                return None;
            }
            (h.to_ascii_lowercase(), p)
        }
    };
    let port = match port {
        None => default,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|&p| p != 0)?
        }
        Some(_) => return None,
    };
    Some((host, port))
}

impl std::fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.origin())
    }
}

impl Serialize for PublicUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PublicUrl;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a URL such as \"https://coexist-admin.example.org\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PublicUrl, E> {
                PublicUrl::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// True when a URL (`scheme://[user@]host[:port][/...]`) names `localhost` or a loopback
/// address.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    PublicUrl::is_loopback_host(host)
}
