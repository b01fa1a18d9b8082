//! `[shadow]`: a redundant copy of every accepted message on NATS JetStream, and the
//! takeover of a dead node's queue by a survivor (see `crate::shadow`).

use super::*;

/// `[shadow]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Seed URLs of the JetStream cluster (`nats://HOST:PORT`, `tls://HOST:PORT`).
    pub nats: Vec<String>,
    /// The JetStream stream holding the copies (created at start when missing).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Copies JetStream keeps of each message (its Raft replicas): 3 in production, 1 for a
    /// lab with one server.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// A node whose lease is older than this is dead for the fleet: a survivor takes its
    /// shadowed messages and delivers them.
    #[serde(default = "default_takeover_after", with = "duration")]
    pub takeover_after: Duration,
    /// What a message gets when no redundant copy can be made: `defer` (451 4.3.0) or
    /// `accept` (taken on the local copy only, counted and shown in readiness).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a copy may take to be stored before it counts as failed.
    #[serde(default = "default_publish_timeout", with = "duration")]
    pub publish_timeout: Duration,
    /// Keep the copy of a delivered message this long (marked delivered, never taken over),
    /// so an admin can deliver again what went to one route (`coexist queue resubmit`);
    /// absent: a copy goes when its message is finished.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_delivered: Option<Duration>,
    /// NATS user (with `password_file`).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the NATS user's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// File holding a NATS authentication token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A NATS credentials file (JWT and NKey seed, as `nsc` writes it).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS servers' certificates: TLS is then required
    /// and the certificate checked against it (and the server's name).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Require TLS to NATS (checked against the system's trusted CAs without `tls_ca`).
    #[serde(default)]
    pub tls_required: bool,
    /// Let a password, token or credentials cross a non-loopback link without TLS (a lab
    /// only).
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

/// `shadow.on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Answer `451 4.3.0`: the sender keeps the message and tries again.
    #[default]
    Defer,
    /// Accept on the local copy only.
    Accept,
}

impl ShadowConfig {
    /// True when a secret (password, token, credentials) is configured.
    pub fn has_secret(&self) -> bool {
        self.password_file.is_some() || self.token_file.is_some() || self.creds_file.is_some()
    }

    /// True when every connection uses TLS (`tls_ca`, `tls_required` or `tls://` URLs).
    pub fn tls_on(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_required
            || (!self.nats.is_empty() && self.nats.iter().all(|u| u.starts_with("tls://")))
    }

    /// The first URL whose host is not a loopback address or `localhost`, if any.
    pub fn remote_url(&self) -> Option<&str> {
        self.nats
            .iter()
            .find(|u| !super::super::values::is_loopback_url(u))
            .map(String::as_str)
    }
}

fn default_stream() -> String {
    "coexist_shadow".into()
}
fn default_replicas() -> usize {
    3
}
fn default_takeover_after() -> Duration {
    Duration::from_secs(60)
}
fn default_publish_timeout() -> Duration {
    // Longer than a JetStream stream's leader election after its leader's server is lost.
    Duration::from_secs(10)
}

