//! Next-hop resolution with hickory-resolver: MX by preference, then A/AAAA (RFC 5321 5.1),
//! with the implicit MX (the domain itself) when there is no MX record and a refusal for a
//! null MX (RFC 7505). Name servers come from `[dns]` or the system configuration.

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Why a name could not be turned into next hops.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    /// Temporary: time-out, server failure, no answer (the delivery is deferred).
    #[error("DNS lookup of {0} failed: {1}")]
    Temporary(String, String),
    /// The domain publishes a null MX: it accepts no mail (the recipients fail).
    #[error("{0} does not accept mail (null MX, RFC 7505)")]
    NullMx(String),
}

/// The resolver used for MX routes and next-hop names.
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// A resolver asking `nameservers` (UDP, then TCP), or the system's when empty.
    pub fn new(
        nameservers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Dns, hickory_resolver::net::NetError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) => {
                    // No usable /etc/resolv.conf: IP next hops still work; names will not
                    // resolve until [dns] nameservers is set.
                    tracing::warn!(error = %e, "no system DNS configuration; set [dns] nameservers for MX routes and host names");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        provider,
                    )
                }
            }
        } else {
            let servers = nameservers
                .iter()
                .map(|sa| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = sa.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = sa.port();
                    NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                })
                .collect();
            let config = ResolverConfig::from_name_servers(servers);
            TokioResolver::builder_with_config(config, provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        builder.build().map(|resolver| Dns { resolver })
    }

    /// The mail hosts of `domain`, most preferred first; the domain itself when it has no MX.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<String>, DnsError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
                    return Err(DnsError::NullMx(domain.to_string()));
                }
                mx.sort_by_key(|(p, _)| *p);
                let hosts: Vec<String> = mx
                    .into_iter()
                    .map(|(_, h)| h.trim_end_matches('.').to_string())
                    .filter(|h| !h.is_empty())
                    .collect();
                if hosts.is_empty() {
                    Ok(vec![domain.to_string()])
                } else {
                    Ok(hosts)
                }
            }
            // No MX record (but the name exists): the domain is its own mail host.
            Err(e) if e.is_no_records_found() && !e.is_nx_domain() => Ok(vec![domain.to_string()]),
            Err(e) => Err(DnsError::Temporary(domain.to_string(), e.to_string())),
        }
    }

    /// The addresses of a host name.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        self.resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map(|l| l.iter().collect())
            .map_err(|e| DnsError::Temporary(host.to_string(), e.to_string()))
    }
}
