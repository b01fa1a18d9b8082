//! `[routes.NAME]`: a route's next hops, TLS, limits and throttling, and the defaults of its
//! keys.

use super::*;

/// `[routes.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Next hops as host:port, tried in order (names are resolved at each attempt).
    #[serde(default)]
    pub next_hops: Vec<NextHop>,
    /// Instead of `next_hops`: deliver to the MX hosts of this domain (by preference, then
    /// A/AAAA; the domain itself when it has no MX), e.g. `tenant-com.mail.protection.outlook.com`.
    #[serde(default)]
    pub mx: Option<Domain>,
    /// Instead of `next_hops` or `mx`: deliver to the MX hosts of each recipient's own
    /// domain (the route that carries DSNs and other mail to the internet, e.g. the
    /// `delivery.external_route`).
    #[serde(default)]
    pub recipient_mx: bool,
    /// Port for MX hosts.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// TLS policy. Default `opportunistic`: the only policy that reaches every MX host on the
    /// internet. Routes to known servers set `verify` (Exchange Online, an on-premises estate
    /// with its CA) or `required`; `check-config` warns about `opportunistic` and `none`
    /// toward anything but this machine.
    #[serde(default = "default_tls_policy")]
    pub tls: TlsPolicy,
    /// Most deliveries in flight on this route.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Envelope rewrite: recipients get this domain on this route (e.g. the tenant's
    /// routing domain `tenant.mail.onmicrosoft.com`, as hybrid coexistence does). Headers
    /// are not touched.
    #[serde(default)]
    pub rewrite_domain: Option<Domain>,
    /// With `rewrite_domain`: a listed recipient whose mailbox has a routing address (the
    /// directory's `routing_address`, Active Directory's `targetAddress`) is sent to that
    /// address instead of being rewritten (default). `false`: every recipient is rewritten
    /// (for a route that rewrites but does not lead to the estate the routing addresses
    /// name). No effect without `rewrite_domain`.
    #[serde(default = "default_true")]
    pub use_routing_address: bool,
    /// Name the next hop's certificate must carry (`verify`); default: the next hop's host.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// PEM CA bundle for `verify` instead of the system roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the next hop, e.g. for an Exchange Online
    /// inbound connector that identifies us by certificate.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Most recipients in one transaction to this route's next hops (Exchange Online and
    /// Exchange receive connectors have such a limit); a message's recipients beyond it go
    /// in further transactions at once. Default: no limit (until the next hop answers
    /// `452 4.5.3`, which has the same effect).
    #[serde(default)]
    pub max_recipients_per_transaction: Option<usize>,
    /// Largest message (bytes) this route's next hops take. A recipient on this route is
    /// refused `552 5.3.4` at RCPT when `SIZE=` declares more; without `SIZE=`, its
    /// delivery fails at once with `5.3.4` (and a DSN) rather than being sent to bounce.
    /// Default: no limit beyond `server.max_message_size`.
    #[serde(default)]
    pub max_message_size: Option<u64>,
    /// Replies that mean "slow down" (`[CODE ]X.Y.Z[-LAST]`): they put the next hop into
    /// the throttled state (fewer transactions at once, a pause, then ramp-up) instead of
    /// deferring each message with its own backoff.
    #[serde(default = "default_throttle_replies")]
    pub throttle_replies: Vec<crate::proto::ReplyPattern>,
    /// First pause of a throttled next hop; each further throttling reply while it
    /// recovers doubles it, up to `throttle_max_pause`.
    #[serde(default = "default_throttle_pause", with = "duration")]
    pub throttle_pause: Duration,
    /// Longest pause of a throttled next hop.
    #[serde(default = "default_throttle_max_pause", with = "duration")]
    pub throttle_max_pause: Duration,
    /// Networks this route's next hops send mail *from* (Exchange Online sends from other
    /// addresses than its MX hosts). A message that comes back from them, or from an
    /// address this route delivers to, with our host name in a `Received:` header, is not
    /// sent to this route again (a routing loop: `5.4.6`).
    #[serde(default)]
    pub returns_from: Vec<ipnet::IpNet>,
}

/// Exchange Online's and Exchange's "slow down" replies: too many concurrent connections
/// (`421 4.3.2`), tenant or sending-IP throttling (`4.7.500`–`4.7.699`), `451 4.4.62`, and
/// on-premises back pressure (`452 4.3.1 Insufficient system resources`).
fn default_throttle_replies() -> Vec<crate::proto::ReplyPattern> {
    [
        "421 4.3.2",
        "421 4.7.500-699",
        "451 4.7.500-699",
        "451 4.4.62",
        "452 4.3.1",
    ]
    .iter()
    .filter_map(|p| crate::proto::ReplyPattern::parse(p).ok())
    .collect()
}

fn default_throttle_pause() -> Duration {
    Duration::from_secs(30)
}

fn default_throttle_max_pause() -> Duration {
    Duration::from_secs(600)
}
