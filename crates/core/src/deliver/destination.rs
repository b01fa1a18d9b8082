//! Which addresses that DNS gives may be connected to.
//!
//! The MX hosts of a route with `mx` or `recipient_mx`, and MTA-STS policy hosts, come from
//! DNS that someone else controls: for `recipient_mx` (DSNs to the internet), any sender's.
//! A record pointing at 127.0.0.1, 10.0.0.1 or fe80::1 would make the relay connect into the
//! network it stands in (its own admin listener, an internal SMTP server, a metadata
//! service). Unless `delivery.allow_private_destinations` is on, such an address is refused
//! with a reason, as an unreachable host is. `next_hops` are not checked: the admin chose them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of non-global address `ip` is (`"loopback"`, `"private"`, ...), or `None` for an
/// address on the public internet. IPv4-mapped IPv6 addresses are judged as IPv4.
pub fn non_global(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => non_global_v4(v4),
        IpAddr::V6(v6) => non_global_v6(v6),
    }
}

fn non_global_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (192, 0, 0) | (198, 18..=19, _) => "reserved",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn non_global_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // NAT64 (64:ff9b::/96): the IPv4 address inside decides.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return non_global_v4(v4);
    }
    // 6to4 (2002::/16): the IPv4 address in bits 16-47 decides (2002:a00:1:: is 10.0.0.1).
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return non_global_v4(v4);
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "private",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "site-local",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation",
        // Teredo (2001::/32): a tunnel endpoint, never a mail server; its client address is
        // hidden in the bits, so it cannot be judged like 6to4.
        0x2001 if s[1] == 0 => "Teredo tunnel",
        // ::/8 beyond the above (IPv4-compatible, ...) and 100::/64 (discard).
        0 => "reserved",
        0x100 if s[1..4] == [0, 0, 0] => "reserved",
        _ => return None,
    })
}

/// Why `host`'s address `ip` is refused (`what` names the host's part, e.g. "MX host"), or
/// `None` when it may be used: a global address, or any address when `allow_private`.
pub fn refusal(what: &str, host: &str, ip: IpAddr, allow_private: bool) -> Option<String> {
    if allow_private {
        return None;
    }
    let kind = non_global(ip)?;
    Some(format!(
        "{what} {host} resolves to {kind} address {ip}; delivery.allow_private_destinations is off"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_global_addresses_are_named_and_global_ones_pass() {
        for (ip, kind) in [
            ("127.0.0.1", Some("loopback")),
            ("127.8.9.10", Some("loopback")),
            ("10.0.0.1", Some("private")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("shared (carrier-grade NAT)")),
            ("0.0.0.0", Some("unspecified")),
            ("255.255.255.255", Some("reserved")),
            ("::", Some("unspecified")),
            ("::1", Some("loopback")),
            ("fd00::1", Some("private")),
            ("fc12::1", Some("private")),
            ("fe80::1", Some("link-local")),
            ("::ffff:10.1.2.3", Some("private")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("64:ff9b::a00:1", Some("private")),
            ("2001:db8::1", Some("documentation")),
            ("2002:a00:1::1", Some("private")),
            ("2002:7f00:1::1", Some("loopback")),
            ("2001:0:4136:e378::1", Some("Teredo tunnel")),
            ("2002:2865:102::1", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("40.107.1.2", None),
            ("52.101.0.1", None),
            ("2a01:111:f403::1", None),
            ("64:ff9b::2865:102", None),
        ] {
            assert_eq!(non_global(ip.parse().unwrap()), kind, "{ip}");
        }
    }

    #[test]
    fn the_refusal_says_what_where_and_which_key() {
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(
            refusal("MX host", "mx.example.org", ip, false).unwrap(),
            "MX host mx.example.org resolves to private address 10.0.0.1; \
             delivery.allow_private_destinations is off"
        );
        assert_eq!(refusal("MX host", "mx.example.org", ip, true), None);
        assert_eq!(
            refusal("MX host", "x", "40.107.1.2".parse().unwrap(), false),
            None
        );
    }
}
