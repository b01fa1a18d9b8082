//! The section structs of the config (`[server]`, `[spool]`, `[routes.NAME]`, ...) and the
//! serde defaults of their keys. They only describe the file; the checks that span keys are
//! in `validate`, and the value types they use in `values`.

use super::values::{NextHop, Percent, TlsPolicy, Unknown};
use crate::types::Domain;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// CSV file with header `address,state`. Required without `[fleet]`; with it, optional:
    /// the first node of a new fleet imports it as the fleet's first base.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Route for addresses not in the directory, or `reject` (550 5.1.1).
    pub unknown: Unknown,
    /// Entries held by the moka lookup cache; 0 (the default) turns it off, which is right
    /// for the in-memory file source (see README: the table is faster than a cache hit).
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
    /// Time a cached lookup stays valid.
    #[serde(default = "default_cache_ttl", with = "duration")]
    pub cache_ttl: Duration,
    /// Where the snapshot and the change log of batches are kept. Default: `directory/`
    /// under `spool.dir`, so that the directory state belongs to one config (resolved by
    /// [`crate::config::Config::parse`]; empty only before that).
    #[serde(default)]
    pub store_dir: PathBuf,
    /// Reload the file when it changes on disk (SIGHUP reloads it too).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Largest share of the addresses a reload of the file may remove; a file that removes
    /// more is refused (a half-written or truncated file) unless the reload is forced.
    #[serde(default = "default_max_shrink")]
    pub max_shrink: Percent,
    /// The directory from Active Directory or OpenLDAP instead of `file`.
    #[serde(default)]
    pub ldap: Option<LdapConfig>,
    /// How long after a mailbox's move a `5.1.1`, `5.1.10` or `5.4.1` from the side it now
    /// routes to is deferred instead of bounced: directory sync between on-premises and
    /// Exchange Online lags behind a migration batch. `0s` turns it off.
    #[serde(default = "default_move_grace", with = "duration")]
    pub move_grace: Duration,
}

fn default_move_grace() -> Duration {
    Duration::from_secs(2 * 3600)
}

/// How the LDAP source finds changes since its last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LdapFlavor {
    /// `uSNChanged` above the last `highestCommittedUSN` of the same domain controller
    /// (its `invocationId` watched: another DC or a restore means a full sync).
    ActiveDirectory,
    /// `modifyTimestamp` at or after the newest one seen.
    Openldap,
}

/// `[directory.ldap]`: the migration state from Active Directory (or OpenLDAP).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade `ldap://` with StartTLS.
    #[serde(default)]
    pub starttls: bool,
    /// PEM CA bundle for `ldaps://` and StartTLS (default: the system's roots).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// DN to bind as (simple bind); none: anonymous.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// Bind password, inline.
    #[serde(default)]
    pub password: Option<String>,
    /// Bind password, first line of this file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Where to search.
    pub base_dn: String,
    /// Which entries are mailboxes.
    #[serde(default = "default_ldap_filter")]
    pub filter: String,
    /// How changes are found: `active-directory` or `openldap`.
    #[serde(default = "default_ldap_flavor")]
    pub flavor: LdapFlavor,
    /// Time between delta syncs.
    #[serde(default = "default_sync_interval", with = "duration")]
    pub sync_interval: Duration,
    /// Time between full syncs (which also see deleted entries).
    #[serde(default = "default_full_sync_interval", with = "duration")]
    pub full_sync_interval: Duration,
    /// Entries per page of a paged search.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Connect and per-operation timeout.
    #[serde(default = "default_ldap_timeout", with = "duration")]
    pub timeout: Duration,
    /// Attribute whose value gives the route.
    #[serde(default = "default_state_attribute")]
    pub state_attribute: String,
    /// Attribute value → route name; entries with other values are not mailboxes.
    #[serde(default = "default_state_values")]
    pub states: std::collections::BTreeMap<String, String>,
    /// Attribute with every address of the mailbox (`SMTP:` primary, `smtp:` others).
    #[serde(default = "default_addresses_attribute")]
    pub addresses_attribute: String,
    /// Attribute with the mailbox's routing address (`SMTP:alias@tenant.mail.onmicrosoft.com`).
    #[serde(default = "default_routing_attribute")]
    pub routing_attribute: String,
}

impl LdapConfig {
    /// The bind password (inline or from `password_file`), if any.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        match &self.password_file {
            Some(f) => Ok(std::fs::read_to_string(f)?
                .lines()
                .next()
                .map(str::to_string)),
            None => Ok(None),
        }
    }
}

fn default_ldap_filter() -> String {
    "(proxyAddresses=*)".into()
}
fn default_ldap_flavor() -> LdapFlavor {
    LdapFlavor::ActiveDirectory
}
fn default_sync_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_full_sync_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_page_size() -> u32 {
    500
}
fn default_ldap_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_state_attribute() -> String {
    "msExchRecipientTypeDetails".into()
}
fn default_addresses_attribute() -> String {
    "proxyAddresses".into()
}
fn default_routing_attribute() -> String {
    "targetAddress".into()
}
/// Active Directory's `msExchRecipientTypeDetails`: on-premises mailboxes (user, shared,
/// room, equipment) and their remote counterparts once moved to Exchange Online.
fn default_state_values() -> std::collections::BTreeMap<String, String> {
    [
        ("1", "onprem"),
        ("4", "onprem"),
        ("16", "onprem"),
        ("32", "onprem"),
        ("2147483648", "cloud"),
        ("8589934592", "cloud"),
        ("17179869184", "cloud"),
        ("34359738368", "cloud"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `[fleet]`: several MX nodes sharing one directory through PostgreSQL.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// libpq URL (`postgresql://user@host:port/db`) or key=value string.
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
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: default_delivery_timeout(),
            external_route: None,
            hop_concurrency: default_concurrency(),
            mta_sts: MtaStsConfig::default(),
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
