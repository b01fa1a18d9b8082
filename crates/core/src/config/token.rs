//! What makes an admin token acceptable: long enough, not a placeholder, not a pattern.
//! The rules live with the config, which checks them when it is validated; the admin API
//! (`admin::token`) applies the same rules when it starts, and creates missing token files.
//!
//! Why each rule:
//! - A token from the documentation (`change-me`, `secret`, `password`, `example-token`…) is
//!   the first thing anyone tries, so a config holding one is refused, in `check-config`,
//!   `serve` and reload alike.
//! - Short tokens, one character or a short pattern repeated, and keyboard or alphabet runs
//!   are guessable; 16 characters is the floor (a generated token has 64 hex digits).
//! - A refusal never repeats the token: it is read in terminals and logs.
//! - A token file that group or others may read is refused, as ssh refuses such a private
//!   key: anyone with a shell on the host could take the token
//!   ([`readable_by_others`]; `admin.allow_readable_token_file` accepts it).

use std::path::Path;

/// Fewest characters a token may have.
pub const MIN_LEN: usize = 16;

/// Words that, alone or strung together (with at most four digits between them), make a
/// placeholder rather than a secret. Compared after lower-casing and dropping everything but
/// letters and digits.
const PLACEHOLDER_WORDS: &[&str] = &[
    "access",
    "admin",
    "administrator",
    "api",
    "auth",
    "bar",
    "baz",
    "bearer",
    "change",
    "changeme",
    "coexist",
    "default",
    "demo",
    "dev",
    "dummy",
    "example",
    "fixme",
    "foo",
    "here",
    "key",
    "letmein",
    "local",
    "me",
    "my",
    "new",
    "pass",
    "passwd",
    "password",
    "placeholder",
    "please",
    "prod",
    "pwd",
    "qwerty",
    "replace",
    "root",
    "sample",
    "secret",
    "temp",
    "test",
    "testing",
    "the",
    "this",
    "tmp",
    "todo",
    "token",
    "user",
    "your",
];

/// Fragments that mark a token as a placeholder wherever they appear in it.
const PLACEHOLDER_PARTS: &[&str] = &[
    "changeme",
    "changethis",
    "replaceme",
    "placeholder",
    "example",
    "yourtoken",
    "yoursecret",
    "redacted",
];

/// Runs that are typed rather than drawn at random (checked forwards and backwards).
const RUNS: &[&str] = &[
    "0123456789abcdefghijklmnopqrstuvwxyz0123456789",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz",
    "1234567890qwertyuiopasdfghjklzxcvbnm1234567890",
];

/// Why `token` must not guard the admin API, or `None` when it may.
pub fn weakness(token: &str) -> Option<String> {
    if token.is_empty() {
        return Some("the token is empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(
            "the token must be printable ASCII without spaces (it travels in an HTTP header)"
                .into(),
        );
    }
    let norm: String = token
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if PLACEHOLDER_PARTS.iter().any(|p| norm.contains(p)) || made_of_placeholder_words(&norm) {
        // The token itself is not repeated: the error goes to terminals and logs.
        return Some(
            "the token is a placeholder, not a secret; generate one, e.g. `openssl rand -hex 32`"
                .into(),
        );
    }
    if token.len() < MIN_LEN {
        return Some(format!(
            "the token is shorter than {MIN_LEN} characters; generate one, e.g. `openssl rand -hex 32`"
        ));
    }
    let lower = token.to_ascii_lowercase();
    let b = lower.as_bytes();
    if (1..=b.len() / 2).any(|p| (p..b.len()).all(|i| b[i] == b[i - p])) {
        return Some(
            "the token is one character or a short pattern repeated; generate one, e.g. `openssl rand -hex 32`"
                .into(),
        );
    }
    let reversed: String = norm.chars().rev().collect();
    if norm.len() >= MIN_LEN / 2
        && RUNS
            .iter()
            .any(|r| r.contains(norm.as_str()) || r.contains(reversed.as_str()))
    {
        return Some(
            "the token is an alphabet or keyboard run; generate one, e.g. `openssl rand -hex 32`"
                .into(),
        );
    }
    None
}

/// True when `norm` splits wholly into placeholder words and runs of at most four digits.
fn made_of_placeholder_words(norm: &str) -> bool {
    let b = norm.as_bytes();
    if b.is_empty() {
        return false;
    }
    // ok[i]: the first i bytes split into words and short digit runs.
    let mut ok = vec![false; b.len() + 1];
    ok[0] = true;
    for i in 0..b.len() {
        if !ok[i] {
            continue;
        }
        for w in PLACEHOLDER_WORDS {
            if b[i..].starts_with(w.as_bytes()) {
                ok[i + w.len()] = true;
            }
        }
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        for n in 1..=digits.min(4) {
            ok[i + n] = true;
        }
    }
    ok[b.len()] && b.iter().any(|c| c.is_ascii_alphabetic())
}

/// The token in `path` (its first line, trimmed), or `None` when the file does not exist.
pub fn read_file(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.lines().next().unwrap_or("").trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why the token file at `path` must not be used: group or others may read or write it
/// (mode & 0o077), named with its mode and the fix; `None` when only its owner may, or when
/// it does not exist.
pub fn readable_by_others(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok((mode & 0o077 != 0).then(|| {
        format!(
            "{} is accessible to group or others (mode {mode:04o}): run `chmod 600 {}`, or set `allow_readable_token_file = true`",
            path.display(),
            path.display()
        )
    }))
}
