//! An ordered map kept as a list of sorted chunks of at most [`CAP`] items: what the
//! queue's index keeps its entries and its per-phase sets in, and what the spool's replay
//! gathers the queued messages in.
//!
//! Written here rather than taken from `std` or a crate because of how the queue's keys
//! arrive: queue ids grow with time, so nearly every insert is past the last key. The
//! standard `BTreeMap` splits a full leaf at that point and leaves every leaf about half
//! full (6 of 11 items), which made a million queued messages cost about 195 bytes each.
//! Here an insert past the end fills the last chunk and then starts a new one, so chunks stay
//! full. Ids made by concurrent sessions reach the spool slightly out of order: an insert
//! into a full chunk moves an item to a neighbour with room (the last chunk, still filling,
//! is the usual one); with no room on either side, an insert near the end of the last chunk
//! splits it where the key goes, leaving it nearly full, and any other splits the chunk in
//! two. A chunk that falls under a quarter full is merged with a neighbour. Lookups are two
//! binary searches (the chunk by its last key, then the item); removing the oldest item
//! moves at most one chunk's items. The crates offering two-level B-trees split on append as
//! `BTreeMap` does.

use std::ops::Bound;

/// Most items in one chunk: small enough that inserting or removing inside it moves little,
/// large enough that the per-chunk overhead (about 40 bytes) is negligible.
const CAP: usize = 128;

/// An ordered map from `K` to `V`.
#[derive(Debug, Clone)]
pub struct ChunkMap<K, V> {
    /// Non-empty chunks, each sorted, each holding keys above the previous chunk's.
    chunks: Vec<Vec<(K, V)>>,
    len: usize,
}

impl<K, V> Default for ChunkMap<K, V> {
    fn default() -> Self {
        ChunkMap {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: Ord + Copy, V> ChunkMap<K, V> {
    /// Items held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `k` or would: the first whose last key is not below `k`
    /// (`chunks.len()` when `k` is above every key).
    fn chunk_of(&self, k: &K) -> usize {
        self.chunks
            .partition_point(|c| c.last().is_some_and(|(last, _)| last < k))
    }

    /// Where `k` is: chunk and place in it.
    fn find(&self, k: &K) -> Option<(usize, usize)> {
        let i = self.chunk_of(k);
        let j = self
            .chunks
            .get(i)?
            .binary_search_by(|(x, _)| x.cmp(k))
            .ok()?;
        Some((i, j))
    }

    /// The value of `k`.
    pub fn get(&self, k: &K) -> Option<&V> {
        let (i, j) = self.find(k)?;
        Some(&self.chunks[i][j].1)
    }

    /// The value of `k`, to change.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let (i, j) = self.find(k)?;
        Some(&mut self.chunks[i][j].1)
    }

    /// True when `k` is held.
    pub fn contains_key(&self, k: &K) -> bool {
        self.find(k).is_some()
    }

    /// Puts `v` under `k`; returns the value it replaces.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.chunk_of(&k);
        if i == self.chunks.len() {
            // Above every key (the usual case): fill the last chunk, then start another.
            match self.chunks.last_mut() {
                Some(c) if c.len() < CAP => c.push((k, v)),
                _ => {
                    let mut c = Vec::with_capacity(CAP);
                    c.push((k, v));
                    self.chunks.push(c);
                }
            }
            self.len += 1;
            return None;
        }
        let j = match self.chunks[i].binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(j) => return Some(std::mem::replace(&mut self.chunks[i][j].1, v)),
            Err(j) => j,
        };
        self.len += 1;
        if self.chunks[i].len() < CAP {
            self.chunks[i].insert(j, (k, v));
        } else if j == 0 && i > 0 && self.chunks[i - 1].len() < CAP {
            // Between two chunks: the end of the previous one has room.
            self.chunks[i - 1].push((k, v));
        } else if i + 1 < self.chunks.len() && self.chunks[i + 1].len() < CAP {
            // The next chunk has room (say the last one, still filling): this chunk's last
            // item moves there, so both stay full instead of two half-full ones.
            let last = self.chunks[i].pop().expect("a full chunk");
            self.chunks[i + 1].insert(0, last);
            self.chunks[i].insert(j, (k, v));
        } else if i > 0 && self.chunks[i - 1].len() < CAP {
            // The previous chunk has room: this chunk's first item moves there (`j > 0`
            // here, the case `j == 0` is above).
            let first = self.chunks[i].remove(0);
            self.chunks[i - 1].push(first);
            self.chunks[i].insert(j - 1, (k, v));
        } else if i + 1 == self.chunks.len() && j > CAP / 2 {
            // Near the end of the last chunk: the keys above `k` start the next chunk, which
            // the keys still to come fill.
            let c = &mut self.chunks[i];
            let mut right = Vec::with_capacity(CAP);
            right.extend(c.drain(j..));
            c.push((k, v));
            self.chunks.push(right);
        } else {
            let c = &mut self.chunks[i];
            let mut right = Vec::with_capacity(CAP);
            right.extend(c.drain(CAP / 2..));
            if j <= CAP / 2 {
                c.insert(j, (k, v));
            } else {
                right.insert(j - CAP / 2, (k, v));
            }
            self.chunks.insert(i + 1, right);
        }
        None
    }

