//! `[tracking]`: the message tracking log (see `crate::tracking`).

use super::*;

/// `[tracking]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingConfig {
    /// Keep the log (default true). Without it `coexist trace` answers from the record of
    /// recent outcomes in memory (`queue.recent_outcomes`) only.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Folder of the log files. Default: `tracking` under `spool.dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Files whose newest event is older than this are deleted (default 30 days).
    #[serde(default = "default_max_age", with = "duration")]
    pub max_age: Duration,
    /// The oldest files are deleted while the log takes more than this (bytes, or a
    /// number with K, M, G or T: binary units). Default 20G.
    #[serde(default = "default_max_size", with = "size")]
    pub max_size: u64,
    /// A new file is started when the open one reaches this size (default 64M, at most 2G),
    /// and at each UTC midnight.
    #[serde(default = "default_max_file", with = "size")]
    pub max_file: u64,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            enabled: true,
            dir: None,
            max_age: default_max_age(),
            max_size: default_max_size(),
            max_file: default_max_file(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_age() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_max_size() -> u64 {
    20 << 30
}
fn default_max_file() -> u64 {
    64 << 20
}

/// Sizes written as a number of bytes or a string such as "64M" or "20G" (K, M, G, T:
/// powers of 1024). Written by hand: the unit parsing is a few lines and the crates for it
/// take decimal units as well, which would make "20GB" mean less than "20G".
mod size {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => parse(&s).ok_or_else(|| {
                de::Error::custom(format!(
                    "{s:?} is not a size: a number of bytes, or a number with K, M, G or T"
                ))
            }),
        }
    }

    pub(super) fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let (num, shift) = match s.char_indices().last()? {
            (i, 'K' | 'k') => (&s[..i], 10),
            (i, 'M' | 'm') => (&s[..i], 20),
            (i, 'G' | 'g') => (&s[..i], 30),
            (i, 'T' | 't') => (&s[..i], 40),
            _ => (s, 0),
        };
        num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::size::parse;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse("64M"), Some(64 << 20));
        assert_eq!(parse("20G"), Some(20 << 30));
        assert_eq!(parse("1024"), Some(1024));
        assert_eq!(parse("2 k"), Some(2048));
        assert_eq!(parse("20GB"), None);
        assert_eq!(parse("x"), None);
    }
}
