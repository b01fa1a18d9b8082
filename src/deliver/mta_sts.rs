//! MTA-STS (RFC 8461) for routes with `tls = "mta-sts"`: the MX domain publishes, in DNS
//! (`_mta-sts.DOMAIN` TXT, `v=STSv1; id=...`) and over HTTPS
//! (`https://mta-sts.DOMAIN/.well-known/mta-sts.txt`), which MX hosts may receive its mail
//! and whether TLS with a valid certificate is required.
//!
//! - **Fetch**: verified HTTPS (system roots, or `delivery.mta_sts.ca_file`), one GET with a
//!   time limit, at most [`MAX_POLICY_BYTES`] of policy, no redirects, `text/plain` only.
//!   It is written here on tokio-rustls and httparse rather than with an HTTP client crate,
//!   because the fetch must connect to the addresses our own resolver found (`[dns]`
//!   nameservers, which tests point at a local server) with the process's rustls provider,
//!   stay async under one deadline, and never follow redirects: one bounded GET is smaller
//!   than the plumbing an HTTP client would need for that.
//! - **Cache**: per domain, in memory (bounded) and as one JSON file per domain under
//!   `delivery.mta_sts.cache_dir`, so a restart keeps policies. A cached policy is used until
//!   its `max_age` runs out; it is fetched again when the TXT record's `id` changes. When the
//!   TXT record or the fetch fails, a cached policy that has not expired still applies; with
//!   none, the domain is treated as having no policy (RFC 8461 5).
//! - **Use** ([`hops`]): `enforce` keeps only MX hosts the policy lists and requires
//!   STARTTLS with a certificate valid for the MX host (WebPKI); `testing` delivers as
//!   opportunistic TLS and logs and counts what `enforce` would have refused; `none` or no
//!   policy is opportunistic TLS.

use super::dns::{Dns, DnsError};
use super::tls::RouteTls;
use super::Hop;
use crate::metrics as m;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// Largest policy body accepted (RFC 8461 3.3 suggests senders limit it; 64 KiB is what
/// postfix-mta-sts-resolver allows).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest HTTP response head accepted.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest `max_age` (RFC 8461 3.2: about one year).
const MAX_MAX_AGE: u64 = 31_557_600;
/// Domains whose policy is kept in memory (more are read back from disk when needed).
const MEMORY_ENTRIES: u64 = 10_000;
/// Addresses of the policy host tried, at most.
const MAX_ADDRESSES: usize = 3;

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
#[derive(Debug, Clone, thiserror::Error)]
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
    #[error("MTA-STS policy fetch from {url} failed: {reason}")]
    Fetch {
        /// The policy URL.
        url: String,
        /// What went wrong.
        reason: String,
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    fn cached(&self, domain: &str, now: u64) -> Option<Entry> {
        let e = match self.memory.get(domain) {
            Some(e) => e,
            None => {
                if !file_safe(domain) || self.absent.contains_key(domain) {
                    return None;
                }
                let path = self.dir.join(format!("{domain}.json"));
                let Ok(text) = std::fs::read(&path) else {
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

    fn store(&self, domain: &str, e: Entry) {
        self.memory.insert(domain.to_string(), e.clone());
        self.absent.invalidate(domain);
        if !file_safe(domain) {
            return;
        }
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!(".{domain}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(&e).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, self.dir.join(format!("{domain}.json")))
        };
        if let Err(err) = write() {
            tracing::warn!(domain, dir = %self.dir.display(), error = %err, "cannot persist MTA-STS policy (kept in memory)");
        }
    }

    /// The policy that applies to `domain` now, if any (see the module docs). Never fails:
    /// what cannot be had counts as no policy, as RFC 8461 5 requires.
    pub async fn policy(&self, resolver: &TokioResolver, domain: &str) -> Option<Policy> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain, now());
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
        if let Some(c) = self.cached(&domain, now()).filter(|c| c.id == id) {
            return Some(c.policy);
        }
        match self.fetch(resolver, &domain).await {
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
                );
                Some(policy)
            }
            Err(e) => {
                metrics::counter!(m::MTA_STS_FETCHES, "result" => "failed").increment(1);
                tracing::warn!(domain = %domain, error = %e, cached = cached.is_some(), "MTA-STS policy fetch failed");
                cached.map(|c| c.policy)
            }
        }
    }

    async fn fetch(&self, resolver: &TokioResolver, domain: &str) -> Result<Policy, StsError> {
        let host = format!("mta-sts.{domain}");
        let url = if self.port == 443 {
            format!("https://{host}/.well-known/mta-sts.txt")
        } else {
            format!("https://{host}:{}/.well-known/mta-sts.txt", self.port)
        };
        let fail = |reason: String| StsError::Fetch {
            url: url.clone(),
            reason,
        };
        let body = tokio::time::timeout(self.timeout, self.get(resolver, &host))
            .await
            .map_err(|_| fail(format!("no complete answer within {:?}", self.timeout)))?
            .map_err(fail)?;
        let text = std::str::from_utf8(&body).map_err(|_| fail("policy is not UTF-8".into()))?;
        parse_policy(text)
    }

    /// One GET of the policy; the body, or why not.
    async fn get(&self, resolver: &TokioResolver, host: &str) -> Result<Vec<u8>, String> {
        let ips = resolver
            .lookup_ip(format!("{host}."))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let mut last = format!("{host} has no address");
        for ip in ips.iter().take(MAX_ADDRESSES) {
            let tcp = match tokio::net::TcpStream::connect(SocketAddr::new(ip, self.port)).await {
                Ok(t) => t,
                Err(e) => {
                    last = format!("connect to {ip}: {e}");
                    continue;
                }
            };
            let mut tls = self
                .connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS with {ip}: {e}"))?;
            let req = format!(
                "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: coexist\r\n\
                 Accept: text/plain\r\nConnection: close\r\n\r\n"
            );
            tls.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            let limit = (MAX_HEAD_BYTES + MAX_POLICY_BYTES + 4096) as u64;
            // A server that closes without TLS close_notify ends the response as well.
            let read = (&mut tls).take(limit + 1).read_to_end(&mut buf).await;
            if let Err(e) = read {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    return Err(format!("reading the response: {e}"));
                }
            }
            if buf.len() as u64 > limit {
                return Err(format!("response larger than {limit} bytes"));
            }
            return response_body(&buf);
        }
        Err(last)
    }
}

