//! The queue's memory: one small entry per queued message (where its records are, its phase,
//! its next attempt), one set per phase in id order (oldest first; ready and deferred ones
//! per route), and one timer heap of next-attempt times. Envelopes, states and bodies stay in
//! the spool; an entry is 56 bytes with its key, plus 16 for its place in a set and 16 for
//! the timer, kept in full chunks ([`crate::chunks`]; the README gives the measured size).
//!
//! Everything here is O(log n) per message (amortised: the timer's stale items are swept
//! now and then) and never touches the disk, so the lock around
//! it is held only briefly: acceptance, listings and metrics do not wait for each other.
//!
//! An outcome an attempt learned that the spool could not write (disk full, I/O error) stays
//! here with the message's entry ([`Unwritten`]) until it is written: the message's next
//! delivery starts from it, never from the older state on disk (DESIGN invariant 11).

mod layout;

use crate::chunks::{ChunkMap, ChunkSet};
use crate::spool::{DeliveryState, Loc};
use crate::types::QueueKey;
use layout::{entry_of, forget, pack, stored, Due, Far, Stored};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::Bound;

/// Where a message is, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Due now: waiting for the dispatcher to start an attempt.
    Ready = 0,
    /// An attempt (or an admin change) is running; requests wait in [`Asks`].
    Busy = 1,
    /// Waiting for its next attempt (in the timer).
    Deferred = 2,
    /// Held by an admin.
    Held = 3,
}

/// Admin requests made while a message is busy, applied when it settles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asks(u8);

impl Asks {
    /// Hold it.
    pub const HOLD: Asks = Asks(1);
    /// Release it.
    pub const RELEASE: Asks = Asks(2);
    /// Delete it.
    pub const DELETE: Asks = Asks(4);
    /// Attempt it again at once.
    pub const FLUSH: Asks = Asks(8);

    /// True when `other`'s requests are all in this set.
    pub fn has(self, other: Asks) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// No requests.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn add(&mut self, a: Asks) {
        // Hold and release cancel each other: the later one wins.
        if a.has(Asks::HOLD) {
            self.0 &= !Asks::RELEASE.0;
        }
        if a.has(Asks::RELEASE) {
            self.0 &= !Asks::HOLD.0;
        }
        self.0 |= a.0;
    }
}

/// No route recorded.
pub const NO_ROUTE: u16 = u16::MAX;

/// One queued message.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Its message record.
    pub msg: Loc,
    /// Its latest state record.
    pub state: Option<Loc>,
    /// Next attempt (Unix ms), when deferred.
    pub due_ms: u64,
    /// Attempts made.
    pub attempts: u32,
    /// The route whose next hops could not be reached at its last attempt ([`NO_ROUTE`]:
    /// none): it is released early when that route answers again.
    pub route: u16,
    /// Phase.
    pub slot: Slot,
    /// Requests waiting for a busy message.
    pub asks: Asks,
}

/// What the spool still has to write for a message before anything else is done with it.
#[derive(Debug, Clone)]
pub enum Owed {
    /// Its newest state (what the last attempt or admin change learned): written before its
    /// next delivery, which starts from it.
    State(Box<DeliveryState>),
    /// Its end record: every recipient has its final outcome and the sender was told (DSN
    /// spooled, or kept in `failed/`); only the `Done` record is left (no delivery, no DSN).
    /// The final state is kept for listings.
    End(Box<DeliveryState>),
}

/// An outcome not yet written, and how many writes of it failed (for the retry backoff).
#[derive(Debug, Clone)]
pub struct Unwritten {
    /// What is to be written.
    pub owed: Owed,
    /// Failed writes so far.
    pub failures: u32,
}

impl Unwritten {
    /// The message's state as last learned.
    pub fn state(&self) -> &DeliveryState {
        match &self.owed {
            Owed::State(s) | Owed::End(s) => s,
        }
    }
}

/// How a busy message settles after its attempt or admin change.
#[derive(Debug, Clone, Copy)]
pub enum Settle {
    /// Attempt again at once.
    Ready,
    /// Attempt again at this time (Unix ms).
    Deferred(u64),
    /// Held until released.
    Held,
}

/// Counts and oldest ids per phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct Census {
    /// Messages per [`Slot`].
    pub count: [usize; 4],
    /// Oldest message per [`Slot`].
    pub oldest: [Option<QueueKey>; 4],
}

/// Keys per route tag, for the phases the dispatcher takes from route by route.
type PerRoute = BTreeMap<u16, ChunkSet<QueueKey>>;

