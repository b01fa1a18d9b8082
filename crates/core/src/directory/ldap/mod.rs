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

#[allow(clippy::disallowed_methods)] // Runs on the blocking pool.
pub mod ids;
mod plan;
pub mod read;
pub mod retry;
pub mod sync;

use super::delta::{self, Delta, DeltaEntry};
use super::store::Fingerprint;
use super::table::{self, Parsed};
use super::{Directory, DirectoryError, Source};
use crate::config::{LdapConfig, LdapFlavor};
use crate::types::RouteName;
pub use delta::Mailbox;
pub use plan::Plan;
pub use read::{Cursor, Found, Round, SyncError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Reads a mailbox from an entry's attributes (names compared case-insensitively): `None`
/// when the entry is not a mailbox the mapping knows (no mapped state, or no SMTP address).
/// Addresses are given as directory keys (lower case).
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
        let Ok(addr) = crate::types::Address::parse(addr.trim(), true) else {
            continue;
        };
        let addr = addr.key();
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

/// What the source knows between rounds.
#[derive(Default)]
struct Content {
    /// Each entry id the source knows → its mailbox's primary address (so a deletion, which
    /// leaves only the id, finds its mailbox).
    ids: HashMap<String, String>,
    /// `ids` came from a full read (else a deletion of an unknown id needs one).
    complete: bool,
    /// A full read's mailboxes, while the directory loads them whole (first start).
    whole: Option<Arc<HashMap<String, Mailbox>>>,
    /// Fingerprint of the last whole load.
    fingerprint: Fingerprint,
    /// The mark of the last round (`usn 123456`, `modifyTimestamp 20261126…Z`).
    mark: String,
}

/// Health of the source, for `coexist status`, `/v1/ready` and the console.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LdapHealth {
    /// The last round succeeded.
    pub healthy: bool,
    /// Entries known.
    pub mailboxes: usize,
    /// The mark of the last successful round.
    pub mark: String,
    /// RFC 3339 time of the last successful round.
    pub last_sync: Option<String>,
    /// RFC 3339 time of the last successful full read.
    #[serde(default)]
    pub last_full_sync: Option<String>,
    /// Active Directory: the `highestCommittedUSN` the next delta starts above.
    #[serde(default)]
    pub usn: Option<u64>,
    /// Active Directory: the domain controller's `invocationId`.
    #[serde(default)]
    pub invocation_id: Option<String>,
    /// OpenLDAP: the newest `modifyTimestamp` seen.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// The current error (the last round's), while unhealthy.
    pub error: Option<String>,
    /// RFC 3339 time since which this error has been the reason.
    #[serde(default)]
    pub error_since: Option<String>,
    /// Failed rounds in a row.
    #[serde(default)]
    pub failures: u32,
    /// RFC 3339 time of the next try.
    #[serde(default)]
    pub next_try: Option<String>,
}

/// The LDAP source: what the rounds found, as a [`Source`] for the directory.
pub struct LdapSource {
    url: String,
    flavor: LdapFlavor,
    /// An admin asked for the next round to be a full read applied with force
    /// (`coexist directory reload --force`).
    forced: AtomicBool,
    content: Mutex<Content>,
    healthy: AtomicBool,
    health: Mutex<LdapHealth>,
}

