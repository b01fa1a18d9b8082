//! Delivery stage (each attempt, `queue::attempt`): what is not sent, and which replies do
//! not bounce.
//! - [`refusal`]: a route's share of a message is not sent where it would certainly loop
//!   ([`routing_loop`], `554 5.4.6`) or be refused ([`route_size`], `552 5.3.4`); its
//!   recipients fail with a DSN;
//! - [`move_grace`]: a permanent "unknown recipient" from the side a mailbox just moved to
//!   defers until `directory.move_grace` has passed.
//!
//! [`route_size`] is the one route size limit: the recipient stage asks it for the declared
//! `SIZE=`, the message stage at end of data, this stage before sending.

use crate::directory::Moved;
use crate::proto::reply::Reply;
use crate::proto::{Failure, LocalError, RcptOutcome};
use crate::route::Rule;
use std::time::Duration;

/// A message larger than its route takes (`routes.NAME.max_message_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooBigForRoute {
    /// The route.
    pub route: String,
    /// The message's size (declared or actual), bytes.
    pub size: u64,
    /// The route's limit, bytes.
    pub limit: u64,
}

impl TooBigForRoute {
    /// The `552 5.3.4` a client gets at RCPT or at the end of data.
    pub fn reply(&self) -> Reply {
        Reply::owned(
            552,
            "5.3.4",
            format!(
                "Message too big for this recipient: its mailbox's side ({}) takes at most {} bytes",
                self.route, self.limit
            ),
        )
    }

    /// The error its recipients fail with at delivery (and their DSN says).
    pub fn error(self) -> LocalError {
        LocalError::TooBigForRoute {
            route: self.route,
            size: self.size,
            limit: self.limit,
        }
    }
}

/// The route size limit: `Err` when a message of `size` bytes is larger than `route` takes
/// (`limit`, its `max_message_size`; `None`: no limit).
pub fn route_size(route: &str, limit: Option<u64>, size: u64) -> Result<(), TooBigForRoute> {
    match limit {
        Some(limit) if size > limit => Err(TooBigForRoute {
            route: route.to_string(),
            size,
            limit,
        }),
        _ => Ok(()),
    }
}

/// The loop guard at delivery: a message that came back to us from `route`'s next hop
/// (`returned_from`, set when it was accepted, see [`super::message::returned_from`]) is
/// not sent to that route again.
pub fn routing_loop(route: &str, returned_from: &[String]) -> Result<(), LocalError> {
    if returned_from.iter().any(|r| r == route) {
        return Err(LocalError::RoutingLoop(route.to_string()));
    }
    Ok(())
}

/// Why a route's share of a message (`size` bytes, `returned_from` the routes it came back
/// from) must not be sent to `route` (whose limit is `limit`) at all, if it must not: the
/// loop guard first, then the route size limit.
pub fn refusal(
    route: &str,
    limit: Option<u64>,
    size: u64,
    returned_from: &[String],
) -> Result<(), LocalError> {
    routing_loop(route, returned_from)?;
    route_size(route, limit, size).map_err(TooBigForRoute::error)
}

/// The statuses that say "no such recipient" on the side a mailbox just moved to while
/// directory sync between the estates catches up: `5.1.1`, `5.1.10` (Exchange Online's
/// RecipientNotFound) and `5.4.1` (Exchange Online's "Recipient address rejected: Access
/// denied", directory-based edge blocking).
pub const NOT_YET_SYNCED: [(u16, u16); 3] = [(1, 1), (1, 10), (4, 1)];

