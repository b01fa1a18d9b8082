//! Start-up: replays the segments to find every queued message and its latest state,
//! repairs the segment that was being written (see [`tail`](super::tail): a torn tail is
//! cut off, corruption is skipped, the damaged bytes of either are kept in `damaged/`), and
//! brings in a spool of the former layout (one file per message under `active/`). Files left
//! under a segment's temporary name (a creation cut short) are removed.
//!
//! Segments before the last were synced whole before the next one was started, so damage in
//! them is not a torn write: it is corruption, handled as in the last segment (the damaged
//! records moved aside and reported with file and offset, the rest kept). Only a damaged
//! sealed segment of format 1 (no turn markers) still stops the start with file and offset.
//!
//! A segment with a void marker (`NNNNNNNNNN.seg.void-OFFSET`, left by the commit stage when
//! a failed write could not be cut off) is read only up to `OFFSET`: its bytes from there on
//! belong to a turn whose callers were told it failed (a sender got a `4xx`), so they are
//! cut off here (or, if the cut fails again, ignored) and the marker removed; markers of
//! segments that no longer exist are removed.

use super::commit::{Head, Rec};
use super::framed::{self, read_at_most, Stop};
use super::gathered::{item_of, Gathered, Item, ItemId, QueuedSet, Routes};
use super::reclaim::Reclaim;
use super::segment::{self, FileHeader, Header, Segment, HEADER_LEN};
use super::tail::{self, Damaged};
use super::void::{parse_void_marker, void_ends};
use super::{io_err, segindex, DeliveryState, Envelope, Loc, SpoolError};
use crate::types::QueueId;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use tracing::{error, info, warn};

/// A queued message found at start-up: where its records are and the schedule it had.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Queue id.
    pub id: QueueId,
    /// Unix time of acceptance.
    pub received_at: u64,
    /// Its message record.
    pub msg: Loc,
    /// Its latest state record, if an attempt or admin action wrote one.
    pub state: Option<Loc>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Held by an admin.
    pub held: bool,
    /// Unix time (milliseconds) of the next attempt, if one was scheduled.
    pub next_attempt_ms: Option<u64>,
    /// The route whose next hops could not be reached at its last attempt.
    pub unreachable: Option<String>,
}

/// What a replay found.
pub struct Replayed {
    /// Queued messages, oldest first.
    pub queued: QueuedSet,
    /// Segment bookkeeping (references of the queued messages, pins of `Done` records).
    pub reclaim: Reclaim,
    /// The head segment to write to next.
    pub head: Head,
    /// Damage found in the segments (kept aside, then skipped or cut).
    pub damaged: Vec<Damaged>,
}

/// What the segments under `dir` hold.
struct Found {
    numbers: Vec<u32>,
    gathered: Gathered,
    damaged: Vec<Damaged>,
}

/// Every record of sealed segment `n` at `path` as items, read record by record (for its
/// index); route names go to `routes`.
pub(super) fn read_sealed(
    path: &Path,
    n: u32,
    routes: &mut Routes,
) -> Result<Vec<(Loc, Item)>, SpoolError> {
    let mut items = Vec::new();
    scan_sealed(path, n, None, &mut |loc, h, meta| {
        if let Some(item) = item_of(h, meta, routes)? {
            items.push((loc, item));
        }
        Ok(())
    })?;
    Ok(items)
}

