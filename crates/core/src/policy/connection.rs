//! Connection stage: whether a new SMTP session is served. The listener
//! (`smtp::server`) keeps the counts (session slots, sessions and connects per client) and
//! asks these functions, in this order:
//! 1. [`closed`]: drain mode, or a directory behind its fleet's;
//! 2. [`no_slot`]: every slot of `server.max_connections` taken;
//! 3. [`is_trusted`]: clients in `policy.trusted_networks` are served from here on;
//! 4. [`reserve`]: others only outside `server.reserved_connections`;
//! 5. [`per_client`]: others only under the per-client limits, where a client is its
//!    [`client_group`].

use crate::proto::reply::{canned, Reply};
use std::net::IpAddr;

/// Why a session is refused: the reply, and the `reason` label of the refusal metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the client is told before the connection closes.
    pub reply: Reply,
    /// The `reason` label of `coexist_sessions_refused_total`.
    pub reason: &'static str,
}

/// The per-client limits (`policy.max_connections_per_ip`,
/// `policy.max_connection_rate_per_ip`; 0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Sessions open at once.
    pub open: usize,
    /// New sessions per minute.
    pub per_minute: u32,
}

impl ClientLimits {
    /// True when neither limit is on.
    pub fn off(&self) -> bool {
        self.open == 0 && self.per_minute == 0
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, a dual-stack listener's view of an IPv4
/// client) as the IPv4 address it is; any other address as it is.
pub fn plain_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// True when `ip` is in one of `networks`.
pub fn is_trusted(networks: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = plain_ip(ip);
    networks.iter().any(|n| n.contains(&ip))
}

/// The network `ip` is counted in for the per-client limits: its IPv4 network of
/// `v4_prefix` bits or its IPv6 network of `v6_prefix` bits (an IPv4-mapped IPv6 address
/// counts as the IPv4 address it is). A prefix longer than the address counts each address
/// apart. One IPv6 client usually holds a whole /64, so counting its addresses apart would
/// let it open as many sessions as it likes.
pub fn client_group(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> ipnet::IpNet {
    match plain_ip(ip) {
        IpAddr::V4(a) => ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(a, v4_prefix.min(32))
                .unwrap_or_else(|_| ipnet::Ipv4Net::from(a))
                .trunc(),
        ),
        IpAddr::V6(a) => ipnet::IpNet::V6(
            ipnet::Ipv6Net::new(a, v6_prefix.min(128))
                .unwrap_or_else(|_| ipnet::Ipv6Net::from(a))
                .trunc(),
        ),
    }
}

/// The `421 4.3.2` every new session gets while the node drains, or while its directory is
/// behind its fleet's (`hostname`: ours, named in the reply).
pub fn closed(hostname: &str, draining: bool, behind: bool) -> Option<Refusal> {
    let (why, reason) = if draining {
        ("Service not available (draining)", "draining")
    } else if behind {
        ("Directory behind the fleet", "behind")
    } else {
        return None;
    };
    Some(Refusal {
        reply: Reply::owned(421, "4.3.2", format!("{hostname} {why}, try another MX")),
        reason,
    })
}

/// The refusal when every session slot (`server.max_connections`) is taken.
pub fn no_slot() -> Refusal {
    Refusal {
        reply: canned::TOO_MANY_CONNECTIONS,
        reason: "limit",
    }
}

/// The reserve for trusted networks: with `open` sessions (this one counted) of
/// `max_sessions`, an untrusted client is refused once more than `max_sessions - reserved`
/// are open.
pub fn reserve(open: usize, max_sessions: usize, reserved: usize) -> Result<(), Refusal> {
    if open > max_sessions.saturating_sub(reserved) {
        return Err(Refusal {
            reply: canned::TOO_MANY_CONNECTIONS,
            reason: "reserved",
        });
    }
    Ok(())
}

/// The per-client limits for a client (`group`) with `open` sessions and `in_window`
/// connects in the current minute, before this one.
pub fn per_client(
    group: &ipnet::IpNet,
    open: usize,
    in_window: u32,
    limits: ClientLimits,
) -> Result<(), Refusal> {
    // "your address" when the group is one address, else the network it counts.
    let whom = || {
        if group.prefix_len() == group.max_prefix_len() {
            "your address".to_string()
        } else {
            format!("your network {group}")
        }
    };
    let refuse = |text: String| Refusal {
        reply: Reply::owned(421, "4.7.0", text),
        reason: "per_client",
    };
    if limits.open > 0 && open >= limits.open {
        let text = format!(
            "Too many connections from {} (limit {})",
            whom(),
            limits.open
        );
        return Err(refuse(text));
    }
    if limits.per_minute > 0 && in_window >= limits.per_minute {
        let text = format!(
            "Too many connections per minute from {} (limit {})",
            whom(),
            limits.per_minute
        );
        return Err(refuse(text));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_networks_match_mapped_addresses() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(&nets, "10.1.2.3".parse().unwrap()));
        assert!(is_trusted(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!is_trusted(&nets, "11.1.2.3".parse().unwrap()));
    }

    #[test]
    fn clients_are_grouped_by_prefix() {
        let g = |ip: &str, v4, v6| client_group(ip.parse().unwrap(), v4, v6).to_string();
        // IPv6: one /64 is one client by default; 128 counts each address apart.
        assert_eq!(g("2001:db8:1:2:aaaa::1", 32, 64), "2001:db8:1:2::/64");
        assert_eq!(
            g("2001:db8:1:2:aaaa::1", 32, 64),
            g("2001:db8:1:2:ffff:1:2:3", 32, 64)
        );
        assert_ne!(g("2001:db8:1:2::1", 32, 64), g("2001:db8:1:3::1", 32, 64));
        assert_eq!(g("2001:db8:1:2::1", 32, 128), "2001:db8:1:2::1/128");
        assert_ne!(g("2001:db8:1:2::1", 32, 128), g("2001:db8:1:2::2", 32, 128));
        assert_eq!(g("2001:db8:1:2::1", 32, 48), "2001:db8:1::/48");
        assert_eq!(g("::1", 32, 64), "::/64");
        // IPv4 per address by default, per network when asked; mapped addresses are IPv4.
        assert_eq!(g("192.0.2.7", 32, 64), "192.0.2.7/32");
        assert_eq!(g("::ffff:192.0.2.7", 32, 64), "192.0.2.7/32");
        assert_eq!(g("192.0.2.7", 24, 64), "192.0.2.0/24");
        assert_eq!(g("192.0.2.7", 24, 64), g("192.0.2.200", 24, 64));
        // Out-of-range prefixes (refused by the config) still give a network.
        assert_eq!(g("192.0.2.7", 40, 200), "192.0.2.7/32");
        assert_eq!(g("2001:db8::1", 40, 200), "2001:db8::1/128");
    }

    #[test]
    fn limits_refuse_with_the_reason_and_the_client() {
        assert_eq!(closed("mx.test", false, false), None);
        let r = closed("mx.test", true, true).unwrap();
        assert_eq!(
            (r.reply.to_string(), r.reason),
            (
                "421 4.3.2 mx.test Service not available (draining), try another MX".into(),
                "draining"
            )
        );
        assert_eq!(closed("mx.test", false, true).unwrap().reason, "behind");
        assert!(reserve(90, 100, 10).is_ok());
        assert_eq!(reserve(91, 100, 10).unwrap_err().reason, "reserved");
        let net: ipnet::IpNet = "2001:db8:1:2::/64".parse().unwrap();
        let limits = ClientLimits {
            open: 2,
            per_minute: 5,
        };
        assert!(per_client(&net, 1, 4, limits).is_ok());
        let r = per_client(&net, 2, 0, limits).unwrap_err();
        assert_eq!(
            r.reply.to_string(),
            "421 4.7.0 Too many connections from your network 2001:db8:1:2::/64 (limit 2)"
        );
        let one: ipnet::IpNet = "192.0.2.7/32".parse().unwrap();
        let r = per_client(&one, 0, 5, limits).unwrap_err();
        assert_eq!(
            r.reply.to_string(),
            "421 4.7.0 Too many connections per minute from your address (limit 5)"
        );
    }
}
