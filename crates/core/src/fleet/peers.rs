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

use crate::config::Config;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// This process's host: `BOOT_ID/NETNS` (the kernel's boot id and the network namespace,
/// which together decide what a loopback address reaches), or the host name where `/proc`
/// cannot tell.
#[allow(clippy::disallowed_methods)] // Reads procfs: kernel memory, never a disk wait.
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

/// Where an admin API listens (this node's own, or a peer's) and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// `Some(name)`: HTTPS, with a certificate that must carry `name`; `None`: clear HTTP.
    pub tls_name: Option<String>,
}

impl Target {
    /// Clear HTTP to `addr`.
    pub fn http(addr: SocketAddr) -> Target {
        Target {
            addr,
            tls_name: None,
        }
    }

    /// The API of the config's own node: its listen address (loopback for a wildcard
    /// address), with https and `server.hostname` when `[admin]` has TLS.
    pub fn of_config(config: &Config) -> Option<Target> {
        let admin = config.admin.as_ref()?;
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Some(Target {
            addr,
            tls_name: admin.tls().then(|| config.server.hostname.clone()),
        })
    }

    /// Whether the token may be sent here: over TLS, or to a loopback address (the same
    /// host); never in clear over a network.
    pub fn may_carry_token(&self) -> bool {
        self.tls_name.is_some() || self.addr.ip().to_canonical().is_loopback()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls_name {
            Some(name) => write!(f, "https://{name}:{} at {}", self.addr.port(), self.addr),
            None => write!(f, "http://{}", self.addr),
        }
    }
}

/// How this node asks a peer's admin API what it has applied. The HTTP client lives above
/// the relay core (crate `coexist-api`), so the composition root hands one in at start.
pub trait PeerApi: Send + Sync + 'static {
    /// The last change `target` has applied, asked with `token` within `timeout` (`ca`: the
    /// CA file that signs admin certificates, else the system's roots). Refused, with why,
    /// when the token would cross the network in clear ([`Target::may_carry_token`]).
    fn applied(
        &self,
        target: &Target,
        token: &str,
        timeout: Duration,
        ca: Option<&Path>,
    ) -> Result<u32, Box<dyn std::error::Error + Send + Sync>>;
}

/// Why a node cannot be asked from here, in words for a log line, `fleet status` and
/// `coexist trace`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CannotAsk {
    /// Its row has no admin address.
    #[error(
        "it has no admin API address in the nodes table (no [admin] listener, or not started yet)"
    )]
    NoAddress,
    /// Its admin address does not resolve here.
    #[error("its admin address {0} does not resolve from here")]
    Unresolved(String),
    /// Its admin address is a loopback address of another host.
    #[error("its admin API listens on {0}, a loopback address of another host: give it an admin.listen address this host can reach")]
    OtherLoopback(String),
}

/// Where to ask a node, from its nodes-table row (`admin`, `admin_tls_name`, `admin_host`)
/// as read on host `here`; or why it cannot be asked from here, in words for a log line,
/// `fleet status` and `coexist trace`. An `admin` written `https://ADDRESS` is asked over
/// TLS, its certificate checked for `admin_tls_name` (or the address's host name). Whether
/// the token may then be sent is [`Target::may_carry_token`]'s rule, applied by
/// the API client (`coexist_api::client::AdminClient::for_peer`).
pub fn reach(
    admin: Option<&str>,
    admin_tls_name: Option<&str>,
    admin_host: Option<&str>,
    here: &str,
) -> Result<Target, CannotAsk> {
    let Some(admin) = admin else {
        return Err(CannotAsk::NoAddress);
    };
    let (address, tls) = match admin.strip_prefix("https://") {
        Some(rest) => (rest.trim_end_matches('/'), true),
        None => (admin, false),
    };
    let Some(addr) = address.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return Err(CannotAsk::Unresolved(admin.to_string()));
    };
    if addr.ip().is_loopback() && admin_host != Some(here) {
        return Err(CannotAsk::OtherLoopback(admin.to_string()));
    }
    let tls_name = tls.then(|| {
        admin_tls_name
            .map(str::to_string)
            .unwrap_or_else(|| match address.rsplit_once(':') {
                Some((host, _)) => host.trim_matches(['[', ']']).to_string(),
                None => address.to_string(),
            })
    });
    Ok(Target { addr, tls_name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_asked_only_from_its_own_host() {
        let here = host_scope();
        assert!(!here.is_empty());
        let http = |a: &str| Ok(Target::http(a.parse().unwrap()));
        assert_eq!(
            reach(Some("127.0.0.1:8025"), None, Some(&here), &here),
            http("127.0.0.1:8025")
        );
        let other = reach(
            Some("127.0.0.1:8025"),
            None,
            Some("other-boot/net:[1]"),
            &here,
        )
        .unwrap_err();
        assert_eq!(other, CannotAsk::OtherLoopback("127.0.0.1:8025".into()));
        assert!(
            other
                .to_string()
                .contains("loopback address of another host"),
            "{other}"
        );
        // A row written before hosts were recorded: a loopback address there is not trusted.
        assert!(reach(Some("[::1]:8025"), None, None, &here).is_err());
        assert_eq!(
            reach(Some("10.0.0.5:8025"), None, Some("other"), &here),
            http("10.0.0.5:8025")
        );
        assert!(reach(None, None, None, &here)
            .unwrap_err()
            .to_string()
            .contains("no admin API address"));
        assert!(reach(Some("mx2-without-a-port"), None, None, &here)
            .unwrap_err()
            .to_string()
            .contains("does not resolve"));
    }

    #[test]
    fn https_addresses_are_asked_over_tls_and_clear_ones_off_loopback_get_no_token() {
        let here = host_scope();
        let t = reach(
            Some("https://10.0.0.5:8025"),
            Some("mx2.nhs.test"),
            Some("other"),
            &here,
        )
        .unwrap();
        assert_eq!(t.addr, "10.0.0.5:8025".parse().unwrap());
        assert_eq!(t.tls_name.as_deref(), Some("mx2.nhs.test"));
        assert!(t.may_carry_token());
        // No name recorded: the address's own host.
        let t = reach(Some("https://10.0.0.5:8025"), None, None, &here).unwrap();
        assert_eq!(t.tls_name.as_deref(), Some("10.0.0.5"));
        // Clear HTTP: the token only to loopback.
        let t = reach(Some("10.0.0.5:8025"), None, Some("other"), &here).unwrap();
        assert!(!t.may_carry_token());
        let t = reach(Some("[::ffff:10.0.0.5]:8025"), None, None, &here).unwrap();
        assert!(!t.may_carry_token());
        let t = reach(Some("127.0.0.1:8025"), None, Some(&here), &here).unwrap();
        assert!(t.may_carry_token());
    }
}
