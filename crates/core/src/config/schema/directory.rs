//! `[directory]` and `[directory.ldap]`: where the migration-state directory comes from, and
//! the defaults of their keys.

use super::*;

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
    /// Allow a bind with a password over plain `ldap://` without StartTLS (the password
    /// crosses the network readable): only for a lab. Loopback is not exempt.
    #[serde(default)]
    pub allow_plaintext_bind: bool,
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
    /// Ask for the addresses attribute in ranges of this many values (`proxyAddresses;range=0-N`);
    /// 0: ask for it whole. A Windows DC answers in ranges past its MaxValRange (1,500) unasked,
    /// and those are read whole either way.
    #[serde(default)]
    pub range_size: u32,
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
    /// True when a password would be sent in clear: a bind DN with a password (inline or
    /// from a file) over `ldap://` without StartTLS, and no `allow_plaintext_bind` (checked
    /// by config validation and again before every bind).
    pub fn plaintext_bind_refused(&self) -> bool {
        let clear = !self.url.to_ascii_lowercase().starts_with("ldaps://") && !self.starttls;
        let secret =
            self.bind_dn.is_some() && (self.password.is_some() || self.password_file.is_some());
        clear && secret && !self.allow_plaintext_bind
    }

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
