//! The directory from Active Directory (or OpenLDAP): `[directory.ldap]`.
//!
//! When a mailbox moves to Exchange Online, its on-premises object becomes a remote mailbox:
//! `msExchRecipientTypeDetails` changes (1, 4, 16, 32 become 2147483648, 8589934592,
//! 17179869184, 34359738368) and `targetAddress` becomes the mailbox's
//! `alias@tenant.mail.onmicrosoft.com`. Every address of the mailbox is in `proxyAddresses`
//! (`SMTP:` primary, `smtp:` secondary). The mapping (attribute names, which values mean
//! which route) is configuration with those defaults.
//!
//! [`sync`] keeps a map of every mailbox entry (by DN) up to date: a paged full sync at
//! start and every `full_sync_interval` (the only way to see deletions), a delta sync every
//! `sync_interval` in between. When a sync changed something, the map is written as
//! directory CSV and the directory's writer reloads it, as it reloads a file
//! ([`super::DirectoryWriter::reload`], [`Directory::reload_file`]): mailboxes the source changed take the source's state, the
//! others keep what batches gave them, the shrink guard applies, and the change is logged
//! with the sync's mark (`ldap usn 123456`, shown as the origin of every mailbox it moved).
//!
//! While the source cannot be reached the directory in force stays, and recipients it does
//! not know get `451 4.4.3` instead of `550` ([`LdapSource::healthy`]).

pub mod sync;

use super::store::Fingerprint;
use super::table::{self, Parsed};
use super::{DirectoryError, Source};
use crate::config::LdapConfig;
use crate::types::RouteName;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One mailbox as the source has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Every address, primary first (lower case).
    pub addresses: Vec<String>,
    /// Route name.
    pub route: String,
    /// Where its route sends it (`targetAddress`), if set.
    pub routing: Option<String>,
}

/// Reads a mailbox from an entry's attributes (names compared case-insensitively): `None`
/// when the entry is not a mailbox the mapping knows (no mapped state, or no SMTP address).
pub fn mailbox(cfg: &LdapConfig, attrs: &HashMap<String, Vec<String>>) -> Option<Mailbox> {
    let get = |name: &str| {
        attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    };
    let route = get(&cfg.state_attribute)
        .iter()
        .find_map(|v| cfg.states.get(v.trim()))?
        .clone();
    let mut primary = None;
    let mut others = Vec::new();
    for v in get(&cfg.addresses_attribute) {
        let Some((kind, addr)) = v.split_once(':') else {
            continue;
        };
        if !kind.eq_ignore_ascii_case("smtp") {
            continue;
        }
        let addr = addr.trim().to_lowercase();
        if crate::types::Address::parse(&addr, true).is_err() {
            continue;
        }
        if kind == "SMTP" && primary.is_none() {
            primary = Some(addr);
        } else {
            others.push(addr);
        }
    }
    others.sort();
    others.dedup();
    let primary = primary.or_else(|| (!others.is_empty()).then(|| others.remove(0)))?;
    others.retain(|a| *a != primary);
    let mut addresses = vec![primary];
    addresses.extend(others);
    let routing = get(&cfg.routing_attribute).first().and_then(|v| {
        let a = match v.split_once(':') {
            Some((k, a)) if k.eq_ignore_ascii_case("smtp") => a,
            Some(_) => return None,
            None => v.as_str(),
        };
        let a = a.trim().to_lowercase();
        crate::types::Address::parse(&a, true).is_ok().then_some(a)
    });
    Some(Mailbox {
        addresses,
        route,
        routing,
    })
}

/// What the source has now: every mailbox by DN, and the directory CSV made from them.
#[derive(Default)]
struct Content {
    mailboxes: HashMap<String, Mailbox>,
    /// The CSV the directory loads (`None` until the first full sync).
    csv: Option<Arc<Vec<u8>>>,
    fingerprint: Fingerprint,
    /// The mark of the last sync (`usn 123456`, `modifyTimestamp 20261126…Z`).
    mark: String,
}

/// Health of the source, for status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LdapHealth {
    /// The last sync (or connection attempt) succeeded.
    pub healthy: bool,
    /// Mailboxes known.
    pub mailboxes: usize,
    /// The mark of the last successful sync.
    pub mark: String,
    /// RFC 3339 time of the last successful sync.
    pub last_sync: Option<String>,
    /// The last error, while unhealthy.
    pub error: Option<String>,
}

/// The LDAP source: what the sync found, as a [`Source`] for the directory.
pub struct LdapSource {
    url: String,
    content: Mutex<Content>,
    healthy: AtomicBool,
    health: Mutex<LdapHealth>,
}

