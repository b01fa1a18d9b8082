//! The compact address index: every address (lower case) in one byte arena, an open-addressing
//! hash index of `u32` entry numbers, and the mailbox each address belongs to.
//!
//! Written by hand because a `HashMap<String, _>` costs ~100 bytes per entry and moka ~390
//! (notes/dependencies.md): at 2,000,000 addresses this table takes ~40 bytes per address
//! plus the key bytes, and it can be written to and read from disk as flat arrays.

use super::DirectoryError;
use crate::types::{Address, RouteName};
use std::hash::BuildHasher;

const HASH_SEED: u64 = 0x636f_6578_6973_7421;

fn hash(key: &[u8]) -> u64 {
    foldhash::fast::FixedState::with_seed(HASH_SEED).hash_one(key)
}

/// Immutable index from address to mailbox.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    /// All keys, concatenated.
    pub(crate) arena: Vec<u8>,
    /// End offset in `arena` of each entry's key.
    pub(crate) ends: Vec<u32>,
    /// Mailbox number of each entry.
    pub(crate) mailbox_of: Vec<u32>,
    /// First entry (primary address) of each mailbox.
    pub(crate) primary: Vec<u32>,
    /// Open-addressing slots: 0 empty, else entry + 1. Length is a power of two.
    pub(crate) slots: Vec<u32>,
}

impl Table {
    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are no addresses.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Number of mailboxes.
    pub fn mailboxes(&self) -> usize {
        self.primary.len()
    }

    /// The key of entry `i`.
    pub fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.arena[start..self.ends[i] as usize]
    }

    /// The primary address of mailbox `m`.
    pub fn primary_address(&self, m: usize) -> &str {
        std::str::from_utf8(self.key(self.primary[m] as usize)).unwrap_or("")
    }

    /// Entry number of a lower-case key.
    pub fn entry(&self, key: &[u8]) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut pos = hash(key) as usize & mask;
        loop {
            let s = self.slots[pos];
            if s == 0 {
                return None;
            }
            let e = (s - 1) as usize;
            if self.key(e) == key {
                return Some(e);
            }
            pos = (pos + 1) & mask;
        }
    }

    /// Mailbox number of a lower-case key.
    pub fn mailbox(&self, key: &[u8]) -> Option<usize> {
        self.entry(key).map(|e| self.mailbox_of[e] as usize)
    }

    /// Adds an address to `mailbox`; `Err` gives the entry already holding the key.
    pub(crate) fn push(&mut self, key: &[u8], mailbox: u32) -> Result<usize, usize> {
        if (self.ends.len() + 1) * 2 > self.slots.len() {
            self.rebuild_slots((self.slots.len() * 2).max(16));
        }
        let mask = self.slots.len() - 1;
        let mut pos = hash(key) as usize & mask;
        loop {
            let s = self.slots[pos];
            if s == 0 {
                break;
            }
            if self.key((s - 1) as usize) == key {
                return Err((s - 1) as usize);
            }
            pos = (pos + 1) & mask;
        }
        self.arena.extend_from_slice(key);
        self.ends.push(self.arena.len() as u32);
        self.mailbox_of.push(mailbox);
        let e = self.ends.len() - 1;
        self.slots[pos] = e as u32 + 1;
        Ok(e)
    }

    fn rebuild_slots(&mut self, cap: usize) {
        let mask = cap - 1;
        let mut slots = vec![0u32; cap];
        for i in 0..self.ends.len() {
            let mut pos = hash(self.key(i)) as usize & mask;
            while slots[pos] != 0 {
                pos = (pos + 1) & mask;
            }
            slots[pos] = i as u32 + 1;
        }
        self.slots = slots;
    }

    /// Checks the internal invariants of a table read from disk.
    pub(crate) fn is_consistent(&self) -> bool {
        let n = self.ends.len();
        self.mailbox_of.len() == n
            && self.slots.len().is_power_of_two()
            && self.slots.len() >= n
            && self.ends.windows(2).all(|w| w[0] <= w[1])
            && self
                .ends
                .last()
                .is_none_or(|&e| e as usize == self.arena.len())
            && self
                .mailbox_of
                .iter()
                .all(|&m| (m as usize) < self.primary.len())
            && self.primary.iter().all(|&p| (p as usize) < n)
            && self.slots.iter().all(|&s| (s as usize) <= n)
    }
}

