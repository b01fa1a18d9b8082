//! The admin API's bearer token: the token the server expects (checked against the rules of
//! [`crate::config::token`], which also explains them), a fresh one for `admin.token_file`
//! at first start, and a comparison that leaks neither the token's content nor its length.
//!
//! - The API compares SHA-256 digests of the expected and the given token with a
//!   constant-time comparison: the time taken does not depend on how many leading characters
//!   are right, nor on the expected token's length.

use aws_lc_rs::digest::{digest, SHA256};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::token::{read_file, readable_by_others, weakness};

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token (inline or from its file) is refused; `key` is `admin.token` or
    /// `admin.token_file`.
    #[error("key `{key}`: {reason}")]
    Weak {
        /// The config key that holds the token.
        key: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// Group or others may read the token file (and `allow_readable_token_file` is off).
    #[error("key `admin.token_file`: {0}")]
    Readable(String),
    /// The token file cannot be read or written.
    #[error("admin.token_file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The operating system gave no random bytes.
    #[error("cannot draw random bytes for a new admin token")]
    Random,
    /// Neither `token` nor `token_file` is set.
    #[error("[admin] needs `token` or `token_file`")]
    Missing,
}

/// A fresh token: 32 random bytes from the operating system, as 64 hex digits.
pub fn generate() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TokenError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a fresh token to `path`, which must not exist yet (mode 0600, parent folders
/// created, synced). When another process created it meanwhile, its token is returned.
#[allow(clippy::disallowed_methods)] // Start-up (`admin::start`) and the CLI, before serving.
pub fn create_file(path: &Path) -> Result<String, TokenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TokenError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let token = generate()?;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return read_file(path)
                .map_err(io)?
                .ok_or_else(|| io(std::io::ErrorKind::NotFound.into()));
        }
        Err(e) => return Err(io(e)),
    };
    f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(token)
}

/// Where the token of a starting server came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `admin.token`.
    Inline,
    /// `admin.token_file`, which existed.
    File(PathBuf),
    /// `admin.token_file`, written now with a fresh token.
    Created(PathBuf),
}

/// The token a starting server uses: `admin.token`, or the first line of
/// `admin.token_file` (written with a fresh token when the file does not exist). A weak
/// token is refused.
pub fn for_server(admin: &crate::config::AdminConfig) -> Result<(String, Origin), TokenError> {
    let (token, origin, key) = match (&admin.token, &admin.token_file) {
        (Some(t), _) => (t.clone(), Origin::Inline, "admin.token"),
        (None, Some(path)) => match read_file(path).map_err(|source| TokenError::File {
            path: path.clone(),
            source,
        })? {
            Some(t) => {
                private(admin, path)?;
                (t, Origin::File(path.clone()), "admin.token_file")
            }
            None => (
                create_file(path)?,
                Origin::Created(path.clone()),
                "admin.token_file",
            ),
        },
        (None, None) => return Err(TokenError::Missing),
    };
    strong(&token, key)?;
    Ok((token, origin))
}

/// What [`for_server`] would find, without writing anything: `Ok(Some(path))` when the
/// token file does not exist yet and a starting server will write it (the caller checks that
/// its folder is writable), `Ok(None)` when a strong token is there, the same errors as
/// [`for_server`] otherwise.
pub fn check(admin: &crate::config::AdminConfig) -> Result<Option<PathBuf>, TokenError> {
    match (&admin.token, &admin.token_file) {
        (Some(t), _) => strong(t, "admin.token").map(|()| None),
        (None, Some(path)) => match read_file(path).map_err(|source| TokenError::File {
            path: path.clone(),
            source,
        })? {
            Some(t) => {
                private(admin, path)?;
                strong(&t, "admin.token_file").map(|()| None)
            }
            None => Ok(Some(path.clone())),
        },
        (None, None) => Err(TokenError::Missing),
    }
}

