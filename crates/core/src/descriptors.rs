//! The file descriptor budget `serve` checks at start against `RLIMIT_NOFILE`.
//!
//! Every SMTP session, admin connection and outbound delivery holds a descriptor; when the
//! process runs out, `accept` fails with EMFILE and the MX stops taking mail. The caps add
//! up to a budget: `server.max_connections` + `admin.max_connections` + the outbound
//! deliveries (the sum of the routes' `concurrency`) + a reserve for everything else
//! ([`RESERVE`]). At start the soft limit is raised to the hard limit when it is lower (as
//! many servers do); if the budget is still above it, `serve` says so with the numbers, and
//! what to change. The listeners also survive running out ([`crate::accept`]), but only
//! a budget under the limit keeps SMTP accepting whatever the admin listener faces.

use crate::config::Config;
use tracing::{info, warn};

/// Descriptors kept for what is not counted by a cap: the listeners, spool segments, the
/// directory store and its change log, the log output, DNS and MTA-STS sockets, the fleet's
/// PostgreSQL connection, the runtime's own (epoll, eventfd).
pub const RESERVE: u64 = 128;

/// What the caps of a config need, part by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `server.max_connections`.
    pub smtp: u64,
    /// `admin.max_connections` (0 without `[admin]`).
    pub admin: u64,
    /// Sum of the routes' `concurrency`.
    pub outbound: u64,
    /// [`RESERVE`] and one per listen address.
    pub reserve: u64,
}

impl Budget {
    /// The budget of `config`.
    pub fn of(config: &Config) -> Budget {
        Budget {
            smtp: config.server.max_connections as u64,
            admin: config
                .admin
                .as_ref()
                .map_or(0, |a| a.max_connections as u64),
            outbound: config.routes.values().map(|r| r.concurrency as u64).sum(),
            reserve: RESERVE + config.server.listen.len() as u64 + 1,
        }
    }

    /// All parts together.
    pub fn total(&self) -> u64 {
        self.smtp + self.admin + self.outbound + self.reserve
    }
}

/// The soft limit before and after the start-up raise, and the hard limit (`None`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The soft limit the process started with.
    pub soft_before: Option<u64>,
    /// The soft limit in force now.
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit when it is lower (an unlimited hard
/// limit: to at least the budget), then logs the limit against `config`'s budget: at info
/// when it fits, at warning with the numbers and the fix when it does not. Returns the limits.
pub fn check(config: &Config) -> Limits {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let budget = Budget::of(config);
    let before = getrlimit(Resource::Nofile);
    let mut soft = before.current;
    if let Some(cur) = soft {
        let target = match before.maximum {
            Some(hard) => hard,
            None => cur.max(budget.total()).max(65_536),
        };
        if target > cur {
            let raised = Rlimit {
                current: Some(target),
                maximum: before.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => soft = Some(target),
                Err(e) => {
                    warn!(error = %e, soft = cur, target, "cannot raise the file descriptor soft limit")
                }
            }
        }
    }
    let limits = Limits {
        soft_before: before.current,
        soft,
        hard: before.maximum,
    };
    let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
    match soft {
        Some(limit) if limit < budget.total() => warn!(
            limit,
            hard = %show(limits.hard),
            budget = budget.total(),
            smtp = budget.smtp,
            admin = budget.admin,
            outbound = budget.outbound,
            reserve = budget.reserve,
            "file descriptors: the limit (RLIMIT_NOFILE) is below what the caps can use (server.max_connections + admin.max_connections + the routes' concurrency + a reserve): under load, accepts fail with \"Too many open files\"; raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) or lower the caps"
        ),
        _ => info!(
            limit = %show(soft),
            raised_from = %show(limits.soft_before),
            budget = budget.total(),
            smtp = budget.smtp,
            admin = budget.admin,
            outbound = budget.outbound,
            reserve = budget.reserve,
            "file descriptors: the limit covers the caps"
        ),
    }
    limits
}

/// What `check-config` says: the limit `serve` would reach (the hard limit it raises the
/// soft one to) against `config`'s budget, when it falls short; `None` when it fits.
pub fn shortfall(config: &Config) -> Option<String> {
    use rustix::process::{getrlimit, Resource};
    let budget = Budget::of(config);
    let l = getrlimit(Resource::Nofile);
    let limit = l.maximum.or(l.current)?;
    (limit < budget.total()).then(|| {
        format!(
            "file descriptors: the limit (RLIMIT_NOFILE, hard) is {limit}, below what the caps can use: {} (server.max_connections {} + admin.max_connections {} + the routes' concurrency {} + reserve {}); raise it (LimitNOFILE= in the systemd unit) or lower the caps",
            budget.total(),
            budget.smtp,
            budget.admin,
            budget.outbound,
            budget.reserve
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_adds_the_caps_and_a_reserve() {
        let cfg = Config::parse(crate::config::DEFAULT_CONFIG, "default").unwrap();
        let b = Budget::of(&cfg);
        assert_eq!(b.smtp, cfg.server.max_connections as u64);
        assert_eq!(b.admin, cfg.admin.as_ref().unwrap().max_connections as u64);
        let routes: u64 = cfg.routes.values().map(|r| r.concurrency as u64).sum();
        assert_eq!(b.outbound, routes);
        assert!(b.reserve > RESERVE);
        assert_eq!(b.total(), b.smtp + b.admin + b.outbound + b.reserve);
    }
}
