//! The state of every next hop, as the console's overview shows it: one function,
//! [`Transport::hop_states`], that joins what the connection pool knows with the routes of
//! the config and the scheduler's route health (given by the caller).
//!
//! Sources: the pool's view of each next-hop address ([`super::hops::HopView`]: up,
//! `circuit open` when it refuses connections, `throttled` when it asked us to slow down)
//! and the scheduler's route health (no next hop of a route answered: its deferred mail
//! waits for a probe; `queue::Queue::routes_down`).

pub use super::hops::HopCondition;
use super::Transport;
use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// One next hop of one route (or a resolved address that no route names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopState {
    /// The route (`None`: an address found through DNS, for an MX route or a host name).
    pub route: Option<String>,
    /// The hop as configured (`host:port`, `MX domain:port`) or its address.
    pub next_hop: String,
    /// Its state.
    pub state: HopCondition,
    /// Why, in words (empty when up).
    pub detail: String,
}

impl Transport {
    /// Every configured next hop of every route of `config` with its state, then the
    /// resolved addresses whose circuit is open that no route names directly. `routes_down`
    /// is the scheduler's route health (route, no next hop answered).
    pub fn hop_states(&self, config: &Config, routes_down: &[(String, bool)]) -> Vec<HopState> {
        let views = self.hop_views();
        let mut used = vec![false; views.len()];
        let mut out = Vec::new();
        for (name, route) in &config.routes {
            let down = routes_down.iter().any(|(r, d)| r == name && *d);
            let mut hops: Vec<(String, Option<SocketAddr>)> = route
                .next_hops
                .iter()
                .map(|h| {
                    let addr = h
                        .host
                        .parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, h.port));
                    (
                        addr.map_or_else(|| format!("{}:{}", h.host, h.port), |a| a.to_string()),
                        addr,
                    )
                })
                .collect();
            if let Some(mx) = &route.mx {
                hops.push((format!("MX {mx}:{}", route.port), None));
            }
            if route.recipient_mx {
                hops.push((format!("MX of each recipient domain:{}", route.port), None));
            }
            for (hop, addr) in hops {
                let found = addr.and_then(|a| {
                    let a = a.to_string();
                    views.iter().position(|v| v.next_hop == a)
                });
                let (state, detail) = match found {
                    Some(i) => {
                        used[i] = true;
                        (views[i].state, views[i].detail())
                    }
                    None => (HopCondition::Up, String::new()),
                };
                let (state, detail) = match state {
                    HopCondition::Up if down => (
                        HopCondition::CircuitOpen,
                        "no next hop of the route answered; its deferred mail waits for a probe"
                            .to_string(),
                    ),
                    _ => (state, detail),
                };
                out.push(HopState {
                    route: Some(name.clone()),
                    next_hop: hop,
                    state,
                    detail,
                });
            }
        }
        // Addresses found through DNS (MX routes, host names) that are not up.
        for (v, used) in views.iter().zip(used) {
            let (state, detail) = (v.state, v.detail());
            if !used && state != HopCondition::Up {
                out.push(HopState {
                    route: v.route.clone(),
                    next_hop: v.next_hop.clone(),
                    state,
                    detail,
                });
            }
        }
        out
    }
}
