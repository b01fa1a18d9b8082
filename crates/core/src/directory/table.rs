//! The compact address index: every address (lower case) in one byte arena, an open-addressing
//! hash index of `u32` entry numbers, and the mailbox each address belongs to.
//!
//! Written by hand because a `HashMap<String, _>` costs ~100 bytes per entry and moka ~390
//! (notes/dependencies.md): at 2,000,000 addresses this table takes ~40 bytes per address
//! plus the key bytes, and it can be written to and read from disk as flat arrays.

use super::routing::{self, RoutingAddresses};
use super::DirectoryError;
use crate::types::{Address, RouteName};
use std::hash::BuildHasher;

const HASH_SEED: u64 = 0x636f_6578_6973_7421;

fn hash(key: &[u8]) -> u64 {
    foldhash::fast::FixedState::with_seed(HASH_SEED).hash_one(key)
}

/// The slot value for the record at `off` with hash `h`.
fn slot(h: u64, off: usize) -> u64 {
    (h & 0xFFFF_FFFF_0000_0000) | (off as u64 + 1)
}

/// The record offset in a non-empty slot.
fn slot_offset(s: u64) -> usize {
    ((s & 0xFFFF_FFFF) - 1) as usize
}

/// Immutable index from address to mailbox.
///
/// Laid out for few cache misses per lookup (two on a hit: the slot, then the record):
/// each address is one record `[key length: u16][key bytes][mailbox: u32]` in `arena`, and
/// the hash slots point straight at records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    /// Address records, concatenated.
    pub(crate) arena: Vec<u8>,
    /// Number of addresses.
    pub(crate) count: usize,
    /// Arena offset of the primary (first) address record of each mailbox.
    pub(crate) primary: Vec<u32>,
    /// Open-addressing slots: 0 empty, else `(hash tag << 32) | (record offset + 1)`, so a
    /// probe rejects most non-matching slots without reading the record. Length is a power
    /// of two.
    pub(crate) slots: Vec<u64>,
    /// Bytes of the arena held by records removed since the table was built or compacted
    /// (not kept in snapshots: a table read back counts from 0).
    pub(crate) dead: usize,
}

/// The mailbox number of a record a source delta removed ([`Table::remove`]): the record's
/// bytes stay in the arena (offsets of the others do not move) but no slot points at it and
/// no listing shows it. A mailbox a delta removed has this as its primary offset.
pub(crate) const DEAD: u32 = u32::MAX;

mod edit;

/// A record's key and mailbox at `off`, if the arena holds a whole record there.
fn record(arena: &[u8], off: usize) -> Option<(&[u8], u32)> {
    let len = u16::from_le_bytes([*arena.get(off)?, *arena.get(off + 1)?]) as usize;
    let key = arena.get(off + 2..off + 2 + len)?;
    let m = arena.get(off + 2 + len..off + 6 + len)?;
    Some((key, u32::from_le_bytes([m[0], m[1], m[2], m[3]])))
}

impl Table {
    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there are no addresses.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of mailbox numbers, those a source delta removed included (their states stay
    /// in place so the numbers of the others do not move).
    pub fn mailboxes(&self) -> usize {
        self.primary.len()
    }

    /// Number of mailboxes that still have addresses.
    pub fn live_mailboxes(&self) -> usize {
        self.primary.iter().filter(|&&p| p != DEAD).count()
    }

    /// The primary address of mailbox `m` (empty for one a delta removed).
    pub fn primary_address(&self, m: usize) -> &str {
        self.primary
            .get(m)
            .filter(|&&off| off != DEAD)
            .and_then(|&off| record(&self.arena, off as usize))
            .and_then(|(k, _)| std::str::from_utf8(k).ok())
            .unwrap_or("")
    }

    /// Record offset of a lower-case key.
    fn find(&self, key: &[u8], h: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let tag = h & 0xFFFF_FFFF_0000_0000;
        let mut pos = h as usize & mask;
        loop {
            let s = self.slots[pos];
            if s == 0 {
                return Err(pos);
            }
            if s & 0xFFFF_FFFF_0000_0000 == tag {
                let off = slot_offset(s);
                if record(&self.arena, off).is_some_and(|(k, _)| k == key) {
                    return Ok(off);
                }
            }
            pos = (pos + 1) & mask;
        }
    }

    /// Mailbox number of a lower-case key.
    pub fn mailbox(&self, key: &[u8]) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let off = self.find(key, hash(key)).ok()?;
        record(&self.arena, off).map(|(_, m)| m as usize)
    }

