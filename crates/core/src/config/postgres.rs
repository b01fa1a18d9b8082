//! `fleet.postgres`: the libpq connection string, with the TLS settings libpq has and the
//! PostgreSQL driver does not.
//!
//! tokio-postgres reads `sslmode` only as `disable`, `prefer` or `require`, and knows no
//! `sslrootcert`. So `sslmode` and `sslrootcert` are taken out of the string here (URL
//! query or `key=value` form alike), and the rest goes to the driver unchanged, with its
//! own `sslmode` set to what the connection needs on the wire (`require` for the three
//! modes that insist on TLS). What a mode checks is up to the connector built from
//! [`PgConn`] (`crate::fleet` does it):
//!
//! - `disable`: no TLS. `prefer` (libpq's default): TLS when the server offers it.
//! - `require`: TLS or no connection; the certificate is not checked, unless `sslrootcert`
//!   is set, when the chain is checked as for `verify-ca` (as libpq does).
//! - `verify-ca`: the certificate chains to a CA in `sslrootcert`.
//! - `verify-full`: that, and the certificate names the host connected to.
//!
//! `sslrootcert=FILE` is a PEM bundle; `sslrootcert=system` is the system's trusted CAs.
//! `verify-ca` and `verify-full` need one of them (libpq would look in
//! `~/.postgresql/root.crt`; a service is better told where).
//!
//! Nothing here puts a value of the string in an error: it may hold a password.

use std::path::PathBuf;

/// Why `fleet.postgres` is not a connection string the fleet can use. No variant holds a
/// value of the string (it may hold a password); the driver's own error names none either.
#[derive(Debug, thiserror::Error)]
pub enum PgConnError {
    /// `sslmode` is none of libpq's modes.
    #[error("sslmode must be disable, prefer, require, verify-ca or verify-full")]
    SslMode,
    /// `sslrootcert=` with nothing after it.
    #[error("sslrootcert is empty")]
    EmptyRootCert,
    /// `verify-ca` or `verify-full` without `sslrootcert`.
    #[error("sslmode={} needs sslrootcert=FILE (the CA that signed the server's certificate, PEM) or sslrootcert=system", .0.name())]
    NeedsRootCert(SslMode),
    /// The driver refused the rest of the string.
    #[error("not a PostgreSQL connection string: {0}")]
    Driver(#[source] tokio_postgres::Error),
    /// A `%` in the URL's query not followed by two hex digits.
    #[error("a bad %-escape in the URL's query")]
    BadEscape,
    /// The URL's query, decoded, is not UTF-8.
    #[error("the URL's query is not UTF-8")]
    QueryNotUtf8,
    /// A quoted value of this key (`key=value` form) does not end.
    #[error("the value of `{0}` has no closing quote")]
    Unquoted(String),
    /// The value of this key is not UTF-8.
    #[error("the value of `{0}` is not UTF-8")]
    NotUtf8(String),
}

/// How the fleet connection uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS with a certificate that chains to a trusted CA.
    VerifyCa,
    /// TLS with a certificate that chains to a trusted CA and names the host.
    VerifyFull,
}

impl SslMode {
    /// The name as libpq spells it.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<SslMode> {
        [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|m| m.name() == s)
    }
}

/// Which CAs the server's certificate may chain to (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM bundle.
    File(PathBuf),
    /// The system's trusted CAs (`sslrootcert=system`).
    System,
}

/// A parsed `fleet.postgres`.
#[derive(Debug, Clone)]
pub struct PgConn {
    /// Everything but the TLS settings, for the driver (its `sslmode` set from `sslmode`).
    pub config: tokio_postgres::Config,
    /// `sslmode` (default `prefer`).
    pub sslmode: SslMode,
    /// `sslrootcert`, if given.
    pub sslrootcert: Option<RootCert>,
}

impl PgConn {
    /// True when the certificate's chain is checked (`verify-*`, or a root given).
    pub fn checks_chain(&self) -> bool {
        matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            || (self.sslmode != SslMode::Disable && self.sslrootcert.is_some())
    }
}

impl PgConn {
    /// Why this connection is weaker than `verify-full` towards a host off this machine
    /// (for a `check-config` warning and the log at start); `None` when it verifies the
    /// server fully, or every host is loopback or a Unix socket.
    pub fn weakness(&self) -> Option<String> {
        use tokio_postgres::config::Host;
        if self.sslmode == SslMode::VerifyFull {
            return None;
        }
        let remote = self.config.get_hosts().iter().find_map(|h| match h {
            Host::Tcp(name) => {
                let loopback = name.eq_ignore_ascii_case("localhost")
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                (!loopback).then(|| name.clone())
            }
            Host::Unix(_) => None,
        })?;
        let risk = match self.sslmode {
            SslMode::Disable | SslMode::Prefer => {
                "the password and every directory change may cross the network in clear"
            }
            _ => "the server is not proven to be the one named (an impostor on the path is not noticed)",
        };
        Some(format!(
            "sslmode={} to {remote}: {risk}; use sslmode=verify-full with \
             sslrootcert=FILE",
            self.sslmode.name()
        ))
    }
}

