//! Editing a table in place, for source deltas: removing addresses (backward-shift
//! deletion, records marked [`DEAD`]), adding mailboxes, moving a primary address, and
//! compacting the arena. Mailbox numbers never move.

use super::{hash, record, slot_offset, Table, DEAD};

impl Table {
    /// Removes an address (a source delta): its slot is freed by backward-shift deletion
    /// (linear probing stays exact without tombstones) and its record marked [`DEAD`].
    /// Returns the mailbox it belonged to.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let h = hash(key);
        let off = self.find(key, h).ok()?;
        let mask = self.slots.len() - 1;
        let mut hole = (h as usize) & mask;
        while slot_offset(self.slots[hole]) != off {
            hole = (hole + 1) & mask;
        }
        let m = record(&self.arena, off).map(|(_, m)| m as usize)?;
        self.arena[off + 2 + key.len()..off + 6 + key.len()].copy_from_slice(&DEAD.to_le_bytes());
        self.slots[hole] = 0;
        self.count -= 1;
        self.dead += 6 + key.len();
        // Move back each following slot of the run whose home is not between the hole and it.
        let mut next = (hole + 1) & mask;
        while self.slots[next] != 0 {
            let s = self.slots[next];
            let home = record(&self.arena, slot_offset(s))
                .map(|(k, _)| hash(k) as usize & mask)
                .unwrap_or(next);
            let between = if hole <= next {
                hole < home && home <= next
            } else {
                hole < home || home <= next
            };
            if !between {
                self.slots[hole] = s;
                self.slots[next] = 0;
                hole = next;
            }
            next = (next + 1) & mask;
        }
        Some(m)
    }

    /// Adds a mailbox with no address yet (a source delta); its primary is set by
    /// [`Table::set_primary`] once it has one. Returns its number.
    pub(crate) fn add_mailbox(&mut self) -> usize {
        self.primary.push(DEAD);
        self.primary.len() - 1
    }

    /// Makes `key` (an address of mailbox `m`) its primary address; `false` when `key` is
    /// not one of `m`'s addresses.
    pub(crate) fn set_primary(&mut self, m: usize, key: &[u8]) -> bool {
        let Ok(off) = self.find_key(key) else {
            return false;
        };
        if record(&self.arena, off).map(|(_, n)| n as usize) != Some(m) {
            return false;
        }
        self.primary[m] = off as u32;
        true
    }

    /// Marks mailbox `m` removed (its addresses must be removed already).
    pub(crate) fn kill_mailbox(&mut self, m: usize) {
        if let Some(p) = self.primary.get_mut(m) {
            *p = DEAD;
        }
    }

    /// Bytes of the arena held by records removed since it was built or compacted.
    pub(crate) fn dead_bytes(&self) -> usize {
        self.dead
    }

    /// Rewrites the arena without removed records (offsets change; mailbox numbers do not).
    pub(crate) fn compact(&mut self) {
        let mut t = Table {
            primary: vec![DEAD; self.primary.len()],
            ..Table::default()
        };
        for (key, m) in self.entries() {
            if let Ok(off) = t.push(key, m as u32) {
                if self.primary_address(m).as_bytes() == key {
                    t.primary[m] = off as u32;
                }
            }
        }
        *self = t;
    }

    fn find_key(&self, key: &[u8]) -> Result<usize, usize> {
        if self.slots.is_empty() {
            return Err(0);
        }
        self.find(key, hash(key))
    }
}