    /// Adds an address to `mailbox`; `Err` gives the record offset already holding the key.
    pub(crate) fn push(&mut self, key: &[u8], mailbox: u32) -> Result<usize, usize> {
        if (self.count + 1) * 2 > self.slots.len() {
            self.rebuild_slots((self.slots.len() * 2).max(16));
        }
        let h = hash(key);
        let pos = match self.find(key, h) {
            Ok(off) => return Err(off),
            Err(pos) => pos,
        };
        let off = self.arena.len();
        self.arena
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(&mailbox.to_le_bytes());
        self.slots[pos] = slot(h, off);
        self.count += 1;
        Ok(off)
    }

    /// Every address (lower case), in the order they were added.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.entries().map(|(k, _)| k)
    }

    /// Every address (lower-case key) with its mailbox number, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], usize)> + '_ {
        self.offsets().filter_map(|off| {
            record(&self.arena, off)
                .filter(|&(_, m)| m != DEAD)
                .map(|(k, m)| (k, m as usize))
        })
    }

    /// Offsets of every record, in order.
    fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let mut off = 0;
        std::iter::from_fn(move || {
            let (k, _) = record(&self.arena, off)?;
            let this = off;
            off += 6 + k.len();
            Some(this)
        })
    }

    fn rebuild_slots(&mut self, cap: usize) {
        let mask = cap - 1;
        let mut slots = vec![0u64; cap];
        for off in self.offsets() {
            let Some((key, m)) = record(&self.arena, off) else {
                break;
            };
            if m == DEAD {
                continue;
            }
            let h = hash(key);
            let mut pos = h as usize & mask;
            while slots[pos] != 0 {
                pos = (pos + 1) & mask;
            }
            slots[pos] = slot(h, off);
        }
        self.slots = slots;
    }

    /// Checks the internal invariants of a table read from disk.
    pub(crate) fn is_consistent(&self) -> bool {
        let mut starts = vec![false; self.arena.len()];
        // Removed records: a mailbox whose primary address went to another may still
        // point at its record.
        let mut dead = vec![false; self.arena.len()];
        let mut n = 0;
        let mut end = 0;
        for off in self.offsets() {
            match record(&self.arena, off) {
                Some((k, DEAD)) => {
                    dead[off] = true;
                    end = off + 6 + k.len();
                }
                Some((k, m)) if (m as usize) < self.primary.len() => {
                    starts[off] = true;
                    end = off + 6 + k.len();
                    n += 1;
                }
                _ => return false,
            }
        }
        let at_start = |off: usize| starts.get(off).copied().unwrap_or(false);
        end == self.arena.len()
            && n == self.count
            && self.slots.len().is_power_of_two()
            && self.slots.len() >= n
            && self.slots.iter().filter(|&&s| s != 0).count() == n
            && self
                .slots
                .iter()
                .all(|&s| s == 0 || at_start(slot_offset(s)))
            && self.primary.iter().all(|&p| {
                p == DEAD || at_start(p as usize) || dead.get(p as usize).copied().unwrap_or(false)
            })
    }
}

/// A parsed directory file: the index, each mailbox's state in the file and each
/// mailbox's routing address.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The address index.
    pub table: Table,
    /// State (index into the route names) of each mailbox, as written in the file.
    pub states: Vec<u8>,
    /// Routing address of each mailbox (none for all when the file has no such column).
    pub routing: RoutingAddresses,
}

/// The directory file's header forms: `(has mailbox column, has routing_address column)`.
fn columns(cols: &[String]) -> Option<(bool, bool)> {
    match cols
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["address", "state"] => Some((false, false)),
        ["address", "state", "mailbox"] => Some((true, false)),
        ["address", "state", "routing_address"] => Some((false, true)),
        ["address", "state", "mailbox", "routing_address"] => Some((true, true)),
        _ => None,
    }
}