/// Optional durations written like "2d" (humantime syntax); absent is `None`.
mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OnFailure, DEFAULT_CONFIG};

    const FLEET: &str =
        "\n[fleet]\npostgres = \"postgresql://postgres@127.0.0.1:5432/test\"\nnode = \"mx1\"\n";
    const SHADOW: &str = "\n[shadow]\nnats = [\"nats://127.0.0.1:4222\"]\nreplicas = 1\ntakeover_after = \"30s\"\non_failure = \"accept\"\n";

    fn line_of(text: &str, pat: &str) -> usize {
        text.lines().position(|l| l.starts_with(pat)).unwrap() + 1
    }

    #[test]
    fn shadow_has_defaults_and_needs_a_fleet() {
        let cfg = Config::parse(&format!("{DEFAULT_CONFIG}{FLEET}{SHADOW}"), "x.toml").unwrap();
        let sh = cfg.shadow.unwrap();
        assert_eq!(sh.stream, "coexist_shadow");
        assert_eq!((sh.replicas, sh.takeover_after.as_secs()), (1, 30));
        assert_eq!(sh.on_failure, OnFailure::Accept);
        let text = format!("{DEFAULT_CONFIG}{SHADOW}");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        let line = line_of(&text, "nats = ");
        assert!(
            err.starts_with(&format!(
                "x.toml:{line}: key `shadow.nats`: [shadow] needs [fleet]"
            )),
            "{err}"
        );
    }

    #[test]
    fn bad_shadow_keys_are_named_with_their_line() {
        for (from, to, key, why) in [
            (
                "node = \"mx1\"",
                "node = \"mx.1\"",
                "fleet.node",
                "must not contain '.'",
            ),
            (
                "nats = [\"nats://127.0.0.1:4222\"]",
                "nats = [\"http://x\"]",
                "shadow.nats",
                "is not a NATS URL",
            ),
            (
                "nats = [\"nats://127.0.0.1:4222\"]",
                "nats = [\"nats://u:hunter2secret@10.0.0.5:4222\"]",
                "shadow.nats",
                "must not carry credentials",
            ),
            (
                "replicas = 1",
                "replicas = 0",
                "shadow.replicas",
                "must be 1 to 5",
            ),
            (
                "takeover_after = \"30s\"",
                "takeover_after = \"1s\"",
                "shadow.takeover_after",
                "at least 2s",
            ),
            (
                "on_failure = \"accept\"",
                "on_failure = \"drop\"",
                "shadow.on_failure",
                "unknown variant",
            ),
            (
                "replicas = 1",
                "replicas = 1\nuser = \"coexist\"",
                "shadow.user",
                "user and password_file go together",
            ),
            (
                "replicas = 1",
                "replicas = 1\ntoken_file = \"/nonexistent/token\"",
                "shadow.token_file",
                "/nonexistent/token",
            ),
        ] {
            let text = format!("{DEFAULT_CONFIG}{FLEET}{SHADOW}").replace(from, to);
            let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
            let (table, k) = key.split_once('.').unwrap();
            let line = text
                .lines()
                .enumerate()
                .skip_while(|(_, l)| *l != format!("[{table}]"))
                .find(|(_, l)| l.starts_with(&format!("{k} ")))
                .map(|(i, _)| i + 1)
                .unwrap();
            assert!(
                err.starts_with(&format!("x.toml:{line}: key `{key}`")),
                "{key}: {err}"
            );
            assert!(err.contains(why), "{err}");
            assert!(!err.contains("hunter2secret"), "{err}");
        }
    }

    #[test]
    fn a_secret_over_a_plain_remote_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let shadow = SHADOW.replace(
            "replicas = 1",
            &format!(
                "replicas = 1\ntoken_file = {:?}",
                token.display().to_string()
            ),
        );
        // Loopback: allowed.
        Config::parse(&format!("{DEFAULT_CONFIG}{FLEET}{shadow}"), "x.toml").unwrap();
        let remote = shadow.replace("127.0.0.1:4222", "nats.example.net:4222");
        let err = Config::parse(&format!("{DEFAULT_CONFIG}{FLEET}{remote}"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `shadow.nats`") && err.contains("set tls_ca"),
            "{err}"
        );
        for fix in ["tls_required = true", "allow_plaintext_auth = true"] {
            let ok = remote.replace("replicas = 1", &format!("replicas = 1\n{fix}"));
            Config::parse(&format!("{DEFAULT_CONFIG}{FLEET}{ok}"), "x.toml").unwrap();
        }
        let tls = remote.replace("nats://", "tls://");
        Config::parse(&format!("{DEFAULT_CONFIG}{FLEET}{tls}"), "x.toml").unwrap();
    }
}
