//! Reading the LDAP source: one connection per round, a paged full read of every mailbox or
//! a delta of the entries changed since the last round's cursor.
//!
//! - **Deltas.** Active Directory counts every change of a domain controller in
//!   `uSNChanged`: entries above the `highestCommittedUSN` read (from the rootDSE) before
//!   the previous round are the ones changed since. USNs are per controller, so its
//!   `invocationId` is read too: another one (a different DC behind the name, or a restored
//!   one) means a full read. OpenLDAP: `modifyTimestamp` at or after the newest one seen
//!   (one-second resolution: entries of that second are read again, harmlessly).
//! - **Entries that stop being mailboxes** (`proxyAddresses` cleared, a state the mapping
//!   does not know, the filter no longer matching) are found by a second delta search for
//!   `(!FILTER)`, and leave the directory.
//! - **Deletions** (Active Directory): tombstones, read with the Show Deleted control
//!   (1.2.840.113556.1.4.417) under the domain's naming context, `isDeleted=TRUE` and
//!   `uSNChanged` above the cursor. A tombstone keeps its `objectGUID`, by which entries are
//!   known. An account that may not list `CN=Deleted Objects` sees none: deletions then
//!   wait for the next full read (see the README).
//! - **Ranged attributes**: a Windows DC answers a multi-valued attribute with more values
//!   than its MaxValRange (1,500) as `proxyAddresses;range=0-1499`; the rest is read with
//!   base searches for `proxyAddresses;range=1500-*` until a range ends in `*`. With
//!   `range_size` set the first request asks for ranges itself (Samba answers ranges only
//!   when asked).
//!
//! Entries are known by `objectGUID` (Active Directory) or `entryUUID` (OpenLDAP), so a
//! rename or a move within the base keeps its identity; by DN when neither is readable.

use super::{mailbox, Mailbox};
use crate::config::{LdapConfig, LdapFlavor};
use ldap3::adapters::{EntriesOnly, PagedResults};
use ldap3::controls::RawControl;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// The Show Deleted control: tombstones are returned.
const SHOW_DELETED: &str = "1.2.840.113556.1.4.417";

/// Where the last round left off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Active Directory: the `highestCommittedUSN` read before the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usn: Option<u64>,
    /// Active Directory: the controller's `invocationId` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation: Option<String>,
    /// OpenLDAP: the newest `modifyTimestamp` seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

impl Cursor {
    /// The round's mark, as change logs and lookups show it.
    pub fn mark(&self, flavor: LdapFlavor) -> String {
        match flavor {
            LdapFlavor::ActiveDirectory => format!("usn {}", self.usn.unwrap_or(0)),
            LdapFlavor::Openldap => format!(
                "modifyTimestamp {}",
                self.timestamp.as_deref().unwrap_or("-")
            ),
        }
    }

    /// True before any round (a delta needs a cursor).
    pub fn is_empty(&self) -> bool {
        self.usn.is_none() && self.timestamp.is_none()
    }

    /// The cursor as a delta's change log record keeps it.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A cursor [`Cursor::encode`] wrote (`None`: not one).
    pub fn decode(text: &str) -> Option<Cursor> {
        serde_json::from_str(text).ok()
    }
}

/// Why a round failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError {
    /// What happened, worded for the log and status.
    pub reason: String,
    /// The bind was refused for its credentials (LDAP result 49: a wrong password, a
    /// locked, disabled or expired account): retrying the same password only counts
    /// toward a lockout.
    pub credentials: bool,
}

impl From<String> for SyncError {
    fn from(reason: String) -> SyncError {
        SyncError {
            reason,
            credentials: false,
        }
    }
}

impl From<&str> for SyncError {
    fn from(reason: &str) -> SyncError {
        reason.to_string().into()
    }
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Every mailbox (a full read), by entry id.
    Full(HashMap<String, Mailbox>),
    /// The entries changed since the cursor, by id: the mailbox now, or `None` when the
    /// entry is no longer a mailbox; and the ids of entries deleted since (tombstones).
    Changes {
        /// Changed entries.
        changed: Vec<(String, Option<Mailbox>)>,
        /// Deleted entries.
        deleted: Vec<String>,
    },
}

/// One round: what it found and where the next one starts.
#[derive(Debug, Clone)]
pub struct Round {
    /// What was found.
    pub found: Found,
    /// The cursor after it.
    pub cursor: Cursor,
}

