//! The section structs of the config (`[server]`, `[spool]`, `[routes.NAME]`, ...) and the
//! serde defaults of their keys. They only describe the file; the checks that span keys are
//! in `validate`, and the value types they use in `values`.

use super::values::{NextHop, Percent, TlsPolicy, Unknown};
use crate::types::Domain;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod directory;
mod route;
mod shadow;
mod tracking;

pub use directory::{DirectoryConfig, LdapConfig, LdapFlavor};
pub use route::RouteConfig;
pub use shadow::{OnFailure, ShadowConfig};
pub use tracking::TrackingConfig;

/// `[dns]`: which name servers answer MX and address lookups.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `ip:port` of name servers; empty (the default) means the system's (/etc/resolv.conf).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchor for `tls = "dane"` routes: a file of DNSKEY (or DS-less DNSKEY)
    /// records for the root zone in zone-file syntax. Default: the IANA root keys built in.
    /// Set it only for a lab or test with its own signed root.
    #[serde(default)]
    pub trust_anchor: Option<PathBuf>,
}

/// `[policy]`: who is trusted, what is stripped from everyone else, per-client limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Networks of the organisation's own servers (e.g. on-premises Exchange): their mail
    /// keeps internal headers, and per-client limits do not apply to them.
    #[serde(default)]
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Header names (case-insensitive prefixes) removed from mail of untrusted clients, so
    /// nobody on the internet can forge internal Exchange status.
    #[serde(default = "default_strip_headers")]
    pub strip_headers: Vec<String>,
    /// Concurrent sessions from one client address (421 4.7.0 beyond); 0 = no limit.
    #[serde(default = "default_per_ip_connections")]
    pub max_connections_per_ip: usize,
    /// New sessions per minute from one client address (421 4.7.0 beyond); 0 = no limit.
    #[serde(default)]
    pub max_connection_rate_per_ip: u32,
    /// IPv4 clients are counted together per network of this prefix length for the
    /// per-client limits (1 to 32; 32 = each address apart).
    #[serde(default = "default_ipv4_client_prefix")]
    pub ipv4_client_prefix: u8,
    /// IPv6 clients are counted together per network of this prefix length for the
    /// per-client limits (1 to 128; 64 by default, since one client usually holds a whole
    /// /64; 128 = each address apart).
    #[serde(default = "default_ipv6_client_prefix")]
    pub ipv6_client_prefix: u8,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            trusted_networks: Vec::new(),
            strip_headers: default_strip_headers(),
            max_connections_per_ip: default_per_ip_connections(),
            max_connection_rate_per_ip: 0,
            ipv4_client_prefix: default_ipv4_client_prefix(),
            ipv6_client_prefix: default_ipv6_client_prefix(),
        }
    }
}

fn default_ipv4_client_prefix() -> u8 {
    32
}

fn default_ipv6_client_prefix() -> u8 {
    64
}

