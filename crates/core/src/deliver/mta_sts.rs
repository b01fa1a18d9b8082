//! MTA-STS (RFC 8461) for routes with `tls = "mta-sts"`: the MX domain publishes, in DNS
//! (`_mta-sts.DOMAIN` TXT, `v=STSv1; id=...`) and over HTTPS
//! (`https://mta-sts.DOMAIN/.well-known/mta-sts.txt`), which MX hosts may receive its mail
//! and whether TLS with a valid certificate is required.
//!
//! - **Fetch** ([`fetch`]): verified HTTPS (system roots, or `delivery.mta_sts.ca_file`),
//!   one GET on hyper's HTTP/1.1 client over tokio-rustls, to the addresses our own resolver
//!   found, under one deadline for the whole fetch; at most [`MAX_POLICY_BYTES`] of policy,
//!   no redirects, `text/plain` only.
//! - **Cache**: per domain, in memory (bounded) and as one JSON file per domain under
//!   `delivery.mta_sts.cache_dir`, so a restart keeps policies. A cached policy is used until
//!   its `max_age` runs out; it is fetched again when the TXT record's `id` changes. When the
//!   TXT record or the fetch fails, a cached policy that has not expired still applies; with
//!   none, the domain is treated as having no policy (RFC 8461 5).
//! - **Use** ([`hops`]): `enforce` keeps only MX hosts the policy lists and requires
//!   STARTTLS with a certificate valid for the MX host (WebPKI); `testing` delivers as
//!   opportunistic TLS and logs and counts what `enforce` would have refused; `none` or no
//!   policy is opportunistic TLS.

pub mod fetch;

use super::dns::{Dns, DnsError};
use super::tls::RouteTls;
use super::Hop;
use crate::metrics as m;
use fetch::FetchError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Largest policy body accepted (RFC 8461 3.3 suggests senders limit it; 64 KiB is what
/// postfix-mta-sts-resolver allows).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest `max_age` (RFC 8461 3.2: about one year).
const MAX_MAX_AGE: u64 = 31_557_600;
/// Domains whose policy is kept in memory (more are read back from disk when needed).
const MEMORY_ENTRIES: u64 = 10_000;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to listed MX hosts, over verified TLS.
    Enforce,
    /// Report what `enforce` would refuse, deliver as usual.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A parsed MTA-STS policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The mode.
    pub mode: Mode,
    /// MX patterns: host names, or `*.` followed by a domain (one leftmost label).
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

impl Policy {
    /// True when `host` matches one of the policy's `mx` patterns (RFC 8461 4.1).
    pub fn allows(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// Why a policy could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StsError {
    /// The domain publishes no `v=STSv1` TXT record.
    #[error("no MTA-STS TXT record")]
    NoRecord,
    /// The TXT record is malformed, or there are several.
    #[error("bad MTA-STS TXT record: {0}")]
    BadTxt(String),
    /// The TXT lookup failed.
    #[error("MTA-STS TXT lookup failed: {0}")]
    Dns(String),
    /// The HTTPS fetch failed.
    #[error("MTA-STS policy fetch from {url} failed: {source}")]
    Fetch {
        /// The policy URL.
        url: String,
        /// What went wrong.
        #[source]
        source: Box<FetchError>,
    },
    /// The HTTPS fetch did not end within its time limit.
    #[error("MTA-STS policy fetch from {url} failed: no complete answer within {limit:?}")]
    Timeout {
        /// The policy URL.
        url: String,
        /// The time limit.
        limit: Duration,
    },
    /// The policy is not UTF-8.
    #[error("MTA-STS policy fetched from {url} is not UTF-8")]
    NotUtf8 {
        /// The policy URL.
        url: String,
    },
    /// The policy text is malformed.
    #[error("bad MTA-STS policy: {0}")]
    BadPolicy(String),
}

/// The `id` of a domain's MTA-STS TXT record, from the record strings found (each record's
/// strings joined). Records that do not start with `v=STSv1` are ignored; more than one that
/// does is an error (RFC 8461 3.1).
pub fn parse_txt(records: &[String]) -> Result<String, StsError> {
    // `v=STSv1`, then optional spaces or tabs and `;` (or the end): RFC 8461 3.1's ABNF.
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1").is_some_and(|rest| {
                let rest = rest.trim_start_matches([' ', '\t']);
                rest.is_empty() || rest.starts_with(';')
            })
        })
        .collect();
    let record = match sts.as_slice() {
        [] => return Err(StsError::NoRecord),
        [one] => one,
        _ => return Err(StsError::BadTxt("more than one v=STSv1 record".into())),
    };
    let mut id = None;
    for field in record.split(';').map(str::trim).filter(|f| !f.is_empty()) {
        let Some((k, v)) = field.split_once('=') else {
            return Err(StsError::BadTxt(format!("field {field:?} has no '='")));
        };
        if k == "id" && id.is_none() {
            if v.is_empty() || v.len() > 32 || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(StsError::BadTxt(format!(
                    "id {v:?} is not 1-32 letters or digits"
                )));
            }
            id = Some(v.to_string());
        }
    }
    id.ok_or_else(|| StsError::BadTxt("no id".into()))
}

