//! Typed TOML configuration, validated at load. Every error names the file, the line and the key.
//!
//! Relative paths in the config (spool, directory, certificates) are taken relative to the
//! working directory of the process, as in the examples in `config/`.

use crate::types::{Domain, RouteName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config shipped in the binary (`config/coexist.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../config/coexist.toml");

/// A config that failed to load, with its location.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The config file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Syntax, type or value error, with where it is.
    #[error("{file}:{line}: key `{key}`: {reason}")]
    Invalid {
        /// The config file.
        file: String,
        /// 1-based line, 0 when unknown.
        line: usize,
        /// Dotted key path such as `server.listen`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole config. It serializes back to TOML that [`Config::parse`] reads the same (the
/// tests write the binary's configs that way).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Inbound SMTP.
    pub server: ServerConfig,
    /// Certificate and key for STARTTLS; without it STARTTLS is not offered.
    pub tls: Option<TlsConfig>,
    /// The durable queue.
    pub spool: SpoolConfig,
    /// Migration-state directory.
    pub directory: DirectoryConfig,
    /// Retry policy.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Outbound SMTP settings shared by all routes.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Routes by name; each directory state names one.
    pub routes: BTreeMap<String, RouteConfig>,
    /// Admin HTTP API (used by the CLI); absent means no API.
    pub admin: Option<AdminConfig>,
    /// Trust and abuse limits.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// DNS for MX routes and next-hop names.
    #[serde(default)]
    pub dns: DnsConfig,
}

/// `[dns]`: which name servers answer MX and address lookups.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `ip:port` of name servers; empty (the default) means the system's (/etc/resolv.conf).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            trusted_networks: Vec::new(),
            strip_headers: default_strip_headers(),
            max_connections_per_ip: default_per_ip_connections(),
            max_connection_rate_per_ip: 0,
        }
    }
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
    /// Address to listen on: loopback unless `allow_plaintext_remote` (the API is clear HTTP).
    pub listen: SocketAddr,
    /// The token, inline (at least 16 characters, no placeholder).
    pub token: Option<String>,
    /// A file holding the token (first line); `serve` writes a fresh random token there
    /// (mode 0600) when the file does not exist.
    pub token_file: Option<PathBuf>,
    /// Allow `listen` on a non-loopback address although the API speaks clear HTTP (the
    /// token then crosses the network readable): only for a trusted management network.
    #[serde(default)]
    pub allow_plaintext_remote: bool,
}

impl AdminConfig {
    /// True when the clear-text API would listen off loopback without the opt-in
    /// `allow_plaintext_remote` (checked by config validation and again at start).
    pub fn plaintext_remote_refused(&self) -> bool {
        !self.listen.ip().to_canonical().is_loopback() && !self.allow_plaintext_remote
    }

    /// The token, from `token` or `token_file` (for the CLI; the server uses
    /// [`crate::admin::token::for_server`], which also creates a missing file).
    pub fn token(&self) -> std::io::Result<String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(f)) => crate::admin::token::read_file(f)?.ok_or_else(|| {
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

/// `[directory]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// CSV file with header `address,state`.
    pub file: PathBuf,
    /// Route for addresses not in the directory, or `reject` (550 5.1.1).
    pub unknown: Unknown,
    /// Entries held by the moka lookup cache; 0 (the default) turns it off, which is right
    /// for the in-memory file source (see README: the table is faster than a cache hit).
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
    /// Time a cached lookup stays valid.
    #[serde(default = "default_cache_ttl", with = "duration")]
    pub cache_ttl: Duration,
    /// Where the snapshot and the change log of batches are kept.
    #[serde(default = "default_store_dir")]
    pub store_dir: PathBuf,
    /// Reload the file when it changes on disk (SIGHUP reloads it too).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Largest share of the addresses a reload of the file may remove; a file that removes
    /// more is refused (a half-written or truncated file) unless the reload is forced.
    #[serde(default = "default_max_shrink")]
    pub max_shrink: Percent,
}

/// A share written as a percentage, `"10%"`, between 0% and 100%.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(f64);

impl Percent {
    /// The share as a fraction between 0 and 1.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }

    /// Parses `"N%"` (N from 0 to 100, decimals allowed).
    pub fn parse(s: &str) -> Result<Percent, ValueError> {
        let n = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .ok_or_else(|| ValueError::NotAPercentage(s.to_string()))?;
        if !(0.0..=100.0).contains(&n) {
            return Err(ValueError::PercentOutOfRange(s.to_string()));
        }
        // Kept as written (7, not 0.07), so messages print "7%", not "7.000000000000001%".
        Ok(Percent(n))
    }
}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a percentage such as \"10%\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Percent, E> {
                Percent::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A config value that does not parse (the key and file are added by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// `N%` expected.
    #[error("{0:?} is not a percentage such as \"10%\"")]
    NotAPercentage(String),
    /// A percentage over 100% or below 0%.
    #[error("{0:?} must be between 0% and 100%")]
    PercentOutOfRange(String),
    /// `host:port` with a port that is not a number.
    #[error("{value:?}: bad port {port:?}")]
    BadPort {
        /// The value as written.
        value: String,
        /// The port part.
        port: String,
    },
    /// Port 0.
    #[error("{0:?}: port 0")]
    PortZero(String),
    /// Neither a host name nor an IP address.
    #[error("{0:?}: not a host name or IP address")]
    NotAHost(String),
}

/// `directory.unknown`: what happens to an address the directory does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// Refused at RCPT with 550 5.1.1 (written `reject`).
    Reject,
    /// Sent on this route (written as the route's name).
    Route(RouteName),
}

