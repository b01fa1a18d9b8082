//! Whether a peer's admin API can be asked from here, and why not.
//!
//! Peers are asked what they have applied while PostgreSQL is unreachable (the lag check in
//! [`super::follow`]), and `coexist trace` asks every node for its outcomes. Each node
//! writes its admin address to the nodes table, with the *host* it runs on: the machine's
//! boot id and the network namespace it lives in. A loopback address is only the same
//! listener when read from that same host; read from another, it names some other process
//! there, or nothing. So a loopback address is used only by readers on the node's own host;
//! every other reader says plainly that this peer cannot be asked and what to set, instead
//! of asking itself, or silently counting the peer as "not ahead".

use std::net::{SocketAddr, ToSocketAddrs};

/// This process's host: `BOOT_ID/NETNS` (the kernel's boot id and the network namespace,
/// which together decide what a loopback address reaches), or the host name where `/proc`
/// cannot tell.
pub fn host_scope() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let net = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if boot.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    } else {
        format!("{boot}/{net}")
    }
}

/// The address to ask the node `name` at, from its nodes-table row (`admin`, `admin_host`)
/// as read on host `here`; or why it cannot be asked from here, in words for a log line,
/// `fleet status` and `coexist trace`.
pub fn reach(
    admin: Option<&str>,
    admin_host: Option<&str>,
    here: &str,
) -> Result<SocketAddr, String> {
    let Some(admin) = admin else {
        return Err("it has no admin API address in the nodes table (no [admin] listener, or not started yet)".into());
    };
    let Some(addr) = admin.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return Err(format!(
            "its admin address {admin} does not resolve from here"
        ));
    };
    if addr.ip().is_loopback() && admin_host != Some(here) {
        return Err(format!(
            "its admin API listens on {admin}, a loopback address of another host: give it an admin.listen address this host can reach"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_asked_only_from_its_own_host() {
        let here = host_scope();
        assert!(!here.is_empty());
        assert_eq!(
            reach(Some("127.0.0.1:8025"), Some(&here), &here),
            Ok("127.0.0.1:8025".parse().unwrap())
        );
        let other = reach(Some("127.0.0.1:8025"), Some("other-boot/net:[1]"), &here).unwrap_err();
        assert!(
            other.contains("loopback address of another host"),
            "{other}"
        );
        // A row written before hosts were recorded: a loopback address there is not trusted.
        assert!(reach(Some("[::1]:8025"), None, &here).is_err());
        assert_eq!(
            reach(Some("10.0.0.5:8025"), Some("other"), &here),
            Ok("10.0.0.5:8025".parse().unwrap())
        );
        assert!(reach(None, None, &here)
            .unwrap_err()
            .contains("no admin API address"));
        assert!(reach(Some("mx2-without-a-port"), None, &here)
            .unwrap_err()
            .contains("does not resolve"));
    }
}
