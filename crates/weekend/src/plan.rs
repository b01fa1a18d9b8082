//! What a run does and when: its sizes, the steps of its weekend (batches, LDAP changes,
//! faults) at offsets from the start of the load, fixed or drawn from a seed.

use crate::history::FaultKind;
use std::time::Duration;

/// One step of the weekend.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A migration batch of `size` mailboxes, applied through `node`. `report`: as a
    /// `Get-MigrationUser | Export-Csv` report (a few users not completed, left where they
    /// are), else as the plain `EmailAddress` CSV of `New-MigrationBatch`.
    Batch {
        /// The batch's name.
        name: String,
        /// Mailboxes listed.
        size: usize,
        /// As a migration report.
        report: bool,
        /// The node it is applied through.
        node: String,
    },
    /// `count` mailboxes moved in LDAP (their recipient type changed).
    LdapMove {
        /// Mailboxes moved.
        count: usize,
    },
    /// A fault on `target`, repaired after `length`.
    Fault {
        /// What.
        kind: FaultKind,
        /// Where (`mx3`, `pg1`, `cloud`, `nats2`…).
        target: String,
        /// How long it lasts.
        length: Duration,
    },
}

/// A step and when it starts (after the load's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Offset from the load's start.
    pub at: Duration,
    /// What happens.
    pub action: Action,
}

/// A run's sizes and schedule.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `smoke` or `weekend`.
    pub name: &'static str,
    /// Mailboxes in the directory.
    pub mailboxes: usize,
    /// Every `cloud_every`-th mailbox starts in Exchange Online.
    pub cloud_every: usize,
    /// How long the load runs.
    pub load: Duration,
    /// Peak rate of the day's curve (messages per second).
    pub peak_rate: f64,
    /// Most recipients per message.
    pub max_rcpts: usize,
    /// The longest the run waits for every queue to empty after the load.
    pub drain: Duration,
    /// `fleet.max_lag` of the nodes.
    pub max_lag: Duration,
    /// `shadow.takeover_after` of the nodes.
    pub takeover_after: Duration,
    /// `delivery.timeout` of the nodes.
    pub delivery_timeout: Duration,
    /// `directory.ldap.sync_interval` of the nodes.
    pub sync_interval: Duration,
    /// `queue.max_backoff` of the nodes (`min_backoff` is a sixth of it).
    pub max_backoff: Duration,
    /// How long Exchange Online answers `5.1.10` for a mailbox after its move (its own
    /// directory sync lagging).
    pub unsynced_for: Duration,
    /// The steps, in time order.
    pub steps: Vec<Step>,
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn batch(name: &str, size: usize, report: bool, node: &str) -> Action {
    Action::Batch {
        name: name.into(),
        size,
        report,
        node: node.into(),
    }
}

fn fault(kind: FaultKind, target: &str, secs: u64) -> Action {
    Action::Fault {
        kind,
        target: target.into(),
        length: s(secs),
    }
}

impl Plan {
    /// The CI run: about two minutes, every kind of fault once, small batches.
    pub fn smoke() -> Plan {
        use FaultKind::*;
        let steps = vec![
            (4, batch("evening 1", 1_000, false, "mx1")),
            (8, Action::LdapMove { count: 50 }),
            (10, fault(HopThrottle, "cloud", 8)),
            (14, fault(NodeKill, "mx3", 26)),
            (18, fault(LdapDown, "ldap", 10)),
            (22, batch("weekend", 4_000, true, "mx2")),
            (32, fault(NodePartition, "mx2", 14)),
            (36, fault(NatsDown, "nats2", 10)),
            (50, fault(PgFailoverLost, "pg1", 12)),
            (70, batch("evening 2", 1_000, false, "mx1")),
            (58, fault(HopRefuse, "onprem", 8)),
            (44, Action::LdapMove { count: 50 }),
            (64, fault(SlowLink, "mx1", 8)),
            (66, fault(SlowDisk, "mx2", 8)),
        ];
        Plan {
            name: "smoke",
            mailboxes: 20_000,
            cloud_every: 10,
            load: s(75),
            peak_rate: 40.0,
            max_rcpts: 3,
            drain: s(60),
            max_lag: s(10),
            takeover_after: s(20),
            delivery_timeout: s(20),
            sync_interval: s(2),
            max_backoff: s(12),
            unsynced_for: s(8),
            steps: at(steps),
        }
    }

    /// The weekend of `bench/weekend.sh`: about ten minutes, the weekend's 83,000-mailbox
    /// batch from a migration report, evening batches of 22,000, LDAP changes, every fault.
    pub fn weekend() -> Plan {
        use FaultKind::*;
        let steps = vec![
            (20, batch("evening 1", 22_000, false, "mx1")),
            (45, Action::LdapMove { count: 300 }),
            (60, fault(HopThrottle, "cloud", 30)),
            (100, fault(LdapDown, "ldap", 40)),
            (150, batch("weekend", 83_000, true, "mx2")),
            (180, fault(NodeKill, "mx3", 90)),
            (210, fault(NatsDown, "nats2", 40)),
            (250, Action::LdapMove { count: 300 }),
            (300, fault(PgFailoverLost, "pg1", 40)),
            (355, batch("evening 2", 22_000, false, "mx1")),
            (345, fault(NodePartition, "mx2", 60)),
            (380, fault(HopRefuse, "onprem", 30)),
            (420, fault(SlowLink, "mx1", 30)),
            (440, fault(SlowDisk, "mx2", 30)),
            (430, batch("evening 3", 22_000, false, "mx3")),
        ];
        Plan {
            name: "weekend",
            mailboxes: 200_000,
            cloud_every: 10,
            load: s(480),
            peak_rate: 80.0,
            max_rcpts: 3,
            drain: s(120),
            max_lag: s(20),
            takeover_after: s(20),
            delivery_timeout: s(30),
            sync_interval: s(3),
            max_backoff: s(30),
            unsynced_for: s(60),
            steps: at(steps),
        }
    }