impl Unknown {
    /// The route, unless unknown addresses are rejected.
    pub fn route(&self) -> Option<&RouteName> {
        match self {
            Unknown::Reject => None,
            Unknown::Route(r) => Some(r),
        }
    }
}

/// `reject`, or a route name (checked against `[routes]` by `validate`).
impl From<&str> for Unknown {
    fn from(s: &str) -> Unknown {
        if s == "reject" {
            Unknown::Reject
        } else {
            Unknown::Route(RouteName(s.into()))
        }
    }
}

/// As written in the config: `reject` or the route's name.
impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unknown::Reject => f.write_str("reject"),
            Unknown::Route(r) => write!(f, "{r}"),
        }
    }
}

impl Serialize for Unknown {
    /// Written as in the file: `reject` or the route name.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Unknown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Unknown::from(s.as_str()))
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
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            max_lifetime: default_max_lifetime(),
            delay_warning: default_delay_warning(),
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
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: default_delivery_timeout(),
            external_route: None,
            hop_concurrency: default_concurrency(),
        }
    }
}

/// TLS policy for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never use TLS.
    None,
    /// Use STARTTLS when offered (no certificate check), else clear text.
    Opportunistic,
    /// Use STARTTLS or defer; never send in clear text.
    Required,
    /// Like `required`, and the certificate must be valid for the expected name (system
    /// roots, or `tls_ca_file`).
    Verify,
}

/// A next hop written `host:port`, `ip:port` or `[ipv6]:port` (port 25 when omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl NextHop {
    /// Parses `host[:port]`.
    pub fn parse(s: &str) -> Result<NextHop, ValueError> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(NextHop::from(sa));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(NextHop::from(SocketAddr::new(ip, 25)));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().map_err(|_| ValueError::BadPort {
                    value: s.to_string(),
                    port: p.to_string(),
                })?,
            ),
            None => (s, 25),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if port == 0 {
            return Err(ValueError::PortZero(s.to_string()));
        }
        if Domain::parse(host, false).is_err() && host.parse::<std::net::IpAddr>().is_err() {
            return Err(ValueError::NotAHost(s.to_string()));
        }
        Ok(NextHop {
            host: host.to_string(),
            port,
        })
    }
}

