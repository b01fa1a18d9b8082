//! Rolling back a fleet's batch across later bases (see `crate::fleet`'s rollbacks).
//!
//! A single node rolls a batch back from its own change log ([`Directory::rollback`]). In a
//! fleet that is not enough: a base (an imported file, or every LDAP sync that changed
//! something) may come between the batch and its rollback, and a node that started from a
//! later base never had the batch in its log. So a fleet's rollback is decided once, by the
//! node that commits it, and carried in the change as a restore list: for every mailbox the
//! batch moved and nothing decided since (its origin is still the batch; a later batch, or
//! the source changing that mailbox's state, makes it something else), its state and origin
//! before the batch. Every node applies that list ([`Directory::restore_at`]), the same list,
//! whatever history it has. Bases keep each mailbox's origin (a mailbox whose row the source
//! did not change keeps the batch as its origin), so a batch stays undoable across them.
//!
//! What the committing node needs is the batch's undo entries (address, state and origin
//! before it): its own change log has them when it applied the batch; otherwise the fleet
//! keeps them in PostgreSQL, written with the batch ([`Directory::undo_entries`]).

use super::store::{Change, ChangeEntry, ChangeKind, ChangeSummary, Stamp};
use super::{batch, changes::now_rfc3339, BatchReport, Directory, DirectoryError, StateId};
use tracing::{info, warn};

/// One mailbox a rollback restores: its primary address now, and the state and origin it
/// goes back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// Primary address of the mailbox (as the directory has it now).
    pub address: String,
    /// Route name it goes back to.
    pub state: String,
    /// The origin it goes back to (the change that had decided it before the batch).
    pub origin: u32,
}

impl Directory {
    /// The undo entries applying `rows` would record now (one per mailbox it moves: primary
    /// address, state and origin before, state after), changing nothing.
    pub fn undo_entries(&self, rows: &[batch::BatchRow]) -> Vec<ChangeEntry> {
        let view = self.view.load_full();
        let mut touched = vec![false; view.table.mailboxes()];
        let mut out = Vec::new();
        for r in rows {
            let Some(m) = view.table.mailbox(r.key.as_bytes()) else {
                continue;
            };
            if std::mem::replace(&mut touched[m], true) || view.states[m] == r.state.raw() {
                continue;
            }
            out.push(ChangeEntry {
                address: view.table.primary_address(m).to_string(),
                from: self.state_name(view.states[m]),
                from_origin: view.origin[m],
                to: self.state_name(r.state.raw()),
            });
        }
        out
    }

    /// Batch `id`'s undo entries from this node's change log, if it has the batch there,
    /// with the batch's identity in a fleet's log (`None` when logged without one): the
    /// caller checks it is the very batch it means, since a log that moved back may have
    /// given `id` to another change.
    #[allow(clippy::type_complexity)]
    pub fn logged_batch(
        &self,
        id: u32,
    ) -> Result<Option<(Option<String>, Vec<ChangeEntry>)>, DirectoryError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let record = store.lock().unwrap_or_else(|p| p.into_inner()).find(id)?;
        Ok(record
            .filter(|c| c.head.kind == ChangeKind::Apply)
            .map(|c| (c.head.uid, c.entries)))
    }

    /// What rolling back batch `id` (its undo `entries`) does now: the report, and the
    /// mailboxes to restore (those whose origin is still the batch).
    pub fn restore_plan(&self, id: u32, entries: &[ChangeEntry]) -> (BatchReport, Vec<Restore>) {
        let view = self.view.load_full();
        let mut report = BatchReport {
            rows: entries.len(),
            ..BatchReport::default()
        };
        let mut out = Vec::new();
        for e in entries {
            let Some(m) = view.table.mailbox(e.address.as_bytes()) else {
                report.not_found_count += 1;
                continue;
            };
            if StateId::find(&self.states, &e.from).is_none() {
                report.not_found_count += 1;
                continue;
            }
            if view.origin[m] != id {
                report.changed_since += 1;
                continue;
            }
            out.push(Restore {
                address: view.table.primary_address(m).to_string(),
                state: e.from.clone(),
                origin: e.from_origin,
            });
        }
        report.changed = out.len();
        (report, out)
    }

    /// Applies fleet change `at`, the rollback of batch `id` as the restore list
    /// `restores` (see the module doc). A mailbox whose origin is no longer the batch is
    /// left alone (it cannot be, on a node that applied the same log). `Ok(None)` when this
    /// node has the change already.
    pub fn restore_at(
        &self,
        at: &Stamp,
        id: u32,
        source: &str,
        restores: &[Restore],
    ) -> Result<Option<BatchReport>, DirectoryError> {
        let seq = at.seq;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        if !Self::in_order(&view, seq)? {
            return Ok(None);
        }
        let mut report = BatchReport {
            rows: restores.len(),
            ..BatchReport::default()
        };
        let mut target = Vec::new();
        for r in restores {
            let (Some(m), Some(s)) = (
                view.table.mailbox(r.address.as_bytes()),
                StateId::find(&self.states, &r.state),
            ) else {
                report.not_found_count += 1;
                continue;
            };
            if view.origin[m] != id {
                warn!(change = seq, batch = id, address = %r.address, "fleet rollback: mailbox changed since on this node; left alone");
                report.changed_since += 1;
                continue;
            }
            target.push((m, s.raw(), r));
        }
        report.changed = target.len();
        let change = Change {
            head: ChangeSummary {
                id: seq,
                time: now_rfc3339(),
                kind: ChangeKind::Rollback,
                source: source.to_string(),
                rolls_back: Some(id),
                count: report.changed,
                uid: at.uid.clone(),
                committed: at.committed.clone(),
            },
            not_found: report.not_found_count,
            already: report.changed_since,
            entries: target
                .iter()
                .map(|(m, _, r)| ChangeEntry {
                    address: r.address.clone(),
                    from: self.state_name(view.states[*m]),
                    from_origin: r.origin,
                    to: r.state.clone(),
                })
                .collect(),
            delta: None,
        };
        self.commit(&view, change, |states, origin| {
            for &(m, s, r) in &target {
                states[m] = s;
                origin[m] = r.origin;
            }
        })?;
        report.id = Some(seq);
        info!(
            batch = id,
            rollback = seq,
            restored = report.changed,
            "directory batch rolled back (fleet restore list)"
        );
        Ok(Some(report))
    }

    fn state_name(&self, s: u8) -> String {
        self.states
            .get(s as usize)
            .map(|r| r.as_str().to_string())
            .unwrap_or_default()
    }
}

