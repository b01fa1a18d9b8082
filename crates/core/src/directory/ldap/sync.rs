//! Syncing the LDAP source: a paged full sync at start and every `full_sync_interval`, a
//! delta sync every `sync_interval` in between, each followed by a reload through the
//! directory's writer when it changed something, or when the directory in force is still not
//! the source's content (a reload refused by `directory.max_shrink` is tried again at every
//! sync until it passes).
//!
//! Deltas: Active Directory counts every change of a domain controller in `uSNChanged`;
//! entries with `uSNChanged` above the `highestCommittedUSN` read (from the rootDSE) before
//! the previous sync are the ones changed since. USNs are per domain controller, so the
//! controller's `invocationId` is read too: another one (a different DC behind the name, or
//! a restored one) means a full sync. OpenLDAP: `modifyTimestamp` at or after the newest one
//! seen (one-second resolution: entries of that second are read again, harmlessly). Neither
//! shows deletions; the periodic full sync does.
//!
//! Each round runs in a task of its own: a failure (or a panic in the LDAP library's
//! parsing) is a failed sync, after which the source is unhealthy until a round succeeds.

use super::{mailbox, LdapSource, Mailbox};
use crate::config::{LdapConfig, LdapFlavor};
use crate::directory::{Directory, DirectoryWriter, WriteError};
use ldap3::adapters::{EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Where the last sync left off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Active Directory: the `highestCommittedUSN` read before the last sync.
    pub usn: Option<u64>,
    /// Active Directory: the controller's `invocationId` then.
    pub invocation: Option<String>,
    /// OpenLDAP: the newest `modifyTimestamp` seen.
    pub timestamp: Option<String>,
}

impl Cursor {
    /// The sync's mark, as change logs and lookups show it.
    pub fn mark(&self, flavor: LdapFlavor) -> String {
        match flavor {
            LdapFlavor::ActiveDirectory => format!("usn {}", self.usn.unwrap_or(0)),
            LdapFlavor::Openldap => format!(
                "modifyTimestamp {}",
                self.timestamp.as_deref().unwrap_or("-")
            ),
        }
    }
}

/// An LDAP failure, worded for the log.
type SyncError = String;

async fn connect(cfg: &LdapConfig) -> Result<Ldap, SyncError> {
    // Config validation refuses this already; a config built by code is held to it too.
    if cfg.plaintext_bind_refused() {
        return Err(format!(
            "refusing to send the bind password over plain {} (set `starttls = true`, use \
             ldaps://, or `allow_plaintext_bind = true` for a lab)",
            cfg.url
        ));
    }
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(cfg.timeout)
        .set_starttls(cfg.starttls);
    if let Some(ca) = &cfg.tls_ca_file {
        let pem = tokio::fs::read(ca)
            .await
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        let roots =
            crate::certs::roots_from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        settings = settings.set_config(Arc::new(tls));
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &cfg.url)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", cfg.url))?;
    ldap3::drive!(conn);
    ldap.with_timeout(cfg.timeout);
    if let Some(dn) = &cfg.bind_dn {
        let pw = cfg
            .password()
            .map_err(|e| format!("directory.ldap.password_file: {e}"))?
            .unwrap_or_default();
        ldap.with_timeout(cfg.timeout);
        ldap.simple_bind(dn, &pw)
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("bind as {dn:?} refused: {e}"))?;
    }
    Ok(ldap)
}

/// Reads one attribute of one entry (a base search).
async fn read_attr(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    dn: &str,
    attr: &str,
) -> Result<Option<String>, SyncError> {
    ldap.with_timeout(cfg.timeout);
    let (rs, _) = ldap
        .search(dn, Scope::Base, "(objectClass=*)", vec![attr])
        .await
        .and_then(|r| r.success())
        .map_err(|e| format!("reading {attr} of {dn:?}: {e}"))?;
    Ok(rs.into_iter().next().and_then(|e| {
        let e = SearchEntry::construct(e);
        e.attrs
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attr))
            .and_then(|(_, v)| v.into_iter().next())
            .or_else(|| {
                e.bin_attrs
                    .into_iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(attr))
                    .and_then(|(_, v)| v.into_iter().next())
                    .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
            })
    }))
}

/// Runs a paged search for `filter` and returns the mailboxes found (by DN), and the newest
/// `modifyTimestamp` among them.
async fn search(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    filter: &str,
) -> Result<(HashMap<String, Mailbox>, Option<String>), SyncError> {
    let attrs = vec![
        cfg.state_attribute.as_str(),
        cfg.addresses_attribute.as_str(),
        cfg.routing_attribute.as_str(),
        "modifyTimestamp",
    ];
    let adapters: Vec<Box<dyn ldap3::adapters::Adapter<_, _>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(
            i32::try_from(cfg.page_size).unwrap_or(500),
        )),
    ];
    ldap.with_timeout(cfg.timeout);
    let mut stream = ldap
        .streaming_search_with(adapters, &cfg.base_dn, Scope::Subtree, filter, attrs)
        .await
        .map_err(|e| format!("search {filter:?} under {:?}: {e}", cfg.base_dn))?;
    let mut found = HashMap::new();
    let mut newest: Option<String> = None;
    while let Some(entry) = stream
        .next()
        .await
        .map_err(|e| format!("search {filter:?}: {e}"))?
    {
        let e = SearchEntry::construct(entry);
        if let Some(ts) = e
            .attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("modifyTimestamp"))
            .and_then(|(_, v)| v.first())
        {
            if newest.as_ref().is_none_or(|n| ts > n) {
                newest = Some(ts.clone());
            }
        }
        if let Some(m) = mailbox(cfg, &e.attrs) {
            found.insert(e.dn.to_lowercase(), m);
        } else {
            // Changed into something that is not a mailbox: drop it (delta syncs).
            found.remove(&e.dn.to_lowercase());
            found.insert(format!("-{}", e.dn.to_lowercase()), not_a_mailbox());
        }
    }
    stream
        .finish()
        .await
        .success()
        .map_err(|e| format!("search {filter:?}: {e}"))?;
    Ok((found, newest))
}