/// Replays the segments under `dir`. With `aside`, damaged segments are repaired (the damaged
/// bytes kept in `aside`) and files left under temporary names are removed; without, nothing
/// is changed.
fn replay_segments(dir: &Path, aside: Option<&Path>) -> Result<Found, SpoolError> {
    let mut numbers = Vec::new();
    let mut voids: Vec<(u32, u64, String)> = Vec::new();
    let mut indexes: Vec<(u32, bool)> = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = segment::number(name) {
            numbers.push(n);
        } else if aside.is_some() && segment::is_temp(name) {
            // A segment whose creation was cut short: it never held a record (and a new
            // segment under that name truncates it anyway).
            let p = e.path();
            if let Err(e) = fs::remove_file(&p) {
                warn!(path = %p.display(), error = %e, "cannot remove a segment file left by a failed creation");
            }
        } else if let Some((n, off)) = parse_void_marker(name) {
            voids.push((n, off, name.to_string()));
        } else if let Some(idx) = segindex::number(name) {
            indexes.push(idx);
        }
    }
    numbers.sort_unstable();
    if aside.is_some() {
        // Indexes half written, or of segments no longer there.
        for (n, temp) in indexes {
            if temp || numbers.binary_search(&n).is_err() {
                let name = if temp {
                    format!("{}.tmp", segindex::file_name(n))
                } else {
                    segindex::file_name(n)
                };
                let _ = fs::remove_file(dir.join(name));
            }
        }
    }
    let limits = void_ends(dir, &numbers, voids, aside.is_none());
    let mut g = Gathered::default();
    let mut damaged = Vec::new();
    for (i, &n) in numbers.iter().enumerate() {
        let path = dir.join(segment::file_name(n));
        if aside.is_none() && !path.exists() {
            continue; // deleted meanwhile by a running relay (a spent segment)
        }
        let end = limits.get(&n).copied();
        if i + 1 < numbers.len() && end.is_none() {
            if let Some(items) = segindex::load(dir, n, &mut g.routes, aside.is_some()) {
                for (loc, item) in items {
                    g.apply(loc, item);
                }
                continue;
            }
        }
        if aside.is_some() {
            // Read whole (and maybe repaired, damaged records filled in place): an index of
            // it, unusable or not, must not be read instead at a later start.
            segindex::remove(dir, n);
        }
        let each = &mut |loc, h: &Header, meta: &[u8]| g.apply_record(loc, h, meta);
        let mode = match aside {
            Some(a) => tail::Mode::Repair(a),
            None => tail::Mode::ReadOnly,
        };
        if i + 1 < numbers.len() {
            // Applied once the whole segment reads well, so a damaged one can be read again
            // by the repairing scan.
            let mut recs = Vec::new();
            let res = scan_sealed(&path, n, end, &mut |loc, h, meta| {
                recs.push((loc, *h, meta.to_vec()));
                Ok(())
            });
            match res {
                Ok(()) => {
                    for (loc, h, meta) in recs {
                        each(loc, &h, &meta).map_err(|e| SpoolError::Corrupt {
                            path: format!("{} at offset {}", path.display(), loc.off),
                            reason: e.to_string(),
                        })?;
                    }
                }
                // Format 2 marks its turns: the damage is moved aside like corruption in the
                // last segment. Format 1 cannot tell, so it stops the start.
                Err(e @ SpoolError::Corrupt { .. }) => match file_format(&path)? {
                    format @ Format::V2(_) => {
                        error!(error = %e, "damage in a sealed spool segment; its damaged records are moved aside");
                        let shape = format.shape(true, end);
                        tail::scan_last(&path, n, shape, mode, each, &mut damaged)?;
                    }
                    Format::V1 | Format::Short => return Err(e),
                },
                Err(e) => return Err(e),
            }
            continue;
        }
        let format = file_format(&path)?;
        match format {
            Format::Short if aside.is_some() => {
                // Created but its header never reached the disk (an older version created
                // segments in place): nothing was written to it.
                warn!(path = %path.display(), "empty spool segment left by a crash; removed");
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
            Format::Short => {}
            Format::V1 | Format::V2(_) => {
                let shape = format.shape(false, end);
                tail::scan_last(&path, n, shape, mode, each, &mut damaged)?
            }
        }
    }
    Ok(Found {
        numbers,
        gathered: g,
        damaged,
    })
}

/// The format a segment's file header names.
#[derive(Clone, Copy)]
enum Format {
    /// Shorter than a file header.
    Short,
    /// Format 1: no turn markers, no salt.
    V1,
    /// Format 2: every commit turn ends with a `Commit` record; checksums keyed by the salt.
    V2(segment::Salt),
}

impl Format {
    /// How [`tail::scan_last`] reads a segment of this format (`sealed` when a later one
    /// exists; `end` when its end is void).
    fn shape(self, sealed: bool, end: Option<u64>) -> tail::Shape {
        let (marked, salt) = match self {
            Format::V2(salt) => (true, salt),
            Format::Short | Format::V1 => (false, segment::Salt::NONE),
        };
        tail::Shape {
            marked,
            sealed,
            end,
            salt,
        }
    }
}