    /// The same sizes with the faults drawn from `seed`: each fault kind once, at a random
    /// time in the load's first four fifths, on a random target of its kind, for a random
    /// length (batches and LDAP changes stay where they are).
    pub fn randomized(mut self, seed: u64) -> Plan {
        let mut rng = fastrand::Rng::with_seed(seed);
        let span = self.load.as_secs() * 4 / 5;
        let longest = (self.load.as_secs() / 6).max(8);
        let mut steps: Vec<Step> = self
            .steps
            .iter()
            .filter(|s| !matches!(s.action, Action::Fault { .. }))
            .cloned()
            .collect();
        let kinds = [
            FaultKind::HopThrottle,
            FaultKind::LdapDown,
            FaultKind::NodeKill,
            FaultKind::NatsDown,
            FaultKind::PgFailoverLost,
            FaultKind::NodePartition,
            FaultKind::HopRefuse,
            FaultKind::SlowLink,
            FaultKind::SlowDisk,
        ];
        for kind in kinds {
            let target = match kind {
                FaultKind::HopThrottle | FaultKind::HopRefuse => {
                    ["onprem", "cloud"][rng.usize(..2)].to_string()
                }
                FaultKind::LdapDown => "ldap".into(),
                FaultKind::NatsDown => format!("nats{}", rng.usize(1..=3)),
                FaultKind::PgFailover | FaultKind::PgFailoverLost => "pg1".into(),
                _ => format!("mx{}", rng.usize(1..=3)),
            };
            let length = if kind == FaultKind::PgFailover {
                0
            } else {
                rng.u64(longest / 3..=longest)
            };
            steps.push(Step {
                at: s(rng.u64(2..span.max(3))),
                action: fault(kind, &target, length),
            });
        }
        steps.sort_by_key(|s| s.at);
        self.steps = steps;
        self
    }
}

/// The steps in time order (the run takes them in list order).
fn at(steps: Vec<(u64, Action)>) -> Vec<Step> {
    let mut steps: Vec<Step> = steps
        .into_iter()
        .map(|(secs, action)| Step {
            at: s(secs),
            action,
        })
        .collect();
    steps.sort_by_key(|s| s.at);
    steps
}

/// The day's curve: the rate at `t` of a run of length `len` (night low, a morning rise,
/// a peak at midday, the evening tail), at most `peak`.
pub fn rate(t: Duration, len: Duration, peak: f64) -> f64 {
    let hour = 24.0 * t.as_secs_f64() / len.as_secs_f64().max(1e-9);
    let day = (-((hour - 12.5) / 4.5).powi(2)).exp();
    peak * (0.15 + 0.85 * day)
}

/// When each message of the run is due after the start, following [`rate`].
pub fn due_times(len: Duration, peak: f64) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut t = 0.0f64;
    let end = len.as_secs_f64();
    while t < end {
        out.push(Duration::from_secs_f64(t));
        t += 1.0 / rate(Duration::from_secs_f64(t), len, peak).max(0.1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_peaks_at_midday_and_the_due_times_follow_it() {
        let len = s(240);
        let night = rate(s(10), len, 100.0);
        let noon = rate(s(125), len, 100.0);
        assert!(night < 20.0 && noon > 95.0, "{night} {noon}");
        let due = due_times(len, 100.0);
        let first_minute = due.iter().filter(|d| d.as_secs() < 60).count();
        let noon_minute = due
            .iter()
            .filter(|d| (95..155).contains(&d.as_secs()))
            .count();
        assert!(
            noon_minute > 3 * first_minute,
            "{first_minute} {noon_minute}"
        );
        assert!(due.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn the_fixed_schedules_are_in_time_order() {
        for p in [Plan::smoke(), Plan::weekend()] {
            assert!(p.steps.windows(2).all(|w| w[0].at <= w[1].at), "{}", p.name);
            assert!(p.steps.iter().all(|s| s.at < p.load), "{}", p.name);
        }
    }

    #[test]
    fn a_seed_draws_every_fault_once_and_the_same_seed_the_same_schedule() {
        let a = Plan::smoke().randomized(7);
        let b = Plan::smoke().randomized(7);
        assert_eq!(a.steps, b.steps);
        let faults = a
            .steps
            .iter()
            .filter(|s| matches!(s.action, Action::Fault { .. }))
            .count();
        assert_eq!(faults, 9);
        assert!(a.steps.windows(2).all(|w| w[0].at <= w[1].at));
        assert_ne!(a.steps, Plan::smoke().randomized(8).steps);
    }
}