/// Parses a policy body (RFC 8461 3.2): `key: value` lines ending in LF or CRLF; `version`
/// must be `STSv1`; `mode`, `max_age` and (unless mode is `none`) `mx` are required; unknown
/// keys are ignored; of a repeated key other than `mx` the first counts.
pub fn parse_policy(text: &str) -> Result<Policy, StsError> {
    let bad = |s: String| StsError::BadPolicy(s);
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("line {line:?} is not `key: value`")))?;
        let (k, v) = (k.trim(), v.trim());
        match k {
            "version" if version.is_none() => version = Some(v.to_string()),
            "mode" if mode.is_none() => {
                mode = Some(match v {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return Err(bad(format!("unknown mode {v:?}"))),
                })
            }
            "max_age" if max_age.is_none() => {
                if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("max_age {v:?} is not a number of seconds")));
                }
                let n: u64 = v.parse().map_err(|_| bad(format!("max_age {v:?}")))?;
                max_age = Some(n.min(MAX_MAX_AGE));
            }
            "mx" => {
                let p = v.trim_end_matches('.').to_ascii_lowercase();
                let name = p.strip_prefix("*.").unwrap_or(&p);
                if name.is_empty()
                    || name.contains('*')
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                {
                    return Err(bad(format!("mx {v:?} is not a host name or *.domain")));
                }
                mx.push(p);
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err(bad("version is not STSv1".into()));
    }
    let mode = mode.ok_or_else(|| bad("no mode".into()))?;
    let max_age = max_age.ok_or_else(|| bad("no max_age".into()))?;
    if mode != Mode::None && mx.is_empty() {
        return Err(bad("no mx".into()));
    }
    Ok(Policy { mode, mx, max_age })
}

/// RFC 8461 4.1: a pattern is a host name compared case-insensitively, or `*.` and a domain,
/// which matches one more label on the left (`*.example.com` matches `mx.example.com`, not
/// `example.com` nor `a.b.example.com`).
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(base) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == base),
        None => host == pattern,
    }
}

/// A policy as cached: the TXT `id` it came with and when it was fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    policy: Policy,
    /// Unix seconds.
    fetched: u64,
}

impl Entry {
    fn fresh(&self, now: u64) -> bool {
        now < self.fetched.saturating_add(self.policy.max_age)
    }
}

/// Policies of MX domains: fetched, cached and persisted.
pub struct MtaSts {
    memory: moka::sync::Cache<String, Entry>,
    /// One fetch per domain at a time.
    locks: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// Domains with no policy file on disk, for a while: most domains publish no policy,
    /// and their deliveries should not each read the disk.
    absent: moka::sync::Cache<String, ()>,
    dir: PathBuf,
    connector: TlsConnector,
    port: u16,
    timeout: Duration,
}

fn now() -> u64 {
    crate::clock::now_secs()
}