impl From<SocketAddr> for NextHop {
    fn from(sa: SocketAddr) -> NextHop {
        NextHop {
            host: sa.ip().to_string(),
            port: sa.port(),
        }
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for NextHop {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NextHop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NextHop::parse(&s).map_err(serde::de::Error::custom)
    }
}

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
    /// Port for MX hosts.
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// TLS policy.
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
fn default_store_dir() -> PathBuf {
    PathBuf::from("var/directory")
}
fn default_true() -> bool {
    true
}
fn default_max_shrink() -> Percent {
    Percent(10.0)
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

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => locate(text, span.start),
                None => (0, String::new()),
            };
            ConfigError::Invalid {
                file: file.to_string(),
                line,
                key,
                reason: e.message().trim().to_string(),
            }
        })?;
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let fail = |table: &str, key: &str, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            line: find_key(text, table, key),
            key: format!("{table}.{key}"),
            reason,
        };
        if self.server.listen.is_empty() {
            return Err(fail(
                "server",
                "listen",
                "needs at least one address".into(),
            ));
        }
        if self.server.accepted_domains.is_empty() {
            return Err(fail(
                "server",
                "accepted_domains",
                "needs at least one domain".into(),
            ));
        }
        if self.server.hostname.is_empty()
            || !self
                .server
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(fail(
                "server",
                "hostname",
                "must be a host name (letters, digits, '.', '-')".into(),
            ));
        }
        if self.server.max_line_length < 512 {
            return Err(fail(
                "server",
                "max_line_length",
                "must be at least 512 (RFC 5321 4.5.3.1.4)".into(),
            ));
        }
        // Room for at least one whole message (and its first buffer step), or no limit.
        let one_message = self.server.max_message_size.saturating_add(64 * 1024);
        if self.server.max_inflight_bytes != 0 && self.server.max_inflight_bytes < one_message {
            return Err(fail(
                "server",
                "max_inflight_bytes",
                format!(
                    "must be 0 (no limit) or at least max_message_size + 64 KiB ({one_message}), \
                     or no message of the largest size could ever be received"
                ),
            ));
        }
        if self.server.max_rcpt_refusals == 0 {
            return Err(fail(
                "server",
                "max_rcpt_refusals",
                "must be at least 1".into(),
            ));
        }
        if self.routes.is_empty() {
            return Err(fail("routes", "", "at least one route is needed".into()));
        }
        let most = crate::directory::StateId::MAX_STATES;
        if self.routes.len() > most {
            return Err(fail(
                "routes",
                "",
                format!("at most {most} routes (the directory keeps a state in one byte)"),
            ));
        }
        for (name, route) in &self.routes {
            let table = format!("routes.{name}");
            if name == "reject" {
                return Err(fail(&table, "", "`reject` is reserved".into()));
            }
            if route.next_hops.is_empty() == route.mx.is_none() {
                return Err(fail(
                    &table,
                    "next_hops",
                    "give either `next_hops` (at least one host:port) or `mx`, not both".into(),
                ));
            }
            if route.client_cert.is_some() != route.client_key.is_some() {
                return Err(fail(
                    &table,
                    "client_cert",
                    "give both `client_cert` and `client_key`, or neither".into(),
                ));
            }
            if route.concurrency == 0 {
                return Err(fail(&table, "concurrency", "must be at least 1".into()));
            }
        }
        if let Some(r) = &self.delivery.external_route {
            if !self.routes.contains_key(r) {
                return Err(fail(
                    "delivery",
                    "external_route",
                    format!("{r:?} is not a route name"),
                ));
            }
        }
        if let Unknown::Route(r) = &self.directory.unknown {
            if !self.routes.contains_key(r.as_str()) {
                return Err(fail(
                    "directory",
                    "unknown",
                    format!("{:?} is neither `reject` nor a route name", r.as_str()),
                ));
            }
        }
        if let Some(admin) = &self.admin {
            if admin.token.is_some() == admin.token_file.is_some() {
                return Err(fail(
                    "admin",
                    "token",
                    "give exactly one of `token` and `token_file`".into(),
                ));
            }
            if let Some(t) = &admin.token {
                if let Some(reason) = crate::admin::token::weakness(t) {
                    return Err(fail("admin", "token", reason));
                }
            }
            if let Some(f) = &admin.token_file {
                // A file that does not exist yet is written by `serve` with a fresh token.
                match crate::admin::token::read_file(f) {
                    Err(e) => {
                        return Err(fail(
                            "admin",
                            "token_file",
                            format!("{}: cannot read: {e}", f.display()),
                        ))
                    }
                    Ok(Some(t)) => {
                        if let Some(reason) = crate::admin::token::weakness(&t) {
                            return Err(fail(
                                "admin",
                                "token_file",
                                format!("{}: {reason}", f.display()),
                            ));
                        }
                    }
                    Ok(None) => {}
                }
            }
            if admin.plaintext_remote_refused() {
                return Err(fail(
                    "admin",
                    "listen",
                    format!(
                        "{} is not a loopback address and the admin API speaks clear HTTP \
                         (the bearer token would cross the network readable): listen on \
                         127.0.0.1 or [::1] and reach it through an SSH tunnel or a TLS proxy, \
                         or set `allow_plaintext_remote = true` for a trusted management network",
                        admin.listen
                    ),
                ));
            }
        }
        if self.queue.min_backoff.is_zero() || self.queue.min_backoff > self.queue.max_backoff {
            return Err(fail(
                "queue",
                "min_backoff",
                "must be above zero and not above max_backoff".into(),
            ));
        }
        Ok(())
    }

    /// The route for recipients outside our domains (see `delivery.external_route`).
    pub fn external_route(&self) -> Option<RouteName> {
        let name = match &self.delivery.external_route {
            Some(r) => Some(r.as_str()),
            None => match self.directory.unknown.route() {
                Some(r) => Some(r.as_str()),
                None => self.routes.keys().next().map(String::as_str),
            },
        };
        name.map(|n| RouteName(n.into()))
    }

    /// Keys whose change needs a restart, where `new` differs from `self`. A reload that
    /// changes any of them is refused (listeners, spool, directory store and the set of
    /// routes, which is the set of directory states).
    pub fn restart_keys(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                keys.push(key);
            }
        };
        check(self.server.listen != new.server.listen, "server.listen");
        check(
            self.server.max_connections != new.server.max_connections,
            "server.max_connections",
        );
        check(self.spool.dir != new.spool.dir, "spool.dir");
        check(self.directory.file != new.directory.file, "directory.file");
        check(
            self.directory.store_dir != new.directory.store_dir,
            "directory.store_dir",
        );
        check(
            self.directory.watch != new.directory.watch,
            "directory.watch",
        );
        check(
            self.directory.cache_capacity != new.directory.cache_capacity
                || self.directory.cache_ttl != new.directory.cache_ttl,
            "directory.cache_capacity/cache_ttl",
        );
        check(self.admin != new.admin, "admin");
        check(self.dns != new.dns, "dns");
        check(
            self.delivery.hop_concurrency != new.delivery.hop_concurrency,
            "delivery.hop_concurrency",
        );
        check(
            self.route_names() != new.route_names(),
            "routes (the set of route names)",
        );
        keys
    }

    /// The route names, i.e. the valid directory states.
    pub fn route_names(&self) -> Vec<RouteName> {
        self.routes
            .keys()
            .map(|k| RouteName(k.as_str().into()))
            .collect()
    }
}