fn add_to(map: &mut PerRoute, tag: u16, k: QueueKey) {
    map.entry(tag).or_default().add(k);
}

fn take_from(map: &mut PerRoute, tag: u16, k: QueueKey) {
    if let Some(set) = map.get_mut(&tag) {
        set.take(&k);
        if set.is_empty() {
            map.remove(&tag);
        }
    }
}

/// The oldest key of any route.
fn oldest_of(map: &PerRoute) -> Option<QueueKey> {
    map.values().filter_map(|s| s.first_key()).min()
}

/// Up to `max` keys from `lower` on, in id order, over every route.
fn keys_of(map: &PerRoute, lower: Bound<&QueueKey>, max: usize) -> Vec<QueueKey> {
    let mut keys: Vec<QueueKey> = map.values().flat_map(|s| s.keys_from(lower, max)).collect();
    keys.sort_unstable();
    keys.truncate(max);
    keys
}

/// The index. Every message is in `entries` and in the set of its phase: ready and
/// deferred messages by route tag (the route that deferred them, [`NO_ROUTE`] for the rest),
/// so the dispatcher takes from each route in turn (one route's backlog never holds up the
/// others) and a route that answers again finds its mail without a scan.
#[derive(Default)]
pub struct Index {
    entries: ChunkMap<QueueKey, Stored>,
    /// Messages per [`Slot`].
    counts: [usize; 4],
    ready: PerRoute,
    deferred: PerRoute,
    busy_keys: BTreeSet<QueueKey>,
    held: ChunkSet<QueueKey>,
    /// Busy messages per route tag, for the per-route limit.
    busy: HashMap<u16, usize>,
    /// The route tag the dispatcher took from last (round robin).
    turn: u16,
    /// Next attempts; an item is stale when its entry is no longer deferred at that time.
    timer: BinaryHeap<Reverse<Due>>,
    /// Outcomes learned and not yet written, by message (few: only while writes fail).
    unwritten: HashMap<QueueKey, Unwritten>,
    /// Record offsets too large for an entry (see [`Pos`]; in practice none).
    far: Far,
}

impl Index {
    /// Messages queued.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One entry.
    pub fn get(&self, k: QueueKey) -> Option<Entry> {
        self.entries.get(&k).map(|s| entry_of(&self.far, k, s))
    }

    /// Adds a message (replacing any entry with that key).
    pub fn insert(&mut self, k: QueueKey, e: Entry) {
        self.remove(k);
        let s = stored(&mut self.far, k, &e);
        self.entries.insert(k, s);
        self.enter(k, e.slot, e.due_ms);
    }

    /// Removes a message (and any outcome of it not yet written).
    pub fn remove(&mut self, k: QueueKey) -> Option<Entry> {
        self.leave(k);
        self.unwritten.remove(&k);
        let e = self.entries.remove(&k).map(|s| entry_of(&self.far, k, &s));
        forget(&mut self.far, k, false);
        forget(&mut self.far, k, true);
        e
    }

    /// The outcome of a queued message that is not yet written, if any.
    pub fn unwritten(&self, k: QueueKey) -> Option<&Unwritten> {
        self.unwritten.get(&k)
    }

    /// Keeps `owed` for a queued message whose write just failed (replacing what it owed
    /// before, counting the failure); returns the failures so far.
    pub fn owe(&mut self, k: QueueKey, owed: Owed) -> u32 {
        if !self.entries.contains_key(&k) {
            return 0;
        }
        let failures = self.unwritten.get(&k).map_or(0, |u| u.failures) + 1;
        self.unwritten.insert(k, Unwritten { owed, failures });
        failures
    }

    /// What a message owed is written now.
    pub fn paid(&mut self, k: QueueKey) {
        self.unwritten.remove(&k);
    }

    /// Messages with an outcome not yet written.
    pub fn unwritten_count(&self) -> usize {
        self.unwritten.len()
    }

    /// Takes `k` out of the structures of its slot (the entry stays).
    fn leave(&mut self, k: QueueKey) {
        let Some(e) = self.entries.get(&k) else {
            return;
        };
        let (slot, tag) = (e.slot, e.route);
        self.counts[slot as usize] = self.counts[slot as usize].saturating_sub(1);
        match slot {
            Slot::Ready => take_from(&mut self.ready, tag, k),
            Slot::Deferred => take_from(&mut self.deferred, tag, k),
            Slot::Busy => {
                self.busy_keys.remove(&k);
                if let Some(n) = self.busy.get_mut(&tag) {
                    *n = n.saturating_sub(1);
                }
            }
            Slot::Held => {
                self.held.take(&k);
            }
        }
    }

