//! The client a request speaks for, behind trusted reverse proxies.
//!
//! An admin listener reached through a TLS-terminating proxy sees one TCP peer, the proxy,
//! for every admin. So that logs name the admin's own address, and one client's wrong
//! tokens lock out only that client ([`super::guesses`]), the client's address is taken
//! from `X-Forwarded-For` — but only when the TCP peer is in `admin.trusted_proxies`:
//! anyone else could write any address there. The list is read from the right (the entry
//! the nearest proxy appended) to the left, skipping trusted proxies; the first address
//! that is not one is the client (what nginx's `real_ip_recursive on` does). An entry that
//! is not an address ends the walk: the last trusted hop is then the client.
//!
//! [`forwarded`] runs before every other handler of the admin listener: it puts the
//! [`Client`] in the request, and replaces the request's `ConnectInfo` by the client's
//! address (port 0 when it came from the header), so every handler logs the real client.

use super::super::AdminState;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{request::Parts, Extensions, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use std::net::{IpAddr, SocketAddr};

/// The client a request speaks for and the TCP peer it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    pub ip: IpAddr,
    /// The TCP peer (the proxy, when the client is forwarded).
    pub peer: SocketAddr,
}

impl Client {
    /// True when the client's address came from a trusted proxy's `X-Forwarded-For`.
    pub fn forwarded(&self) -> bool {
        self.ip != crate::policy::plain_ip(self.peer.ip())
    }
}

/// `ADDRESS` for a direct client (with its port), `ADDRESS via PROXY:PORT` for a forwarded
/// one.
impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.forwarded() {
            write!(f, "{} via {}", self.ip, self.peer)
        } else {
            write!(f, "{}", self.peer)
        }
    }
}

impl Client {
    /// The client [`forwarded`] found for a request with these extensions; without it, the
    /// connection's peer, or the unspecified address without connection info.
    pub fn of(extensions: &Extensions) -> Client {
        if let Some(c) = extensions.get::<Client>() {
            return *c;
        }
        let peer = extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
        Client {
            ip: crate::policy::plain_ip(peer.ip()),
            peer,
        }
    }
}

/// [`Client::of`] the request, as an extractor.
impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Client::of(&parts.extensions))
    }
}

/// The client's address for a request from `peer` with `headers` (see the module docs).
pub fn real_client(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let mut client = crate::policy::plain_ip(peer);
    if !crate::policy::is_trusted(trusted, client) {
        return client;
    }
    // Several X-Forwarded-For fields are one list, in order (RFC 9110 5.3).
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = hop_address(hop) else { break };
        client = ip;
        if !crate::policy::is_trusted(trusted, ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port (`[v6]:port`, `v4:port`).
fn hop_address(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })?;
    Some(crate::policy::plain_ip(ip))
}

/// Middleware for the whole admin listener: finds the request's [`Client`] (see the module
/// docs).
pub(in crate::admin) async fn forwarded(
    State(s): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(&ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let config = s.control.config();
        let trusted = config
            .admin
            .as_ref()
            .map_or(&[][..], |a| &a.trusted_proxies[..]);
        let client = Client {
            ip: real_client(peer.ip(), req.headers(), trusted),
            peer,
        };
        req.extensions_mut().insert(client);
        if client.forwarded() {
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(client.ip, 0)));
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let h = headers(&["203.0.113.5"]);
        assert_eq!(real_client(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
        assert_eq!(real_client(ip("192.0.2.9"), &h, &trusted), ip("192.0.2.9"));
        assert_eq!(real_client(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
        // No header: the proxy itself.
        assert_eq!(
            real_client(ip("10.0.0.1"), &headers(&[]), &trusted),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/24".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ];
        // The client wrote a forged address first; the proxy appended the real one.
        let h = headers(&["198.51.100.1, 203.0.113.5"]);
        assert_eq!(real_client(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
        // Two proxies, over two header fields, with ports and brackets.
        let h = headers(&["198.51.100.1, [2001:db8:9::7]:443", "10.0.0.2:8080"]);
        assert_eq!(
            real_client(ip("10.0.0.1"), &h, &trusted),
            ip("2001:db8:9::7")
        );
        // Only trusted hops: the left-most of them.
        let h = headers(&["10.0.0.3, 10.0.0.2"]);
        assert_eq!(real_client(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.3"));
        // Garbage ends the walk at the last trusted hop.
        let h = headers(&["203.0.113.5, unknown, 10.0.0.2"]);
        assert_eq!(real_client(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.2"));
        // An IPv4-mapped peer is the IPv4 address it is.
        let h = headers(&["203.0.113.5"]);
        assert_eq!(
            real_client(ip("::ffff:10.0.0.1"), &h, &trusted),
            ip("203.0.113.5")
        );
    }
}