fn default_strip_headers() -> Vec<String> {
    [
        "X-MS-Exchange-Organization-",
        "X-MS-Exchange-CrossTenant-",
        "X-MS-Exchange-CrossPremises-",
        "X-MS-Exchange-Transport-",
        "X-MS-Exchange-Processed-By-",
        "X-MS-Exchange-Forest-",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn default_per_ip_connections() -> usize {
    50
}

/// `[admin]`: the HTTP API for the CLI, with bearer-token auth.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on: loopback unless the API is served over TLS (`tls_cert`) or
    /// `allow_plaintext_remote` is set.
    pub listen: SocketAddr,
    /// The token, inline (at least 16 characters, no placeholder).
    pub token: Option<String>,
    /// A file holding the token (first line); `serve` writes a fresh random token there
    /// (mode 0600) when the file does not exist.
    pub token_file: Option<PathBuf>,
    /// Allow `listen` on a non-loopback address although the API speaks clear HTTP (the
    /// token then crosses the network readable): only for a trusted management network.
    /// Not needed with `tls_cert`/`tls_key`.
    #[serde(default)]
    pub allow_plaintext_remote: bool,
    /// Most admin connections open at once. A connection beyond it is closed as soon as
    /// it is accepted, before anything is read, so the admin listener holds at most this
    /// many descriptors whatever its clients do.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// Time a request has, from its first byte, to send its whole head and body (and a
    /// TLS client to finish its handshake); the connection is closed past it.
    #[serde(default = "default_admin_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Time a connection may stay open with no request in progress (before its first
    /// request, and between keep-alive requests); it is closed past it.
    #[serde(default = "default_admin_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Certificate chain (PEM) of the admin listener: with `tls_key`, the API is served
    /// over HTTPS only, and peers and the CLI reach it with https.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle that the admin certificates of this node and its peers must chain to
    /// (the CLI and peer questions check it), instead of the system roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Accept a `token_file` that group or others may read (refused by default, as ssh
    /// refuses a private key that others can read).
    #[serde(default)]
    pub allow_readable_token_file: bool,
    /// Reverse proxies in front of the admin listener (e.g. a TLS terminator). Only for a
    /// request whose TCP peer is in one of these networks is the client's address taken from
    /// `X-Forwarded-For` (the right-most address that is not a trusted proxy); logs and the
    /// limit on wrong tokens then count the real client. Empty: the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The address admins open the console at (`https://coexist-admin.example.org`). When
    /// set, the console answers only requests for that host (or a loopback address: an SSH
    /// tunnel, a proxy that passes the upstream address) and accepts changes only from that
    /// origin.
    pub public_url: Option<super::values::PublicUrl>,
}

impl AdminConfig {
    /// True when the clear-text API would listen off loopback without the opt-in
    /// `allow_plaintext_remote` (checked by config validation and again at start).
    pub fn plaintext_remote_refused(&self) -> bool {
        !self.listen.ip().to_canonical().is_loopback()
            && !self.allow_plaintext_remote
            && !self.tls()
    }

    /// True when the API is served over TLS (`tls_cert` and `tls_key` both set).
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// The token, from `token` or `token_file` (for the CLI; the server uses
    /// [`crate::admin::token::for_server`], which also creates a missing file).
    pub fn token(&self) -> std::io::Result<String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(f)) => super::token::read_file(f)?.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "{} does not exist (`coexist serve` writes it at its first start)",
                        f.display()
                    ),
                )
            }),
            (None, None) => Ok(String::new()),
        }
    }
}

/// `[server]`: inbound SMTP listener and limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Name in the greeting, EHLO reply and Received header.
    pub hostname: String,
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Domains we accept mail for; everything else is relaying and is refused.
    pub accepted_domains: Vec<Domain>,
    /// Largest message accepted, in bytes (SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Most recipients per message (452 4.5.3 beyond).
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Longest command line, CRLF included (500 5.5.2 beyond).
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// Errors allowed per session before 421 and disconnect.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Refused recipients allowed per session before 421 and disconnect (apart from
    /// `max_errors`: a message may have many unknown recipients and still be delivered).
    #[serde(default = "default_max_rcpt_refusals")]
    pub max_rcpt_refusals: u32,
    /// Bytes all sessions together may hold in messages being received; beyond it MAIL
    /// gets `452 4.3.1` (0 = no limit). Default: a quarter of the machine's memory.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: u64,
    /// Concurrent sessions; more are answered 421 4.7.0.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Sessions of `max_connections` only clients in `policy.trusted_networks` may use:
    /// everyone else is refused once `max_connections - reserved_connections` are open.
    /// Default: a tenth of `max_connections`; always 0 without trusted networks. Use
    /// [`crate::config::Config::reserved_connections`] for the value in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_connections: Option<usize>,
    /// Longest session: past it, the next command gets `421 4.4.2` and the session is
    /// closed (a DATA or BDAT transfer under way is not cut). "0s" = no limit.
    #[serde(default = "default_max_session_time", with = "duration")]
    pub max_session_time: Duration,
    /// Junk commands (NOOP, RSET, VRFY, HELP, EHLO, HELO) allowed per session between
    /// accepted messages before `421 4.7.0` and disconnect; 0 = no limit.
    #[serde(default = "default_junk_command_limit")]
    pub junk_command_limit: u32,
    /// Wait for a command (and for each DATA/BDAT read) before 421 4.4.2.
    #[serde(default = "default_command_timeout", with = "duration")]
    pub command_timeout: Duration,
    /// Most Received headers before a message is refused as looping (5.4.6).
    #[serde(default = "default_max_hops")]
    pub max_hops: usize,
    /// Longest time for a whole DATA or BDAT transfer (slow senders get 421 4.4.2).
    #[serde(default = "default_data_timeout", with = "duration")]
    pub data_timeout: Duration,
    /// On SIGTERM, how long sessions in progress may take to finish.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
}

