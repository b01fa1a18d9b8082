//! The outbound side as one value: the connection pool with its next-hop states, the
//! resolver (with DNSSEC and MTA-STS), and each route's TLS settings. The composition root
//! (`relay::start`) builds one [`Transport`] from the config and hands it to the queue, which
//! only asks it to deliver; reloads give it the new config; the console and the API read the
//! next hops' states from it (`states`).

use super::dns::{self, Dns};
use super::hops::HopView;
use super::pool::Pool;
use super::{Attempt, Hello, HopRules, Outbound, RouteTls, Target};
use crate::config::{Config, TlsPolicy};
use arc_swap::ArcSwap;
use std::collections::HashMap;

/// Idle connections kept per next hop.
const MAX_IDLE: usize = 16;

/// Why the outbound side could not be set up from a config.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Outbound TLS material of a route is unusable.
    #[error(transparent)]
    Tls(#[from] crate::certs::TlsError),
    /// The resolver could not be set up.
    #[error("DNS: {0}")]
    Dns(#[source] dns::SetupError),
}

/// Everything a delivery needs besides the message: pool, resolver, route TLS.
pub struct Transport {
    pool: Pool,
    dns: Dns,
    tls: ArcSwap<HashMap<String, RouteTls>>,
}

impl Transport {
    /// The outbound side for `config`, with each route's TLS settings already loaded
    /// ([`super::tls::route_tls`], run by the start-up checks). Reads the DNS trust anchor
    /// and MTA-STS files now, so a bad one is reported at start-up.
    pub fn new(
        config: &Config,
        route_tls: HashMap<String, RouteTls>,
    ) -> Result<Transport, SetupError> {
        let t = Transport {
            pool: Pool::new(MAX_IDLE, config.delivery.hop_concurrency),
            dns: Dns::for_config(config).map_err(SetupError::Dns)?,
            tls: ArcSwap::from_pointee(route_tls),
        };
        t.pool.set_max_down(config.queue.probe_interval);
        Ok(t)
    }

    /// Uses `config` and the routes' TLS settings `route_tls` from the next delivery on
    /// (at each reload).
    pub fn set_config(&self, config: &Config, route_tls: HashMap<String, RouteTls>) {
        self.tls.store(std::sync::Arc::new(route_tls));
        self.pool.set_max_down(config.queue.probe_interval);
        self.dns
            .set_allow_private(config.delivery.allow_private_destinations);
    }

    /// The TLS settings of `route`; `fallback`'s plain settings for a route not loaded.
    pub fn route_tls(&self, route: &str, fallback: TlsPolicy) -> RouteTls {
        self.tls
            .load()
            .get(route)
            .cloned()
            .unwrap_or_else(|| RouteTls::plain(fallback))
    }

    /// Delivers `out` to `target`'s next hops ([`super::deliver`]) with this pool and
    /// resolver.
    pub async fn deliver(
        &self,
        target: &Target<'_>,
        hello: Hello<'_>,
        rules: &HopRules<'_>,
        out: &Outbound<'_>,
    ) -> Attempt {
        super::deliver(&self.pool, &self.dns, target, hello, rules, out).await
    }

    /// Every next hop delivered to so far, with its state (up, circuit open, throttled).
    pub fn hop_views(&self) -> Vec<HopView> {
        self.pool.hop_views()
    }
}