/// A parsed directory file: the index and each mailbox's state in the file.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The address index.
    pub table: Table,
    /// State (index into the route names) of each mailbox, as written in the file.
    pub states: Vec<u8>,
}

/// Parses a directory CSV: header `address,state` or `address,state,mailbox` (aliases: rows
/// with the same mailbox share one state). A bad row fails the whole file with its line.
pub fn parse(text: &[u8], file: &str, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
    let row_err = |line: u64, reason: String| DirectoryError::Row {
        file: file.to_string(),
        line: line as usize,
        reason,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text);
    let mut lines = Lines::new(text);
    let mut records = rdr.byte_records();
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            return Err(row_err(
                lines.at(e.position().map(|p| p.byte())),
                e.to_string(),
            ))
        }
        None => {
            return Err(row_err(
                1,
                "empty file: header `address,state` missing".into(),
            ))
        }
    };
    let cols: Vec<String> = header
        .iter()
        .map(|f| String::from_utf8_lossy(f).to_ascii_lowercase())
        .collect();
    let with_mailbox = match cols
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["address", "state"] => false,
        ["address", "state", "mailbox"] => true,
        _ => {
            let line = lines.at(header.position().map(|p| p.byte()));
            return Err(row_err(
                line,
                format!(
                    "header must be `address,state` or `address,state,mailbox`, found {:?}",
                    cols.join(",")
                ),
            ));
        }
    };
    let mut t = Table::default();
    let mut file_states: Vec<u8> = Vec::new();
    let mut mailbox_ids: std::collections::HashMap<Vec<u8>, u32> = std::collections::HashMap::new();
    let mut first_line: Vec<u32> = Vec::new();
    for rec in records {
        let rec =
            rec.map_err(|e| row_err(lines.at(e.position().map(|p| p.byte())), e.to_string()))?;
        let line = lines.at(rec.position().map(|p| p.byte()));
        if rec.len() == 1 && rec[0].is_empty() {
            continue;
        }
        let want = if with_mailbox { 3 } else { 2 };
        if rec.len() != want {
            return Err(row_err(
                line,
                format!("expected {want} fields, found {}", rec.len()),
            ));
        }
        let addr_text = std::str::from_utf8(&rec[0])
            .map_err(|_| row_err(line, "address is not UTF-8".into()))?;
        let addr = Address::parse(addr_text, true)
            .map_err(|e| row_err(line, format!("bad address {addr_text:?}: {e}")))?;
        let state_text = String::from_utf8_lossy(&rec[1]);
        let state = states
            .iter()
            .position(|s| s.0 == state_text)
            .ok_or_else(|| {
                row_err(
                    line,
                    format!("unknown state {state_text:?} (routes: {})", names(states)),
                )
            })? as u8;
        let key = addr.key().into_bytes();
        let mailbox = if with_mailbox && !rec[2].is_empty() {
            let next = file_states.len() as u32;
            *mailbox_ids
                .entry(rec[2].to_ascii_lowercase())
                .or_insert(next)
        } else {
            file_states.len() as u32
        };
        let new_mailbox = mailbox as usize == file_states.len();
        if new_mailbox {
            file_states.push(state);
            t.primary.push(t.ends.len() as u32);
        } else if file_states[mailbox as usize] != state {
            let other = t.primary_address(mailbox as usize).to_string();
            return Err(row_err(
                line,
                format!("alias {addr_text} has state {state_text:?} but its mailbox ({other}) has another state"),
            ));
        }
        if let Err(e) = t.push(&key, mailbox) {
            return Err(row_err(
                line,
                format!("{addr_text} is already listed on line {}", first_line[e]),
            ));
        }
        first_line.push(line as u32);
    }
    t.arena.shrink_to_fit();
    Ok(Parsed {
        table: t,
        states: file_states,
    })
}