/// LDAP's result code for invalid credentials.
const INVALID_CREDENTIALS: u32 = 49;

/// The reason of a refused bind, in words an admin acts on.
fn bind_refused(dn: &str, e: &LdapError) -> SyncError {
    let (rc, text) = match e {
        LdapError::LdapResult { result } => (Some(result.rc), result.text.clone()),
        _ => (None, e.to_string()),
    };
    let reason = match rc {
        Some(INVALID_CREDENTIALS) => {
            format!("bind as {dn:?} refused: invalid credentials (wrong password, or the account is locked, disabled or expired): {text}")
        }
        Some(8) | Some(13) => format!(
            "bind as {dn:?} refused: the server requires transport encryption (use ldaps:// or starttls = true): {text}"
        ),
        _ => format!("bind as {dn:?} refused: {e}"),
    };
    SyncError {
        reason,
        credentials: rc == Some(INVALID_CREDENTIALS),
    }
}

/// Connects and binds.
pub(super) async fn connect(cfg: &LdapConfig) -> Result<Ldap, SyncError> {
    // Config validation refuses this already; a config built by code is held to it too.
    if cfg.plaintext_bind_refused() {
        return Err(format!(
            "refusing to send the bind password over plain {} (set `starttls = true`, use \
             ldaps://, or `allow_plaintext_bind = true` for a lab)",
            cfg.url
        )
        .into());
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
            .map_err(|e| bind_refused(dn, &e))?;
    }
    Ok(ldap)
}

/// An attribute's first value, text or (binary) hex.
fn first_value(e: &SearchEntry, attr: &str) -> Option<String> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first().cloned())
        .or_else(|| {
            e.bin_attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(attr))
                .and_then(|(_, v)| v.first())
                .map(|b| hex(b))
        })
}

/// A binary value as text: a 16-byte one (`objectGUID`, `invocationId`) in the GUID form
/// Windows shows (the first three fields little-endian), others in hex.
fn hex(b: &[u8]) -> String {
    match <[u8; 16]>::try_from(b) {
        Ok(g) => format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            g[8],
            g[9],
            g[10..]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        ),
        Err(_) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
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
    Ok(rs
        .into_iter()
        .next()
        .and_then(|e| first_value(&SearchEntry::construct(e), attr)))
}

/// The id an entry is known by.
fn entry_id(e: &SearchEntry) -> String {
    first_value(e, "objectGUID")
        .or_else(|| first_value(e, "entryUUID"))
        .unwrap_or_else(|| format!("dn:{}", e.dn.to_lowercase()))
}

/// `attr;range=LOW-HIGH` → (attr, HIGH), `HIGH` `None` for `*`.
fn ranged(name: &str, attr: &str) -> Option<Option<u64>> {
    let (base, opts) = name.split_once(';')?;
    if !base.eq_ignore_ascii_case(attr) {
        return None;
    }
    let range = opts.split(';').find_map(|o| {
        o.strip_prefix("range=")
            .or_else(|| o.strip_prefix("Range="))
    })?;
    let (_, high) = range.split_once('-')?;
    Some(if high == "*" {
        None
    } else {
        Some(high.parse().ok()?)
    })
}

/// Merges a ranged attribute's values under its plain name; returns where to go on
/// (`Some(next low)`) when the server has more.
fn merge_ranged(attrs: &mut HashMap<String, Vec<String>>, attr: &str) -> Option<u64> {
    let names: Vec<String> = attrs
        .keys()
        .filter(|k| ranged(k, attr).is_some())
        .cloned()
        .collect();
    let mut more = None;
    for name in names {
        let values = attrs.remove(&name).unwrap_or_default();
        if let Some(Some(high)) = ranged(&name, attr) {
            more = Some(high + 1);
        }
        attrs.entry(attr.to_string()).or_default().extend(values);
    }
    more
}

/// The attribute list asked for the addresses (`proxyAddresses;range=0-N` with
/// `range_size`).
fn addresses_request(cfg: &LdapConfig, low: u64) -> String {
    match cfg.range_size {
        0 if low == 0 => cfg.addresses_attribute.clone(),
        0 => format!("{};range={low}-*", cfg.addresses_attribute),
        n => format!(
            "{};range={low}-{}",
            cfg.addresses_attribute,
            low + u64::from(n) - 1
        ),
    }
}