fn now() -> String {
    crate::clock::now_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl LdapSource {
    /// A source for `cfg` that has not synced yet (unhealthy until its first round).
    pub fn new(cfg: &LdapConfig) -> Arc<LdapSource> {
        Arc::new(LdapSource {
            url: cfg.url.clone(),
            flavor: cfg.flavor,
            forced: AtomicBool::new(false),
            content: Mutex::new(Content::default()),
            healthy: AtomicBool::new(false),
            health: Mutex::new(LdapHealth::default()),
        })
    }

    fn content(&self) -> std::sync::MutexGuard<'_, Content> {
        self.content.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health_mut(&self) -> std::sync::MutexGuard<'_, LdapHealth> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has the next round read every entry and apply it past the shrink guard.
    pub fn force_next(&self) {
        self.forced.store(true, Ordering::SeqCst);
    }

    /// Whether the next round was forced (and clears it).
    pub fn take_forced(&self) -> bool {
        self.forced.swap(false, Ordering::SeqCst)
    }

    /// True while the last round succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// The source's health, for status.
    pub fn health(&self) -> LdapHealth {
        self.health_mut().clone()
    }

    /// Records a failed round, the next try `retry_in` from now. The reason is logged when
    /// it changes (and so is the first failure after a success); status shows the current
    /// one.
    pub fn failed(&self, e: &SyncError, retry_in: Duration, failures: u32) {
        self.healthy.store(false, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::DIRECTORY_SOURCE_UP).set(0.0);
        let next = crate::clock::now_utc()
            + chrono::Duration::from_std(retry_in).unwrap_or_else(|_| chrono::Duration::zero());
        let mut h = self.health_mut();
        if h.error.as_deref() != Some(e.reason.as_str()) {
            if e.credentials {
                tracing::error!(
                    error = %e,
                    retry_in_s = retry_in.as_secs(),
                    "directory: LDAP bind refused for its credentials; NOT retrying this password for 30 minutes (each try counts toward the account's lockout). Fix the password (directory.ldap.password_file is read again at every check and a changed one is tried at once). Meanwhile the directory in force stays and unknown recipients get 451 4.4.3"
                );
            } else {
                tracing::error!(error = %e, retry_in_s = retry_in.as_secs(), failures, "directory: LDAP source failing; the directory in force stays, unknown recipients get 451 4.4.3 until it is back");
            }
            h.error_since = Some(now());
        }
        h.healthy = false;
        h.error = Some(e.reason.clone());
        h.failures = failures;
        h.next_try = Some(next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }

    /// Takes back the ids known before a restart (see [`ids`]): the file written after the
    /// last full read, brought up to date from the deltas `dir` logged since. Blocking.
    pub fn restore_ids(&self, dir: &Directory) {
        let Some(folder) = dir.store_dir() else {
            return;
        };
        let Some((change, mut known)) = ids::load(&folder) else {
            return;
        };
        let Some(deltas) = dir.deltas_after(change) else {
            tracing::info!("directory: the LDAP source's ids are older than the change log holds; a deletion will need a full read");
            return;
        };
        ids::replay(&mut known, &deltas);
        tracing::info!(
            ids = known.len(),
            deltas = deltas.len(),
            "directory: LDAP entry ids restored"
        );
        let mut c = self.content();
        c.ids = known;
        c.complete = true;
    }

    /// Keeps the ids of a full read the directory took (see [`ids`]). Blocking.
    pub fn save_ids(&self, dir: &Directory) {
        let Some(folder) = dir.store_dir() else {
            return;
        };
        let known = self.content().ids.clone();
        if let Err(e) = ids::save(&folder, dir.applied(), &known) {
            tracing::warn!(error = %e, folder = %folder.display(), "directory: the LDAP source's ids not saved; after a restart a deletion will need a full read");
        }
    }

    /// Drops a whole read once the directory has loaded it (it is large).
    pub fn loaded(&self) {
        self.content().whole = None;
    }

    /// The directory CSV of the last full read, while a whole load needs it.
    pub fn csv(&self) -> Option<Vec<u8>> {
        self.content().whole.as_ref().map(|m| to_csv(m))
    }
}

/// Opens the directory on the LDAP source: from its store (snapshot and change log), then a
/// first round before listening (bounded by `timeout`): the changes since the cursor the
/// last logged delta recorded, or a full read when there is none (a first start: loaded
/// whole). If it fails, the directory of before the restart is served and the source is
/// unhealthy. The rounds that follow are the caller's to start ([`Syncs::run`]) once it has
/// the directory's writer. The outer error is a failed task; the inner one the directory's.
pub async fn open(
    l: LdapConfig,
    cfg: crate::config::DirectoryConfig,
    names: Vec<RouteName>,
) -> Result<Result<(Arc<super::Directory>, Syncs), DirectoryError>, tokio::task::JoinError> {
    let source = LdapSource::new(&l);
    let src = Box::new(SharedLdap(source.clone()));
    let d =
        match tokio::task::spawn_blocking(move || Directory::open_with(&cfg, names, src)).await? {
            Ok(d) => Arc::new(d),
            Err(e) => return Ok(Err(e)),
        };
    d.attach_ldap(source.clone());
    // An empty directory (a first start, or a snapshot that could not be used) is read
    // whole, whatever cursor the change log still holds.
    let cursor = match d.is_empty() {
        true => Cursor::default(),
        false => d
            .last_source_cursor()
            .and_then(|c| Cursor::decode(&c))
            .unwrap_or_default(),
    };
    if !cursor.is_empty() {
        let (s, dd) = (source.clone(), d.clone());
        tokio::task::spawn_blocking(move || s.restore_ids(&dd)).await?;
    }
    let mut syncs = Syncs::new(l, source, cursor);
    let first = tokio::time::timeout(syncs.cfg.timeout, syncs.round(&d, &d)).await;
    if let Ok(wait) = first {
        syncs.wait = wait;
    } else {
        let e = SyncError::from(format!(
            "no answer from {} within {:?}",
            syncs.cfg.url, syncs.cfg.timeout
        ));
        syncs.wait = syncs.retry.failed(&syncs.cfg, false);
        syncs.source.failed(&e, syncs.wait, syncs.retry.failures());
    }
    Ok(Ok((d, syncs)))
}

pub use sync::Syncs;

/// The directory CSV for `mailboxes`: `address,state,mailbox,routing_address`, one row per
/// address, mailboxes in id order (stable across reads).
fn to_csv(mailboxes: &HashMap<String, Mailbox>) -> Vec<u8> {
    let mut ids: Vec<&String> = mailboxes.keys().collect();
    ids.sort();
    let mut out = Vec::with_capacity(mailboxes.len() * 80 + 64);
    out.extend_from_slice(b"address,state,mailbox,routing_address\n");
    for id in ids {
        let m = &mailboxes[id];
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
        let mark = self.0.content().mark.clone();
        if mark.is_empty() {
            format!("ldap {}", self.0.url)
        } else {
            format!("ldap {mark}")
        }
    }
    fn fingerprint(&self) -> Result<Fingerprint, DirectoryError> {
        Ok(self.0.content().fingerprint)
    }
    fn load(&self, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
        let csv = self.0.csv().ok_or_else(|| {
            DirectoryError::Batch(format!(
                "LDAP source {}: its changes are applied as each round finds them and a full read runs every directory.ldap.full_sync_interval; there is no file to reload",
                self.0.url
            ))
        })?;
        table::parse(&csv, &self.name(), states)
    }
    fn healthy(&self) -> bool {
        self.0.healthy()
    }
    fn marks_origin(&self) -> bool {
        true
    }
    fn follows_deltas(&self) -> bool {
        true
    }
    fn reload_requested(&self, force: bool) -> Option<String> {
        if force {
            self.0.force_next();
            Some(
                "the next LDAP round reads every entry and applies it past directory.max_shrink"
                    .into(),
            )
        } else {
            Some("the LDAP source applies its changes at every round; `--force` makes the next one a full read applied past directory.max_shrink".into())
        }
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
            "b".to_string(),
            Mailbox {
                addresses: vec!["b@corp.test".into(), "b2@trust.test".into()],
                route: "cloud".into(),
                routing: Some("b@tenant.mail.onmicrosoft.com".into()),
            },
        );
        m.insert(
            "a".to_string(),
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
