//! Searching the tracking log: the files whose time span meets the window, the records
//! their index names for the key (the open file, which has no index yet, is read whole),
//! and the events of those records that match.

use super::event::{Event, Key, Role};
use super::files::{self, LogFile};
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A search.
#[derive(Debug, Clone)]
pub struct Query {
    /// What the value is.
    pub role: Role,
    /// An address, a Message-ID or a queue id (any case, except a queue id).
    pub value: String,
    /// Oldest event time wanted (Unix ms).
    pub since_ms: u64,
    /// Newest event time wanted (Unix ms).
    pub until_ms: u64,
    /// Most events returned (the oldest are kept).
    pub limit: usize,
}

/// What a search found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The events, oldest first.
    pub events: Vec<Event>,
    /// More events matched than `limit`.
    pub truncated: bool,
    /// Files read.
    pub files: usize,
}

/// The files to read for the window `since..=until`: sealed files whose span meets it, a
/// file without an index (read whole), and the open one.
fn in_window(dir: &Path, since: u64, until: u64) -> io::Result<Vec<LogFile>> {
    Ok(files::list(dir)?
        .into_iter()
        .filter(|f| match f.index {
            Some(h) => h.last_ms.max(f.start_ms) >= since && h.first_ms.min(f.start_ms) <= until,
            // The open file (or one left without an index): its events may be older than
            // its start (they waited in the channel), so it is always read.
            None => true,
        })
        .collect())
}

/// Calls `each` with the payload of every record of `f` that may hold `hash` (all of them
/// for a file without index or the open file, whose whole records end at `open_end`).
fn records_with(
    f: &LogFile,
    open: Option<&(PathBuf, u64)>,
    hash: Option<u64>,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let file = match File::open(&f.path) {
        Ok(file) => file,
        // Deleted by the retention meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let open_end = open.filter(|o| o.0 == f.path).map(|o| o.1);
    match (f.index, open_end, hash) {
        (Some(h), None, Some(hash)) => {
            let end = file.metadata()?.len();
            let offsets = match files::lookup(&f.path, &h, hash) {
                Ok(o) => o,
                // Deleted by the retention meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for off in offsets {
                match files::read_record(&file, off, end)? {
                    Some(body) => each(&body),
                    // The index names a record that is not whole: read the file whole.
                    None => return files::each_record(&file, &f.path, end, |_, b| each(b)),
                }
            }
            Ok(())
        }
        _ => {
            let end = match open_end {
                Some(e) => e,
                None => file.metadata()?.len(),
            };
            files::each_record(&file, &f.path, end, |_, b| each(b))
        }
    }
}

/// The events of `dir` matching `q` (see [`Query`]). A search by Message-ID returns every
/// event of the messages that carry it.
pub fn search(dir: &Path, open: Option<(PathBuf, u64)>, q: &Query) -> io::Result<Found> {
    let key = match q.role {
        Role::Recipient | Role::Sender => Key::Address(&q.value),
        Role::MessageId => Key::MessageId(&q.value),
        Role::QueueId => Key::QueueId(&q.value),
    };
    let needle = match q.role {
        Role::MessageId => super::event::trim_id(&q.value),
        _ => q.value.as_str(),
    };
    let mut found = find(
        dir,
        open.as_ref(),
        needle,
        key.hash(),
        q.since_ms,
        q.until_ms,
        |e| e.matches(q.role, &q.value),
    )?;
    if q.role == Role::MessageId {
        // The rest of those messages' lives: by queue id, from the window's start on.
        let ids: BTreeSet<String> = found.events.iter().map(|e| e.queue_id.clone()).collect();
        for id in ids.iter().take(100) {
            let more = find(
                dir,
                open.as_ref(),
                id,
                Key::QueueId(id).hash(),
                q.since_ms,
                u64::MAX,
                |e| e.queue_id == *id,
            )?;
            found.files += more.files;
            found.events.extend(more.events);
        }
        found.events.sort_by_key(|e| e.time_ms);
        found.events.dedup();
    }
    if found.events.len() > q.limit {
        found.events.truncate(q.limit);
        found.truncated = true;
    }
    Ok(found)
}

/// Events of `dir` in the window whose key hash is `hash` and that `keep` accepts.
fn find(
    dir: &Path,
    open: Option<&(PathBuf, u64)>,
    needle: &str,
    hash: u64,
    since: u64,
    until: u64,
    keep: impl Fn(&Event) -> bool,
) -> io::Result<Found> {
    let mut out = Found::default();
    // Only lines that hold the value (any case) are parsed: a record holds thousands of
    // events. JSON writes a value as it is unless it has a quote, a backslash or a control
    // character; such a value is looked for by parsing every line.
    let plain = !needle.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
    let filter = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build([needle])
        .ok()
        .filter(|_| plain && !needle.is_empty());
    for f in in_window(dir, since, until)? {
        out.files += 1;
        records_with(&f, open, Some(hash), |body| {
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if filter.as_ref().is_some_and(|ac| !ac.is_match(line)) {
                    continue;
                }
                let Ok(e) = serde_json::from_slice::<Event>(line) else {
                    continue;
                };
                let mut has = false;
                e.keys(|k| has |= k.hash() == hash);
                if has && e.time_ms >= since && e.time_ms <= until && keep(&e) {
                    out.events.push(e);
                }
            }
        })?;
    }
    out.events.sort_by_key(|e| e.time_ms);
    Ok(out)
}

/// Messages received for each of `addrs` between `since` and `until` (Unix ms), same
/// order: from the count section of each sealed file's index, and from the events of the
/// open file (and of any file without an index). Files that only partly meet the window
/// count whole.
pub fn received_counts(
    dir: &Path,
    open: Option<(PathBuf, u64)>,
    addrs: &[String],
    since: u64,
    until: u64,
) -> io::Result<Vec<u64>> {
    let mut wanted: Vec<(u64, usize)> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (Key::Address(a).hash(), i))
        .collect();
    wanted.sort_unstable();
    let hashes: Vec<u64> = wanted.iter().map(|w| w.0).collect();
    let mut sums = vec![0u64; hashes.len()];
    for f in in_window(dir, since, until)? {
        let is_open = open.as_ref().is_some_and(|o| o.0 == f.path);
        match f.index {
            Some(h) if !is_open => match files::add_counts(&f.path, &h, &hashes, &mut sums) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            _ => records_with(&f, open.as_ref(), None, |body| {
                for e in files::events(body) {
                    if e.kind != super::Kind::Received || e.time_ms < since || e.time_ms > until {
                        continue;
                    }
                    for r in &e.recipients {
                        let h = Key::Address(r).hash();
                        if let Ok(i) = hashes.binary_search(&h) {
                            // Every address of `addrs` with this hash.
                            let mut j = i;
                            while j > 0 && hashes[j - 1] == h {
                                j -= 1;
                            }
                            while j < hashes.len() && hashes[j] == h {
                                sums[j] += 1;
                                j += 1;
                            }
                        }
                    }
                }
            })?,
        }
    }
    let mut out = vec![0u64; addrs.len()];
    for (k, (_, i)) in wanted.iter().enumerate() {
        out[*i] = sums[k];
    }
    Ok(out)
}