/// The placeholder a search leaves for an entry that is no longer a mailbox.
fn not_a_mailbox() -> Mailbox {
    Mailbox {
        addresses: Vec::new(),
        route: String::new(),
        routing: None,
    }
}

/// One sync: full (every mailbox) or delta (changes since `cursor`, merged into `known`).
/// Returns the mailboxes now and the new cursor.
pub async fn sync_once(
    cfg: &LdapConfig,
    cursor: &Cursor,
    known: HashMap<String, Mailbox>,
    full: bool,
) -> Result<(HashMap<String, Mailbox>, Cursor, bool), SyncError> {
    let mut ldap = connect(cfg).await?;
    let mut next = cursor.clone();
    let mut full = full;
    let filter = match cfg.flavor {
        LdapFlavor::ActiveDirectory => {
            let service = read_attr(&mut ldap, cfg, "", "dsServiceName").await?;
            let usn = read_attr(&mut ldap, cfg, "", "highestCommittedUSN")
                .await?
                .and_then(|u| u.parse::<u64>().ok())
                .ok_or("the rootDSE has no highestCommittedUSN (not Active Directory? set directory.ldap.flavor = \"openldap\")")?;
            let invocation = match &service {
                Some(dn) => read_attr(&mut ldap, cfg, dn, "invocationId").await?,
                None => None,
            };
            if cursor.invocation.is_some() && invocation != cursor.invocation {
                warn!("directory: the LDAP server's invocationId changed (another domain controller, or a restore): full sync");
                full = true;
            }
            let f = match (full, cursor.usn) {
                (false, Some(last)) => format!("(&{}(uSNChanged>={}))", cfg.filter, last + 1),
                _ => {
                    full = true;
                    cfg.filter.clone()
                }
            };
            next.usn = Some(usn);
            next.invocation = invocation;
            f
        }
        LdapFlavor::Openldap => match (full, &cursor.timestamp) {
            (false, Some(ts)) => format!("(&{}(modifyTimestamp>={ts}))", cfg.filter),
            _ => {
                full = true;
                cfg.filter.clone()
            }
        },
    };
    let (found, newest) = search(&mut ldap, cfg, &filter).await?;
    let _ = ldap.unbind().await;
    if let Some(n) = newest {
        if next.timestamp.as_ref().is_none_or(|t| n > *t) {
            next.timestamp = Some(n);
        }
    }
    let mailboxes = if full {
        found
            .into_iter()
            .filter(|(k, _)| !k.starts_with('-'))
            .collect()
    } else {
        let mut all = known;
        for (dn, m) in found {
            match dn.strip_prefix('-') {
                Some(gone) => {
                    all.remove(gone);
                }
                None => {
                    all.insert(dn, m);
                }
            }
        }
        all
    };
    Ok((mailboxes, next, full))
}

/// Syncs until the process ends: a full sync first (the caller may have run it already:
/// `cursor`), then deltas every `sync_interval` and a full sync every `full_sync_interval`;
/// after each sync that changed something, the directory reloads the source.
pub async fn run(
    cfg: LdapConfig,
    source: Arc<LdapSource>,
    directory: Arc<Directory>,
    writer: Arc<dyn DirectoryWriter>,
    mut cursor: Cursor,
) {
    let mut last_full = Instant::now();
    let mut need_full = cursor == Cursor::default();
    loop {
        if !need_full {
            tokio::time::sleep(cfg.sync_interval).await;
        }
        let full = need_full || last_full.elapsed() >= cfg.full_sync_interval;
        let (c, cur, known) = (cfg.clone(), cursor.clone(), source.mailboxes());
        let round = tokio::spawn(async move { sync_once(&c, &cur, known, full).await });
        match round.await {
            Ok(Ok((mailboxes, next, was_full))) => {
                if was_full {
                    last_full = Instant::now();
                }
                need_full = false;
                let mark = next.mark(cfg.flavor);
                let changed = source.synced(mailboxes, mark.clone());
                metrics::counter!(crate::metrics::LDAP_SYNCS, "kind" => if was_full { "full" } else { "delta" }, "result" => "ok").increment(1);
                cursor = next;
                // Also when the content did not change since the last sync but is not the
                // one in force: the last reload was refused (`directory.max_shrink`, whose
                // limit a config reload may have raised since), so it is tried again at
                // every sync, not only when the source changes again.
                if changed || directory.source_changed() {
                    match writer.reload(false).await {
                        Ok(r) => info!(
                            mark,
                            changed = r.changed,
                            added = r.added,
                            removed = r.removed,
                            "directory: LDAP changes applied"
                        ),
                        // Refusals (the shrink guard) are logged and kept for status by the
                        // directory itself.
                        Err(WriteError::Task(e)) => {
                            warn!(error = %e, "directory reload task failed")
                        }
                        Err(_) => {}
                    }
                }
            }
            Ok(Err(e)) => {
                metrics::counter!(crate::metrics::LDAP_SYNCS, "kind" => if full { "full" } else { "delta" }, "result" => "failed").increment(1);
                source.failed(e);
                // Retry soon, and make it a full sync if the first one never succeeded.
                tokio::time::sleep(cfg.sync_interval.min(Duration::from_secs(5))).await;
            }
            Err(e) => {
                source.failed(format!("sync task failed: {e}"));
                tokio::time::sleep(cfg.sync_interval).await;
            }
        }
    }
}
