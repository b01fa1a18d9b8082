//! Warnings: settings that are valid but unsafe where they are used. `check-config` prints
//! them and `serve` logs them at start (and at each reload); neither refuses the config,
//! because a lab or a migration may need them for a while.
//!
//! Three kinds. A route that sends mail off this machine with `tls = "opportunistic"` (set,
//! or the default) or `tls = "none"`: opportunistic TLS checks no certificate and falls
//! back to clear text when STARTTLS is not offered, so anyone on the path can strip
//! STARTTLS or present any certificate and read or change the mail (a next hop on loopback,
//! an IP address that is loopback or the name `localhost`, is not warned about: nothing
//! crosses a network). A route that verifies certificates against the system's CAs on a
//! machine that has none. And a fleet connection to a PostgreSQL server off this machine
//! with less than `sslmode=verify-full` (see `postgres::PgConn::weakness`).

use super::locate::find_key;
use super::{Config, RouteConfig, TlsPolicy};
use std::fmt;

/// A config setting that works but is unsafe: where it is (file, line, key) and what to use
/// instead, in the same form as a [`super::ConfigError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The config file.
    pub file: String,
    /// 1-based line; the table's header when the key is not written (a default).
    pub line: usize,
    /// Dotted key path such as `routes.cloud.tls`.
    pub key: String,
    /// What is unsafe, and what to set instead.
    pub reason: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: key `{}`: {}",
            self.file, self.line, self.key, self.reason
        )
    }
}

impl Config {
    /// The warnings about this config, whose text is `text` from `file` (see the module
    /// docs). Empty for the shipped config.
    pub fn warnings(&self, text: &str, file: &str) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        for (name, route) in &self.routes {
            if !matches!(route.tls, TlsPolicy::Opportunistic | TlsPolicy::None) {
                continue;
            }
            let Some(toward) = off_machine(route) else {
                continue;
            };
            let table = format!("routes.{name}");
            let line = find_key(text, &table, "tls");
            // find_key gives the table's header line for a key that is not written.
            let written = line != 0 && line != find_key(text, &table, "");
            let what = match (route.tls, written) {
                (TlsPolicy::None, _) => "tls = \"none\" sends the mail in clear text".to_string(),
                (_, true) => "tls = \"opportunistic\" checks no certificate and falls back to \
                              clear text"
                    .to_string(),
                (_, false) => "`tls` is not set, so it is \"opportunistic\" (the default), \
                               which checks no certificate and falls back to clear text"
                    .to_string(),
            };
            let instead = if route.recipient_mx {
                "use tls = \"mta-sts\" or \"dane\": they verify where the recipient domain \
                 publishes a policy and stay opportunistic where it does not"
            } else if route.mx.is_some() {
                "use tls = \"verify\" (with tls_name for a service whose hosts share one \
                 certificate, e.g. \"mail.protection.outlook.com\" for Exchange Online), or \
                 \"mta-sts\" or \"dane\" when the domain publishes a policy"
            } else {
                "use tls = \"verify\" (with tls_ca_file for an internal CA and tls_name when \
                 the certificate carries another name than the next hop), or \"required\" \
                 inside a trusted network"
            };
            out.push(ConfigWarning {
                file: file.to_string(),
                line,
                key: format!("{table}.tls"),
                reason: format!(
                    "{what} toward {toward}, which is not on this machine: anyone on the path \
                     can read or change the mail; {instead}"
                ),
            });
        }
        // Routes that check certificates against the system's CAs, on a machine with none
        // (no ca-certificates, a bare container): every delivery on them would wait.
        let on_system_roots: Vec<_> = self
            .routes
            .iter()
            .filter(|(_, r)| {
                matches!(r.tls, TlsPolicy::Verify | TlsPolicy::MtaSts) && r.tls_ca_file.is_none()
            })
            .collect();
        if !on_system_roots.is_empty() && crate::certs::system_roots().is_empty() {
            for (name, route) in on_system_roots {
                let table = format!("routes.{name}");
                out.push(ConfigWarning {
                    file: file.to_string(),
                    line: find_key(text, &table, "tls"),
                    key: format!("{table}.tls"),
                    reason: format!(
                        "tls = \"{}\" checks certificates against the system's trusted CAs, \
                         and this machine has none: every delivery on this route will wait; \
                         install them (Debian: ca-certificates) or set tls_ca_file",
                        route.tls.name()
                    ),
                });
            }
        }
        if let Some(fleet) = &self.fleet {
            if let Some(reason) = fleet.connection().ok().and_then(|c| c.weakness()) {
                out.push(ConfigWarning {
                    file: file.to_string(),
                    line: find_key(text, "fleet", "postgres"),
                    key: "fleet.postgres".to_string(),
                    reason,
                });
            }
        }
        out
    }
}

