//! Which segments may be deleted.
//!
//! A segment is needed while it holds the message record or the latest state record of a
//! queued message (a *reference*). It is also needed while it holds the `Done` record of a
//! message whose message record is still on disk in another segment (a *pin*): deleting the
//! `Done` first would bring the finished message back at the next start. The head segment
//! (being written) is never deleted. A segment's pins are released ([`Reclaim::deleted`])
//! only once its file is gone and the folder synced: a segment whose unlink failed stays
//! here, keeping what it pins, until a later try removes it.

use std::collections::{BTreeSet, HashMap};

/// A segment with at most this many records of queued messages is compacted: their
/// messages are copied forward at their next attempt.
const SPARSE_REFS: u32 = 64;

/// Reference and pin counts per segment.
#[derive(Debug, Default)]
pub struct Reclaim {
    /// Segments on disk.
    existing: BTreeSet<u32>,
    /// The segment being written.
    head: u32,
    /// Records of queued messages per segment.
    refs: HashMap<u32, u32>,
    /// `Done` records per segment that must outlive another segment.
    pins: HashMap<u32, u32>,
    /// For a segment holding message records: the segments whose pins it holds.
    pinned_by: HashMap<u32, Vec<u32>>,
}

impl Reclaim {
    /// Bookkeeping over the segments on disk, `head` being written.
    pub fn new(existing: impl IntoIterator<Item = u32>, head: u32) -> Reclaim {
        let mut existing: BTreeSet<u32> = existing.into_iter().collect();
        existing.insert(head);
        Reclaim {
            existing,
            head,
            ..Reclaim::default()
        }
    }

    /// Segments on disk.
    pub fn segments(&self) -> usize {
        self.existing.len()
    }

    /// A new head segment was created; returns the old head if it is no longer needed.
    pub fn rotated(&mut self, head: u32) -> Option<u32> {
        let old = std::mem::replace(&mut self.head, head);
        self.existing.insert(head);
        self.free(old).then_some(old)
    }

    /// A record in `seg` now belongs to a queued message.
    pub fn add_ref(&mut self, seg: u32) {
        *self.refs.entry(seg).or_default() += 1;
    }

    /// A record in `seg` no longer matters; returns `seg` when nothing needs it any more.
    pub fn drop_ref(&mut self, seg: u32) -> Option<u32> {
        if let Some(n) = self.refs.get_mut(&seg) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&seg);
            }
        }
        self.free(seg).then_some(seg)
    }

    /// A record in `done` ends or supersedes a message record in `msg`, so `done` must
    /// outlive `msg` (a `Done` record; or a message's record copied to a newer segment).
    pub fn pin(&mut self, done: u32, msg: u32) {
        if done != msg && self.existing.contains(&msg) {
            *self.pins.entry(done).or_default() += 1;
            self.pinned_by.entry(msg).or_default().push(done);
        }
    }

    /// `seg` was deleted (and the directory synced); returns segments this frees.
    pub fn deleted(&mut self, seg: u32) -> Vec<u32> {
        self.existing.remove(&seg);
        let mut freed = Vec::new();
        for d in self.pinned_by.remove(&seg).unwrap_or_default() {
            if let Some(n) = self.pins.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    self.pins.remove(&d);
                }
            }
            if self.free(d) && !freed.contains(&d) {
                freed.push(d);
            }
        }
        freed
    }

    /// True when the message record of a queued message in `seg` should be copied forward so
    /// that the segment can go: `seg` is at least two segments behind the head and holds few
    /// records of queued messages (a mostly dead segment kept for a handful of stragglers).
    pub fn sparse(&self, seg: u32) -> bool {
        seg + 2 <= self.head && self.refs.get(&seg).is_some_and(|&n| n <= SPARSE_REFS)
    }

    /// Every segment that nothing needs (after recovery).
    pub fn all_free(&self) -> Vec<u32> {
        self.existing
            .iter()
            .copied()
            .filter(|&s| self.free(s))
            .collect()
    }

    fn free(&self, seg: u32) -> bool {
        seg != self.head
            && self.existing.contains(&seg)
            && !self.refs.contains_key(&seg)
            && !self.pins.contains_key(&seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_done_record_outlives_the_message_record() {
        // Message in segment 1, finished by a Done in segment 2; head is 3.
        let mut r = Reclaim::new([1, 2], 3);
        r.add_ref(1); // message M
        r.add_ref(1); // message N, still queued
        assert_eq!(r.drop_ref(1), None);
        r.pin(2, 1);
        assert!(r.all_free().is_empty(), "2 is pinned by 1, 1 holds N");
        // N finishes in the head: 1 is free; deleting it frees 2.
        assert_eq!(r.drop_ref(1), Some(1));
        assert_eq!(r.deleted(1), vec![2]);
        assert_eq!(r.deleted(2), Vec::<u32>::new());
        assert_eq!(r.segments(), 1);
    }

    #[test]
    fn the_head_is_kept_until_rotated() {
        let mut r = Reclaim::new([], 1);
        r.add_ref(1);
        assert_eq!(r.drop_ref(1), None, "head");
        assert_eq!(r.rotated(2), Some(1));
        r.add_ref(2);
        assert_eq!(r.rotated(3), None);
    }
}