impl LdapSource {
    /// A source for `cfg` that has not synced yet (unhealthy until its first sync).
    pub fn new(cfg: &LdapConfig) -> Arc<LdapSource> {
        Arc::new(LdapSource {
            url: cfg.url.clone(),
            content: Mutex::new(Content::default()),
            healthy: AtomicBool::new(false),
            health: Mutex::new(LdapHealth::default()),
        })
    }

    /// True while the last sync succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// The source's health, for status.
    pub fn health(&self) -> LdapHealth {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a failed sync.
    pub fn failed(&self, error: String) {
        let was = self.healthy.swap(false, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::DIRECTORY_SOURCE_UP).set(0.0);
        if was {
            tracing::error!(error, "directory: LDAP source failing; the directory in force stays, unknown recipients get 451 4.4.3 until it is back");
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.healthy = false;
        h.error = Some(error);
    }

    /// Records a successful sync that left `mailboxes` (by DN) with mark `mark`: returns
    /// true when the content changed (the directory should reload).
    pub fn synced(&self, mailboxes: HashMap<String, Mailbox>, mark: String) -> bool {
        let n = mailboxes.len();
        let changed = {
            let mut c = self.content.lock().unwrap_or_else(|p| p.into_inner());
            let changed = c.csv.is_none() || c.mailboxes != mailboxes;
            if changed {
                let csv = to_csv(&mailboxes);
                c.fingerprint = Fingerprint {
                    len: csv.len() as u64,
                    mtime_ns: u64::from(crc32fast::hash(&csv)),
                };
                c.csv = Some(Arc::new(csv));
                c.mailboxes = mailboxes;
            }
            c.mark = mark.clone();
            changed
        };
        let was = self.healthy.swap(true, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::DIRECTORY_SOURCE_UP).set(1.0);
        if !was {
            tracing::info!(mailboxes = n, mark, "directory: LDAP source healthy");
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        *h = LdapHealth {
            healthy: true,
            mailboxes: n,
            mark,
            last_sync: Some(
                crate::clock::now_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
            error: None,
        };
        changed
    }

    /// The directory CSV of what the source has now (`None` before its first sync).
    pub fn csv(&self) -> Option<Arc<Vec<u8>>> {
        self.content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .csv
            .clone()
    }

    /// The mailboxes known now (a delta sync starts from them).
    pub fn mailboxes(&self) -> HashMap<String, Mailbox> {
        self.content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mailboxes
            .clone()
    }
}

/// Opens the directory on the LDAP source: a first full sync (bounded by `timeout`; if it
/// fails, the directory of before the restart is served and the source is unhealthy). The
/// syncs that follow are the caller's to start ([`Syncs::run`]) once it has the directory's
/// writer. The outer error is a failed task; the inner one the directory's.
pub async fn open(
    l: LdapConfig,
    cfg: crate::config::DirectoryConfig,
    names: Vec<RouteName>,
) -> Result<Result<(Arc<super::Directory>, Syncs), DirectoryError>, tokio::task::JoinError> {
    let source = LdapSource::new(&l);
    let first = tokio::time::timeout(
        l.timeout,
        sync::sync_once(&l, &sync::Cursor::default(), HashMap::new(), true),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer from {} within {:?}", l.url, l.timeout)));
    let cursor = match first {
        Ok((mailboxes, cursor, _)) => {
            tracing::info!(mailboxes = mailboxes.len(), url = %l.url, "directory: first LDAP sync done");
            source.synced(mailboxes, cursor.mark(l.flavor));
            cursor
        }
        Err(e) => {
            tracing::error!(error = %e, "directory: LDAP source unreachable at start; serving the directory of before the restart, unknown recipients get 451 4.4.3");
            source.failed(e);
            sync::Cursor::default()
        }
    };
    let src = Box::new(SharedLdap(source.clone()));
    let d =
        tokio::task::spawn_blocking(move || super::Directory::open_with(&cfg, names, src)).await?;
    Ok(d.map(|d| {
        let syncs = Syncs {
            cfg: l,
            source,
            cursor,
        };
        (Arc::new(d), syncs)
    }))
}

/// The syncs after the first one, not started yet: a single node's LDAP sync, which hands
/// what changed to the directory's writer.
pub struct Syncs {
    cfg: LdapConfig,
    source: Arc<LdapSource>,
    cursor: sync::Cursor,
}

impl Syncs {
    /// Syncs until the process ends (see [`sync::run`]); after each sync that changed
    /// something, `writer` reloads the source into `directory`.
    pub async fn run(
        self,
        directory: Arc<super::Directory>,
        writer: Arc<dyn super::DirectoryWriter>,
    ) {
        sync::run(self.cfg, self.source, directory, writer, self.cursor).await
    }
}

/// The directory CSV for `mailboxes`: `address,state,mailbox,routing_address`, one row per
/// address, mailboxes in DN order (stable across syncs).
fn to_csv(mailboxes: &HashMap<String, Mailbox>) -> Vec<u8> {
    let mut dns: Vec<&String> = mailboxes.keys().collect();
    dns.sort();
    let mut out = Vec::with_capacity(mailboxes.len() * 80 + 64);
    out.extend_from_slice(b"address,state,mailbox,routing_address\n");
    for dn in dns {
        let m = &mailboxes[dn];
        let primary = &m.addresses[0];
        for (i, a) in m.addresses.iter().enumerate() {
            out.extend_from_slice(a.as_bytes());
            out.push(b',');
            out.extend_from_slice(m.route.as_bytes());
            out.push(b',');
            out.extend_from_slice(primary.as_bytes());
            out.push(b',');
            if i == 0 {
                if let Some(r) = &m.routing {
                    out.extend_from_slice(r.as_bytes());
                }
            }
            out.push(b'\n');
        }
    }
    out
}

/// A shared [`LdapSource`] as the directory's [`Source`].
pub struct SharedLdap(pub Arc<LdapSource>);

impl Source for SharedLdap {
    fn name(&self) -> String {
        let mark = self
            .0
            .content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark
            .clone();
        if mark.is_empty() {
            format!("ldap {}", self.0.url)
        } else {
            format!("ldap {mark}")
        }
    }
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError> {
        Ok(self
            .0
            .content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint)
    }
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
        let csv = self
            .0
            .content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .csv
            .clone()
            .ok_or_else(|| {
                DirectoryError::Batch(format!("LDAP source {} has not synced yet", self.0.url))
            })?;
        table::parse(&csv, &self.name(), states)
    }
    fn healthy(&self) -> bool {
        self.0.healthy()
    }
    fn marks_origin(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LdapConfig {
        let text = format!(
            "{}\n[directory.ldap]\nurl = \"ldap://127.0.0.1:1\"\nbase_dn = \"dc=corp,dc=test\"\n",
            crate::config::DEFAULT_CONFIG
        );
        crate::config::Config::parse(&text, "t")
            .unwrap()
            .directory
            .ldap
            .unwrap()
    }

    fn attrs(pairs: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn an_entry_maps_to_a_mailbox_with_the_active_directory_defaults() {
        let c = cfg();
        let m = mailbox(
            &c,
            &attrs(&[
                ("msexchrecipienttypedetails", &["2147483648"]),
                (
                    "proxyAddresses",
                    &[
                        "smtp:Jo@Trust.test",
                        "SMTP:John.Doe@Corp.test",
                        "X500:/o=x",
                        "sip:j@corp.test",
                    ],
                ),
                ("targetAddress", &["SMTP:jdoe@tenant.mail.onmicrosoft.com"]),
            ]),
        )
        .unwrap();
        assert_eq!(m.route, "cloud");
        assert_eq!(m.addresses, vec!["john.doe@corp.test", "jo@trust.test"]);
        assert_eq!(
            m.routing.as_deref(),
            Some("jdoe@tenant.mail.onmicrosoft.com")
        );
        let on = mailbox(
            &c,
            &attrs(&[
                ("msExchRecipientTypeDetails", &["1"]),
                ("proxyAddresses", &["SMTP:a@corp.test"]),
            ]),
        )
        .unwrap();
        assert_eq!((on.route.as_str(), on.routing), ("onprem", None));
        // Not a mailbox: a contact (type 64), no state, no SMTP address.
        assert!(mailbox(
            &c,
            &attrs(&[
                ("msExchRecipientTypeDetails", &["64"]),
                ("proxyAddresses", &["SMTP:c@corp.test"])
            ])
        )
        .is_none());
        assert!(mailbox(&c, &attrs(&[("proxyAddresses", &["SMTP:c@corp.test"])])).is_none());
        assert!(mailbox(
            &c,
            &attrs(&[
                ("msExchRecipientTypeDetails", &["1"]),
                ("proxyAddresses", &["X500:/o=x"])
            ])
        )
        .is_none());
    }

    #[test]
    fn the_csv_lists_every_address_with_its_mailbox_and_routing_address() {
        let mut m = HashMap::new();
        m.insert(
            "cn=b".to_string(),
            Mailbox {
                addresses: vec!["b@corp.test".into(), "b2@trust.test".into()],
                route: "cloud".into(),
                routing: Some("b@tenant.mail.onmicrosoft.com".into()),
            },
        );
        m.insert(
            "cn=a".to_string(),
            Mailbox {
                addresses: vec!["a@corp.test".into()],
                route: "onprem".into(),
                routing: None,
            },
        );
        assert_eq!(
            String::from_utf8(to_csv(&m)).unwrap(),
            "address,state,mailbox,routing_address\na@corp.test,onprem,a@corp.test,\nb@corp.test,cloud,b@corp.test,b@tenant.mail.onmicrosoft.com\nb2@trust.test,cloud,b@corp.test,\n"
        );
    }
}
