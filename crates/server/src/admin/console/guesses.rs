//! Wrong admin tokens, counted per client: console logins and API bearer tokens alike.
//!
//! A client (its real address, see [`super::proxy`]; an IPv6 client by its /64, the block
//! one host is usually given) that presents a wrong token [`FAILURES`] times within
//! [`WINDOW`] gets no more comparisons until the window, counted from its first failure,
//! has passed: the console answers `429` on the login page, the API `429` with
//! `Retry-After`. A right token forgets the client's failures. Both doors share one count,
//! since they guard the same secret.
//!
//! [`Guesses::failed`] says whether a failure starts a burst or reaches the limit, so the
//! API can log a burst of wrong tokens twice (its start, and the lock) instead of once per
//! request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens allowed per client within [`WINDOW`].
pub const FAILURES: u32 = 5;

/// The window wrong tokens are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most clients whose failures are remembered.
const MAX_TRACKED: usize = 4096;

/// What a failure made of its client's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first failure of a burst (none in the window before it).
    First,
    /// Another failure, below the limit or past it.
    Counted,
    /// This failure reached the limit: the client waits this long.
    Limit(Duration),
}

/// The failure counts, per client.
#[derive(Default)]
pub struct Guesses {
    by_client: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// The key a client is counted under: an IPv6 address by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match crate::policy::plain_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Guesses {
    /// `Some(wait)` when `ip` has presented too many wrong tokens lately.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let f = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let &(n, since) = f.get(&key(ip))?;
        let left = WINDOW.checked_sub(since.elapsed())?;
        (n >= FAILURES).then_some(left)
    }

    /// Counts a wrong token from `ip`.
    pub fn failed(&self, ip: IpAddr) -> Failure {
        let mut f = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_TRACKED && !f.contains_key(&key(ip)) {
            // Make room without lifting a lock: drop what has expired, then clients below
            // the limit. Locked clients are never dropped (an attacker with thousands of
            // addresses must not be able to reset the locks by adding more); when they alone
            // fill the table, a new client's failure is not tracked (the table stays bounded,
            // and a 256-bit token is not guessed by the few tries that leaves).
            f.retain(|_, (_, since)| since.elapsed() < WINDOW);
            if f.len() >= MAX_TRACKED {
                f.retain(|_, (n, _)| *n >= FAILURES);
            }
            if f.len() >= MAX_TRACKED {
                return Failure::Counted;
            }
        }
        let e = f.entry(key(ip)).or_insert((0, Instant::now()));
        if e.1.elapsed() >= WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        match e.0 {
            1 if FAILURES > 1 => Failure::First,
            n if n == FAILURES => Failure::Limit(WINDOW.saturating_sub(e.1.elapsed())),
            _ => Failure::Counted,
        }
    }

    /// Forgets the failures of `ip` (after a right token).
    pub fn ok(&self, ip: IpAddr) {
        self.by_client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_never_lifts_a_lock() {
        let g = Guesses::default();
        let locked: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..FAILURES {
            g.failed(locked);
        }
        assert!(g.blocked(locked).is_some());
        // Thousands of other addresses, one wrong token each.
        for i in 0..(MAX_TRACKED as u32 * 2) {
            g.failed(IpAddr::V4((0x0a00_0000 + i).into()));
        }
        assert!(g.blocked(locked).is_some(), "the lock was lifted");
        assert!(g.by_client.lock().unwrap().len() <= MAX_TRACKED);
    }

    #[test]
    fn wrong_tokens_are_limited_per_client() {
        let g = Guesses::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(g.failed(ip), Failure::First);
        for _ in 1..FAILURES - 1 {
            assert_eq!(g.failed(ip), Failure::Counted);
        }
        assert!(g.blocked(ip).is_none());
        assert!(matches!(g.failed(ip), Failure::Limit(_)));
        assert!(g.blocked(ip).is_some());
        assert_eq!(g.failed(ip), Failure::Counted, "logged once per burst");
        assert!(g.blocked("127.0.0.2".parse().unwrap()).is_none());
        g.ok(ip);
        assert!(g.blocked(ip).is_none());
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let g = Guesses::default();
        for i in 0..FAILURES {
            g.failed(format!("2001:db8:1:2::{i}").parse().unwrap());
        }
        assert!(g.blocked("2001:db8:1:2:ffff::1".parse().unwrap()).is_some());
        assert!(g.blocked("2001:db8:1:3::1".parse().unwrap()).is_none());
    }
}
