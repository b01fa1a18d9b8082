//! The state of every next hop, as the console's overview shows it: one function,
//! [`Queue::hop_states`], that gathers what the scheduler and the connection pool know.
//!
//! Sources today: the pool's circuit breaker (a hop that refuses connections is skipped for a
//! while: `circuit open`) and the scheduler's route health (no next hop of a route answered:
//! its deferred mail waits for a probe). A new kind of hop state (such as `throttled`, when
//! a next hop asks us to slow down) is one more [`HopCondition`] variant and one more source
//! read in [`Queue::hop_states`].

use super::Queue;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// What a next hop allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HopCondition {
    /// Deliveries go ahead.
    #[serde(rename = "up")]
    Up,
    /// Connections failed: deliveries skip it until a probe gets through.
    #[serde(rename = "circuit open")]
    CircuitOpen,
    /// The hop asked us to slow down: fewer deliveries in flight for a while.
    #[serde(rename = "throttled")]
    Throttled,
}

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

impl Queue {
    /// Every configured next hop of every route with its state, then the resolved addresses
    /// whose circuit is open that no route names directly.
    pub fn hop_states(&self) -> Vec<HopState> {
        let config = self.inner.config.load();
        let mut open = self.inner.pool.open_circuits();
        open.sort();
        let routes_down = self.routes_down();
        let circuit = |failures: u32, wait: std::time::Duration| {
            format!(
                "{failures} failed connect(s); next probe in {} s",
                wait.as_secs()
            )
        };
        let mut used = vec![false; open.len()];
        let mut out = Vec::new();
        for (name, route) in &config.routes {
            let down = routes_down.iter().any(|(r, d)| r == name && *d);
            let route_down = || {
                (
                    HopCondition::CircuitOpen,
                    "no next hop of the route answered; its deferred mail waits for a probe"
                        .to_string(),
                )
            };
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
            for (hop, addr) in hops {
                let found = addr.and_then(|a| open.iter().position(|(o, _, _)| *o == a));
                let (state, detail) = match found {
                    Some(i) => {
                        used[i] = true;
                        (HopCondition::CircuitOpen, circuit(open[i].1, open[i].2))
                    }
                    None if down => route_down(),
                    None => (HopCondition::Up, String::new()),
                };
                out.push(HopState {
                    route: Some(name.clone()),
                    next_hop: hop,
                    state,
                    detail,
                });
            }
        }
        for (i, (addr, failures, wait)) in open.iter().enumerate() {
            if !used[i] {
                out.push(HopState {
                    route: None,
                    next_hop: addr.to_string(),
                    state: HopCondition::CircuitOpen,
                    detail: circuit(*failures, *wait),
                });
            }
        }
        out
    }
}