/// Refuses a token file that group or others may read, unless the config allows it.
fn private(admin: &crate::config::AdminConfig, path: &Path) -> Result<(), TokenError> {
    if admin.allow_readable_token_file {
        return Ok(());
    }
    match readable_by_others(path) {
        Ok(None) => Ok(()),
        Ok(Some(reason)) => Err(TokenError::Readable(reason)),
        Err(source) => Err(TokenError::File {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Refuses a weak `token`, naming the config `key` that holds it.
fn strong(token: &str, key: &'static str) -> Result<(), TokenError> {
    match weakness(token) {
        Some(reason) => Err(TokenError::Weak { key, reason }),
        None => Ok(()),
    }
}

/// The expected token, kept only as its SHA-256 digest.
pub struct Expected([u8; 32]);

impl Expected {
    /// Keeps the digest of `token`.
    pub fn new(token: &str) -> Expected {
        let mut d = [0u8; 32];
        d.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
        Expected(d)
    }

    /// True when `given` is the token. Both sides are 32-byte digests compared in constant
    /// time, so neither the position of the first wrong byte nor the expected token's length
    /// shows in the time taken.
    pub fn matches(&self, given: &[u8]) -> bool {
        let d = digest(&SHA256, given);
        aws_lc_rs::constant_time::verify_slices_are_equal(d.as_ref(), &self.0).is_ok()
    }
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Expected(<sha-256 of the admin token>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_short_and_patterned_tokens_are_refused() {
        for t in [
            "change-me",
            "changeme",
            "CHANGE_ME",
            "secret",
            "password",
            "token",
            "test",
            "example",
            "change-me-change-me",
            "secret-token-secret",
            "admin-password-2024",
            "test-token-1234-test",
            "my-example-token-for-coexist",
            "https://example.org/replace",
            "passwordpassword",
            "TestTestTestTest",
        ] {
            let why = weakness(t).unwrap_or_default();
            assert!(why.contains("placeholder"), "{t}: {why:?}");
        }
        for t in ["x", "k3Jx9pQ2", "Zq8mR2vLk1Tn7wB"] {
            let why = weakness(t).unwrap_or_default();
            assert!(why.contains("shorter than 16"), "{t}: {why:?}");
        }
        for t in [
            "aaaaaaaaaaaaaaaa",
            "################",
            "abababababababab",
            "k3J9k3J9k3J9k3J9",
        ] {
            let why = weakness(t).unwrap_or_default();
            assert!(why.contains("repeated"), "{t}: {why:?}");
        }
        for t in ["abcdefghijklmnop", "0123456789abcdef", "ponmlkjihgfedcba"] {
            let why = weakness(t).unwrap_or_default();
            assert!(why.contains("run"), "{t}: {why:?}");
        }
        for t in [
            "with space in it 0123",
            "tab\tin-the-token-xyz",
            "naïve-token-0193847",
        ] {
            let why = weakness(t).unwrap_or_default();
            assert!(why.contains("printable ASCII"), "{t}: {why:?}");
        }
    }

    #[test]
    fn random_tokens_pass() {
        for t in [
            "3f9a1c7e5b2d4086a1e9c3b7d5f20486",
            "Zq8mR2vLk1Tn7wBx",
            "token-83749281740192-Xb",
        ] {
            assert_eq!(weakness(t), None, "{t}");
        }
        for _ in 0..100 {
            let t = generate().unwrap();
            assert_eq!(t.len(), 64);
            assert_eq!(weakness(&t), None, "{t}");
        }
        assert_ne!(generate().unwrap(), generate().unwrap());
    }

    #[test]
    fn comparison_accepts_only_the_token() {
        let e = Expected::new("3f9a1c7e5b2d4086a1e9c3b7d5f20486");
        assert!(e.matches(b"3f9a1c7e5b2d4086a1e9c3b7d5f20486"));
        assert!(!e.matches(b"3f9a1c7e5b2d4086a1e9c3b7d5f20487"));
        assert!(!e.matches(b"3f9a1c7e5b2d4086a1e9c3b7d5f2048"));
        assert!(!e.matches(b"3f9a1c7e5b2d4086a1e9c3b7d5f204866"));
        assert!(!e.matches(b""));
        assert!(!format!("{e:?}").contains("3f9a"));
    }

    #[test]
    fn a_missing_token_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        let mut admin: crate::config::AdminConfig =
            toml::from_str("listen = \"127.0.0.1:0\"").unwrap();
        admin.token_file = Some(path.clone());
        let (t1, o1) = for_server(&admin).unwrap();
        assert_eq!(o1, Origin::Created(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (t2, o2) = for_server(&admin).unwrap();
        assert_eq!((t1, o2), (t2, Origin::File(path.clone())));
        std::fs::write(&path, "changeme\n").unwrap();
        let e = for_server(&admin).unwrap_err().to_string();
        assert!(
            e.starts_with("key `admin.token_file`: the token is a placeholder"),
            "{e}"
        );
        assert!(!e.contains("changeme"), "the token is echoed: {e}");
    }

    #[test]
    fn a_token_file_others_may_read_is_refused_unless_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "3f9a1c7e5b2d4086a1e9c3b7d5f20486\n").unwrap();
        let mut admin: crate::config::AdminConfig =
            toml::from_str("listen = \"127.0.0.1:0\"").unwrap();
        admin.token_file = Some(path.clone());
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = for_server(&admin).unwrap_err().to_string();
            assert!(
                e.contains(&format!("(mode {mode:04o})")) && e.contains("chmod 600"),
                "{mode:o}: {e}"
            );
            assert!(check(&admin).is_err());
        }
        admin.allow_readable_token_file = true;
        assert!(for_server(&admin).is_ok());
        admin.allow_readable_token_file = false;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(for_server(&admin).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(for_server(&admin).is_ok());
    }
}