/// A domain name safe to use as a file name (letters, digits, '-', '.', not starting with '.').
fn file_safe(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('.')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

impl MtaSts {
    /// Policies fetched with `roots` (verified HTTPS) from `port`, each fetch within
    /// `timeout`, persisted under `dir` (created when first needed).
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        port: u16,
        timeout: Duration,
        dir: PathBuf,
    ) -> Result<MtaSts, crate::certs::TlsError> {
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(roots);
        let mut config = rustls::ClientConfig::builder_with_provider(crate::certs::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| crate::certs::TlsError::Config(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(MtaSts {
            memory: moka::sync::Cache::new(MEMORY_ENTRIES),
            locks: moka::sync::Cache::new(MEMORY_ENTRIES),
            absent: moka::sync::Cache::builder()
                .max_capacity(MEMORY_ENTRIES)
                .time_to_live(std::time::Duration::from_secs(300))
                .build(),
            dir,
            connector: TlsConnector::from(Arc::new(config)),
            port,
            timeout,
        })
    }

    /// The cached entry of `domain`, from memory or disk, if it has not expired.
    async fn cached(&self, domain: &str, now: u64) -> Option<Entry> {
        let e = match self.memory.get(domain) {
            Some(e) => e,
            None => {
                if !file_safe(domain) || self.absent.contains_key(domain) {
                    return None;
                }
                let path = self.dir.join(format!("{domain}.json"));
                let Ok(text) = tokio::fs::read(&path).await else {
                    self.absent.insert(domain.to_string(), ());
                    return None;
                };
                let e: Entry = serde_json::from_slice(&text).ok()?;
                self.memory.insert(domain.to_string(), e.clone());
                e
            }
        };
        e.fresh(now).then_some(e)
    }

    async fn store(&self, domain: &str, e: Entry) {
        self.memory.insert(domain.to_string(), e.clone());
        self.absent.invalidate(domain);
        if !file_safe(domain) {
            return;
        }
        let (dir, name) = (self.dir.clone(), domain.to_string());
        let written = tokio::task::spawn_blocking(move || persist(&dir, &name, &e))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(err) = written {
            tracing::warn!(domain, dir = %self.dir.display(), error = %err, "cannot persist MTA-STS policy (kept in memory)");
        }
    }

    /// The policy that applies to `domain` now, if any (see the module docs). Never fails:
    /// what cannot be had counts as no policy, as RFC 8461 5 requires. Without
    /// `allow_private`, a policy host on a non-global address is not connected to (see
    /// `destination`): the fetch fails.
    pub async fn policy(
        &self,
        resolver: &TokioResolver,
        domain: &str,
        allow_private: bool,
    ) -> Option<Policy> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain, now()).await;
        let id = match txt_id(resolver, &domain).await {
            Ok(id) => id,
            Err(StsError::NoRecord) => return cached.map(|c| c.policy),
            Err(e) => {
                tracing::warn!(domain = %domain, error = %e, cached = cached.is_some(), "MTA-STS TXT lookup failed");
                return cached.map(|c| c.policy);
            }
        };
        if let Some(c) = cached.as_ref().filter(|c| c.id == id) {
            return Some(c.policy.clone());
        }
        let lock = self.locks.get_with(domain.clone(), Default::default);
        let _one = lock.lock().await;
        // Fetched by another delivery while this one waited.
        if let Some(c) = self.cached(&domain, now()).await.filter(|c| c.id == id) {
            return Some(c.policy);
        }
        match self.fetch(resolver, &domain, allow_private).await {
            Ok(policy) => {
                metrics::counter!(m::MTA_STS_FETCHES, "result" => "ok").increment(1);
                tracing::info!(domain = %domain, id = %id, mode = ?policy.mode, max_age = policy.max_age, mx = ?policy.mx, "MTA-STS policy fetched");
                self.store(
                    &domain,
                    Entry {
                        id,
                        policy: policy.clone(),
                        fetched: now(),
                    },
                )
                .await;
                Some(policy)
            }
            Err(e) => {
                metrics::counter!(m::MTA_STS_FETCHES, "result" => "failed").increment(1);
                tracing::warn!(domain = %domain, error = %e, cached = cached.is_some(), "MTA-STS policy fetch failed");
                cached.map(|c| c.policy)
            }
        }
    }

    async fn fetch(
        &self,
        resolver: &TokioResolver,
        domain: &str,
        allow_private: bool,
    ) -> Result<Policy, StsError> {
        let host = format!("mta-sts.{domain}");
        let url = if self.port == 443 {
            format!("https://{host}{}", fetch::POLICY_PATH)
        } else {
            format!("https://{host}:{}{}", self.port, fetch::POLICY_PATH)
        };
        let get = fetch::get(&self.connector, resolver, &host, self.port, allow_private);
        let body = match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                return Err(StsError::Fetch {
                    url,
                    source: Box::new(e),
                })
            }
            Err(_) => {
                return Err(StsError::Timeout {
                    url,
                    limit: self.timeout,
                })
            }
        };
        let text = std::str::from_utf8(&body).map_err(|_| StsError::NotUtf8 { url })?;
        parse_policy(text)
    }
}

/// Writes the policy `e` of `domain` to the cache folder `dir` (temporary file, then
/// renamed into place). Blocking: run on the blocking pool.
#[allow(clippy::disallowed_methods)] // Blocking boundary: only called through `spawn_blocking`.
fn persist(dir: &Path, domain: &str, e: &Entry) -> std::io::Result<()> {
    crate::fsmode::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{domain}.tmp"));
    crate::fsmode::write(&tmp, serde_json::to_vec(e).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, dir.join(format!("{domain}.json")))
}

