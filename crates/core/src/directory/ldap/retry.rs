//! When to try the LDAP source again after a failed round.
//!
//! Failures back off exponentially from 2 s, doubled each time up to a minute (or
//! `sync_interval` when that is longer), each delay drawn between 75 % and 125 % of its
//! value, so a fleet restarted at once does not knock in step. A bind refused for its
//! credentials (LDAP result 49) is not retried with the same password: each failed bind
//! counts toward the account's lockout threshold, and a retry every few seconds locks a
//! service account within a minute (then the right password is refused too). The password
//! (inline, or `password_file`, read again at every check) is tried again as soon as it
//! changes, and otherwise once every [`CREDENTIALS_HOLD`]: at most two tries in a typical
//! 30-minute lockout observation window.

use crate::config::LdapConfig;
use std::time::{Duration, Instant};

/// How long a password refused as invalid is not tried again (unless it changes).
pub const CREDENTIALS_HOLD: Duration = Duration::from_secs(30 * 60);
/// The first delay after a failure.
const FIRST: Duration = Duration::from_secs(2);
/// The longest delay between tries (unless `sync_interval` is longer): a DC back from an
/// outage is read again within about a minute.
const CAP: Duration = Duration::from_secs(60);

/// The retry state of one sync loop.
#[derive(Debug, Default)]
pub struct Retry {
    /// Failures in a row.
    failures: u32,
    /// A password refused as invalid: its fingerprint, and when it was refused.
    refused: Option<(u32, Instant)>,
}

/// A fingerprint of the configured password (never kept or logged in clear).
fn password_print(cfg: &LdapConfig) -> u32 {
    match cfg.password() {
        Ok(Some(p)) => crc32fast::hash(p.as_bytes()),
        Ok(None) => 0,
        Err(_) => 1,
    }
}

impl Retry {
    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failed round; returns how long to wait before the next one.
    pub fn failed(&mut self, cfg: &LdapConfig, credentials: bool) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if credentials {
            self.refused = Some((password_print(cfg), Instant::now()));
        }
        let base = FIRST.saturating_mul(1u32 << self.failures.saturating_sub(1).min(16));
        let cap = CAP.max(cfg.sync_interval);
        jitter(base.min(cap))
    }

    /// Records a successful round.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.refused = None;
    }

    /// While a refused password is held back: how much longer (`None`: a round may run,
    /// because nothing is held, the hold is over, or the password changed since).
    pub fn held(&self, cfg: &LdapConfig) -> Option<Duration> {
        let (print, at) = self.refused?;
        if password_print(cfg) != print {
            return None;
        }
        CREDENTIALS_HOLD.checked_sub(at.elapsed())
    }
}

/// `d` scaled by a random factor between 0.75 and 1.25.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pw: &str) -> LdapConfig {
        let text = format!(
            "{}\n[directory.ldap]\nurl = \"ldaps://127.0.0.1:1\"\nbase_dn = \"dc=corp,dc=test\"\nbind_dn = \"cn=svc\"\npassword = \"{pw}\"\nsync_interval = \"10s\"\n",
            crate::config::DEFAULT_CONFIG
        );
        crate::config::Config::parse(&text, "t")
            .unwrap()
            .directory
            .ldap
            .unwrap()
    }

    #[test]
    fn failures_back_off_exponentially_with_a_cap_and_jitter() {
        let c = cfg("x");
        let mut r = Retry::default();
        let delays: Vec<Duration> = (0..12).map(|_| r.failed(&c, false)).collect();
        assert!(
            delays[0] >= Duration::from_millis(1500) && delays[0] <= Duration::from_millis(2500)
        );
        assert!(delays[3] >= Duration::from_secs(12) && delays[3] <= Duration::from_secs(20));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(75)));
        assert!(
            delays[11] >= Duration::from_secs(45),
            "capped near a minute: {delays:?}"
        );
        assert_eq!(r.held(&c), None, "no credentials error: nothing held");
        r.succeeded();
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn a_refused_password_is_held_until_it_changes() {
        let mut r = Retry::default();
        r.failed(&cfg("wrong"), true);
        let left = r.held(&cfg("wrong")).unwrap();
        assert!(left > Duration::from_secs(29 * 60));
        assert_eq!(
            r.held(&cfg("fixed")),
            None,
            "a new password is tried at once"
        );
        r.succeeded();
        assert_eq!(r.held(&cfg("wrong")), None);
    }
}