fn file_format(path: &Path) -> Result<Format, SpoolError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut fh = [0u8; segment::FILE_HEADER_LEN];
    let got = read_at_most(&file, &mut fh, 0).map_err(io_err(path))?;
    match segment::parse_file_header(&fh[..got]) {
        FileHeader::Short => Ok(Format::Short),
        FileHeader::Segment(salt) if salt == segment::Salt::NONE => Ok(Format::V1),
        FileHeader::Segment(_) if unsalted_v2(&file).map_err(io_err(path))? => {
            Err(SpoolError::Corrupt {
                path: format!("{} at offset 0", path.display()),
                reason: "a format 2 segment without a salt, written by a pre-release build: \
                    let that build empty the queue (or move the spool away) before this one starts"
                    .into(),
            })
        }
        FileHeader::Segment(salt) => Ok(Format::V2(salt)),
        FileHeader::Foreign => Err(SpoolError::Corrupt {
            path: format!("{} at offset 0", path.display()),
            reason: "not a coexist spool segment".into(),
        }),
    }
}

/// True when a `COEXSEG2` segment has no salt but a whole unsalted record right after its
/// magic (written by a build before the salt): read as salted, every record of it would look
/// damaged and be cut off, so the start is refused instead. A salted segment matches only
/// if its 8 random bytes happen to form such a header and its checksum (never, in practice).
fn unsalted_v2(file: &File) -> std::io::Result<bool> {
    let start = segment::FILE_MAGIC.len() as u64;
    let mut hb = [0u8; HEADER_LEN];
    if read_at_most(file, &mut hb, start)? < HEADER_LEN {
        return Ok(false);
    }
    let Some(h) = segment::decode_header(&segment::Salt::NONE, &hb) else {
        return Ok(false);
    };
    let mut meta = vec![0u8; h.meta_len.min(1 << 20) as usize];
    let got = read_at_most(file, &mut meta, start + HEADER_LEN as u64)?;
    Ok(got == h.meta_len as usize && h.meta_ok(&meta))
}

/// The queued messages of the spool under `root` as its log says, without changing anything
/// (for a spool whose relay is stopped, or to look at a live one: a record being written is
/// not counted). Oldest first.
pub fn inspect(root: &Path) -> Result<Vec<Queued>, SpoolError> {
    let dir = root.join("segments");
    Ok(replay_segments(&dir, None)?
        .gathered
        .into_set()
        .into_iter()
        .collect())
}

/// Replays every segment under `dir`, imports a former `active/` spool, and opens a new head.
pub fn replay(root: &Path, dir: &Path) -> Result<Replayed, SpoolError> {
    let Found {
        numbers,
        gathered: mut g,
        damaged,
    } = replay_segments(dir, Some(&root.join("damaged")))?;
    let mut head = Head::create(dir, numbers.last().map_or(1, |n| n + 1))?;
    let imported = import_former(root, &mut head, &mut g)?;
    if imported > 0 {
        info!(
            messages = imported,
            "imported the queue of the former spool layout (active/)"
        );
    }
    let mut reclaim = Reclaim::new(numbers.iter().copied(), head.n);
    let dones = std::mem::take(&mut g.dones);
    let queued = g.into_set();
    for seg in queued.segments() {
        reclaim.add_ref(seg);
    }
    for (done, msg) in dones {
        reclaim.pin(done, msg);
    }
    // A segment whose corrupt bytes could not be moved aside stays for this run, so that the
    // next start can still move them aside.
    for d in damaged.iter().filter(|d| d.left) {
        if let Some(n) = d
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(segment::number)
        {
            reclaim.add_ref(n);
        }
    }
    Ok(Replayed {
        queued,
        reclaim,
        head,
        damaged,
    })
}

/// What a scan calls for each record: its position, header and metadata.
pub(super) type RecordFn<'a> = dyn FnMut(Loc, &Header, &[u8]) -> Result<(), serde_json::Error> + 'a;