/// The `id` of `domain`'s MTA-STS TXT record.
async fn txt_id(resolver: &TokioResolver, domain: &str) -> Result<String, StsError> {
    let name = format!("_mta-sts.{domain}.");
    match resolver.txt_lookup(name).await {
        Ok(lookup) => {
            let records: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            parse_txt(&records)
        }
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Err(StsError::NoRecord),
        Err(e) => Err(StsError::Dns(e.to_string())),
    }
}

/// The next hops of an MX route under MTA-STS: the MX hosts of `domain` (on `port`), each
/// with the TLS settings the domain's policy gives it (see the module docs). Fails, for a
/// deferral, when an `enforce` policy lists none of the MX hosts.
pub(super) async fn hops(
    dns: &Dns,
    domain: &str,
    port: u16,
    tls: &RouteTls,
) -> Result<Vec<Hop>, DnsError> {
    let hosts = dns.mx_hosts(domain).await?;
    let policy = dns.sts_policy(domain).await;
    let mode = policy.as_ref().map(|p| p.mode);
    let mut chosen = Vec::new();
    for host in &hosts {
        match &policy {
            Some(p) if p.mode == Mode::Enforce => {
                if p.allows(host) {
                    let Some(strict) = tls.sts_enforce(domain) else {
                        return Err(DnsError::Policy(
                            "MTA-STS: the route's TLS settings were not made for mta-sts".into(),
                        ));
                    };
                    chosen.push((host.clone(), strict));
                } else {
                    metrics::counter!(m::MTA_STS_REFUSALS, "mode" => "enforce", "reason" => "mx")
                        .increment(1);
                    tracing::warn!(domain, mx = %host, patterns = ?p.mx, "MTA-STS (enforce): MX host not in the policy; skipped");
                }
            }
            Some(p) if p.mode == Mode::Testing => {
                if !p.allows(host) {
                    metrics::counter!(m::MTA_STS_REFUSALS, "mode" => "testing", "reason" => "mx")
                        .increment(1);
                    tracing::warn!(domain, mx = %host, patterns = ?p.mx, "MTA-STS (testing): MX host not in the policy; delivering anyway");
                }
                chosen.push((host.clone(), tls.sts_testing(domain)));
            }
            _ => chosen.push((host.clone(), tls.opportunistic())),
        }
    }
    if chosen.is_empty() {
        let patterns = policy.map(|p| p.mx.join(", ")).unwrap_or_default();
        return Err(DnsError::Policy(format!(
            "MTA-STS policy of {domain} (enforce) lists none of its MX hosts ({}); policy mx: {patterns}",
            hosts.join(", ")
        )));
    }
    tracing::debug!(domain, mode = ?mode, hops = chosen.len(), "MTA-STS applied");
    let hosts = chosen.into_iter().map(|(h, t)| (h, port, t)).collect();
    super::addresses(dns, hosts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_txt(&s(&["v=STSv1; id=20160831085700Z;"])).unwrap(),
            "20160831085700Z"
        );
        assert_eq!(parse_txt(&s(&["spf", "v=STSv1;id=abc"])).unwrap(), "abc");
        assert!(matches!(parse_txt(&s(&["spf"])), Err(StsError::NoRecord)));
        assert!(matches!(
            parse_txt(&s(&["v=STSv10; id=1"])),
            Err(StsError::NoRecord)
        ));
        assert_eq!(parse_txt(&s(&["v=STSv1 ;\tid=x1 ;"])).unwrap(), "x1");
        assert!(parse_txt(&s(&["v=STSv1; id=a", "v=STSv1; id=b"])).is_err());
        assert!(parse_txt(&s(&["v=STSv1; id=bad-id"])).is_err());
        assert!(parse_txt(&s(&["v=STSv1;"])).is_err());
    }

    #[test]
    fn policies() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\nextra: x\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 86400);
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("mx1.example.net"));
        assert!(!p.allows("example.net"));
        assert!(!p.allows("a.b.example.net"));
        assert!(!p.allows("other.example.com"));
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").is_ok());
        for bad in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n",
            "garbage",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad:?}");
        }
        let long = parse_policy("version: STSv1\nmode: testing\nmx: a\nmax_age: 9999999999\n");
        assert_eq!(long.unwrap().max_age, MAX_MAX_AGE);
    }
}
