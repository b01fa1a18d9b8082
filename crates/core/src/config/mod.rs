//! Typed TOML configuration, validated at load. Every error names the file, the line and the key.
//!
//! Relative paths in the config (spool, directory, certificates) are taken relative to the
//! working directory of the process, as in the examples in `config/`.
//!
//! This module holds [`Config`] itself, loading and parsing, and the error type. The section
//! structs are in `schema`, the value types (percentages, next hops, ...) in `values`, the
//! checks run after parsing in `validate`, the warnings about valid but unsafe settings in
//! `warnings`, the mapping of a TOML offset or key to its line in `locate`, and the fleet's
//! PostgreSQL connection string (with its TLS settings) in `postgres`.
#![allow(clippy::disallowed_methods)] // Read at start-up and on reload, which runs off the async workers.

mod locate;
pub mod postgres;
mod schema;
pub mod token;
mod validate;
mod values;
mod warnings;

pub use schema::{
    AdminConfig, BounceConfig, DeliveryConfig, DirectoryConfig, DnsConfig, FleetConfig, LdapConfig,
    LdapFlavor, MtaStsConfig, OnFailure, PolicyConfig, QueueConfig, RouteConfig, ServerConfig,
    ShadowConfig, SpoolConfig, TlsConfig, TrackingConfig,
};
pub use values::{NextHop, Percent, PublicUrl, TlsPolicy, Unknown, ValueError};
pub use warnings::ConfigWarning;

use crate::types::RouteName;
use locate::locate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Most routes a config may name: the directory keeps each mailbox's state (a route) in
/// one byte.
pub const MAX_ROUTES: usize = u8::MAX as usize + 1;

/// The folder under `spool.dir` that holds the directory store when `directory.store_dir`
/// is not set.
pub const DEFAULT_STORE_FOLDER: &str = "directory";

/// `directory.store_dir`'s default in versions before it moved under `spool.dir`: relative to
/// the working directory, so two configs started from one folder shared it.
pub const LEGACY_STORE_DIR: &str = "var/directory";

/// The config shipped in the binary (`config/coexist.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../../config/coexist.toml");

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
    /// What DSNs return to the sender.
    #[serde(default)]
    pub bounce: BounceConfig,
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
    /// Several nodes sharing one directory through PostgreSQL; absent: a single node.
    pub fleet: Option<FleetConfig>,
    /// A redundant copy of every message on NATS JetStream, and takeover of a dead node's
    /// queue (needs `[fleet]`); absent: the local spool only.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
    /// The message tracking log (on by default).
    #[serde(default)]
    pub tracking: TrackingConfig,
}

impl Config {
    /// The folder of the tracking log: `tracking.dir`, else `tracking` under `spool.dir`.
    pub fn tracking_dir(&self) -> std::path::PathBuf {
        self.tracking
            .dir
            .clone()
            .unwrap_or_else(|| self.spool.dir.join("tracking"))
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_warnings(path).map(|(c, _)| c)
    }

    /// [`Config::load`], with the warnings about the config (see [`Config::warnings`]).
    pub fn load_with_warnings(path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let file = path.display().to_string();
        let cfg = Config::parse(&text, &file)?;
        let warnings = cfg.warnings(&text, &file);
        Ok((cfg, warnings))
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
        let mut cfg = cfg;
        if cfg.directory.store_dir.as_os_str().is_empty() {
            cfg.directory.store_dir = cfg.spool.dir.join(DEFAULT_STORE_FOLDER);
        }
        cfg.validate(text, file)?;
        Ok(cfg)
    }

    /// Sessions reserved for `policy.trusted_networks` (see `server.reserved_connections`):
    /// the value set, else a tenth of `server.max_connections`; 0 without trusted networks,
    /// since nobody could use them.
    pub fn reserved_connections(&self) -> usize {
        if self.policy.trusted_networks.is_empty() {
            return 0;
        }
        self.server
            .reserved_connections
            .unwrap_or(self.server.max_connections / 10)
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
        check(self.fleet != new.fleet, "fleet");
        check(self.shadow != new.shadow, "shadow");
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
        // Shipped: unknown addresses are refused (no backscatter); DSNs still go on premises.
        let c = Config::parse(DEFAULT_CONFIG, "t").unwrap();
        assert_eq!(c.directory.unknown, Unknown::Reject);
        assert_eq!(c.directory.unknown.to_string(), "reject");
        assert_eq!(c.external_route(), Some(RouteName("onprem".into())));
        let text = DEFAULT_CONFIG.replace("unknown = \"reject\"", "unknown = \"onprem\"");
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(
            c.directory.unknown,
            Unknown::Route(RouteName("onprem".into()))
        );
    }