/// Parses a directory CSV. The header is one of `address,state`, `address,state,mailbox`,
/// `address,state,routing_address` and `address,state,mailbox,routing_address`. Rows with
/// the same (non-empty) mailbox are aliases of one mailbox and share its state and routing
/// address: an alias row may leave the routing address empty, but two different ones for
/// one mailbox are an error. A routing address must be an ASCII address. A bad row fails
/// the whole file with its line.
pub fn parse(text: &[u8], file: &str, states: &[RouteName]) -> Result<Parsed, DirectoryError> {
    let row_err = |line: u64, reason: String| DirectoryError::Row {
        file: file.to_string(),
        line: line as usize,
        reason,
    };
    let mut rows = CsvRows::new(text);
    let (header_line, cols) = rows.header().map_err(|(l, r)| row_err(l, r))?;
    let Some((with_mailbox, with_routing)) = columns(&cols) else {
        return Err(row_err(
            header_line,
            format!(
                "header must be `address,state`, `address,state,mailbox`, `address,state,routing_address` or `address,state,mailbox,routing_address`, found {:?}",
                cols.join(",")
            ),
        ));
    };
    let want = 2 + usize::from(with_mailbox) + usize::from(with_routing);
    let mut t = Table::default();
    let mut file_states: Vec<u8> = Vec::new();
    let mut routing = routing::Builder::default();
    let mut mailbox_ids: std::collections::HashMap<Vec<u8>, u32> = std::collections::HashMap::new();
    let mut first_line: Vec<(u32, u32)> = Vec::new();
    while let Some(row) = rows.next_row() {
        let (line, rec) = row.map_err(|(l, r)| row_err(l, r))?;
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
        let state = super::StateId::find(states, &state_text)
            .ok_or_else(|| {
                row_err(
                    line,
                    format!("unknown state {state_text:?} (routes: {})", names(states)),
                )
            })?
            .raw();
        let routing_address = match rec.get(want - 1).filter(|f| with_routing && !f.is_empty()) {
            None => None,
            Some(field) => {
                let text = String::from_utf8_lossy(field);
                let ra = Address::parse(&text, false)
                    .map_err(|e| row_err(line, format!("bad routing address {text:?}: {e}")))?;
                Some(ra.to_string())
            }
        };
        let key = addr.key().into_bytes();
        let mailbox = if with_mailbox && !rec[2].is_empty() {
            let next = file_states.len() as u32;
            *mailbox_ids
                .entry(rec[2].to_ascii_lowercase())
                .or_insert(next)
        } else {
            file_states.len() as u32
        };
        if t.arena.len() + key.len() + 6 > u32::MAX as usize {
            return Err(row_err(
                line,
                "directory too large (over 4 GiB of addresses)".into(),
            ));
        }
        if mailbox as usize == file_states.len() {
            file_states.push(state);
            routing.add_mailbox();
            t.primary.push(t.arena.len() as u32);
        } else if file_states[mailbox as usize] != state {
            let other = t.primary_address(mailbox as usize).to_string();
            return Err(row_err(
                line,
                format!("alias {addr_text} has state {state_text:?} but its mailbox ({other}) has another state"),
            ));
        }
        if let Some(ra) = routing_address {
            match routing.get(mailbox as usize) {
                // The same address (the local part compared without case, as Exchange does).
                Some(had) if had.eq_ignore_ascii_case(&ra) => {}
                Some(had) => {
                    let other = t.primary_address(mailbox as usize).to_string();
                    return Err(row_err(
                        line,
                        format!("alias {addr_text} has routing address {ra:?} but its mailbox ({other}) has {had:?}"),
                    ));
                }
                None => {
                    if !routing.set(mailbox as usize, &ra) {
                        return Err(row_err(
                            line,
                            "directory too large (over 4 GiB of routing addresses)".into(),
                        ));
                    }
                }
            }
        }
        match t.push(&key, mailbox) {
            Ok(off) => first_line.push((off as u32, line as u32)),
            Err(off) => {
                // Offsets grow with each row, so the first row's line is found by bisection.
                let i = first_line.partition_point(|&(o, _)| (o as usize) < off);
                let first = first_line.get(i).map(|&(_, l)| l).unwrap_or(0);
                return Err(row_err(
                    line,
                    format!("{addr_text} is already listed on line {first}"),
                ));
            }
        }
    }
    t.arena.shrink_to_fit();
    Ok(Parsed {
        table: t,
        states: file_states,
        routing: routing.finish(),
    })
}

/// The records of a CSV file (directory or batch) with their line numbers: `#` comments,
/// blank rows and a UTF-8 byte order mark are skipped, fields are trimmed.
pub(crate) struct CsvRows<'a> {
    records: csv::ByteRecordsIntoIter<&'a [u8]>,
    lines: Lines<'a>,
}