    /// Puts `k` (already out of its former slot) into `slot`.
    fn enter(&mut self, k: QueueKey, slot: Slot, due_ms: u64) -> Option<Entry> {
        let e = self.entries.get_mut(&k)?;
        e.slot = slot;
        e.due_ms = due_ms;
        let (tag, entry) = (e.route, entry_of(&self.far, k, e));
        self.counts[slot as usize] += 1;
        match slot {
            Slot::Ready => add_to(&mut self.ready, tag, k),
            Slot::Deferred => {
                add_to(&mut self.deferred, tag, k);
                self.timer.push(Reverse(Due::new(due_ms, k)));
                self.sweep_timer();
            }
            Slot::Busy => {
                self.busy_keys.insert(k);
                *self.busy.entry(tag).or_default() += 1;
            }
            Slot::Held => {
                self.held.add(k);
            }
        }
        Some(entry)
    }

    /// Drops the timer's stale items once they outnumber the deferred messages (a release
    /// or flush of many deferred messages leaves theirs behind until they come due).
    fn sweep_timer(&mut self) {
        let live = self.counts[Slot::Deferred as usize];
        if self.timer.len() <= 2 * live + 1024 {
            return;
        }
        let timer = std::mem::take(&mut self.timer);
        let kept: Vec<_> = timer
            .into_vec()
            .into_iter()
            .filter(|Reverse(d)| self.is_current(*d))
            .collect();
        self.timer = BinaryHeap::from(kept);
    }

    fn move_to(&mut self, k: QueueKey, slot: Slot, due_ms: u64) -> Option<Entry> {
        self.leave(k);
        self.enter(k, slot, due_ms)
    }

    /// Takes the next message to attempt and makes it busy: a ready one, taking the routes
    /// in turn, from a route with fewer than `cap(route)` busy messages; else the earliest
    /// deferred one due at `now_ms` (one due for a route at its limit waits as ready).
    pub fn next(&mut self, now_ms: u64, cap: impl Fn(u16) -> usize) -> Option<(QueueKey, Entry)> {
        let k = match self.pick_ready(&cap) {
            Some(k) => k,
            None => loop {
                let k = self.pop_due(now_ms)?;
                let tag = self.entries.get(&k)?.route;
                if self.busy.get(&tag).copied().unwrap_or(0) < cap(tag) {
                    break k;
                }
                self.move_to(k, Slot::Ready, 0);
            },
        };
        let e = self.move_to(k, Slot::Busy, 0)?;
        Some((k, e))
    }

    fn pick_ready(&mut self, cap: &impl Fn(u16) -> usize) -> Option<QueueKey> {
        // The routes after the last one taken, then from the start (NO_ROUTE is the last
        // tag, so after it the turn starts over).
        let from = self.turn.checked_add(1).unwrap_or(0);
        let after = self.ready.range(from..).chain(self.ready.range(..from));
        let mut pick = None;
        for (&tag, set) in after {
            if self.busy.get(&tag).copied().unwrap_or(0) < cap(tag) {
                pick = set.first_key().map(|k| (tag, k));
                if pick.is_some() {
                    break;
                }
            }
        }
        let (tag, k) = pick?;
        self.turn = tag;
        Some(k)
    }

    fn pop_due(&mut self, now_ms: u64) -> Option<QueueKey> {
        let due = self.next_due()?;
        if due > now_ms {
            return None;
        }
        self.timer.pop().and_then(|Reverse(d)| d.key())
    }

    /// True when `d` is the item of a deferred message at its current time (not stale).
    fn is_current(&self, d: Due) -> bool {
        d.key()
            .and_then(|k| self.entries.get(&k))
            .is_some_and(|e| e.slot == Slot::Deferred && Due::ms_of(e.due_ms) == d.ms())
    }

    /// When the earliest deferred message is due (Unix ms).
    pub fn next_due(&mut self) -> Option<u64> {
        while let Some(&Reverse(d)) = self.timer.peek() {
            if self.is_current(d) {
                return Some(d.ms());
            }
            self.timer.pop();
        }
        None
    }

    /// The message's record was copied to `msg` (compaction).
    pub fn moved(&mut self, k: QueueKey, msg: Loc) {
        if let Some(e) = self.entries.get_mut(&k) {
            e.msg = pack(&mut self.far, k, false, Some(msg));
        }
    }