    /// Takes `k` out; returns its value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let (i, j) = self.find(k)?;
        let (_, v) = self.chunks[i].remove(j);
        self.len -= 1;
        let n = self.chunks[i].len();
        if n == 0 {
            self.chunks.remove(i);
        } else if n < CAP / 4 {
            // Into the previous chunk when both fit in one, else take the next one in.
            if i > 0 && self.chunks[i - 1].len() + n <= CAP {
                let c = self.chunks.remove(i);
                self.chunks[i - 1].extend(c);
            } else if i + 1 < self.chunks.len() && self.chunks[i + 1].len() + n <= CAP {
                let next = self.chunks.remove(i + 1);
                self.chunks[i].extend(next);
            }
        }
        Some(v)
    }

    /// The item with the lowest key.
    pub fn first(&self) -> Option<(&K, &V)> {
        self.chunks.first()?.first().map(|(k, v)| (k, v))
    }

    /// The items from `lower` on, in key order.
    pub fn range_from(&self, lower: Bound<&K>) -> impl Iterator<Item = (&K, &V)> + '_ {
        let (i, j) = match lower {
            Bound::Unbounded => (0, 0),
            Bound::Included(k) => {
                let i = self.chunk_of(k);
                let j = self
                    .chunks
                    .get(i)
                    .map_or(0, |c| c.partition_point(|(x, _)| x < k));
                (i, j)
            }
            Bound::Excluded(k) => {
                let i = self
                    .chunks
                    .partition_point(|c| c.last().is_some_and(|(last, _)| last <= k));
                let j = self
                    .chunks
                    .get(i)
                    .map_or(0, |c| c.partition_point(|(x, _)| x <= k));
                (i, j)
            }
        };
        let head = self.chunks.get(i).map(|c| &c[j..]).unwrap_or(&[]);
        head.iter()
            .chain(self.chunks.iter().skip(i + 1).flatten())
            .map(|(k, v)| (k, v))
    }

    /// Every item, in key order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.range_from(Bound::Unbounded)
    }
}

impl<K, V> IntoIterator for ChunkMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<Vec<(K, V)>>>;

    /// Every item, in key order; each chunk is freed once its items are taken.
    fn into_iter(self) -> Self::IntoIter {
        self.chunks.into_iter().flatten()
    }
}

/// An ordered set kept in chunks (see [`ChunkMap`]).
pub type ChunkSet<K> = ChunkMap<K, ()>;

impl<K: Ord + Copy> ChunkMap<K, ()> {
    /// Adds `k`; false when it was there.
    pub fn add(&mut self, k: K) -> bool {
        self.insert(k, ()).is_none()
    }

    /// Takes `k` out; false when it was not there.
    pub fn take(&mut self, k: &K) -> bool {
        self.remove(k).is_some()
    }

    /// The lowest key.
    pub fn first_key(&self) -> Option<K> {
        self.first().map(|(k, _)| *k)
    }

