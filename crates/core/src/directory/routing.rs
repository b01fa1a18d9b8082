//! Per-mailbox routing addresses: the address a route with `rewrite_domain` sends a
//! mailbox's mail to (its `targetAddress` in Active Directory, typically
//! `alias@TENANT.mail.onmicrosoft.com`), instead of rewriting the domain of the address
//! the mail came for (see `crate::route`).
//!
//! A routing address belongs to a mailbox, not to an address: every alias of the mailbox
//! shares it. Stored compactly for millions of mailboxes: one byte arena of the addresses
//! and one end offset per mailbox (an empty span is "none"); a directory where no mailbox
//! has one holds two empty vectors.

/// The routing address of each mailbox of a directory (mailbox numbers as in its
/// [`super::table::Table`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutingAddresses {
    /// Every routing address (as [`crate::types::Address`] displays it), concatenated.
    pub(crate) arena: Vec<u8>,
    /// Per mailbox, the end of its routing address in `arena` (it starts where the previous
    /// mailbox's ends); an empty span means none. Empty when no mailbox has one.
    pub(crate) ends: Vec<u32>,
}

impl RoutingAddresses {
    /// The routing address of mailbox `m`, when it has one.
    pub fn get(&self, m: usize) -> Option<&str> {
        let end = *self.ends.get(m)? as usize;
        let start = match m {
            0 => 0,
            _ => self.ends[m - 1] as usize,
        };
        let bytes = self.arena.get(start..end)?;
        match bytes {
            [] => None,
            _ => std::str::from_utf8(bytes).ok(),
        }
    }

    /// True when no mailbox has a routing address.
    pub fn is_empty(&self) -> bool {
        self.arena.is_empty()
    }

    /// Number of mailboxes that have a routing address.
    pub fn count(&self) -> usize {
        let mut start = 0;
        self.ends
            .iter()
            .filter(|&&end| {
                let some = end > start;
                start = end;
                some
            })
            .count()
    }

    /// These routing addresses for `mailboxes` mailboxes (more than before when a delta
    /// added some), with `changes` (mailbox → its routing address now) made. Rebuilt whole:
    /// spans are contiguous. `None` when the arena would exceed 4 GiB.
    pub(crate) fn edited(
        &self,
        mailboxes: usize,
        changes: &std::collections::HashMap<usize, Option<String>>,
    ) -> Option<RoutingAddresses> {
        if self.is_empty() && changes.values().all(Option::is_none) {
            return Some(RoutingAddresses::default());
        }
        let mut arena = Vec::with_capacity(self.arena.len() + 64 * changes.len());
        let mut ends = Vec::with_capacity(mailboxes);
        for m in 0..mailboxes {
            let now = match changes.get(&m) {
                Some(c) => c.as_deref(),
                None => self.get(m),
            };
            if let Some(a) = now {
                arena.extend_from_slice(a.as_bytes());
            }
            ends.push(u32::try_from(arena.len()).ok()?);
        }
        Some(RoutingAddresses { arena, ends })
    }

    /// Checks the invariants of routing addresses read from disk, for a table of
    /// `mailboxes` mailboxes.
    pub(crate) fn is_consistent(&self, mailboxes: usize) -> bool {
        if self.ends.is_empty() {
            return self.arena.is_empty();
        }
        let mut start = 0usize;
        self.ends.len() == mailboxes
            && self.ends.last().map(|&e| e as usize) == Some(self.arena.len())
            && self.ends.iter().all(|&end| {
                let end = end as usize;
                let ok = self
                    .arena
                    .get(start..end)
                    .is_some_and(|b| std::str::from_utf8(b).is_ok());
                start = end;
                ok
            })
    }
}

/// Collects routing addresses while a directory is parsed, in any order of mailboxes (an
/// alias row may give its mailbox's address after the primary's row left it empty).
#[derive(Default)]
pub(crate) struct Builder {
    /// Addresses in the order they were given.
    arena: Vec<u8>,
    /// Per mailbox, its span in `arena` (`(0, 0)`: none so far).
    spans: Vec<(u32, u32)>,
}

impl Builder {
    /// Registers mailbox number `spans.len()` (mailboxes are numbered in order).
    pub(crate) fn add_mailbox(&mut self) {
        self.spans.push((0, 0));
    }

    /// Mailbox `m`'s routing address so far.
    pub(crate) fn get(&self, m: usize) -> Option<&str> {
        let &(start, end) = self.spans.get(m)?;
        let bytes = self.arena.get(start as usize..end as usize)?;
        match bytes {
            [] => None,
            _ => std::str::from_utf8(bytes).ok(),
        }
    }

    /// Gives mailbox `m` (registered) its routing address; `false` when the arena would
    /// exceed 4 GiB.
    pub(crate) fn set(&mut self, m: usize, address: &str) -> bool {
        let start = self.arena.len();
        let Ok(end) = u32::try_from(start + address.len()) else {
            return false;
        };
        self.arena.extend_from_slice(address.as_bytes());
        if let Some(span) = self.spans.get_mut(m) {
            *span = (start as u32, end);
        }
        true
    }

    /// The routing addresses in mailbox order.
    pub(crate) fn finish(self) -> RoutingAddresses {
        if self.arena.is_empty() {
            return RoutingAddresses::default();
        }
        let mut arena = Vec::with_capacity(self.arena.len());
        let mut ends = Vec::with_capacity(self.spans.len());
        for (start, end) in self.spans {
            arena.extend_from_slice(&self.arena[start as usize..end as usize]);
            ends.push(arena.len() as u32);
        }
        RoutingAddresses { arena, ends }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_orders_by_mailbox_and_empty_is_none() {
        let mut b = Builder::default();
        for _ in 0..3 {
            b.add_mailbox();
        }
        assert!(b.set(2, "c@t.test"));
        assert!(b.set(0, "a@t.test"));
        assert_eq!(b.get(0), Some("a@t.test"));
        assert_eq!(b.get(1), None);
        let r = b.finish();
        assert_eq!(r.arena, b"a@t.testc@t.test");
        assert_eq!(r.ends, vec![8, 8, 16]);
        assert_eq!(
            (r.get(0), r.get(1), r.get(2), r.get(3)),
            (Some("a@t.test"), None, Some("c@t.test"), None)
        );
        assert_eq!(r.count(), 2);
        assert!(r.is_consistent(3));
        assert!(!r.is_consistent(4));

        let mut b = Builder::default();
        b.add_mailbox();
        let none = b.finish();
        assert!(none.is_empty() && none.ends.is_empty(), "nothing stored");
        assert_eq!(none.get(0), None);
        assert!(none.is_consistent(1));
        let bad_utf8 = (vec![0xff, b'y'], vec![1, 2]);
        for (arena, ends) in [
            (b"x".to_vec(), vec![2]),
            (b"xy".to_vec(), vec![5, 2]),
            (b"xy".to_vec(), vec![1, 0, 2]),
            bad_utf8,
        ] {
            let bad = RoutingAddresses { arena, ends };
            assert!(!bad.is_consistent(bad.ends.len()), "{bad:?}");
        }
    }
}