/// Reads the rest of a ranged attribute of `dn` from `low` on, into `attrs`.
async fn read_ranges(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    dn: &str,
    attrs: &mut HashMap<String, Vec<String>>,
    mut low: u64,
) -> Result<(), SyncError> {
    let attr = cfg.addresses_attribute.clone();
    // A bound on the rounds: a server answering the same range forever cannot hold us.
    for _ in 0..100_000 {
        let ask = addresses_request(cfg, low);
        ldap.with_timeout(cfg.timeout);
        let (rs, _) = ldap
            .search(dn, Scope::Base, "(objectClass=*)", vec![ask.as_str()])
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("reading {ask} of {dn:?}: {e}"))?;
        let Some(e) = rs.into_iter().next().map(SearchEntry::construct) else {
            return Ok(());
        };
        let mut part = e.attrs;
        let before = part.values().map(Vec::len).sum::<usize>();
        let more = merge_ranged(&mut part, &attr);
        if let Some(v) = part.remove(&attr) {
            attrs.entry(attr.clone()).or_default().extend(v);
        }
        match more {
            Some(next) if next > low && before > 0 => low = next,
            _ => return Ok(()),
        }
    }
    Err(format!("reading {attr} of {dn:?}: too many ranges").into())
}

/// Runs a paged search under `base` for `filter`: each entry's id with its mailbox (`None`
/// when it is not one), and the newest `modifyTimestamp` among them.
async fn search(
    ldap: &mut Ldap,
    cfg: &LdapConfig,
    base: &str,
    filter: &str,
    deleted: bool,
) -> Result<(Vec<(String, Option<Mailbox>)>, Option<String>), SyncError> {
    let addresses = addresses_request(cfg, 0);
    let attrs = vec![
        cfg.state_attribute.as_str(),
        addresses.as_str(),
        cfg.routing_attribute.as_str(),
        "modifyTimestamp",
        "objectGUID",
        "entryUUID",
    ];
    let adapters: Vec<Box<dyn ldap3::adapters::Adapter<_, _>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(
            i32::try_from(cfg.page_size).unwrap_or(500),
        )),
    ];
    ldap.with_timeout(cfg.timeout);
    if deleted {
        ldap.with_controls(vec![RawControl {
            ctype: SHOW_DELETED.into(),
            crit: true,
            val: None,
        }]);
    }
    let mut stream = ldap
        .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs)
        .await
        .map_err(|e| format!("search {filter:?} under {base:?}: {e}"))?;
    let mut found = Vec::new();
    let mut newest: Option<String> = None;
    // Entries whose addresses come in ranges: read once the search is done.
    let mut partial = Vec::new();
    while let Some(entry) = stream
        .next()
        .await
        .map_err(|e| format!("search {filter:?}: {e}"))?
    {
        let mut e = SearchEntry::construct(entry);
        if let Some(ts) = first_value(&e, "modifyTimestamp") {
            if newest.as_ref().is_none_or(|n| ts > *n) {
                newest = Some(ts);
            }
        }
        let id = entry_id(&e);
        if deleted {
            found.push((id, None));
            continue;
        }
        match merge_ranged(&mut e.attrs, &cfg.addresses_attribute) {
            Some(low) => partial.push((id, e.dn.clone(), e.attrs, low)),
            None => found.push((id, mailbox(cfg, &e.attrs))),
        }
    }
    stream
        .finish()
        .await
        .success()
        .map_err(|e| format!("search {filter:?}: {e}"))?;
    for (id, dn, mut attrs, low) in partial {
        read_ranges(ldap, cfg, &dn, &mut attrs, low).await?;
        found.push((id, mailbox(cfg, &attrs)));
    }
    Ok((found, newest))
}