/// Parses a libpq connection string (URL or `key=value` form), taking `sslmode` and
/// `sslrootcert` out for ourselves. The error never quotes the string.
pub fn parse(s: &str) -> Result<PgConn, PgConnError> {
    let t = s.trim();
    let (rest, ours) = if t.starts_with("postgresql://") || t.starts_with("postgres://") {
        strip_url(t)?
    } else {
        strip_key_values(t)?
    };
    let mut sslmode = SslMode::Prefer;
    let mut sslrootcert = None;
    for (key, value) in ours {
        if key == "sslmode" {
            sslmode = SslMode::parse(&value).ok_or(PgConnError::SslMode)?;
        } else if value == "system" {
            sslrootcert = Some(RootCert::System);
        } else if value.is_empty() {
            return Err(PgConnError::EmptyRootCert);
        } else {
            sslrootcert = Some(RootCert::File(PathBuf::from(value)));
        }
    }
    let mut config: tokio_postgres::Config = rest.parse().map_err(PgConnError::Driver)?;
    config.ssl_mode(match sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && sslrootcert.is_none() {
        return Err(PgConnError::NeedsRootCert(sslmode));
    }
    Ok(PgConn {
        config,
        sslmode,
        sslrootcert,
    })
}

/// True for the keys this module takes out of the string.
fn ours(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// A URL without `sslmode` and `sslrootcert` in its query, and those two (decoded).
fn strip_url(url: &str) -> Result<(String, Vec<(String, String)>), PgConnError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for part in query.split('&') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decode(k)?;
        if ours(&key) {
            taken.push((key, percent_decode(v)?));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

fn percent_decode(s: &str) -> Result<String, PgConnError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PgConnError::BadEscape)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgConnError::QueryNotUtf8)
}

/// A `key=value` string without `sslmode` and `sslrootcert` (every other pair kept as
/// written), and those two (unquoted). Values follow libpq: single quotes, and `\` escapes
/// the next character.
fn strip_key_values(s: &str) -> Result<(String, Vec<(String, String)>), PgConnError> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut kept: Vec<&str> = Vec::new();
    let mut taken = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        skip_ws(&mut i);
        if b.get(i) != Some(&b'=') {
            // Let the driver word it (its message names no value).
            return Ok((s.to_string(), Vec::new()));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(PgConnError::Unquoted(key.to_string())),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        if ours(key) {
            let value =
                String::from_utf8(value).map_err(|_| PgConnError::NotUtf8(key.to_string()))?;
            taken.push((key.to_string(), value));
        } else {
            kept.push(&s[start..i]);
        }
    }
    Ok((kept.join(" "), taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_from_both_forms_and_the_rest_goes_to_the_driver() {
        let c = parse("host=db.test port=5433 user=coexist password='p w\\'x' dbname=fleet sslmode=verify-full sslrootcert='/etc/coexist/pg ca.pem'").unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.sslrootcert,
            Some(RootCert::File("/etc/coexist/pg ca.pem".into()))
        );
        assert_eq!(c.config.get_password(), Some(&b"p w'x"[..]));
        assert_eq!(c.config.get_dbname(), Some("fleet"));
        assert_eq!(
            c.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let u = parse("postgresql://coexist:s%40cret@db.test:5433/fleet?application_name=x&sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem").unwrap();
        assert_eq!(u.sslmode, SslMode::VerifyCa);
        assert_eq!(u.sslrootcert, Some(RootCert::File("/etc/ca.pem".into())));
        assert_eq!(u.config.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(u.config.get_application_name(), Some("x"));
        let d = parse("postgresql://postgres@127.0.0.1:5432/test").unwrap();
        assert_eq!((d.sslmode, d.sslrootcert), (SslMode::Prefer, None));
        let s = parse("host=h sslmode=require sslrootcert=system").unwrap();
        assert_eq!(s.sslrootcert, Some(RootCert::System));
        assert!(s.checks_chain());
        assert!(!parse("host=h sslmode=require").unwrap().checks_chain());
    }

    #[test]
    fn anything_short_of_verify_full_to_another_host_is_a_weakness() {
        let w = |s: &str| parse(s).unwrap().weakness();
        let e = w("host=db1.corp.test password=hunter2secret").unwrap();
        assert!(e.contains("sslmode=prefer to db1.corp.test"), "{e}");
        assert!(
            e.contains("in clear") && !e.contains("hunter2secret"),
            "{e}"
        );
        let e = w("host=10.0.8.5 sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert!(e.contains("not proven") && e.contains("verify-full"), "{e}");
        assert_eq!(
            w("host=db1.corp.test sslmode=verify-full sslrootcert=system"),
            None
        );
        assert_eq!(w("postgresql://postgres@127.0.0.1:5432/test"), None);
        assert_eq!(w("host=localhost sslmode=disable"), None);
        assert_eq!(w("host=/run/postgresql"), None);
    }

    #[test]
    fn errors_name_the_setting_never_the_password() {
        for bad in [
            "host=h password=hunter2secret sslmode=verify-full",
            "host=h password=hunter2secret sslmode=bogus",
            "postgresql://u:hunter2secret@h/db?sslmode=verify-ca",
            "host=h password='hunter2secret",
            "host=h password=hunter2secret port=notaport",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2secret"), "{bad}: {e}");
        }
        let e = parse("host=h sslmode=verify-full").unwrap_err();
        assert!(matches!(e, PgConnError::NeedsRootCert(SslMode::VerifyFull)));
        assert!(e.to_string().contains("sslrootcert=FILE"), "{e}");
    }
}