/// `[tls]`: server certificate for STARTTLS.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[spool]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory holding queued messages.
    pub dir: PathBuf,
    /// Free space the spool's file system must keep, in bytes; below it (plus the declared
    /// SIZE) MAIL gets 452 4.3.1 until space returns.
    #[serde(default = "default_min_free_space")]
    pub min_free_space: u64,
}

fn default_min_free_space() -> u64 {
    100 * 1024 * 1024
}

/// `[fleet]`: several MX nodes sharing one directory through PostgreSQL.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// libpq URL (`postgresql://user@host:port/db`) or key=value string; TLS with libpq's
    /// `sslmode` and `sslrootcert` (see [`super::postgres`]).
    pub postgres: String,
    /// Schema holding every fleet table; created and migrated at start.
    #[serde(default = "default_fleet_schema")]
    pub schema: String,
    /// This node's unique name in the fleet.
    pub node: String,
    /// Behind the fleet for longer than this: drain until caught up.
    #[serde(default = "default_max_lag", with = "duration")]
    pub max_lag: Duration,
    /// How long a directory change (batch, rollback, scheduled batch, base import besides
    /// its COPY), a `fleet status` read or the catch-up at start may wait for PostgreSQL
    /// before it is given up as unreachable (a stalled server, a half-open connection).
    #[serde(default = "default_commit_timeout", with = "duration")]
    pub commit_timeout: Duration,
}

/// `[bounce]`: what a delivery status notification (DSN) carries back to the sender.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BounceConfig {
    /// Largest original, in bytes, a DSN returns whole when the sender asked for it
    /// (`RET=FULL`); a larger one is returned as its header section only (Postfix's
    /// `bounce_size_limit`), so a forged sender cannot have big messages reflected to a
    /// third party.
    #[serde(default = "default_max_return_size")]
    pub max_return_size: u64,
}

impl Default for BounceConfig {
    fn default() -> Self {
        BounceConfig {
            max_return_size: default_max_return_size(),
        }
    }
}

fn default_max_return_size() -> u64 {
    50_000
}

impl FleetConfig {
    /// The connection string, parsed, with its TLS settings (the error never quotes it:
    /// it may hold a password).
    pub fn connection(&self) -> Result<super::postgres::PgConn, super::postgres::PgConnError> {
        super::postgres::parse(&self.postgres)
    }
}

/// `[queue]`: retries and expiry, Postfix's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// First retry delay; it doubles per attempt.
    #[serde(default = "default_min_backoff", with = "duration")]
    pub min_backoff: Duration,
    /// Longest retry delay.
    #[serde(default = "default_max_backoff", with = "duration")]
    pub max_backoff: Duration,
    /// A message still undelivered after this is failed.
    #[serde(default = "default_max_lifetime", with = "duration")]
    pub max_lifetime: Duration,
    /// Send the sender one "delayed" DSN when a message is still undelivered after this;
    /// "0s" turns warnings off.
    #[serde(default = "default_delay_warning", with = "duration")]
    pub delay_warning: Duration,
    /// Delivery attempts running at once, across routes (Postfix's `qmgr_message_active_limit`
    /// plays the same part); due messages beyond it wait in the index, costing no task. Read
    /// at start.
    #[serde(default = "default_max_active")]
    pub max_active: usize,
    /// While a route's next hops cannot be reached, its oldest deferred message is tried this
    /// often; when one gets through, all mail deferred for that route is released at once.
    #[serde(default = "default_probe_interval", with = "duration")]
    pub probe_interval: Duration,
    /// Per-recipient outcomes kept in memory for `coexist trace` (`GET /v1/trace`), the
    /// newest: when full, the oldest is dropped for each new one. 0 keeps none. Read at
    /// start.
    #[serde(default = "default_recent_outcomes")]
    pub recent_outcomes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            max_lifetime: default_max_lifetime(),
            delay_warning: default_delay_warning(),
            max_active: default_max_active(),
            probe_interval: default_probe_interval(),
            recent_outcomes: default_recent_outcomes(),
        }
    }
}

