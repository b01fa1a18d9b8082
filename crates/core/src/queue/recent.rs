//! The record of recent per-recipient outcomes: what `coexist trace` (`GET /v1/trace`) and
//! an address search in a console read to say where mail for an address went.
//!
//! Every per-recipient outcome the queue logs (the `status=sent` line of `attempt`, an
//! expiry, an admin's delete) is also added here, with the directory's word on where the
//! route came from (`file …`, `batch N`, `unlisted`) at the time of the attempt. The record
//! lives in memory only: it starts empty at each start and is not shared between nodes (a
//! fleet-wide answer asks every node).
//!
//! It is a ring of at most `queue.recent_outcomes` entries: when it is full, the oldest entry
//! is dropped for each new one, and its buffer never grows past that many entries, so the
//! memory it takes is bounded (see [`RecentOutcome`] for the cost of one entry). A search by
//! address scans the whole ring under its lock. There is no index by address: at the default
//! capacity (100 000) a scan takes about a millisecond, an admin asks rarely, and an index
//! would have to be kept up to date on every outcome of the delivery hot path (and cost
//! memory of its own) for a question asked a few times a day.

use crate::proto::{EnhancedStatus, Failure, LastReply};
use crate::types::{QueueId, RouteName};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Longest reply text an entry keeps, in bytes; a longer one is cut (at a character
/// boundary) and ends with `…`. Bounds the memory of an entry whatever a next hop answers.
pub const MAX_TEXT: usize = 256;

/// Longest origin an entry keeps, in bytes (cut like the reply text): the origin of a file
/// names the file's path.
pub const MAX_ORIGIN: usize = 256;

/// What became of one recipient at one point in its message's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A next hop took it (the log's `status=sent`).
    Delivered,
    /// A temporary failure: it will be tried again.
    Deferred,
    /// A permanent failure: a DSN goes to the sender (unless it asked for none).
    Bounced,
    /// Still not delivered after `queue.max_lifetime`: failed, with a DSN.
    Expired,
    /// Deleted from the queue by an admin while still pending (no DSN).
    Deleted,
    /// Taken over from a dead node (`[shadow]`): this node delivers it now; the entry's
    /// origin names the node and the message's queue id there.
    #[serde(rename = "taken_over")]
    TakenOver,
}

impl Outcome {
    /// The outcome's name: `delivered`, `deferred`, `bounced`, `expired`, `deleted` or
    /// `taken_over`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
            Outcome::Expired => "expired",
            Outcome::Deleted => "deleted",
            Outcome::TakenOver => "taken_over",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reply behind an outcome, as fields: the next hop's reply, or the reply a local error
/// stands for (`451 4.4.1` for an unreachable next hop); an expiry has no code and the
/// status `5.4.7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedReply {
    /// Reply code.
    pub code: Option<u16>,
    /// Enhanced status code.
    pub status: Option<EnhancedStatus>,
    /// The text without code and status (lines separated by `\n`), at most [`MAX_TEXT`]
    /// bytes.
    pub text: Box<str>,
}

/// A recipient's last reply as code, enhanced status and text (whole): the next hop's
/// reply, the one a local error stands for, or an expiry's (no code, `5.4.7`).
pub fn reply_parts(reply: &LastReply) -> (Option<u16>, Option<EnhancedStatus>, String) {
    match reply {
        LastReply::Delivered(r) | LastReply::Failed(Failure::Remote(r)) => {
            (Some(r.code), r.status, r.text().to_string())
        }
        LastReply::Failed(Failure::Local(e)) => {
            let (code, status) = e.code();
            (Some(code), Some(status), e.to_string())
        }
        LastReply::Failed(f @ Failure::Expired(_)) => (None, f.status(), f.to_string()),
    }
}

impl RecordedReply {
    /// The fields of a recipient's last reply.
    pub fn of(reply: &LastReply) -> RecordedReply {
        let (code, status, text) = reply_parts(reply);
        RecordedReply {
            code,
            status,
            text: cut(&text, MAX_TEXT),
        }
    }
}

