//! The loop guard's memory: which routes send mail from an address. A message that passed
//! through us before and now comes back from one of these addresses is not sent to those
//! routes again (the decision is the loop guard's, at acceptance; this is only its state).
//!
//! The routes that send from an address are those whose `returns_from` networks hold it,
//! those whose `next_hops` name it, and those whose deliveries reached it (noted by the
//! queue after each delivery, except for routes to each recipient domain's MX hosts: those
//! are the internet). One [`HopRoutes`] is built by the composition root and shared by the
//! queue (which notes) and the session handler (which asks).

use crate::config::Config;
use crate::policy::plain_ip;
use arc_swap::ArcSwap;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Most next-hop addresses remembered (an MX route to the internet meets many; the map
/// starts over when full).
const MAX_HOP_ROUTES: usize = 10_000;

/// What the config says of one route: the networks its mail returns from, and its next
/// hops given as IP addresses.
struct Configured {
    route: String,
    returns_from: Vec<ipnet::IpNet>,
    next_hop_ips: Vec<IpAddr>,
}

/// The routes whose next hops send mail from each address (see the module docs).
pub struct HopRoutes {
    configured: ArcSwap<Vec<Configured>>,
    /// Next-hop addresses deliveries reached, with their routes.
    reached: Mutex<HashMap<IpAddr, Vec<String>>>,
}

fn configured(config: &Config) -> Vec<Configured> {
    config
        .routes
        .iter()
        .map(|(name, r)| Configured {
            route: name.clone(),
            returns_from: r.returns_from.clone(),
            next_hop_ips: r
                .next_hops
                .iter()
                .filter_map(|h| h.host.parse::<IpAddr>().ok().map(plain_ip))
                .collect(),
        })
        .collect()
}

impl HopRoutes {
    /// The routes of `config`, and no address reached yet.
    pub fn new(config: &Config) -> HopRoutes {
        HopRoutes {
            configured: ArcSwap::from_pointee(configured(config)),
            reached: Mutex::new(HashMap::new()),
        }
    }

    /// Uses the routes of `config` (at each reload); the addresses reached are kept.
    pub fn set_config(&self, config: &Config) {
        self.configured.store(Arc::new(configured(config)));
    }

    fn reached(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<String>>> {
        self.reached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that a delivery on `route` reached the next hop at `ip`.
    pub fn note(&self, ip: IpAddr, route: &str) {
        let ip = plain_ip(ip);
        let mut m = self.reached();
        if m.get(&ip).is_some_and(|r| r.iter().any(|x| x == route)) {
            return;
        }
        if m.len() >= MAX_HOP_ROUTES {
            m.clear();
        }
        m.entry(ip).or_default().push(route.to_string());
    }

    /// The routes whose next hops send mail from `ip`, by name: a route's `returns_from`
    /// networks, its next hops given as IP addresses, and the addresses its deliveries
    /// reached.
    pub fn routes_sending_from(&self, ip: IpAddr) -> Vec<String> {
        let ip = plain_ip(ip);
        let mut out: BTreeSet<String> = self
            .configured
            .load()
            .iter()
            .filter(|c| {
                c.returns_from.iter().any(|n| n.contains(&ip)) || c.next_hop_ips.contains(&ip)
            })
            .map(|c| c.route.clone())
            .collect();
        if let Some(routes) = self.reached().get(&ip) {
            out.extend(routes.iter().cloned());
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reached_addresses_and_configured_ones_name_their_routes() {
        let base = || {
            let mut c = Config::parse(crate::config::DEFAULT_CONFIG, "test").unwrap();
            c.routes.clear();
            c
        };
        let mut c = base();
        let mut route = |name: &str, toml: &str| {
            let r: crate::config::RouteConfig = toml::from_str(toml).unwrap();
            c.routes.insert(name.to_string(), r);
        };
        route("onprem", "next_hops = [\"10.0.0.5:25\"]\n");
        route(
            "cloud",
            "mx = \"tenant.test\"\nreturns_from = [\"192.0.2.0/24\"]\n",
        );
        let h = HopRoutes::new(&c);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(h.routes_sending_from(ip("10.0.0.5")), vec!["onprem"]);
        assert_eq!(h.routes_sending_from(ip("::ffff:10.0.0.5")), vec!["onprem"]);
        assert_eq!(h.routes_sending_from(ip("192.0.2.9")), vec!["cloud"]);
        assert!(h.routes_sending_from(ip("198.51.100.1")).is_empty());
        h.note(ip("198.51.100.1"), "cloud");
        h.note(ip("198.51.100.1"), "cloud");
        h.note(ip("::ffff:198.51.100.1"), "onprem");
        assert_eq!(
            h.routes_sending_from(ip("198.51.100.1")),
            vec!["cloud", "onprem"]
        );
        h.set_config(&base());
        assert!(h.routes_sending_from(ip("10.0.0.5")).is_empty());
        assert_eq!(h.routes_sending_from(ip("198.51.100.1")).len(), 2);
    }
}
