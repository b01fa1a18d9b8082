//! Failures the commit stage makes up on purpose (a test hook, [`super::Spool::inject_faults`]),
//! for the rare paths a real disk seldom shows: a short write, a failed sync, a failed cut, a
//! sync that stalls.
//! (The unit tests' failure points in recovery and reclaim, which run before a spool exists,
//! are in [`super::inject`].)

use super::commit::Rec;
use super::segment::Kind;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Test hook: failures the commit stage makes up on purpose, for the rare paths a real disk
/// seldom shows; each count is used up by one turn (or one cut).
#[derive(Debug, Default)]
pub struct Faults {
    /// Turns whose write stops half-way (a short write), then fails.
    pub short_writes: AtomicU32,
    /// Turns whose records are written whole, then whose sync fails.
    pub syncs: AtomicU32,
    /// Cuts of a failed turn off the segment that fail.
    pub cuts: AtomicU32,
    /// Turns holding a `Done` record whose sync fails (then cut off as usual).
    pub end_syncs: AtomicU32,
    /// Turns whose sync takes [`Faults::stall_ms`] longer (a disk that stalls), then succeeds.
    pub stalls: AtomicU32,
    /// How long a stalled turn waits, in milliseconds.
    pub stall_ms: AtomicU64,
}

impl Faults {
    /// After a turn's records were written to `file` (from `start` to `end`) and synced: a
    /// made-up short write (the file left with half of those bytes) or failed sync, when
    /// one is asked for.
    pub fn turn(&self, file: &File, start: u64, end: u64, recs: &[&Rec]) -> io::Result<()> {
        let stall = self
            .stalls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if stall.is_ok() {
            // This runs on the commit thread, which a stalled disk would hold just so.
            std::thread::sleep(std::time::Duration::from_millis(
                self.stall_ms.load(Ordering::SeqCst),
            ));
        }
        if let Err(e) = made_up(&self.short_writes) {
            let _ = file.set_len(start + (end - start) / 2);
            return Err(e);
        }
        made_up(&self.syncs)?;
        if recs.iter().any(|r| matches!(r.kind, Kind::Done)) {
            made_up(&self.end_syncs)?;
        }
        Ok(())
    }
}

/// An error (EIO) when `count` asks for one, using it up.
pub fn made_up(count: &AtomicU32) -> io::Result<()> {
    match count.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => Err(io::Error::from_raw_os_error(5)),
        Err(_) => Ok(()),
    }
}