    #[test]
    fn slot_and_bounce_limits_have_defaults_and_are_checked_with_line() {
        let c = Config::parse(DEFAULT_CONFIG, "t").unwrap();
        assert_eq!(c.bounce.max_return_size, 50_000);
        assert_eq!(c.server.max_session_time.as_secs(), 3600);
        assert_eq!(c.server.junk_command_limit, 100);
        assert_eq!(
            (c.policy.ipv4_client_prefix, c.policy.ipv6_client_prefix),
            (32, 64)
        );
        // No trusted networks: nothing reserved; with them, a tenth unless set.
        assert_eq!(c.reserved_connections(), 0);
        let text = DEFAULT_CONFIG.replace(
            "trusted_networks = []",
            "trusted_networks = [\"10.20.0.0/16\"]",
        );
        assert_eq!(
            Config::parse(&text, "t").unwrap().reserved_connections(),
            100
        );
        let text = text.replace("# reserved_connections = 100", "reserved_connections = 7");
        assert_eq!(Config::parse(&text, "t").unwrap().reserved_connections(), 7);
        for (from, to, key, why) in [
            (
                "ipv6_client_prefix = 64",
                "ipv6_client_prefix = 129",
                "policy.ipv6_client_prefix",
                "from 1 to 128",
            ),
            (
                "ipv6_client_prefix = 64",
                "ipv6_client_prefix = 0",
                "policy.ipv6_client_prefix",
                "from 1 to 128",
            ),
            (
                "ipv4_client_prefix = 32",
                "ipv4_client_prefix = 33",
                "policy.ipv4_client_prefix",
                "from 1 to 32",
            ),
            (
                "# reserved_connections = 100",
                "reserved_connections = 1000",
                "server.reserved_connections",
                "less than server.max_connections (1000)",
            ),
        ] {
            let text = DEFAULT_CONFIG.replace(from, to);
            let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
            let line = text.lines().position(|l| l.starts_with(to)).unwrap() + 1;
            assert!(
                err.starts_with(&format!("x.toml:{line}: key `{key}`: ")),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn unknown_route_is_refused_with_line() {
        let text = DEFAULT_CONFIG.replace("unknown = \"reject\"", "unknown = \"mars\"");
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
    fn fleet_keys_are_checked_and_make_the_directory_file_optional() {
        let line_of =
            |text: &str, pat: &str| text.lines().position(|l| l.starts_with(pat)).unwrap() + 1;
        let no_file: String = DEFAULT_CONFIG
            .lines()
            .filter(|l| !l.starts_with("file = "))
            .collect::<Vec<_>>()
            .join("\n");
        let err = Config::parse(&no_file, "x.toml").unwrap_err().to_string();
        assert!(err.contains("key `directory.file`: is required"), "{err}");
        let fleet = "\n[fleet]\npostgres = \"postgresql://postgres@127.0.0.1:5432/test\"\nschema = \"coexist\"\nnode = \"mx1\"\nmax_lag = \"5m\"\n";
        let cfg = Config::parse(&format!("{no_file}{fleet}"), "x.toml").unwrap();
        let f = cfg.fleet.unwrap();
        assert_eq!((f.node.as_str(), f.max_lag.as_secs()), ("mx1", 300));
        assert_eq!(cfg.directory.file, None);
        for (from, to, key, why) in [
            (
                "schema = \"coexist\"",
                "schema = \"Coexist; DROP\"",
                "fleet.schema",
                "lower-case SQL name",
            ),
            (
                "node = \"mx1\"",
                "node = \"mx 1\"",
                "fleet.node",
                "must be a node name",
            ),
            (
                "max_lag = \"5m\"",
                "max_lag = \"0s\"",
                "fleet.max_lag",
                "more than 0s",
            ),
            (
                "postgresql://postgres@127.0.0.1:5432/test",
                "host=x port=notaport",
                "fleet.postgres",
                "not a PostgreSQL connection string",
            ),
            (
                "postgresql://postgres@127.0.0.1:5432/test",
                "host=x password=hunter2secret sslmode=verify-full",
                "fleet.postgres",
                "sslmode=verify-full needs sslrootcert=FILE",
            ),
            (
                "postgresql://postgres@127.0.0.1:5432/test",
                "host=x password=hunter2secret sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
                "fleet.postgres",
                "sslrootcert: /nonexistent/ca.pem: cannot load certificate",
            ),
            (
                "postgresql://postgres@127.0.0.1:5432/test",
                "postgresql://u:hunter2secret@x/db?sslmode=verify-everything",
                "fleet.postgres",
                "sslmode must be disable, prefer, require, verify-ca or verify-full",
            ),
        ] {
            let text = format!("{no_file}{}", fleet.replace(from, to));
            let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
            let line = line_of(&text, key.trim_start_matches("fleet."));
            assert!(
                err.starts_with(&format!("x.toml:{line}: key `{key}`: ")),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
            assert!(!err.contains("hunter2secret"), "{err}");
        }
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