/// The body of a fleet rollback change that carries its restore list: a marker line, then
/// one `address TAB state TAB origin` line per mailbox. (Rollbacks of earlier versions
/// have an empty body: each node computed them from its own log.)
pub fn encode_restores(restores: &[Restore]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + restores.len() * 48);
    out.extend_from_slice(RESTORE_MARK);
    for r in restores {
        out.extend_from_slice(format!("{}\t{}\t{}\n", r.address, r.state, r.origin).as_bytes());
    }
    out
}

/// Why a restore list or undo list read back (from a change's body, from PostgreSQL) is
/// not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadList {
    /// Its bytes are not UTF-8.
    #[error("{what} is not UTF-8")]
    NotUtf8 {
        /// `restore list` or `undo entries`.
        what: &'static str,
    },
    /// A line without the fields it needs.
    #[error("{what} line {line}: not {fields}")]
    Fields {
        /// `restore list` or `undo`.
        what: &'static str,
        /// 1-based line.
        line: usize,
        /// The fields a line has.
        fields: &'static str,
    },
    /// An origin that is not a number.
    #[error("{what} line {line}: bad origin {origin:?}")]
    Origin {
        /// `restore list` or `undo`.
        what: &'static str,
        /// 1-based line.
        line: usize,
        /// What was there.
        origin: String,
    },
}

/// The first line of a rollback body with a restore list.
const RESTORE_MARK: &[u8] = b"#restore\n";

/// The restore list of a rollback change's body; `None` for a body without one (a rollback
/// of an earlier version); an error for a damaged one.
pub fn decode_restores(body: &[u8]) -> Result<Option<Vec<Restore>>, BadList> {
    const WHAT: &str = "restore list";
    let Some(rest) = body.strip_prefix(RESTORE_MARK) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(rest).map_err(|_| BadList::NotUtf8 { what: WHAT })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let mut f = line.split('\t');
        let (Some(address), Some(state), Some(origin), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(BadList::Fields {
                what: WHAT,
                line: i + 1,
                fields: "address, state, origin",
            });
        };
        let origin = origin.parse().map_err(|_| BadList::Origin {
            what: WHAT,
            line: i + 1,
            origin: origin.to_string(),
        })?;
        out.push(Restore {
            address: address.to_string(),
            state: state.to_string(),
            origin,
        });
    }
    Ok(Some(out))
}

/// The undo entries of a batch as the fleet keeps them in PostgreSQL: one
/// `address TAB from TAB from_origin TAB to` line per mailbox.
pub fn encode_undo(entries: &[ChangeEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 48);
    for e in entries {
        out.extend_from_slice(
            format!("{}\t{}\t{}\t{}\n", e.address, e.from, e.from_origin, e.to).as_bytes(),
        );
    }
    out
}

/// [`encode_undo`] read back.
pub fn decode_undo(body: &[u8]) -> Result<Vec<ChangeEntry>, BadList> {
    let text = std::str::from_utf8(body).map_err(|_| BadList::NotUtf8 {
        what: "undo entries",
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let [address, from, origin, to] = f[..] else {
            return Err(BadList::Fields {
                what: "undo",
                line: i + 1,
                fields: "address, from, origin, to",
            });
        };
        out.push(ChangeEntry {
            address: address.to_string(),
            from: from.to_string(),
            from_origin: origin.parse().map_err(|_| BadList::Origin {
                what: "undo",
                line: i + 1,
                origin: origin.to_string(),
            })?,
            to: to.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_lists_and_undo_entries_round_trip() {
        let r = vec![
            Restore {
                address: "a@nhs.test".into(),
                state: "onprem".into(),
                origin: 0,
            },
            Restore {
                address: "b@nhs.test".into(),
                state: "cloud".into(),
                origin: 7,
            },
        ];
        assert_eq!(decode_restores(&encode_restores(&r)).unwrap(), Some(r));
        assert_eq!(decode_restores(b"").unwrap(), None, "an earlier rollback");
        assert_eq!(decode_restores(RESTORE_MARK).unwrap(), Some(Vec::new()));
        assert!(decode_restores(b"#restore\na@nhs.test\tcloud\n").is_err());
        let u = vec![ChangeEntry {
            address: "a@nhs.test".into(),
            from: "onprem".into(),
            from_origin: 3,
            to: "cloud".into(),
        }];
        assert_eq!(decode_undo(&encode_undo(&u)).unwrap(), u);
        assert!(decode_undo(b"a\tb\tx\tc\n").is_err());
    }
}