/// Line numbers from csv byte offsets. The csv crate's own `line()` is off by one after a
/// CRLF line end (its record position points at the LF), so lines are counted here: the
/// number of LFs up to and including the offset, plus one.
pub(crate) struct Lines<'a> {
    text: &'a [u8],
    pos: usize,
    line: u64,
}

impl<'a> Lines<'a> {
    /// A counter over `text`.
    pub(crate) fn new(text: &'a [u8]) -> Lines<'a> {
        Lines {
            text,
            pos: 0,
            line: 1,
        }
    }

    /// The line of a record or error at byte `offset` (offsets must not go backwards).
    pub(crate) fn at(&mut self, offset: Option<u64>) -> u64 {
        let Some(end) = offset.and_then(|o| usize::try_from(o).ok()) else {
            return self.line;
        };
        let end = (end + 1).min(self.text.len());
        if end > self.pos {
            self.line += memchr::memchr_iter(b'\n', &self.text[self.pos..end]).count() as u64;
            self.pos = end;
        }
        self.line
    }
}

/// Route names joined for error messages.
pub fn names(states: &[RouteName]) -> String {
    states
        .iter()
        .map(|s| s.0.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<RouteName> {
        vec![RouteName("cloud".into()), RouteName("onprem".into())]
    }

    fn p(text: &str) -> Result<Parsed, DirectoryError> {
        parse(text.as_bytes(), "d.csv", &states())
    }

    #[test]
    fn parses_plain_and_aliases() {
        let d = p("address,state\nA@nhs.test,cloud\n\nb@nhs.test,onprem\n").unwrap();
        assert_eq!(d.table.len(), 2);
        assert_eq!(d.table.mailbox(b"a@nhs.test"), Some(0));
        assert_eq!(d.states, vec![0, 1]);
        let d = p("address,state,mailbox\njohn@nhs.test,cloud,m1\nj.smith@nhs.test,cloud,M1\nx@nhs.test,onprem,\n").unwrap();
        assert_eq!(d.table.mailboxes(), 2);
        assert_eq!(d.table.mailbox(b"j.smith@nhs.test"), Some(0));
        assert_eq!(d.table.primary_address(0), "john@nhs.test");
        assert!(d.table.is_consistent());
    }

    #[test]
    fn reports_bad_rows_with_line() {
        let e = |t: &str| p(t).unwrap_err().to_string();
        assert!(
            e("address,state\na@nhs.test,cloud\nbad,cloud\n").starts_with("d.csv:3: bad address")
        );
        assert!(
            e("address,state\na@nhs.test,mars\n").starts_with("d.csv:2: unknown state \"mars\"")
        );
        assert!(e("email,state\n").starts_with("d.csv:1: header"));
        assert!(e("address,state\na@nhs.test,cloud\nA@nhs.test,onprem\n")
            .contains("d.csv:3: A@nhs.test is already listed on line 2"));
        assert!(e("address,state\na@nhs.test\n").starts_with("d.csv:2: expected 2 fields"));
        assert!(
            e("address,state,mailbox\na@nhs.test,cloud,m\nb@nhs.test,onprem,m\n")
                .starts_with("d.csv:3: alias")
        );
    }

    #[test]
    fn many_entries_round_trip() {
        let mut text = String::from("address,state\n");
        for i in 0..10_000 {
            text.push_str(&format!(
                "user{i}@nhs.test,{}\n",
                if i % 3 == 0 { "cloud" } else { "onprem" }
            ));
        }
        let d = p(&text).unwrap();
        for i in (0..10_000).step_by(7) {
            let m = d
                .table
                .mailbox(format!("user{i}@nhs.test").as_bytes())
                .unwrap();
            assert_eq!(d.states[m], if i % 3 == 0 { 0 } else { 1 });
        }
        assert_eq!(d.table.mailbox(b"user10000@nhs.test"), None);
    }
}