/// Where `route` sends mail when that is not this machine, in words; `None` when every next
/// hop is on loopback.
fn off_machine(route: &RouteConfig) -> Option<String> {
    if route.recipient_mx {
        return Some("each recipient domain's MX hosts".into());
    }
    if let Some(domain) = &route.mx {
        return Some(format!("the MX hosts of {domain}"));
    }
    route
        .next_hops
        .iter()
        .find(|h| !is_loopback_host(&h.host))
        .map(|h| format!("next hop {h}"))
}

/// True for a loopback IP address and for the name `localhost`. Other names count as off
/// this machine (what they resolve to may change).
fn is_loopback_host(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => host.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, DEFAULT_CONFIG};

    #[test]
    fn the_shipped_config_has_no_warnings() {
        let cfg = Config::parse(DEFAULT_CONFIG, "coexist.toml").unwrap();
        assert_eq!(cfg.warnings(DEFAULT_CONFIG, "coexist.toml"), vec![]);
    }

    #[test]
    fn opportunistic_or_none_off_this_machine_is_warned_about_with_line_and_key() {
        let onprem = "[routes.onprem]\nnext_hops = [\"127.0.0.1:2601\"]\n";
        let off = "[routes.onprem]\nnext_hops = [\"exchange.corp.test:25\"]\n";
        assert!(DEFAULT_CONFIG.contains(onprem));
        let text = DEFAULT_CONFIG.replace(onprem, off);
        let cfg = Config::parse(&text, "x.toml").unwrap();
        let w = cfg.warnings(&text, "x.toml");
        let line = text
            .lines()
            .position(|l| l.starts_with("tls = \"opportunistic\""))
            .unwrap()
            + 1;
        assert_eq!(w.len(), 1, "{w:?}");
        let w = w[0].to_string();
        assert!(
            w.starts_with(&format!(
                "x.toml:{line}: key `routes.onprem.tls`: tls = \"opportunistic\""
            )),
            "{w}"
        );
        assert!(w.contains("next hop exchange.corp.test:25"), "{w}");
        assert!(w.contains("use tls = \"verify\""), "{w}");

        // `localhost` and ::1 are this machine; `none` is warned about too.
        for (hop, warned) in [
            ("localhost:25", false),
            ("[::1]:25", false),
            ("10.1.2.3:25", true),
        ] {
            let text = DEFAULT_CONFIG
                .replace(
                    onprem,
                    &format!("[routes.onprem]\nnext_hops = [\"{hop}\"]\n"),
                )
                .replacen("tls = \"opportunistic\"", "tls = \"none\"", 1);
            let cfg = Config::parse(&text, "x.toml").unwrap();
            let w = cfg.warnings(&text, "x.toml");
            assert_eq!(!w.is_empty(), warned, "{hop}: {w:?}");
            if warned {
                assert!(w[0].reason.contains("clear text"), "{w:?}");
            }
        }
    }

    #[test]
    fn a_default_policy_toward_the_internet_is_warned_about_at_the_table() {
        let text = format!("{DEFAULT_CONFIG}\n[routes.internet]\nrecipient_mx = true\n");
        let cfg = Config::parse(&text, "x.toml").unwrap();
        let w = cfg.warnings(&text, "x.toml");
        assert_eq!(w.len(), 1, "{w:?}");
        let header = text.lines().position(|l| l == "[routes.internet]").unwrap() + 1;
        assert_eq!(
            (w[0].line, w[0].key.as_str()),
            (header, "routes.internet.tls")
        );
        assert!(w[0].reason.contains("is not set"), "{w:?}");
        assert!(w[0].reason.contains("\"mta-sts\" or \"dane\""), "{w:?}");
    }
}
