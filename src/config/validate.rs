//! The checks run on a parsed config, beyond what its types say (a route per state, a
//! readable admin token, sane backoffs, ...). Each error names FILE:LINE: key, the line
//! found in the text by `locate`.

use super::locate::find_key;
use super::{Config, ConfigError, TlsPolicy, Unknown};

impl Config {
    pub(super) fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let fail = |table: &str, key: &str, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            line: find_key(text, table, key),
            key: format!("{table}.{key}"),
            reason,
        };
        if self.server.listen.is_empty() {
            return Err(fail(
                "server",
                "listen",
                "needs at least one address".into(),
            ));
        }
        if let Some(l) = &self.directory.ldap {
            let t = "directory.ldap";
            if !(l.url.starts_with("ldap://") || l.url.starts_with("ldaps://")) {
                return Err(fail(
                    t,
                    "url",
                    "must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]".into(),
                ));
            }
            if l.password.is_some() && l.password_file.is_some() {
                return Err(fail(
                    t,
                    "password",
                    "set password or password_file, not both".into(),
                ));
            }
            for (value, route) in &l.states {
                if !self.routes.contains_key(route) {
                    return Err(fail(
                        "directory.ldap.states",
                        value,
                        format!("{route:?} is not a route"),
                    ));
                }
            }
            if l.sync_interval.is_zero() || l.page_size == 0 {
                return Err(fail(
                    t,
                    "sync_interval",
                    "sync_interval and page_size must be more than 0".into(),
                ));
            }
        }
        match (&self.fleet, &self.directory.file) {
            (None, None) if self.directory.ldap.is_none() => {
                return Err(fail(
                    "directory",
                    "file",
                    "is required (without [fleet] or [directory.ldap] the directory comes from this file)".into(),
                ))
            }
            (None, None) => {}
            (Some(f), _) => {
                if let Err(e) = f.postgres.parse::<tokio_postgres::Config>() {
                    return Err(fail(
                        "fleet",
                        "postgres",
                        format!("not a PostgreSQL connection string: {e}"),
                    ));
                }
                let ident = |s: &str| {
                    !s.is_empty()
                        && s.len() <= 40
                        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                };
                if !ident(&f.schema) {
                    return Err(fail(
                        "fleet",
                        "schema",
                        "must be a lower-case SQL name (a-z, 0-9, _; at most 40)".into(),
                    ));
                }
                if f.node.is_empty()
                    || f.node.len() > 64
                    || !f
                        .node
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    return Err(fail(
                        "fleet",
                        "node",
                        "must be a node name (letters, digits, '.', '_', '-'; at most 64)".into(),
                    ));
                }
                if f.max_lag.is_zero() {
                    return Err(fail("fleet", "max_lag", "must be more than 0s".into()));
                }
                if f.commit_timeout.is_zero() {
                    return Err(fail(
                        "fleet",
                        "commit_timeout",
                        "must be more than 0s".into(),
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        if self.server.accepted_domains.is_empty() {
            return Err(fail(
                "server",
                "accepted_domains",
                "needs at least one domain".into(),
            ));
        }
        if self.server.hostname.is_empty()
            || !self
                .server
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(fail(
                "server",
                "hostname",
                "must be a host name (letters, digits, '.', '-')".into(),
            ));
        }
        if self.server.max_line_length < 512 {
            return Err(fail(
                "server",
                "max_line_length",
                "must be at least 512 (RFC 5321 4.5.3.1.4)".into(),
            ));
        }
        // Room for at least one whole message (and its first buffer step), or no limit.
        let one_message = self.server.max_message_size.saturating_add(64 * 1024);
        if self.server.max_inflight_bytes != 0 && self.server.max_inflight_bytes < one_message {
            return Err(fail(
                "server",
                "max_inflight_bytes",
                format!(
                    "must be 0 (no limit) or at least max_message_size + 64 KiB ({one_message}), \
                     or no message of the largest size could ever be received"
                ),
            ));
        }
        if self.server.max_rcpt_refusals == 0 {
            return Err(fail(
                "server",
                "max_rcpt_refusals",
                "must be at least 1".into(),
            ));
        }
        if self.queue.max_active == 0 {
            return Err(fail("queue", "max_active", "must be at least 1".into()));
        }
        if self.queue.probe_interval.is_zero() {
            return Err(fail(
                "queue",
                "probe_interval",
                "must be more than 0s".into(),
            ));
        }
        if self.routes.is_empty() {
            return Err(fail("routes", "", "at least one route is needed".into()));
        }
        let most = crate::directory::StateId::MAX_STATES;
        if self.routes.len() > most {
            return Err(fail(
                "routes",
                "",
                format!("at most {most} routes (the directory keeps a state in one byte)"),
            ));
        }
        for (name, route) in &self.routes {
            let table = format!("routes.{name}");
            if name == "reject" {
                return Err(fail(&table, "", "`reject` is reserved".into()));
            }
            let targets = usize::from(!route.next_hops.is_empty())
                + usize::from(route.mx.is_some())
                + usize::from(route.recipient_mx);
            if targets != 1 {
                return Err(fail(
                    &table,
                    "next_hops",
                    "give exactly one of `next_hops` (at least one host:port), `mx` or \
                     `recipient_mx = true`"
                        .into(),
                ));
            }
            if route.client_cert.is_some() != route.client_key.is_some() {
                return Err(fail(
                    &table,
                    "client_cert",
                    "give both `client_cert` and `client_key`, or neither".into(),
                ));
            }
            if route.concurrency == 0 {
                return Err(fail(&table, "concurrency", "must be at least 1".into()));
            }
            if route.max_recipients_per_transaction == Some(0) {
                return Err(fail(
                    &table,
                    "max_recipients_per_transaction",
                    "must be at least 1 (leave it out for no limit)".into(),
                ));
            }
            if route.max_message_size.is_some_and(|m| m < 1024) {
                return Err(fail(
                    &table,
                    "max_message_size",
                    "must be at least 1024 bytes (leave it out for no limit)".into(),
                ));
            }
            if let Some(p) = route.throttle_replies.iter().find(|p| p.class() != 4) {
                return Err(fail(
                    &table,
                    "throttle_replies",
                    format!("\"{p}\" is a permanent failure: only 4xx replies ask to slow down"),
                ));
            }
            if route.throttle_pause.is_zero() || route.throttle_pause > route.throttle_max_pause {
                return Err(fail(
                    &table,
                    "throttle_pause",
                    "must be above zero and not above throttle_max_pause".into(),
                ));
            }
            if matches!(route.tls, TlsPolicy::MtaSts | TlsPolicy::Dane) {
                if route.mx.is_none() && !route.recipient_mx {
                    return Err(fail(
                        &table,
                        "tls",
                        format!(
                            "{:?} applies to MX hosts found in DNS: the route needs `mx` or \
                             `recipient_mx`, not `next_hops`",
                            route.tls.name()
                        ),
                    ));
                }
                if route.tls_name.is_some() {
                    return Err(fail(
                        &table,
                        "tls_name",
                        format!(
                            "not used with tls = {:?}: the MX host's own name is checked",
                            route.tls.name()
                        ),
                    ));
                }
            }
        }
        if let Some(r) = &self.delivery.external_route {
            if !self.routes.contains_key(r) {
                return Err(fail(
                    "delivery",
                    "external_route",
                    format!("{r:?} is not a route name"),
                ));
            }
        }
        if let Unknown::Route(r) = &self.directory.unknown {
            if !self.routes.contains_key(r.as_str()) {
                return Err(fail(
                    "directory",
                    "unknown",
                    format!("{:?} is neither `reject` nor a route name", r.as_str()),
                ));
            }
        }
        if let Some(admin) = &self.admin {
            if admin.token.is_some() == admin.token_file.is_some() {
                return Err(fail(
                    "admin",
                    "token",
                    "give exactly one of `token` and `token_file`".into(),
                ));
            }
            if let Some(t) = &admin.token {
                if let Some(reason) = super::token::weakness(t) {
                    return Err(fail("admin", "token", reason));
                }
            }
            if let Some(f) = &admin.token_file {
                // A file that does not exist yet is written by `serve` with a fresh token.
                match super::token::read_file(f) {
                    Err(e) => {
                        return Err(fail(
                            "admin",
                            "token_file",
                            format!("{}: cannot read: {e}", f.display()),
                        ))
                    }
                    Ok(Some(t)) => {
                        if let Some(reason) = super::token::weakness(&t) {
                            return Err(fail(
                                "admin",
                                "token_file",
                                format!("{}: {reason}", f.display()),
                            ));
                        }
                    }
                    Ok(None) => {}
                }
            }
            if admin.plaintext_remote_refused() {
                return Err(fail(
                    "admin",
                    "listen",
                    format!(
                        "{} is not a loopback address and the admin API speaks clear HTTP \
                         (the bearer token would cross the network readable): listen on \
                         127.0.0.1 or [::1] and reach it through an SSH tunnel or a TLS proxy, \
                         or set `allow_plaintext_remote = true` for a trusted management network",
                        admin.listen
                    ),
                ));
            }
        }
        if self.delivery.mta_sts.https_port == 0 || self.delivery.mta_sts.timeout.is_zero() {
            return Err(fail(
                "delivery.mta_sts",
                "https_port",
                "https_port and timeout must be more than 0".into(),
            ));
        }
        if self.queue.min_backoff.is_zero() || self.queue.min_backoff > self.queue.max_backoff {
            return Err(fail(
                "queue",
                "min_backoff",
                "must be above zero and not above max_backoff".into(),
            ));
        }
        Ok(())
    }
}