/// One recipient's outcome, as the record keeps it.
///
/// Cost: 168 bytes in the ring's buffer plus the heap text of the queue id (17 bytes), the
/// recipient, the rewritten recipient (only when rewritten), the origin and the reply text:
/// about 350 bytes for a typical entry with the allocator's overhead, so about 35 MB at the
/// default capacity of 100 000. At most about 1.4 KiB (recipient and rewritten recipient
/// each at most 320 bytes as SMTP limits them, origin and reply text each at most 256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentOutcome {
    /// Unix time (seconds) of the outcome.
    pub time: u64,
    /// The message's queue id.
    pub queue_id: QueueId,
    /// The recipient as the message was received for it.
    pub rcpt: Box<str>,
    /// The recipient as sent to the next hop, when the route rewrote it.
    pub sent_as: Option<Box<str>>,
    /// The route it took (`None`: no route, as for an unroutable recipient, an expiry or a
    /// delete).
    pub route: Option<RouteName>,
    /// The next hop that answered, when one did.
    pub next_hop: Option<SocketAddr>,
    /// What became of it.
    pub outcome: Outcome,
    /// The reply (`None` for a delete).
    pub reply: Option<RecordedReply>,
    /// Where the directory's state for the recipient came from when the route was decided,
    /// as [`crate::directory::Directory::lookup`] gives it: `file …`, `batch N`,
    /// `unlisted`. At most [`MAX_ORIGIN`] bytes.
    pub origin: Box<str>,
}

impl RecentOutcome {
    /// True when the recipient, as received or as sent, is `address` (which must be in lower
    /// case), ignoring case.
    fn is_for(&self, address: &str) -> bool {
        same_address(&self.rcpt, address)
            || self
                .sent_as
                .as_deref()
                .is_some_and(|s| same_address(s, address))
    }
}

/// `a` equals `lower` (already in lower case) ignoring case; without allocating for ASCII.
fn same_address(a: &str, lower: &str) -> bool {
    if a.is_ascii() {
        a.eq_ignore_ascii_case(lower)
    } else {
        a.to_lowercase() == lower
    }
}

/// `s`, cut to at most `max` bytes at a character boundary (ending with `…` when cut).
pub fn cut(s: &str, max: usize) -> Box<str> {
    if s.len() <= max {
        return s.into();
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + ellipsis.len_utf8());
    out.push_str(&s[..end]);
    out.push(ellipsis);
    out.into_boxed_str()
}

/// The bounded record of recent outcomes (see the module docs).
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    ring: Mutex<VecDeque<RecentOutcome>>,
}

impl Recent {
    /// A record of at most `capacity` entries; 0 keeps none (the record is off). Nothing is
    /// allocated until the first entry; the buffer then grows with the entries, up to
    /// `capacity` and no further.
    pub fn new(capacity: usize) -> Recent {
        Recent {
            capacity,
            ring: Mutex::new(VecDeque::new()),
        }
    }

