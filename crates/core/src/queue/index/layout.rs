//! How the index keeps its items small: an entry in 40 bytes ([`Stored`], record places
//! in 12 bytes each with a side table for the rare large offset) and a timer item in 16
//! ([`Due`]). A million deferred messages are what these sizes are for (README, "Queue at
//! scale").

use super::{Asks, Entry, Slot};
use crate::spool::Loc;
use crate::types::QueueKey;
use std::collections::HashMap;

/// An [`Entry`] as the index keeps it: 40 bytes (a whole `Entry` takes 56).
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) msg: Pos,
    pub(super) state: Pos,
    pub(super) due_ms: u64,
    pub(super) attempts: u32,
    pub(super) route: u16,
    pub(super) slot: Slot,
    pub(super) asks: Asks,
}

/// A record's place in 12 bytes (a [`Loc`] takes 16). An offset of 4 GiB or more in its
/// segment, which only a commit turn of several huge messages could reach (segments are cut
/// at 64 MiB), is kept whole in [`Index::far`] and marked [`FAR`]; a segment number of
/// [`NO_SEG`], never reached, stands for "no record".
#[derive(Debug, Clone, Copy)]
pub(super) struct Pos {
    seg: u32,
    meta_len: u32,
    off: u32,
}

/// The segment number that stands for "no state record".
const NO_SEG: u32 = u32::MAX;
/// The offset that says "the whole offset is in [`Index::far`]".
const FAR: u32 = u32::MAX;

/// Whole offsets of the records at [`FAR`], by message and record (`true`: its state).
pub(super) type Far = HashMap<(QueueKey, bool), u64>;

/// Drops what `far` holds for record `state` of `k`. `far` is empty in practice, and then
/// nothing is hashed: this runs on every insert and settle.
pub(super) fn forget(far: &mut Far, k: QueueKey, state: bool) {
    if !far.is_empty() {
        far.remove(&(k, state));
    }
}

/// `loc` in 12 bytes, keeping a large offset in `far`.
pub(super) fn pack(far: &mut Far, k: QueueKey, state: bool, loc: Option<Loc>) -> Pos {
    let Some(l) = loc else {
        forget(far, k, state);
        return Pos {
            seg: NO_SEG,
            meta_len: 0,
            off: 0,
        };
    };
    let off = match u32::try_from(l.off) {
        Ok(off) if off != FAR => {
            forget(far, k, state);
            off
        }
        _ => {
            far.insert((k, state), l.off);
            FAR
        }
    };
    Pos {
        seg: l.seg,
        meta_len: l.meta_len,
        off,
    }
}

/// The place [`pack`] kept as `p`.
fn unpack(far: &Far, k: QueueKey, state: bool, p: Pos) -> Option<Loc> {
    if p.seg == NO_SEG {
        return None;
    }
    let off = match p.off {
        FAR => far.get(&(k, state)).copied().unwrap_or(u64::from(FAR)),
        off => u64::from(off),
    };
    Some(Loc {
        seg: p.seg,
        meta_len: p.meta_len,
        off,
    })
}

/// The entry of `k` as the index keeps it.
pub(super) fn stored(far: &mut Far, k: QueueKey, e: &Entry) -> Stored {
    Stored {
        msg: pack(far, k, false, Some(e.msg)),
        state: pack(far, k, true, e.state),
        due_ms: e.due_ms,
        attempts: e.attempts,
        route: e.route,
        slot: e.slot,
        asks: e.asks,
    }
}

/// The entry of `k` from what the index keeps.
pub(super) fn entry_of(far: &Far, k: QueueKey, s: &Stored) -> Entry {
    Entry {
        msg: unpack(far, k, false, s.msg).unwrap_or(Loc {
            seg: NO_SEG,
            meta_len: 0,
            off: 0,
        }),
        state: unpack(far, k, true, s.state),
        due_ms: s.due_ms,
        attempts: s.attempts,
        route: s.route,
        slot: s.slot,
        asks: s.asks,
    }
}

/// A timer item in 16 bytes (a `(u64, QueueKey)` takes 24): the next attempt (Unix ms, kept
/// to 48 bits: good until the year 10889) in the top 48 bits, the key in the low 80 (keys
/// have at most 68: every key comes from an id of the generated form, see
/// [`QueueKey::from_u128`]), so items order by time, then key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due(u128);

impl Due {
    const KEY_BITS: u32 = 80;
    pub(super) const MAX_MS: u64 = (1 << 48) - 1;

    /// The item of `k`, due at `due_ms` (capped to 48 bits, as [`Due::ms`] gives it back).
    pub(super) fn new(due_ms: u64, k: QueueKey) -> Due {
        debug_assert!(
            k.to_u128() >> Due::KEY_BITS == 0,
            "a key of more than 80 bits"
        );
        Due((u128::from(Due::ms_of(due_ms)) << Due::KEY_BITS) | k.to_u128())
    }

    /// `due_ms` as an item holds it.
    pub(super) fn ms_of(due_ms: u64) -> u64 {
        due_ms.min(Due::MAX_MS)
    }

    pub(super) fn ms(self) -> u64 {
        (self.0 >> Due::KEY_BITS) as u64
    }

    pub(super) fn key(self) -> Option<QueueKey> {
        QueueKey::from_u128(self.0 & ((1 << Due::KEY_BITS) - 1))
    }
}