    /// Up to `max` keys from `lower` on, in order.
    pub fn keys_from(&self, lower: Bound<&K>, max: usize) -> Vec<K> {
        self.range_from(lower).take(max).map(|(k, _)| *k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The same operations on a `ChunkMap` and a `BTreeMap` give the same answers.
    #[test]
    fn behaves_as_a_btree_map_under_mixed_operations() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut ours: ChunkMap<u32, u32> = ChunkMap::default();
        let mut std: BTreeMap<u32, u32> = BTreeMap::new();
        let mut next = 0u32;
        for step in 0..60_000u32 {
            match rng.u32(0..10) {
                // Mostly appends, as queue ids arrive.
                0..=4 => {
                    next += rng.u32(1..4);
                    assert_eq!(ours.insert(next, step), std.insert(next, step));
                }
                5 => {
                    let k = rng.u32(0..=next);
                    assert_eq!(ours.insert(k, step), std.insert(k, step));
                }
                6..=7 => {
                    // Oldest first, as deliveries end.
                    let k = std.keys().next().copied().unwrap_or(0);
                    assert_eq!(ours.remove(&k), std.remove(&k));
                }
                _ => {
                    let k = rng.u32(0..=next);
                    assert_eq!(ours.remove(&k), std.remove(&k));
                }
            }
            if step % 997 == 0 {
                check(&ours, &std, next);
            }
        }
        check(&ours, &std, next);
        assert!(ours.clone().into_iter().eq(std.clone()));
        // Everything out, in random order.
        let mut keys: Vec<u32> = std.keys().copied().collect();
        rng.shuffle(&mut keys);
        for k in keys {
            assert_eq!(ours.remove(&k), std.remove(&k));
        }
        assert!(ours.is_empty() && ours.chunks.is_empty());
    }

    fn check(ours: &ChunkMap<u32, u32>, std: &BTreeMap<u32, u32>, top: u32) {
        assert_eq!(ours.len(), std.len());
        assert!(ours.iter().eq(std.iter()));
        assert_eq!(ours.first(), std.iter().next());
        for k in [0, top / 3, top / 2, top] {
            assert!(ours
                .range_from(Bound::Included(&k))
                .eq(std.range((Bound::Included(k), Bound::Unbounded))));
            assert!(ours
                .range_from(Bound::Excluded(&k))
                .eq(std.range((Bound::Excluded(k), Bound::Unbounded))));
            assert_eq!(ours.get(&k), std.get(&k));
        }
        for c in &ours.chunks {
            assert!(!c.is_empty() && c.len() <= CAP);
            assert!(c.windows(2).all(|w| w[0].0 < w[1].0));
        }
        assert!(ours
            .chunks
            .windows(2)
            .all(|w| w[0].last().unwrap().0 < w[1][0].0));
    }

    /// Keys that arrive nearly in order (each at most a few places early) still fill their
    /// chunks.
    #[test]
    fn keys_nearly_in_order_fill_the_chunks() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut m: ChunkSet<u64> = ChunkSet::default();
        let mut keys: Vec<u64> = (0..100_000).collect();
        for w in keys.chunks_mut(8) {
            rng.shuffle(w);
        }
        for k in keys {
            m.add(k);
        }
        assert_eq!(m.len(), 100_000);
        let full = m.len() as f64 / (m.chunks.len() * CAP) as f64;
        assert!(full > 0.9, "chunks {:.0} % full", full * 100.0);
        assert!(m.iter().map(|(k, _)| *k).eq(0..100_000));
    }

    /// Keys made by many sessions at once reach the map up to 64 places late (each waits a
    /// random time before it is inserted): the chunks still fill, because a key for a full
    /// chunk pushes that chunk's last key into the next one when it has room.
    #[test]
    fn keys_from_many_sessions_fill_the_chunks() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut m: ChunkSet<u64> = ChunkSet::default();
        let mut waiting = std::collections::BTreeMap::new();
        for (t, k) in (0..200_000u64).enumerate() {
            waiting.insert((t as u64 + rng.u64(0..64), k), ());
            while let Some(e) = waiting.first_entry() {
                if e.key().0 > t as u64 {
                    break;
                }
                m.add(e.remove_entry().0 .1);
            }
        }
        for ((_, k), ()) in waiting {
            m.add(k);
        }
        assert_eq!(m.len(), 200_000);
        let full = m.len() as f64 / (m.chunks.len() * CAP) as f64;
        assert!(full > 0.9, "chunks {:.0} % full", full * 100.0);
        assert!(m.iter().map(|(k, _)| *k).eq(0..200_000));
    }

    /// Keys that arrive in order fill their chunks.
    #[test]
    fn keys_in_order_fill_the_chunks() {
        let mut m: ChunkSet<u64> = ChunkSet::default();
        for k in 0..10_000 {
            m.add(k);
        }
        assert_eq!(m.chunks.len(), 10_000usize.div_ceil(CAP));
        assert_eq!(m.keys_from(Bound::Excluded(&9_997), 5), vec![9_998, 9_999]);
        assert_eq!(m.first_key(), Some(0));
        assert!(m.take(&0) && !m.take(&0));
        assert_eq!(m.first_key(), Some(1));
    }
}
