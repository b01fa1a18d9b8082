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
            if l.plaintext_bind_refused() {
                return Err(fail(
                    t,
                    "url",
                    format!(
                        "{} is plain LDAP and `bind_dn` binds with a password: the password \
                         would cross the network readable. Set `starttls = true`, or use \
                         ldaps://, or (for a lab only) `allow_plaintext_bind = true`",
                        l.url
                    ),
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
                match f.connection() {
                    Err(e) => return Err(fail("fleet", "postgres", e.to_string())),
                    Ok(c) => {
                        if let Some(super::postgres::RootCert::File(p)) = &c.sslrootcert {
                            if let Err(e) = crate::certs::load_certs(p) {
                                return Err(fail("fleet", "postgres", format!("sslrootcert: {e}")));
                            }
                        }
                    }
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
        if let Some(sh) = &self.shadow {
            self.validate_shadow(sh, &fail)?;
        }
        let t = &self.tracking;
        if t.max_age < std::time::Duration::from_secs(60) {
            return Err(fail("tracking", "max_age", "must be at least 1m".into()));
        }
        if t.max_file < 1 << 20 || t.max_file > 2 << 30 {
            return Err(fail(
                "tracking",
                "max_file",
                "must be between 1M and 2G (the index keeps 32-bit offsets)".into(),
            ));
        }
        if t.max_size < 2 * t.max_file {
            return Err(fail(
                "tracking",
                "max_size",
                format!(
                    "must be at least twice tracking.max_file ({} bytes): the open file and one sealed one",
                    t.max_file
                ),
            ));
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
        if let Some(r) = self.server.reserved_connections {
            if r >= self.server.max_connections {
                return Err(fail(
                    "server",
                    "reserved_connections",
                    format!(
                        "must be less than server.max_connections ({}), or no client outside \
                         policy.trusted_networks could ever connect",
                        self.server.max_connections
                    ),
                ));
            }
        }
        if !(1..=32).contains(&self.policy.ipv4_client_prefix) {
            return Err(fail(
                "policy",
                "ipv4_client_prefix",
                "must be a prefix length from 1 to 32".into(),
            ));
        }
        if !(1..=128).contains(&self.policy.ipv6_client_prefix) {
            return Err(fail(
                "policy",
                "ipv6_client_prefix",
                "must be a prefix length from 1 to 128".into(),
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
        let most = super::MAX_ROUTES;
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
                if !admin.allow_readable_token_file {
                    match super::token::readable_by_others(f) {
                        Ok(Some(reason)) => return Err(fail("admin", "token_file", reason)),
                        Ok(None) => {}
                        Err(e) => {
                            return Err(fail(
                                "admin",
                                "token_file",
                                format!("{}: cannot read: {e}", f.display()),
                            ))
                        }
                    }
                }
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
            if admin.tls_cert.is_some() != admin.tls_key.is_some() {
                let key = if admin.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                };
                let line_key = if admin.tls_cert.is_some() {
                    "tls_cert"
                } else {
                    "tls_key"
                };
                return Err(fail(
                    "admin",
                    line_key,
                    format!("needs `{key}` too (the admin API serves HTTPS with both)"),
                ));
            }
            if admin.max_connections == 0 {
                return Err(fail(
                    "admin",
                    "max_connections",
                    "must be more than 0".into(),
                ));
            }
            if admin.request_timeout.is_zero() || admin.idle_timeout.is_zero() {
                let key = if admin.request_timeout.is_zero() {
                    "request_timeout"
                } else {
                    "idle_timeout"
                };
                return Err(fail("admin", key, "must be more than 0".into()));
            }
            if admin.plaintext_remote_refused() {
                return Err(fail(
                    "admin",
                    "listen",
                    format!(
                        "{} is not a loopback address and the admin API speaks clear HTTP \
                         (the bearer token would cross the network readable): listen on \
                         127.0.0.1 or [::1], or serve it over TLS (`tls_cert` and `tls_key`), \
                         or reach it through an SSH tunnel or a TLS proxy, \
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

impl Config {
    /// The checks of `[shadow]`: it needs `[fleet]` (node names, the leases in PostgreSQL),
    /// NATS URLs, names that make NATS subjects, and no secret in clear.
    fn validate_shadow(
        &self,
        sh: &super::ShadowConfig,
        fail: &dyn Fn(&str, &str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let t = "shadow";
        let Some(fleet) = &self.fleet else {
            return Err(fail(
                t,
                "nats",
                "[shadow] needs [fleet]: the node names and the leases that decide when a \
                 node is dead and which survivor takes its queue are kept in the fleet's \
                 PostgreSQL"
                    .into(),
            ));
        };
        if fleet.node.contains('.') {
            return Err(fail(
                "fleet",
                "node",
                "with [shadow] a node name must not contain '.' (it is a token of NATS subjects)"
                    .into(),
            ));
        }
        if sh.nats.is_empty() {
            return Err(fail(t, "nats", "needs at least one NATS URL".into()));
        }
        for u in &sh.nats {
            let ok = ["nats://", "tls://"].iter().any(|p| {
                u.strip_prefix(p)
                    .is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace))
            });
            if !ok {
                return Err(fail(
                    t,
                    "nats",
                    format!("{u:?} is not a NATS URL (nats://HOST:PORT or tls://HOST:PORT)"),
                ));
            }
            if u.split_once("://")
                .is_some_and(|(_, r)| r.split('/').next().unwrap_or("").contains('@'))
            {
                return Err(fail(
                    t,
                    "nats",
                    "must not carry credentials: use user with password_file, token_file or creds_file".into(),
                ));
            }
        }
        let name_ok = !sh.stream.is_empty()
            && sh.stream.len() <= 64
            && sh
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(fail(
                t,
                "stream",
                "must be a stream name (letters, digits, '_', '-'; at most 64)".into(),
            ));
        }
        if !(1..=5).contains(&sh.replicas) {
            return Err(fail(t, "replicas", "must be 1 to 5".into()));
        }
        if sh.takeover_after < std::time::Duration::from_secs(2) {
            return Err(fail(t, "takeover_after", "must be at least 2s".into()));
        }
        if sh.publish_timeout.is_zero() || sh.publish_timeout >= sh.takeover_after {
            return Err(fail(
                t,
                "publish_timeout",
                "must be more than 0s and less than takeover_after".into(),
            ));
        }
        let secrets = [
            sh.password_file.is_some(),
            sh.token_file.is_some(),
            sh.creds_file.is_some(),
        ];
        if secrets.iter().filter(|s| **s).count() > 1 {
            return Err(fail(
                t,
                "password_file",
                "set one of password_file, token_file and creds_file".into(),
            ));
        }
        if sh.password_file.is_some() != sh.user.is_some() {
            return Err(fail(t, "user", "user and password_file go together".into()));
        }
        for (key, file) in [
            ("password_file", &sh.password_file),
            ("token_file", &sh.token_file),
            ("creds_file", &sh.creds_file),
            ("tls_ca", &sh.tls_ca),
        ] {
            if let Some(f) = file {
                #[allow(clippy::disallowed_methods)] // Config load: a blocking check of a file.
                if let Err(e) = std::fs::metadata(f) {
                    return Err(fail(t, key, format!("{}: {e}", f.display())));
                }
            }
        }
        if let Some(ca) = &sh.tls_ca {
            if let Err(e) = crate::certs::load_certs(ca) {
                return Err(fail(t, "tls_ca", e.to_string()));
            }
        }
        if sh.has_secret() && !sh.tls_on() && !sh.allow_plaintext_auth {
            if let Some(u) = sh.remote_url() {
                return Err(fail(
                    t,
                    "nats",
                    format!(
                        "{u} is not a loopback address and the NATS credentials would cross \
                         the network readable: set tls_ca (or tls_required = true, or tls:// \
                         URLs), or (for a lab only) allow_plaintext_auth = true"
                    ),
                ));
            }
        }
        Ok(())
    }
}