    /// False when the record keeps nothing (`queue.recent_outcomes = 0`): callers then skip
    /// the work of building entries.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Most entries kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.ring().len()
    }

    /// True when no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<RecentOutcome>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry, dropping the oldest when the record is full.
    pub fn record(&self, entry: RecentOutcome) {
        if self.capacity == 0 {
            return;
        }
        let mut ring = self.ring();
        let dropped = if ring.len() >= self.capacity {
            ring.pop_front()
        } else {
            if ring.len() == ring.capacity() {
                // Grow by doubling, but never past the capacity (VecDeque's own growth
                // could round the buffer up to the next power of two).
                let more = ring.len().max(64).min(self.capacity - ring.len());
                ring.reserve_exact(more);
            }
            None
        };
        ring.push_back(entry);
        drop(ring);
        // The dropped entry's strings are freed outside the lock.
        drop(dropped);
    }

    /// The entries for `address` (the recipient as received or as sent, ignoring case; `<>`
    /// around it are ignored) at or after Unix time `since`, newest first.
    pub fn matching(&self, address: &str, since: u64) -> Vec<RecentOutcome> {
        let address = address
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_lowercase();
        self.ring()
            .iter()
            .rev()
            .filter(|e| e.time >= since && e.is_for(&address))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{LocalError, Reply};

    fn entry(n: u64, rcpt: &str) -> RecentOutcome {
        RecentOutcome {
            time: 1_000 + n,
            queue_id: QueueId::from_file_stem(&format!("{n:017X}")).unwrap(),
            rcpt: rcpt.into(),
            sent_as: None,
            route: Some(RouteName("cloud".into())),
            next_hop: Some("127.0.0.1:25".parse().unwrap()),
            outcome: Outcome::Delivered,
            reply: None,
            origin: "batch 1".into(),
        }
    }

    fn times(v: &[RecentOutcome]) -> Vec<u64> {
        v.iter().map(|e| e.time - 1_000).collect()
    }

    #[test]
    fn keeps_at_most_its_capacity_dropping_the_oldest_first() {
        let r = Recent::new(3);
        for n in 0..5 {
            r.record(entry(n, "bob@nhs.test"));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(times(&r.matching("bob@nhs.test", 0)), vec![4, 3, 2]);
    }

    #[test]
    fn the_buffer_never_grows_past_the_capacity() {
        let r = Recent::new(1000);
        for n in 0..5000 {
            r.record(entry(n, "bob@nhs.test"));
        }
        assert_eq!(r.len(), 1000);
        assert_eq!(r.ring().capacity(), 1000);
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let r = Recent::new(0);
        assert!(!r.enabled());
        r.record(entry(1, "bob@nhs.test"));
        assert!(r.is_empty());
        assert!(r.matching("bob@nhs.test", 0).is_empty());
    }

    #[test]
    fn matches_received_or_rewritten_recipient_ignoring_case_and_since() {
        let r = Recent::new(10);
        r.record(entry(1, "Bob@NHS.test"));
        r.record(entry(2, "alice@nhs.test"));
        let mut e = entry(3, "carol@nhs.test");
        e.sent_as = Some("BOB@tenant.mail.onmicrosoft.test".into());
        r.record(e);
        let mut e = entry(4, "Zoë@nhs.test");
        e.sent_as = Some("zoe@nhs.test".into());
        r.record(e);
        assert_eq!(times(&r.matching("bob@nhs.test", 0)), vec![1]);
        assert_eq!(times(&r.matching(" <BOB@nhs.TEST> ", 0)), vec![1]);
        assert_eq!(
            times(&r.matching("bob@tenant.mail.onmicrosoft.test", 0)),
            vec![3]
        );
        assert_eq!(times(&r.matching("ZOË@nhs.test", 0)), vec![4]);
        assert_eq!(times(&r.matching("Zoe@nhs.test", 0)), vec![4]);
        assert!(r.matching("bob@nhs", 0).is_empty(), "no partial matches");
        assert!(r.matching("bob@nhs.test", 1_002).is_empty(), "too old");
        assert_eq!(times(&r.matching("alice@nhs.test", 1_002)), vec![2]);
    }

    #[test]
    fn replies_are_kept_as_fields_and_cut() {
        let remote = LastReply::Failed(Failure::Remote(Reply::multiline(
            554,
            EnhancedStatus::parse("5.6.0"),
            ["Sink: rejecting", "second line"],
        )));
        let r = RecordedReply::of(&remote);
        assert_eq!(r.code, Some(554));
        assert_eq!(r.status, EnhancedStatus::parse("5.6.0"));
        assert_eq!(&*r.text, "Sink: rejecting\nsecond line");
        let local = LastReply::Failed(Failure::Local(LocalError::NoRoute));
        let r = RecordedReply::of(&local);
        assert_eq!(
            (r.code, r.status),
            (Some(550), EnhancedStatus::parse("5.1.1"))
        );
        assert_eq!(&*r.text, "recipient is no longer in the directory");
        let expired = LastReply::Failed(Failure::Expired(None));
        let r = RecordedReply::of(&expired);
        assert_eq!((r.code, r.status), (None, EnhancedStatus::parse("5.4.7")));

        let long = "é".repeat(300);
        let c = cut(&long, MAX_TEXT);
        assert!(c.len() <= MAX_TEXT && c.ends_with('…'), "{}", c.len());
        assert_eq!(&*cut("short", MAX_TEXT), "short");
    }

    #[test]
    fn an_entry_costs_what_the_docs_say() {
        assert_eq!(std::mem::size_of::<RecentOutcome>(), 168);
    }
}