/// The body of a complete HTTP/1.1 response `buf`, if it is a `200` with `text/plain`.
fn response_body(buf: &[u8]) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if (300..400).contains(&code) {
        return Err(format!(
            "HTTP {code}: redirects are not followed (RFC 8461 3.3)"
        ));
    }
    if code != 200 {
        return Err(format!("HTTP {code}"));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let ctype = header("content-type").unwrap_or_default();
    if ctype.split(';').next().map(str::trim) != Some("text/plain") {
        return Err(format!("Content-Type {ctype:?} is not text/plain"));
    }
    let rest = &buf[head..];
    let body = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad Content-Length".to_string())?;
        rest.get(..len)
            .ok_or_else(|| "body shorter than Content-Length".to_string())?
            .to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_POLICY_BYTES {
        return Err(format!("policy larger than {MAX_POLICY_BYTES} bytes"));
    }
    Ok(body)
}

/// Decodes a chunked body (RFC 9112 7.1); trailers are ignored.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for _ in 0..=MAX_POLICY_BYTES {
        let eol = memchr::memmem::find(rest, b"\r\n").ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > MAX_POLICY_BYTES - out.len() {
            return Err(format!("policy larger than {MAX_POLICY_BYTES} bytes"));
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
    Err("too many chunks".into())
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

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(response_body(ok).unwrap(), b"hello");
        let chunked = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(response_body(chunked).unwrap(), b"hello");
        let redirect = b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n";
        assert!(response_body(redirect).unwrap_err().contains("redirect"));
        let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nhello";
        assert!(response_body(html).is_err());
        assert!(response_body(b"HTTP/1.1 200 OK\r\nContent-Ty").is_err());
        assert!(dechunk(b"ffffffffffffffffffff\r\n").is_err());
        assert!(dechunk(b"ffffffffffffffff\r\nx").is_err());
        assert!(dechunk(b"3\r\nabc").is_err());
    }
}