/// Line (1-based) and dotted key path at a byte offset of TOML text.
fn locate(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let mut table = String::new();
    for l in before.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let key = match line.split_once('=') {
        Some((k, _)) if !line.trim_start().starts_with('[') => k.trim().to_string(),
        _ => String::new(),
    };
    let path = match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    };
    (line_no, path)
}

/// Line (1-based) of `key` inside `[table]`, or of the table header; 0 if absent.
fn find_key(text: &str, table: &str, key: &str) -> usize {
    let mut in_table = false;
    let mut header_line = 0;
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table;
            if in_table {
                header_line = i + 1;
            }
            if name.starts_with(&format!("{table}.")) && header_line == 0 {
                header_line = i + 1;
            }
        } else if in_table && !key.is_empty() {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return i + 1;
                }
            }
        }
    }
    header_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let cfg = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        assert!(cfg.routes.contains_key("onprem"));
        assert!(cfg.routes.contains_key("cloud"));
    }

    #[test]
    fn type_error_names_line_and_key() {
        let text =
            DEFAULT_CONFIG.replace("max_message_size = 52428800", "max_message_size = \"big\"");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        let line = text
            .lines()
            .position(|l| l.contains("max_message_size"))
            .unwrap()
            + 1;
        assert!(
            err.starts_with(&format!("x.toml:{line}: key `server.max_message_size`")),
            "{err}"
        );
    }

    #[test]
    fn unknown_is_reject_or_a_route() {
        let c = Config::parse(DEFAULT_CONFIG, "t").unwrap();
        assert_eq!(
            c.directory.unknown,
            Unknown::Route(RouteName("onprem".into()))
        );
        let text = DEFAULT_CONFIG.replace("unknown = \"onprem\"", "unknown = \"reject\"");
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(c.directory.unknown, Unknown::Reject);
        assert_eq!(c.directory.unknown.to_string(), "reject");
        assert_eq!(c.external_route(), Some(RouteName("onprem".into())));
    }

    #[test]
    fn unknown_route_is_refused_with_line() {
        let text = DEFAULT_CONFIG.replace("unknown = \"onprem\"", "unknown = \"mars\"");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("key `directory.unknown`"), "{err}");
        assert!(err.contains("\"mars\" is neither"), "{err}");
        assert!(!err.contains(":0:"), "{err}");
    }

    #[test]
    fn bad_address_and_unknown_key_are_refused() {
        let text = DEFAULT_CONFIG.replace("127.0.0.1:2601", "exchange.corp.test:2525");
        let cfg = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(
            cfg.routes["onprem"].next_hops[0].to_string(),
            "exchange.corp.test:2525"
        );
        assert_eq!(NextHop::parse("[::1]:26").unwrap().to_string(), "[::1]:26");
        assert_eq!(NextHop::parse("mx.test").unwrap().port, 25);
        let text = DEFAULT_CONFIG.replace("127.0.0.1:2601", "127.0.0.1:99999");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("routes.onprem.next_hops"), "{err}");
        let text = DEFAULT_CONFIG.replace("[spool]", "[spool]\nfsync = false");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("unknown field `fsync`"), "{err}");
    }

    #[test]
    fn max_shrink_is_a_percentage_with_line_and_key() {
        let cfg = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(cfg.directory.max_shrink.fraction(), 0.10);
        assert_eq!(Percent::parse("7%").unwrap().to_string(), "7%");
        let text = DEFAULT_CONFIG.replace("max_shrink = \"10%\"", "max_shrink = \"2.5%\"");
        let cfg = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(cfg.directory.max_shrink.to_string(), "2.5%");
        for (bad, why) in [
            ("\"150%\"", "must be between 0% and 100%"),
            ("\"ten\"", "is not a percentage such as \"10%\""),
            ("0.1", "expected a percentage such as \"10%\""),
        ] {
            let text =
                DEFAULT_CONFIG.replace("max_shrink = \"10%\"", &format!("max_shrink = {bad}"));
            let line = text.lines().position(|l| l.contains("max_shrink")).unwrap() + 1;
            let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("x.toml:{line}: key `directory.max_shrink`"))
                    && err.contains(why),
                "{err}"
            );
        }
    }
}