/// Reads every record of sealed segment `n` (synced whole before the next one was started;
/// up to `end`, when its end is marked void): headers and metadata only, their bodies are
/// skipped ([`framed::walk`]); any damage is an error naming the file and offset.
fn scan_sealed(
    path: &Path,
    n: u32,
    end: Option<u64>,
    each: &mut RecordFn<'_>,
) -> Result<(), SpoolError> {
    let corrupt = |off: u64, reason: String| SpoolError::Corrupt {
        path: format!("{} at offset {off}", path.display()),
        reason,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let file_len = end.map_or(file_len, |e| e.min(file_len));
    let mut fh = [0u8; segment::FILE_HEADER_LEN];
    let got = read_at_most(&file, &mut fh, 0).map_err(io_err(path))?;
    let FileHeader::Segment(salt) = segment::parse_file_header(&fh[..got]) else {
        return Err(corrupt(0, "not a coexist spool segment".into()));
    };
    let seg = Segment {
        salt,
        marked: salt != segment::Salt::NONE,
    };
    let res = framed::walk(&seg, &file, file_len, &mut |off, h, meta| {
        let loc = Loc {
            seg: n,
            meta_len: h.meta_len,
            off,
        };
        each(loc, h, meta)
    });
    match res {
        Ok(()) => Ok(()),
        Err(Stop::Io(e)) => Err(io_err(path)(e)),
        Err(Stop::Damaged { offset, reason }) => Err(corrupt(offset, reason.into())),
        Err(Stop::Each { offset, error }) => Err(corrupt(offset, error.to_string())),
    }
}

/// Moves the messages of the former layout (`active/ID.msg` with an envelope line, and
/// `active/ID.state`) into the head segment, syncs it, then removes the old files.
fn import_former(root: &Path, head: &mut Head, g: &mut Gathered) -> Result<usize, SpoolError> {
    let incoming = root.join("incoming");
    if incoming.is_dir() {
        // Never acknowledged: a message being written when the former version stopped.
        let _ = fs::remove_dir_all(&incoming);
    }
    let active = root.join("active");
    if !active.is_dir() {
        return Ok(0);
    }
    let mut files = Vec::new();
    for e in fs::read_dir(&active).map_err(io_err(&active))? {
        let path = e.map_err(io_err(&active))?.path();
        let stem = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".msg"))
            .and_then(QueueId::from_file_stem);
        if let Some(id) = stem {
            files.push((id, path));
        }
    }
    files.sort();
    let mut buf = Vec::new();
    for (i, (id, path)) in files.iter().enumerate() {
        let (env, body) = read_former(path)?;
        let state_path = active.join(format!("{id}.state"));
        let state = fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<DeliveryState>(&b).ok())
            .filter(|s| s.rcpts.len() == env.rcpts.len())
            .unwrap_or_else(|| DeliveryState::new(env.rcpts.len()));
        let recs = [
            super::message_rec(&env, Arc::new(body))?,
            super::state_rec(&env.id, &state)?,
        ];
        let locs = head
            .write(
                &recs.iter().collect::<Vec<&Rec>>(),
                i + 1 == files.len(),
                &mut buf,
            )
            .map_err(io_err(path))?;
        let id = ItemId::of(env.id.clone());
        g.apply(
            locs[0],
            Item::Message {
                id: id.clone(),
                received_at: env.received_at,
            },
        );
        g.apply(
            locs[1],
            Item::State {
                id,
                attempts: state.attempts,
                held: state.held,
                next_attempt_ms: None,
                route: None,
            },
        );
    }
    head.sync().map_err(io_err(&active))?;
    for (id, path) in &files {
        fs::remove_file(path).map_err(io_err(path))?;
        let _ = fs::remove_file(active.join(format!("{id}.state")));
    }
    if fs::remove_dir(&active).is_err() {
        warn!(dir = %active.display(), "files that are not queued messages were left in the former spool folder");
    }
    File::open(root)
        .and_then(|f| f.sync_all())
        .map_err(io_err(root))?;
    Ok(files.len())
}

/// A message file of the former layout: one JSON envelope line, then the message.
pub(super) fn read_former(path: &Path) -> Result<(Envelope, Vec<u8>), SpoolError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::new(f);
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).map_err(io_err(path))?;
    let env: Envelope = serde_json::from_slice(&line).map_err(|e| SpoolError::Corrupt {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut body = Vec::new();
    r.read_to_end(&mut body).map_err(io_err(path))?;
    Ok((env, body))
}
