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
    /// The route's TLS policy (MTA-STS, DANE) leaves no usable next hop now (temporary).
    #[error("{0}")]
    Policy(String),
}

/// Why the lookups could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The resolver could not be built.
    #[error("DNS resolver: {0}")]
    Resolver(#[from] hickory_resolver::net::NetError),
    /// `dns.trust_anchor` could not be read.
    #[error("dns.trust_anchor {0}: {1}")]
    TrustAnchor(String, String),
    /// `delivery.mta_sts.ca_file` could not be read.
    #[error("delivery.mta_sts.ca_file: {0}")]
    CaFile(#[from] crate::certs::TlsError),
}

/// The lookups of delivery: the resolver for MX routes and next-hop names, a
/// DNSSEC-validating one for DANE, and the MTA-STS policies.
pub struct Dns {
    resolver: TokioResolver,
    /// Built when a config is given ([`Dns::for_config`]).
    validating: Option<TokioResolver>,
    sts: Option<super::mta_sts::MtaSts>,
    /// `delivery.allow_private_destinations` (see `destination`); follows reloads.
    allow_private: std::sync::atomic::AtomicBool,
}

impl Dns {
    /// Everything `config` asks for: `[dns]` nameservers and trust anchor,
    /// `[delivery.mta_sts]`. Files are read now, so a bad one is reported at start-up.
    pub fn for_config(config: &crate::config::Config) -> Result<Dns, SetupError> {
        let timeout = config.delivery.timeout;
        let mut dns = Dns::new(&config.dns.nameservers, timeout)?;
        dns.set_allow_private(config.delivery.allow_private_destinations);
        let anchors = match &config.dns.trust_anchor {
            Some(path) => hickory_resolver::proto::dnssec::TrustAnchors::from_file(path)
                .map_err(|e| SetupError::TrustAnchor(path.display().to_string(), e.to_string()))?,
            None => hickory_resolver::proto::dnssec::TrustAnchors::default(),
        };
        let mut builder = builder(&config.dns.nameservers, timeout);
        builder.options_mut().validate = true;
        dns.validating = Some(
            builder
                .with_trust_anchor(std::sync::Arc::new(anchors))
                .build()?,
        );
        let sts = &config.delivery.mta_sts;
        let roots = match &sts.ca_file {
            Some(f) => crate::certs::load_certs(f)?,
            None => crate::certs::system_roots(),
        };
        let dir = sts
            .cache_dir
            .clone()
            .unwrap_or_else(|| config.spool.dir.join("mta-sts"));
        dns.sts = Some(super::mta_sts::MtaSts::new(
            roots,
            sts.https_port,
            sts.timeout,
            dir,
        )?);
        Ok(dns)
    }

    /// The DNSSEC-validating resolver (DANE).
    pub(super) fn validating(&self) -> Result<&TokioResolver, DnsError> {
        self.validating.as_ref().ok_or_else(|| {
            DnsError::Policy("DANE needs the validating resolver (Dns::for_config)".into())
        })
    }

    /// The MTA-STS policy of `domain` now, if any.
    pub(super) async fn sts_policy(&self, domain: &str) -> Option<super::mta_sts::Policy> {
        match &self.sts {
            Some(sts) => {
                sts.policy(&self.resolver, domain, self.allow_private())
                    .await
            }
            None => None,
        }
    }

    /// Sets `delivery.allow_private_destinations` (at start and at each reload).
    pub fn set_allow_private(&self, allow: bool) {
        self.allow_private
            .store(allow, std::sync::atomic::Ordering::Relaxed);
    }

    /// True when MX and MTA-STS policy hosts may be on non-global addresses.
    pub fn allow_private(&self) -> bool {
        self.allow_private
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A resolver asking `nameservers` (UDP, then TCP), or the system's when empty.
    pub fn new(
        nameservers: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Dns, hickory_resolver::net::NetError> {
        builder(nameservers, timeout).build().map(|resolver| Dns {
            resolver,
            validating: None,
            sts: None,
            allow_private: Default::default(),
        })
    }
}

/// A resolver builder asking `nameservers` (UDP, then TCP), or the system's when empty.
fn builder(
    nameservers: &[SocketAddr],
    timeout: Duration,
) -> hickory_resolver::ResolverBuilder<TokioRuntimeProvider> {
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
    builder
}

/// The mail hosts the MX `records` of `domain` name, most preferred first: the domain
/// itself when they name none; a null MX (RFC 7505) is an error.
pub(super) fn mail_hosts<'a>(
    domain: &str,
    records: impl IntoIterator<Item = &'a hickory_resolver::proto::rr::Record>,
) -> Result<Vec<String>, DnsError> {
    let mut mx: Vec<(u16, String)> = records
        .into_iter()
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

impl Dns {
    /// The mail hosts of `domain`, most preferred first; the domain itself when it has no MX.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<String>, DnsError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => mail_hosts(domain, lookup.answers()),
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
