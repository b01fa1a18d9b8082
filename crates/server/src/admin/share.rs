//! The admin listener's per-client share: one client address (an IPv6 client by its /64)
//! holds at most a quarter of `admin.max_connections` at once, so a single host on the
//! management network cannot take every admin slot and lock out the admins, the CLI and the
//! fleet's peer questions. Loopback peers are not limited: the CLI and a TLS proxy on the
//! same host come from there (a proxy forwards every admin through one address).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections per client address, for the admin listener.
#[derive(Clone)]
pub struct Shares {
    per_client: usize,
    open: Arc<Mutex<HashMap<ipnet::IpNet, usize>>>,
}

/// One connection's place in its client's share; given back when dropped.
pub struct Held {
    key: Option<ipnet::IpNet>,
    open: Arc<Mutex<HashMap<ipnet::IpNet, usize>>>,
}

impl Shares {
    /// Shares of a listener taking `max_connections` at once: a quarter each (at least 1).
    pub fn new(max_connections: usize) -> Shares {
        Shares {
            per_client: (max_connections / 4).max(1),
            open: Arc::default(),
        }
    }

    /// The most connections one client holds at once.
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    /// A place for a connection from `ip`, or `None` when that client holds its share.
    pub fn take(&self, ip: IpAddr) -> Option<Held> {
        let ip = crate::policy::plain_ip(ip);
        if ip.is_loopback() {
            return Some(Held {
                key: None,
                open: self.open.clone(),
            });
        }
        let key = crate::policy::client_group(ip, 32, 64);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(Held {
            key: Some(key),
            open: self.open.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_gets_a_quarter_and_loopback_is_not_limited() {
        let s = Shares::new(64);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let held: Vec<Held> = (0..16)
            .map(|_| s.take(a).expect("within the share"))
            .collect();
        assert!(s.take(a).is_none(), "a 17th connection from one client");
        assert!(
            s.take("192.0.2.8".parse().unwrap()).is_some(),
            "another client"
        );
        // One /64 is one client.
        let v6: Vec<Held> = (0..16)
            .map(|i| s.take(format!("2001:db8::{i}").parse().unwrap()).unwrap())
            .collect();
        assert!(s.take("2001:db8::ffff".parse().unwrap()).is_none());
        drop(v6);
        assert!(s.take("2001:db8::1".parse().unwrap()).is_some());
        let local: Vec<Held> = (0..100)
            .map(|_| s.take("127.0.0.1".parse().unwrap()).unwrap())
            .collect();
        drop(local);
        drop(held);
        assert!(s.take(a).is_some(), "the share is given back");
        assert!(s.open.lock().unwrap().len() <= 2);
    }
}