/// Unix seconds as RFC 3339 (empty if out of range).
fn rfc3339(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The move grace: when `o` is a permanent "unknown recipient" from the next hop for a
/// recipient its route gave by `rule` [`Rule::Listed`], and its mailbox `moved` (asked
/// only then) less than `grace` before `now` (Unix seconds), the deferral it becomes
/// ([`LocalError::MoveGrace`], naming the change); `None`: `o` stands.
pub fn move_grace(
    o: &RcptOutcome,
    rule: Rule,
    grace: Duration,
    now: u64,
    moved: impl FnOnce() -> Option<Moved>,
) -> Option<RcptOutcome> {
    let RcptOutcome::Failed(Failure::Remote(r)) = o else {
        return None;
    };
    let status = r.status?;
    if grace.is_zero()
        || rule != Rule::Listed
        || status.class() != 5
        || !NOT_YET_SYNCED.contains(&(status.subject(), status.detail()))
    {
        return None;
    }
    let moved = moved()?;
    let until = moved.at.saturating_add(grace.as_secs());
    if now >= until {
        return None;
    }
    Some(RcptOutcome::Deferred(Failure::Local(
        LocalError::MoveGrace {
            reply: r.to_string(),
            subject: status.subject(),
            detail: status.detail(),
            origin: moved.origin,
            moved: rfc3339(moved.at),
            until: rfc3339(until),
        },
    )))
}

/// What the move grace decides for a recipient of `route` given by `rule` whose mailbox
/// last `moved` as said, at `now`: for `route explain`.
pub(super) fn grace_verdict(
    route: &str,
    rule: Rule,
    grace: Duration,
    now: u64,
    moved: Option<Moved>,
) -> String {
    if grace.is_zero() {
        return "off (directory.move_grace = 0s)".into();
    }
    if rule != Rule::Listed {
        return "does not apply: not listed in the directory".into();
    }
    let Some(moved) = moved else {
        return "does not apply: no move of this mailbox recorded".into();
    };
    let until = moved.at.saturating_add(grace.as_secs());
    let when = format!("moved by {} at {}", moved.origin, rfc3339(moved.at));
    if now >= until {
        format!("ended {} ({when})", rfc3339(until))
    } else {
        format!(
            "5.1.1, 5.1.10, 5.4.1 from {route} defer until {} ({when})",
            rfc3339(until)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reply::Reply;

    #[test]
    fn one_route_size_limit() {
        assert_eq!(route_size("cloud", None, u64::MAX), Ok(()));
        assert_eq!(route_size("cloud", Some(4096), 4096), Ok(()));
        let e = route_size("cloud", Some(4096), 4097).unwrap_err();
        assert_eq!(
            e.clone().error().to_string(),
            "message of 4097 bytes is larger than route cloud takes (4096 bytes at most)"
        );
        assert_eq!(e.reply().code, 552);
    }

    #[test]
    fn the_loop_guard_comes_before_the_size() {
        let back = ["onprem".to_string()];
        assert!(matches!(
            refusal("onprem", Some(1), 10, &back),
            Err(LocalError::RoutingLoop(r)) if r == "onprem"
        ));
        assert!(matches!(
            refusal("cloud", Some(1), 10, &back),
            Err(LocalError::TooBigForRoute { .. })
        ));
        assert_eq!(refusal("cloud", None, 10, &back), Ok(()));
    }

    #[test]
    fn move_grace_defers_unknown_recipient_replies_after_a_move() {
        let failed = |status: &'static str| {
            let r = Reply::owned(550, status, "no such recipient".to_string());
            RcptOutcome::Failed(Failure::Remote(r))
        };
        let moved = || {
            Some(Moved {
                origin: "batch 3".into(),
                at: 1000,
            })
        };
        let grace = Duration::from_secs(100);
        let o = failed("5.1.10");
        let d = move_grace(&o, Rule::Listed, grace, 1099, moved);
        assert!(
            matches!(&d, Some(RcptOutcome::Deferred(Failure::Local(LocalError::MoveGrace { origin, until, .. })))
                if origin == "batch 3" && until == "1970-01-01T00:18:20Z"),
            "{d:?}"
        );
        assert_eq!(move_grace(&o, Rule::Listed, grace, 1100, moved), None);
        assert_eq!(move_grace(&o, Rule::Unknown, grace, 1050, moved), None);
        assert_eq!(
            move_grace(&o, Rule::Listed, Duration::ZERO, 1050, moved),
            None
        );
        assert_eq!(move_grace(&o, Rule::Listed, grace, 1050, || None), None);
        let other = failed("5.7.1");
        assert_eq!(move_grace(&other, Rule::Listed, grace, 1050, moved), None);
    }
}