impl<'a> CsvRows<'a> {
    pub(crate) fn new(text: &'a [u8]) -> CsvRows<'a> {
        let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
        let records = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .comment(Some(b'#'))
            .trim(csv::Trim::All)
            .from_reader(text)
            .into_byte_records();
        CsvRows {
            records,
            lines: Lines::new(text),
        }
    }

    /// The next non-blank record and its line; `Err((line, reason))` for a CSV error.
    pub(crate) fn next_row(&mut self) -> Option<Result<(u64, csv::ByteRecord), (u64, String)>> {
        loop {
            return Some(match self.records.next()? {
                Ok(rec) if rec.iter().all(|f| f.is_empty()) => continue,
                Ok(rec) => Ok((self.lines.at(rec.position().map(|p| p.byte())), rec)),
                Err(e) => Err((self.lines.at(e.position().map(|p| p.byte())), e.to_string())),
            });
        }
    }

    /// The header row: its line and its column names in lower case.
    pub(crate) fn header(&mut self) -> Result<(u64, Vec<String>), (u64, String)> {
        let (line, rec) = self
            .next_row()
            .ok_or((1, "empty file: no header".to_string()))??;
        Ok((
            line,
            rec.iter()
                .map(|f| String::from_utf8_lossy(f).to_ascii_lowercase())
                .collect(),
        ))
    }
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
        .map(|s| s.as_str())
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
    fn parses_the_four_headers() {
        fn ra<'a>(d: &'a Parsed, a: &str) -> Option<&'a str> {
            d.table.mailbox(a.as_bytes()).and_then(|m| d.routing.get(m))
        }
        let d = p("address,state\na@nhs.test,cloud\n").unwrap();
        assert!(d.routing.is_empty() && d.routing.ends.is_empty());
        let d = p("address,state,mailbox\na@nhs.test,cloud,m\nb@nhs.test,cloud,m\n").unwrap();
        assert!(d.routing.is_empty());
        let d = p("address,state,routing_address\na@nhs.test,cloud,a@Tenant.mail.onmicrosoft.test\nb@nhs.test,onprem,\n").unwrap();
        assert_eq!(ra(&d, "a@nhs.test"), Some("a@tenant.mail.onmicrosoft.test"));
        assert_eq!(ra(&d, "b@nhs.test"), None);
        assert!(d.routing.is_consistent(d.table.mailboxes()));
        // The form the LDAP source writes (header in any case).
        let d = p("Address,State,Mailbox,Routing_Address\na@nhs.test,cloud,m1,a@t.test\nb@nhs.test,onprem,,\n").unwrap();
        assert_eq!(ra(&d, "a@nhs.test"), Some("a@t.test"));
        assert_eq!(ra(&d, "b@nhs.test"), None);
        assert_eq!(d.states, vec![0, 1]);
    }

    #[test]
    fn aliases_share_their_mailbox_routing_address() {
        // The primary row leaves it empty, an alias on a secondary domain gives it, a third
        // repeats it (local part in another case), a fourth leaves it empty.
        let d = p("address,state,mailbox,routing_address\n\
                   john.smith@nhs.test,cloud,m1,\n\
                   other@nhs.test,onprem,m2,other@t.test\n\
                   John.Smith@other.test,cloud,m1,jsmith@t.test\n\
                   j.smith@nhs.test,cloud,M1,JSmith@t.test\n\
                   js@nhs.test,cloud,m1,\n")
        .unwrap();
        assert_eq!(d.table.mailboxes(), 2);
        for a in [
            "john.smith@nhs.test",
            "john.smith@other.test",
            "j.smith@nhs.test",
            "js@nhs.test",
        ] {
            let m = d.table.mailbox(a.as_bytes()).unwrap();
            assert_eq!((m, d.routing.get(m)), (0, Some("jsmith@t.test")), "{a}");
        }
        assert_eq!(d.routing.get(1), Some("other@t.test"));
        assert_eq!(d.routing.count(), 2);
        assert!(d.routing.is_consistent(2));
    }

    #[test]
    fn reports_bad_routing_addresses_with_line() {
        let e = |t: &str| p(t).unwrap_err().to_string();
        assert_eq!(
            e("address,state,mailbox,routing_address\na@nhs.test,cloud,m,a@t.test\nb@nhs.test,cloud,m,\nc@nhs.test,cloud,m,c@t.test\n"),
            "d.csv:4: alias c@nhs.test has routing address \"c@t.test\" but its mailbox (a@nhs.test) has \"a@t.test\""
        );
        assert_eq!(
            e("address,state,routing_address\na@nhs.test,cloud,a@t.test\nb@nhs.test,cloud,not-an-address\n"),
            "d.csv:3: bad routing address \"not-an-address\": missing @domain"
        );
        assert_eq!(
            e("address,state,routing_address\nb@nhs.test,cloud,jö@t.test\n"),
            "d.csv:2: bad routing address \"jö@t.test\": non-ASCII address needs SMTPUTF8"
        );
        assert!(e("address,state,routing_address\na@nhs.test,cloud\n")
            .starts_with("d.csv:2: expected 3 fields, found 2"));
        assert!(
            e("address,state,mailbox,routing_address\na@nhs.test,cloud,m\n")
                .starts_with("d.csv:2: expected 4 fields, found 3")
        );
        assert!(e("address,state,routing_address,mailbox\n").starts_with(
            "d.csv:1: header must be `address,state`, `address,state,mailbox`, `address,state,routing_address` or `address,state,mailbox,routing_address`, found"
        ));
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