/// `[delivery]`: outbound SMTP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Timeout for connect and each reply.
    #[serde(default = "default_delivery_timeout", with = "duration")]
    pub timeout: Duration,
    /// Route for recipients outside `accepted_domains` (in practice: the senders that DSNs
    /// go back to), e.g. the on-premises servers that relay to the internet. Default: the
    /// `directory.unknown` route, or the first route when that is `reject`.
    #[serde(default)]
    pub external_route: Option<String>,
    /// Transactions in flight per next-hop address, across routes.
    #[serde(default = "default_concurrency")]
    pub hop_concurrency: usize,
    /// `[delivery.mta_sts]`: fetching and caching MTA-STS policies (`tls = "mta-sts"`).
    #[serde(default)]
    pub mta_sts: MtaStsConfig,
    /// Let MX hosts (routes with `mx` or `recipient_mx`) and MTA-STS policy hosts be reached
    /// on loopback, private (RFC 1918, fc00::/7), link-local, shared (100.64.0.0/10) and other
    /// non-global addresses. Off (the default), such an address found in DNS is refused like
    /// an unreachable host, so a sender's DNS cannot point the relay into the network it
    /// stands in. Explicit `next_hops` are never refused. Only for labs and tests.
    #[serde(default)]
    pub allow_private_destinations: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: default_delivery_timeout(),
            external_route: None,
            hop_concurrency: default_concurrency(),
            mta_sts: MtaStsConfig::default(),
            allow_private_destinations: false,
        }
    }
}

/// `[delivery.mta_sts]`: how MTA-STS policies (RFC 8461) are fetched and kept.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Time limit for one policy fetch (connect, TLS, request and the whole response).
    #[serde(default = "default_mta_sts_timeout", with = "duration")]
    pub timeout: Duration,
    /// Where fetched policies are kept across restarts (one small JSON file per domain).
    /// Default: `mta-sts` under `spool.dir`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// PEM CA bundle that the policy host's certificate must chain to, instead of the
    /// system roots. For tests and labs only: on the internet, policies are served with
    /// WebPKI certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Port of the policy host. RFC 8461 fixes 443; another port is for tests and labs
    /// only.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            timeout: default_mta_sts_timeout(),
            cache_dir: None,
            ca_file: None,
            https_port: default_https_port(),
        }
    }
}

fn default_mta_sts_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_https_port() -> u16 {
    443
}

fn default_smtp_port() -> u16 {
    25
}
fn default_max_message_size() -> u64 {
    52_428_800
}
fn default_max_recipients() -> usize {
    1000
}
fn default_max_line_length() -> usize {
    2048
}
fn default_max_rcpt_refusals() -> u32 {
    100
}

/// A quarter of the memory this process may use: the machine's (Linux `/proc/meminfo`), or
/// a container's cgroup limit when lower (`/sys/fs/cgroup/memory.max`); else 1 GiB.
fn default_max_inflight_bytes() -> u64 {
    let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    // "max" (no limit) does not parse and is skipped.
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    let total = match (ram, cgroup) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    };
    total.map(|t| t / 4).unwrap_or(1 << 30)
}

fn default_max_errors() -> u32 {
    20
}
fn default_max_connections() -> usize {
    1000
}
fn default_admin_max_connections() -> usize {
    64
}
fn default_admin_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_admin_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_session_time() -> Duration {
    Duration::from_secs(3600)
}
fn default_junk_command_limit() -> u32 {
    100
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_hops() -> usize {
    50
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_cache_capacity() -> u64 {
    0
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_fleet_schema() -> String {
    "coexist".into()
}
fn default_max_lag() -> Duration {
    Duration::from_secs(300)
}
fn default_commit_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_true() -> bool {
    true
}
fn default_max_shrink() -> Percent {
    Percent(10.0)
}
fn default_max_active() -> usize {
    5000
}

fn default_recent_outcomes() -> usize {
    100_000
}

fn default_probe_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_min_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(4000)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(5 * 86400)
}
fn default_delay_warning() -> Duration {
    Duration::from_secs(4 * 3600)
}
fn default_delivery_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_tls_policy() -> TlsPolicy {
    TlsPolicy::Opportunistic
}
fn default_concurrency() -> usize {
    20
}

/// Durations written like "300s", "5m", "5d" (humantime syntax).
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration: {e}")))
    }
}