/// One round: a full read (`full`, or no cursor yet, or another domain controller) or the
/// changes since `cursor`.
pub async fn read(cfg: &LdapConfig, cursor: &Cursor, full: bool) -> Result<Round, SyncError> {
    let mut ldap = connect(cfg).await?;
    let mut next = cursor.clone();
    let mut full = full || cursor.is_empty();
    let since = match cfg.flavor {
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
            if !full && cursor.invocation.is_some() && invocation != cursor.invocation {
                tracing::warn!(
                    before = ?cursor.invocation,
                    now = ?invocation,
                    "directory: the LDAP server's invocationId changed (another domain controller, or a restore): full sync"
                );
                full = true;
            }
            let since = cursor.usn.map(|u| format!("(uSNChanged>={})", u + 1));
            next.usn = Some(usn);
            next.invocation = invocation;
            since
        }
        LdapFlavor::Openldap => cursor
            .timestamp
            .as_ref()
            .map(|ts| format!("(modifyTimestamp>={ts})")),
    };
    let found = match (full, since) {
        (false, Some(since)) => {
            let (mut changed, n1) = search(
                &mut ldap,
                cfg,
                &cfg.base_dn,
                &format!("(&{}{since})", cfg.filter),
                false,
            )
            .await?;
            // Changed entries the filter no longer matches: no longer mailboxes.
            let (gone, n2) = search(
                &mut ldap,
                cfg,
                &cfg.base_dn,
                &format!("(&(!{}){since})", cfg.filter),
                false,
            )
            .await?;
            changed.extend(gone.into_iter().map(|(id, _)| (id, None)));
            let mut deleted = Vec::new();
            if cfg.flavor == LdapFlavor::ActiveDirectory {
                // Tombstones live under the domain's naming context, not the base.
                let nc = read_attr(&mut ldap, cfg, "", "defaultNamingContext")
                    .await?
                    .unwrap_or_else(|| cfg.base_dn.clone());
                let (tombstones, _) = search(
                    &mut ldap,
                    cfg,
                    &nc,
                    &format!("(&(isDeleted=TRUE){since})"),
                    true,
                )
                .await?;
                deleted = tombstones.into_iter().map(|(id, _)| id).collect();
            }
            newest(&mut next, [n1, n2]);
            Found::Changes { changed, deleted }
        }
        _ => {
            let (all, n) = search(&mut ldap, cfg, &cfg.base_dn, &cfg.filter, false).await?;
            newest(&mut next, [n, None]);
            Found::Full(
                all.into_iter()
                    .filter_map(|(id, m)| m.map(|m| (id, m)))
                    .collect(),
            )
        }
    };
    let _ = ldap.unbind().await;
    Ok(Round {
        found,
        cursor: next,
    })
}

/// Moves the OpenLDAP cursor to the newest `modifyTimestamp` seen.
fn newest(next: &mut Cursor, seen: [Option<String>; 2]) {
    for n in seen.into_iter().flatten() {
        if next.timestamp.as_ref().is_none_or(|t| n > *t) {
            next.timestamp = Some(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranged_attributes_are_merged_and_say_where_to_go_on() {
        let mut attrs: HashMap<String, Vec<String>> = HashMap::new();
        attrs.insert(
            "proxyAddresses;range=0-1499".into(),
            vec!["SMTP:a@corp.test".into(), "smtp:b@corp.test".into()],
        );
        attrs.insert("msExchRecipientTypeDetails".into(), vec!["1".into()]);
        assert_eq!(merge_ranged(&mut attrs, "proxyAddresses"), Some(1500));
        assert_eq!(attrs["proxyAddresses"].len(), 2);
        let mut last: HashMap<String, Vec<String>> = HashMap::new();
        last.insert(
            "proxyaddresses;range=1500-*".into(),
            vec!["smtp:c@corp.test".into()],
        );
        assert_eq!(merge_ranged(&mut last, "proxyAddresses"), None);
        assert_eq!(last["proxyAddresses"], vec!["smtp:c@corp.test"]);
        let mut plain: HashMap<String, Vec<String>> = HashMap::new();
        plain.insert("proxyAddresses".into(), vec!["SMTP:a@corp.test".into()]);
        assert_eq!(merge_ranged(&mut plain, "proxyAddresses"), None);
        assert_eq!(
            ranged("proxyAddresses;range=10-19", "proxyaddresses"),
            Some(Some(19))
        );
        assert_eq!(ranged("proxyAddresses;binary", "proxyAddresses"), None);
    }

    #[test]
    fn guids_read_as_windows_shows_them() {
        let b = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(hex(&b), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(hex(&[1, 2]), "0102");
    }

    #[test]
    fn cursors_round_trip_as_text() {
        let c = Cursor {
            usn: Some(12),
            invocation: Some("ab".into()),
            timestamp: None,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("usn 12"), None);
    }
}