    /// Settles a busy message, unless requests arrived meanwhile: those are returned (and
    /// cleared) and the message stays busy, for the caller to apply and settle again.
    pub fn settle(
        &mut self,
        k: QueueKey,
        state: Option<Loc>,
        attempts: u32,
        route: u16,
        how: Settle,
    ) -> Result<(), Asks> {
        let e = self.entries.get_mut(&k).ok_or(Asks::default())?;
        if let Some(st) = state {
            e.state = pack(&mut self.far, k, true, Some(st));
        }
        e.attempts = attempts;
        if !e.asks.is_empty() {
            return Err(std::mem::take(&mut e.asks));
        }
        let (slot, due) = match how {
            Settle::Ready => (Slot::Ready, 0),
            Settle::Deferred(t) => (Slot::Deferred, t),
            Settle::Held => (Slot::Held, 0),
        };
        self.leave(k);
        if let Some(e) = self.entries.get_mut(&k) {
            e.route = route;
        }
        self.enter(k, slot, due);
        Ok(())
    }

    /// An admin request. A busy message keeps it for when it settles (returns `None`);
    /// otherwise the message becomes busy and the request is returned with the entry, for the
    /// caller to apply (a flush of a deferred message just makes it ready: `None`).
    pub fn ask(&mut self, k: QueueKey, a: Asks) -> Result<Option<Entry>, ()> {
        let e = self.entries.get_mut(&k).ok_or(())?;
        match e.slot {
            Slot::Busy => {
                e.asks.add(a);
                Ok(None)
            }
            Slot::Deferred | Slot::Ready if a == Asks::FLUSH => {
                self.move_to(k, Slot::Ready, 0);
                Ok(None)
            }
            Slot::Held if a == Asks::FLUSH || a == Asks::HOLD => Ok(None),
            Slot::Ready | Slot::Deferred if a == Asks::RELEASE => Ok(None),
            _ => Ok(self.move_to(k, Slot::Busy, 0)),
        }
    }

    /// Makes ready up to `max` of the deferred messages whose last attempt found `route`'s
    /// next hops unreachable, oldest first, after `after` (exclusive: a message deferred for
    /// the route again meanwhile, say because its state could not be written, is not taken
    /// twice by one release); returns how many, and where to go on (`None`: done).
    pub fn release_route(
        &mut self,
        route: u16,
        after: Option<QueueKey>,
        max: usize,
    ) -> (usize, Option<QueueKey>) {
        let lower = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
        let picked = self
            .deferred
            .get(&route)
            .map(|s| s.keys_from(lower, max))
            .unwrap_or_default();
        for &k in &picked {
            self.move_to(k, Slot::Ready, 0);
        }
        let next = (picked.len() == max)
            .then(|| picked.last().copied())
            .flatten();
        (picked.len(), next)
    }

    /// The oldest deferred message waiting for `route`, made ready (a probe of the route).
    pub fn probe_route(&mut self, route: u16) -> Option<QueueKey> {
        let k = self.deferred.get(&route)?.first_key()?;
        self.move_to(k, Slot::Ready, 0);
        Some(k)
    }

    /// Counts and oldest per phase: O(routes) per phase.
    pub fn census(&self) -> Census {
        let mut c = Census {
            count: self.counts,
            ..Census::default()
        };
        c.oldest[Slot::Ready as usize] = oldest_of(&self.ready);
        c.oldest[Slot::Busy as usize] = self.busy_keys.first().copied();
        c.oldest[Slot::Deferred as usize] = oldest_of(&self.deferred);
        c.oldest[Slot::Held as usize] = self.held.first_key();
        c
    }

    /// Up to `max` keys in id order from `after` (exclusive), in the given phases.
    pub fn keys(&self, slots: &[Slot], after: Option<QueueKey>, max: usize) -> Vec<QueueKey> {
        let lower = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
        match slots {
            [Slot::Ready] => keys_of(&self.ready, lower, max),
            [Slot::Deferred] => keys_of(&self.deferred, lower, max),
            [Slot::Busy] => self
                .busy_keys
                .range((lower, Bound::Unbounded))
                .take(max)
                .copied()
                .collect(),
            [Slot::Held] => self.held.keys_from(lower, max),
            _ => self
                .entries
                .range_from(lower)
                .filter(|(_, e)| slots.contains(&e.slot))
                .take(max)
                .map(|(k, _)| *k)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
