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
    /// Most events returned (the newest are kept).
    pub limit: usize,
}

/// What a search found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The events, oldest first.
    pub events: Vec<Event>,
    /// More events matched than `limit` (the older ones are left out).
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

/// Calls `each` with the payload of every record of `f` that may hold `hash`: those its
/// index names when it has one (it is sealed then, whatever `open` says: it may have been
/// sealed since), else all of them (the open file, whose whole records end at the end
/// `open` gives, or a file left without an index).
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
    let end = match open.filter(|o| o.0 == f.path && f.index.is_none()) {
        Some(o) => o.1,
        None => file.metadata()?.len(),
    };
    if let (Some(h), Some(hash)) = (f.index, hash) {
        let offsets = match files::lookup(&f.path, &h, hash) {
            Ok(o) => o,
            // Deleted by the retention meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut bodies = Vec::with_capacity(offsets.len());
        for off in offsets {
            match files::read_record(&file, off, end)? {
                Some(body) => bodies.push(body),
                // The index names a record that is not whole (the file was damaged after
                // it was sealed): the file is read whole instead, nothing twice.
                None => return files::each_record(&file, &f.path, end, |_, b| each(b)),
            }
        }
        bodies.iter().for_each(|b| each(b));
        return Ok(());
    }
    files::each_record(&file, &f.path, end, |_, b| each(b))
}

/// How far before the window a Message-ID search looks for the message's reception: a
/// message received earlier may still be delivered inside the window (longer than the
/// default `queue.max_lifetime`, 5 days).
const RECEIVED_BEFORE_MS: u64 = 7 * 86_400_000;

/// Most messages a Message-ID search follows.
const MAX_MESSAGES: usize = 100;

/// The events of `dir` matching `q` (see [`Query`]). A search by Message-ID returns every
/// event of the messages that carry it (found by their reception, up to 7 days before the
/// window), in the window.
pub fn search(dir: &Path, open: Option<(PathBuf, u64)>, q: &Query) -> io::Result<Found> {
    let (key, needle) = match q.role {
        Role::Recipient | Role::Sender => (Key::Address(&q.value), q.value.as_str()),
        Role::MessageId => {
            let id = super::event::trim_id(&q.value);
            (Key::MessageId(id), id)
        }
        Role::QueueId => (Key::QueueId(&q.value), q.value.as_str()),
    };
    if q.role != Role::MessageId {
        return find(
            dir,
            open.as_ref(),
            needle,
            key.hash(),
            q.since_ms,
            q.until_ms,
            q.limit,
            |e| e.matches(q.role, &q.value),
        );
    }
    let since = q.since_ms.saturating_sub(RECEIVED_BEFORE_MS);
    let received = find(
        dir,
        open.as_ref(),
        needle,
        key.hash(),
        since,
        q.until_ms,
        q.limit,
        |e| e.matches(Role::MessageId, &q.value),
    )?;
    let ids: BTreeSet<String> = received.events.iter().map(|e| e.queue_id.clone()).collect();
    let mut found = Found {
        truncated: received.truncated || ids.len() > MAX_MESSAGES,
        files: received.files,
        events: Vec::new(),
    };
    // The rest of those messages' lives, by queue id (the events of one message are
    // found once each: by its own queue id only).
    for id in ids.iter().take(MAX_MESSAGES) {
        let more = find(
            dir,
            open.as_ref(),
            id,
            Key::QueueId(id).hash(),
            q.since_ms,
            q.until_ms,
            q.limit,
            |e| e.queue_id == *id,
        )?;
        found.files += more.files;
        found.truncated |= more.truncated;
        found.events.extend(more.events);
    }
    found.events.sort_by_key(|e| e.time_ms);
    if found.events.len() > q.limit {
        found.events.drain(..found.events.len() - q.limit);
        found.truncated = true;
    }
    Ok(found)
}

/// Events of `dir` in the window whose key hash is `hash` and that `keep` accepts.
/// Files are read newest first and the search stops once more than `limit` events matched:
/// the newest `limit` are returned, oldest first.
#[allow(clippy::too_many_arguments)]
fn find(
    dir: &Path,
    open: Option<&(PathBuf, u64)>,
    needle: &str,
    hash: u64,
    since: u64,
    until: u64,
    limit: usize,
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
    for f in in_window(dir, since, until)?.iter().rev() {
        if out.events.len() > limit {
            out.truncated = true;
            break;
        }
        out.files += 1;
        records_with(f, open, Some(hash), |body| {
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
    if out.events.len() > limit {
        out.events.drain(..out.events.len() - limit);
        out.truncated = true;
    }
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
        // A file with an index is sealed (whatever `open` said a moment ago).
        match f.index {
            Some(h) => match files::add_counts(&f.path, &h, &hashes, &mut sums) {
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
