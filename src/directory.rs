//! The migration-state directory: which route (estate) holds each recipient's mailbox now.
//!
//! The embedded source is a CSV file (`address,state`) loaded into a compact in-memory table.
//! Lookups go through a bounded moka cache in front of the [`Source`]; for the in-memory
//! table the cache saves little, but it is where remote sources (LDAP, SQL) plug in without
//! changing the callers. The table sits behind an `ArcSwap`, so a new table replaces the old
//! one atomically and never blocks a lookup (DESIGN invariant 4).

use crate::config::DirectoryConfig;
use crate::types::{Address, RouteName};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A directory file that could not be used; names file, line and reason.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// File.
        file: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// A row is malformed.
    #[error("{file}:{line}: {reason}")]
    Row {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Where migration states come from.
pub trait Source: Send + Sync {
    /// The state index of a lower-case address, if listed.
    fn get(&self, key: &str) -> Option<u16>;
    /// Number of entries.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The in-memory table loaded from the CSV file.
#[derive(Debug, Default)]
pub struct Table {
    map: HashMap<Box<str>, u16>,
}

impl Source for Table {
    fn get(&self, key: &str) -> Option<u16> {
        self.map.get(key).copied()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

impl Table {
    /// Parses CSV text with header `address,state`; `states` are the valid state names.
    pub fn parse(text: &str, file: &str, states: &[RouteName]) -> Result<Table, DirectoryError> {
        let row_err = |line: usize, reason: String| DirectoryError::Row {
            file: file.to_string(),
            line,
            reason,
        };
        let mut lines = text.lines().enumerate();
        let header = lines
            .by_ref()
            .find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        match header {
            Some((_, h)) if fields(h) == ["address", "state"] => {}
            Some((i, h)) => {
                return Err(row_err(
                    i + 1,
                    format!("header must be `address,state`, found {h:?}"),
                ))
            }
            None => {
                return Err(row_err(
                    1,
                    "empty file: header `address,state` missing".into(),
                ))
            }
        }
        let mut map: HashMap<Box<str>, u16> = HashMap::new();
        let mut first_line: HashMap<Box<str>, usize> = HashMap::new();
        for (i, raw) in lines {
            let line_no = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = l.split(',').map(unquote).collect();
            if f.len() != 2 {
                return Err(row_err(
                    line_no,
                    format!("expected 2 fields (address,state), found {}", f.len()),
                ));
            }
            let addr = Address::parse(f[0], true)
                .map_err(|e| row_err(line_no, format!("bad address {:?}: {e}", f[0])))?;
            let state = states.iter().position(|s| s.0 == f[1]).ok_or_else(|| {
                row_err(
                    line_no,
                    format!("unknown state {:?} (routes: {})", f[1], names(states)),
                )
            })?;
            let key: Box<str> = addr.key().into();
            if let Some(old) = map.insert(key.clone(), state as u16) {
                if old != state as u16 {
                    let first = first_line.get(&key).copied().unwrap_or(0);
                    return Err(row_err(
                        line_no,
                        format!("{} is listed on line {first} with another state", f[0]),
                    ));
                }
            } else {
                first_line.insert(key, line_no);
            }
        }
        map.shrink_to_fit();
        Ok(Table { map })
    }

    /// Loads a CSV file.
    pub fn load(path: &Path, states: &[RouteName]) -> Result<Table, DirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Table::parse(&text, &path.display().to_string(), states)
    }
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

fn fields(h: &str) -> Vec<String> {
    h.split(',')
        .map(|f| unquote(f).to_ascii_lowercase())
        .collect()
}

fn names(states: &[RouteName]) -> String {
    states
        .iter()
        .map(|s| s.0.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How an address resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Listed in the directory with this state.
    Listed(RouteName),
    /// Not listed; `directory.unknown` sends it to this route.
    Unlisted(RouteName),
    /// Not listed and `directory.unknown = "reject"`.
    Reject,
}

impl Resolution {
    /// The route, unless rejected.
    pub fn route(&self) -> Option<&RouteName> {
        match self {
            Resolution::Listed(r) | Resolution::Unlisted(r) => Some(r),
            Resolution::Reject => None,
        }
    }
}

/// The live directory: swappable table, cache, unknown policy.
pub struct Directory {
    states: Vec<RouteName>,
    table: ArcSwap<Table>,
    cache: moka::sync::Cache<Box<str>, Option<u16>>,
    unknown: Option<RouteName>,
}

impl Directory {
    /// A directory over `table`; `states` are the route names (index = state id).
    pub fn new(table: Table, states: Vec<RouteName>, cfg: &DirectoryConfig) -> Directory {
        let unknown = (cfg.unknown != "reject").then(|| RouteName(cfg.unknown.clone()));
        Directory {
            states,
            table: ArcSwap::from_pointee(table),
            cache: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(cfg.cache_ttl)
                .build(),
            unknown,
        }
    }

    /// Loads the configured file.
    pub fn open(
        cfg: &DirectoryConfig,
        states: Vec<RouteName>,
    ) -> Result<Directory, DirectoryError> {
        let table = Table::load(&cfg.file, &states)?;
        Ok(Directory::new(table, states, cfg))
    }

    /// Replaces the whole table at once; lookups see the old or the new one, never a mix.
    pub fn replace(&self, table: Table) {
        self.table.store(Arc::new(table));
        self.cache.invalidate_all();
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    /// True when no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current state of an address (case-insensitive).
    pub fn resolve(&self, addr: &Address) -> Resolution {
        let key: Box<str> = addr.key().into();
        let table = &self.table;
        let state = self.cache.get_with(key.clone(), || table.load().get(&key));
        match state.and_then(|s| self.states.get(s as usize)) {
            Some(route) => Resolution::Listed(route.clone()),
            None => match &self.unknown {
                Some(r) => Resolution::Unlisted(r.clone()),
                None => Resolution::Reject,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    #[test]
    fn parses_and_reports_bad_rows() {
        let t = Table::parse(
            "address,state\nA@nhs.test,cloud\n\nb@nhs.test,onprem\n",
            "d.csv",
            &states(),
        )
        .unwrap();
        assert_eq!(t.get("a@nhs.test"), Some(0));
        let e = Table::parse(
            "address,state\na@nhs.test,cloud\nbad,cloud\n",
            "d.csv",
            &states(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("d.csv:3: bad address"), "{e}");
        let e = Table::parse("address,state\na@nhs.test,mars\n", "d.csv", &states())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.csv:2: unknown state \"mars\""), "{e}");
        let e = Table::parse("email,state\n", "d.csv", &states())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d.csv:1: header"), "{e}");
        let e = Table::parse(
            "address,state\na@nhs.test,cloud\nA@nhs.test,onprem\n",
            "d.csv",
            &states(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("d.csv:3:") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn resolves_case_insensitively_and_swaps_atomically() {
        let cfg = DirectoryConfig {
            file: "x".into(),
            unknown: "reject".into(),
            cache_capacity: 100,
            cache_ttl: std::time::Duration::from_secs(60),
        };
        let t = Table::parse("address,state\na@nhs.test,cloud\n", "d", &states()).unwrap();
        let d = Directory::new(t, states(), &cfg);
        let a = Address::parse("A@NHS.TEST", false).unwrap();
        assert_eq!(d.resolve(&a), Resolution::Listed(RouteName("cloud".into())));
        let z = Address::parse("z@nhs.test", false).unwrap();
        assert_eq!(d.resolve(&z), Resolution::Reject);
        d.replace(Table::parse("address,state\na@nhs.test,onprem\n", "d", &states()).unwrap());
        assert_eq!(
            d.resolve(&a),
            Resolution::Listed(RouteName("onprem".into()))
        );
    }
}
