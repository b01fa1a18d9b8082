//! Message stage (`MAIL FROM` to the end of data): whether a message is taken, and what is
//! done to it before it is spooled.
//! - [`check_space`] (`MAIL FROM`): room on the spool's disk for `spool.min_free_space`
//!   plus the declared size (`452 4.3.1`);
//! - [`hops`] (end of data): `server.max_hops` `Received:` headers at most (`554 5.4.6`);
//! - [`strip_untrusted`]: internal headers (`policy.strip_headers`) removed from the mail
//!   of clients outside `policy.trusted_networks`;
//! - [`route_sizes`]: without `SIZE=`, the size is known only now: a message no
//!   recipient's route takes is refused ([`super::delivery::route_size`], `552 5.3.4`);
//!   when some take it, the others fail at delivery with a DSN;
//! - [`returned_from`]: the loop guard's mark, the routes a message that passed through us
//!   before came back from (delivery does not send it there again,
//!   [`super::delivery::routing_loop`]).

use super::delivery::{route_size, TooBigForRoute};
use super::recipient::admit;
use super::{headers, Rules};
use crate::directory::Resolution;
use crate::proto::reply::Reply;
use crate::types::Address;
use std::net::IpAddr;

/// The reply while the spool's disk is short of space (RFC 3463 4.3.1).
pub const NO_SPACE: Reply =
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later");

/// The spool's disk has less free space than a message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortOfSpace {
    /// Free bytes.
    pub free: u64,
    /// Bytes needed: `spool.min_free_space` plus the declared size.
    pub need: u64,
}

/// Room for a message of `declared` bytes (`SIZE=`; 0 when not declared) when the spool's
/// disk has `free` bytes.
pub fn check_space(rules: &Rules, declared: Option<u64>, free: u64) -> Result<(), ShortOfSpace> {
    let need = rules.min_free_space.saturating_add(declared.unwrap_or(0));
    if free < need {
        return Err(ShortOfSpace { free, need });
    }
    Ok(())
}

/// The hop limit: more than `max_hops` `Received:` headers in `message` is refused (a mail
/// loop elsewhere).
pub fn hops(message: &[u8], max_hops: usize) -> Result<(), Reply> {
    let hops = headers::count_hops(message);
    if hops > max_hops {
        return Err(Reply::owned(
            554,
            "5.4.6",
            format!("Too many hops ({hops} Received headers, limit {max_hops}): mail loop?"),
        ));
    }
    Ok(())
}

/// Removes the internal headers of `policy.strip_headers` from the mail of a client (`ip`)
/// outside `policy.trusted_networks`. Returns the number of fields removed.
pub fn strip_untrusted(rules: &Rules, ip: IpAddr, message: &mut Vec<u8>) -> usize {
    if super::is_trusted(&rules.trusted, ip) {
        return 0;
    }
    headers::strip_headers(message, &rules.strip_headers)
}

/// The route size limit at the end of data, for a message of `size` bytes to `rcpts`
/// (`resolve`: the directory): `Err` with every recipient's route, when none of them takes
/// it (never empty).
pub fn route_sizes(
    rules: &Rules,
    rcpts: &[Address],
    size: u64,
    resolve: impl Fn(&Address) -> Resolution,
) -> Result<(), Vec<TooBigForRoute>> {
    if rules.route_sizes.is_empty() {
        return Ok(());
    }
    let routes: Vec<String> = rcpts
        .iter()
        .filter_map(|to| {
            admit(&rules.policy, to, &resolve)
                .ok()
                .map(|d| d.route.as_str().to_string())
        })
        .collect();
    if routes.is_empty() {
        return Ok(());
    }
    let refusals: Vec<TooBigForRoute> = routes
        .iter()
        .filter_map(|r| route_size(r, rules.route_limit(r), size).err())
        .collect();
    if refusals.len() == routes.len() {
        return Err(refusals);
    }
    Ok(())
}

/// The loop guard at acceptance: when `message` passed through this relay before (our
/// host name in a `Received:` header after ours), the routes whose next hops send from the
/// client (`routes_sending_from`, asked only then); else none.
pub fn returned_from(
    rules: &Rules,
    message: &[u8],
    routes_sending_from: impl FnOnce() -> Vec<String>,
) -> Vec<String> {
    if headers::passed_through(message, &rules.hostname) {
        routes_sending_from()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_CONFIG};
    use crate::types::RouteName;

    fn rules(tweak: impl FnOnce(&mut Config)) -> Rules {
        let mut c = Config::parse(DEFAULT_CONFIG, "test").unwrap();
        tweak(&mut c);
        Rules::new(&c)
    }

    #[test]
    fn a_message_no_recipient_route_takes_is_refused() {
        let r = rules(|c| c.routes.get_mut("cloud").unwrap().max_message_size = Some(100));
        let cloud = |_: &Address| Resolution::Listed(RouteName("cloud".into()));
        let onprem = |_: &Address| Resolution::Listed(RouteName("onprem".into()));
        let to = [Address::parse("a@nhs.test", false).unwrap()];
        assert_eq!(route_sizes(&r, &to, 100, cloud), Ok(()));
        let e = route_sizes(&r, &to, 101, cloud).unwrap_err();
        assert_eq!((e[0].route.as_str(), e[0].limit), ("cloud", 100));
        assert_eq!(route_sizes(&r, &to, 101, onprem), Ok(()));
    }

    #[test]
    fn space_and_hops() {
        let r = rules(|c| c.spool.min_free_space = 1000);
        assert_eq!(check_space(&r, Some(10), 1010), Ok(()));
        assert_eq!(
            check_space(&r, Some(10), 1009),
            Err(ShortOfSpace {
                free: 1009,
                need: 1010
            })
        );
        let m = b"Received: a\r\nReceived: b\r\n\r\nbody";
        assert_eq!(hops(m, 2), Ok(()));
        assert_eq!(
            hops(m, 1).unwrap_err().to_string(),
            "554 5.4.6 Too many hops (2 Received headers, limit 1): mail loop?"
        );
    }
}
