//! The writer thread of the tracking log: it takes events from a bounded channel, writes
//! them in batches (one framed record per batch, synced before the next, so only the last
//! record can ever be torn), starts a new file each UTC day and at `max_file` bytes, writes
//! the index of each file it seals and applies the retention. It runs on a thread of its
//! own so that no SMTP reply and no delivery waits for the log's disk.

use super::event::Event;
use super::files::{self, IndexBuilder, FORMAT};
use super::Shared;
use crate::metrics as m;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Most events written as one record.
const MAX_BATCH: usize = 4096;
/// A record's payload is closed once it is this long (the rest goes in the next).
const MAX_PAYLOAD: usize = 8 << 20;
/// How long the writer lets events gather after the first one before it writes them: fewer,
/// larger records and syncs (which leaves the disk to the spool's group commits), and no
/// wake-up of the writer per event. A crash costs at most the events of this long (and
/// those still queued).
const GATHER: Duration = Duration::from_millis(100);
/// How often the retention runs.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
const DAY_MS: u64 = 86_400_000;

/// The file being written.
struct Open {
    file: File,
    path: PathBuf,
    start_ms: u64,
    end: u64,
    index: IndexBuilder,
}

/// The writer's state.
pub(super) struct Writer {
    shared: Arc<Shared>,
    open: Option<Open>,
    /// A write failed and nothing was written since (logged once per burst).
    failing: bool,
    buf: Vec<u8>,
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>) -> Writer {
        Writer {
            shared,
            open: None,
            failing: false,
            buf: Vec::new(),
        }
    }

    /// Runs until every sender is gone, then seals the open file.
    pub(super) fn run(mut self, rx: Receiver<Box<Event>>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut last_house = Instant::now();
        loop {
            let mut stop = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(e) => {
                    batch.push(*e);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            // Let events gather without being woken for each one (a sender wakes the writer
            // only while it waits in `recv`), then take all of them.
            if !batch.is_empty() && !stop {
                std::thread::sleep(GATHER);
            }
            loop {
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(e) => batch.push(*e),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            stop = true;
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let full = batch.len() >= MAX_BATCH;
                self.write(&batch);
                batch.clear();
                if !full {
                    break;
                }
            }
            if stop {
                self.seal();
                return;
            }
            let day_over = self
                .open
                .as_ref()
                .is_some_and(|o| crate::clock::now_ms() / DAY_MS != o.start_ms / DAY_MS);
            if day_over || last_house.elapsed() >= HOUSEKEEPING {
                if day_over {
                    self.seal();
                }
                self.shared.retain();
                last_house = Instant::now();
            }
        }
    }

    /// Writes `batch` as one or more records.
    fn write(&mut self, batch: &[Event]) {
        let mut from = 0;
        while from < batch.len() {
            self.buf.clear();
            let mut to = from;
            while to < batch.len() && self.buf.len() < MAX_PAYLOAD {
                if serde_json::to_writer(&mut self.buf, &batch[to]).is_ok() {
                    self.buf.push(b'\n');
                }
                to += 1;
            }
            match self.append(&batch[from..to]) {
                Ok(()) => {
                    metrics::counter!(m::TRACKING_EVENTS).increment((to - from) as u64);
                    if self.failing {
                        info!("tracking log: writing again");
                        self.failing = false;
                    }
                }
                Err(e) => {
                    metrics::counter!(m::TRACKING_LOST, "reason" => "write")
                        .increment((to - from) as u64);
                    if !self.failing {
                        error!(error = %e, dir = %self.shared.dir.display(), events = to - from, "tracking log: cannot write; these events are lost (logged once until a write succeeds)");
                        self.failing = true;
                    }
                }
            }
            from = to;
        }
    }

    /// Appends the record in `self.buf` (the events `evs`) and syncs it.
    fn append(&mut self, evs: &[Event]) -> io::Result<()> {
        let rotate = self.open.as_ref().is_some_and(|o| {
            o.end >= self.shared.max_file || crate::clock::now_ms() / DAY_MS != o.start_ms / DAY_MS
        });
        if rotate {
            self.seal();
        }
        if self.open.is_none() {
            self.open = Some(self.start()?);
        }
        let o = self.open.as_mut().expect("opened above");
        let rec = FORMAT.frame(&self.buf);
        if let Err(e) = o
            .file
            .write_all_at(&rec, o.end)
            .and_then(|_| o.file.sync_data())
        {
            // Never glue the next record to a torn one.
            if crate::spool::framed::cut(&o.file, o.end).is_err() {
                self.open = None;
            }
            return Err(e);
        }
        for e in evs {
            o.index.add(e, o.end);
        }
        o.end += rec.len() as u64;
        self.shared.set_open(Some((o.path.clone(), o.end)));
        Ok(())
    }

    /// Starts a new log file, synced with its folder.
    fn start(&self) -> io::Result<Open> {
        let mut start_ms = crate::clock::now_ms();
        let mut path = files::log_path(&self.shared.dir, start_ms);
        while path.exists() {
            start_ms += 1;
            path = files::log_path(&self.shared.dir, start_ms);
        }
        let file = crate::fsmode::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let synced = file
            .write_all_at(FORMAT.magic, 0)
            .and_then(|_| file.sync_all())
            .and_then(|_| File::open(&self.shared.dir)?.sync_all());
        if let Err(e) = synced {
            // No empty file left behind for each failed try (a full disk).
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Open {
            file,
            path,
            start_ms,
            end: FORMAT.magic.len() as u64,
            index: IndexBuilder::default(),
        })
    }

    /// Writes the index of the open file; the next event starts a new file.
    fn seal(&mut self) {
        let Some(o) = self.open.take() else {
            return;
        };
        let mut index = o.index;
        if index.events == 0 {
            index.first_ms = o.start_ms;
            index.last_ms = o.start_ms;
        }
        if let Err(e) = index.write(&o.path) {
            warn!(file = %o.path.display(), error = %e, "tracking log: cannot write the index of a full file; it is searched without one and indexed again at the next start");
        }
        self.shared.set_open(None);
    }
}
