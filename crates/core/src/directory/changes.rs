//! Changes to the directory: applying and rolling back batches, and the change-log
//! bookkeeping every change goes through (ids, logging before the swap, history, snapshots,
//! replay at start-up).

use super::store::{Change, ChangeEntry, ChangeKind, ChangeSummary, Stamp};
use super::view::View;
use super::{batch, BatchReport, Directory, DirectoryError, StateId};
use crate::types::RouteName;
use std::sync::Arc;
use tracing::{info, warn};

impl Directory {
    /// Applies (or with `dry_run`, previews) a batch atomically; recorded in the change log
    /// before it takes effect. Addresses not in the directory are reported and skipped.
    pub fn apply(
        &self,
        rows: &[batch::BatchRow],
        source: &str,
        dry_run: bool,
    ) -> Result<BatchReport, DirectoryError> {
        self.apply_inner(rows, source, dry_run, None)
            .map(|r| r.unwrap_or_default())
    }

    /// Applies change `seq` of a fleet's change log (see `crate::fleet`): the same as
    /// [`Directory::apply`], under the id the fleet gave it, and recorded even when it
    /// changes nothing here, so the node's applied sequence moves on. `Ok(None)` when this
    /// node has it already; an error when `seq` is not the next one.
    pub fn apply_at(
        &self,
        at: &Stamp,
        rows: &[batch::BatchRow],
        source: &str,
    ) -> Result<Option<BatchReport>, DirectoryError> {
        self.apply_inner(rows, source, false, Some(at))
    }

    /// The fleet change applied here last, with the identity PostgreSQL gave it as this
    /// node's change log recorded it (none for changes logged before identities existed).
    pub fn applied_stamp(&self) -> Stamp {
        let seq = self.applied();
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        match h.iter().rev().find(|c| c.id == seq) {
            Some(c) => Stamp {
                seq,
                uid: c.uid.clone(),
                committed: c.committed.clone(),
            },
            None => Stamp::seq(seq),
        }
    }

    /// Checks that fleet change `seq` is the next one for `view`: `Ok(false)` when it is
    /// applied already.
    pub(super) fn in_order(view: &View, seq: u32) -> Result<bool, DirectoryError> {
        if seq <= view.last_change {
            return Ok(false);
        }
        if seq != view.last_change + 1 {
            return Err(DirectoryError::Batch(format!(
                "fleet change {seq} is out of order: this node has applied up to {}",
                view.last_change
            )));
        }
        Ok(true)
    }

    fn apply_inner(
        &self,
        rows: &[batch::BatchRow],
        source: &str,
        dry_run: bool,
        at: Option<&Stamp>,
    ) -> Result<Option<BatchReport>, DirectoryError> {
        let t0 = std::time::Instant::now();
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        let seq = at.map(|a| a.seq);
        if let Some(seq) = seq {
            if !Self::in_order(&view, seq)? {
                return Ok(None);
            }
        }
        let mut report = BatchReport {
            rows: rows.len(),
            ..BatchReport::default()
        };
        let mut target: Vec<(usize, u8)> = Vec::new();
        let mut touched = vec![false; view.table.mailboxes()];
        for r in rows {
            match view.table.mailbox(r.key.as_bytes()) {
                None => {
                    report.not_found_count += 1;
                    if report.not_found.len() < 100 {
                        report.not_found.push(r.address.clone());
                    }
                }
                Some(m) if touched[m] => {}
                Some(m) => {
                    touched[m] = true;
                    if view.states[m] == r.state.raw() {
                        report.already += 1;
                    } else {
                        target.push((m, r.state.raw()));
                    }
                }
            }
        }
        report.changed = target.len();
        if dry_run || (target.is_empty() && seq.is_none()) {
            report.elapsed_ms = t0.elapsed().as_millis() as u64;
            return Ok(Some(report));
        }
        let id = seq.unwrap_or_else(|| self.next_id(&view));
        let entries = target
            .iter()
            .map(|&(m, s)| ChangeEntry {
                address: view.table.primary_address(m).to_string(),
                from: self.states[view.states[m] as usize].as_str().to_string(),
                from_origin: view.origin[m],
                to: self.states[s as usize].as_str().to_string(),
            })
            .collect();
        let change = Change {
            head: ChangeSummary {
                id,
                time: now_rfc3339(),
                kind: ChangeKind::Apply,
                source: source.to_string(),
                rolls_back: None,
                count: report.changed,
                uid: at.and_then(|a| a.uid.clone()),
                committed: at.and_then(|a| a.committed.clone()),
            },
            not_found: report.not_found_count,
            already: report.already,
            entries,
            delta: None,
        };
        self.commit(&view, change, |states, origin| {
            for &(m, s) in &target {
                states[m] = s;
                origin[m] = id;
            }
        })?;
        report.id = Some(id);
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            batch = id,
            source,
            changed = report.changed,
            already = report.already,
            not_found = report.not_found_count,
            ms = report.elapsed_ms,
            "directory batch applied"
        );
        Ok(Some(report))
    }

    /// Undoes batch `id`: mailboxes it moved and nothing moved since go back to their state
    /// before it. Recorded as a change of its own.
    pub fn rollback(&self, id: u32) -> Result<BatchReport, DirectoryError> {
        self.rollback_inner(id, false, None)
            .map(|r| r.unwrap_or_default())
    }

    /// What rolling back batch `id` would do, changing nothing (the checks of
    /// [`Directory::rollback`] included).
    pub fn rollback_preview(&self, id: u32) -> Result<BatchReport, DirectoryError> {
        self.rollback_inner(id, true, None)
            .map(|r| r.unwrap_or_default())
    }

    /// Applies change `seq` of a fleet's change log, a rollback of batch `id` (see
    /// [`Directory::apply_at`] for `seq`). A batch this node cannot roll back (it started
    /// from a later base) is recorded as an empty change: the base already decided those
    /// mailboxes, on every node alike.
    pub fn rollback_at(&self, at: &Stamp, id: u32) -> Result<Option<BatchReport>, DirectoryError> {
        let seq = at.seq;
        match self.rollback_inner(id, false, Some(at)) {
            Err(DirectoryError::Batch(why)) => {
                warn!(
                    change = seq,
                    batch = id,
                    why,
                    "fleet rollback does not apply on this node; recorded as empty"
                );
                let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let view = self.view.load_full();
                if !Self::in_order(&view, seq)? {
                    return Ok(None);
                }
                let change = Change {
                    head: ChangeSummary {
                        id: seq,
                        time: now_rfc3339(),
                        kind: ChangeKind::Rollback,
                        source: String::new(),
                        rolls_back: Some(id),
                        count: 0,
                        uid: at.uid.clone(),
                        committed: at.committed.clone(),
                    },
                    not_found: 0,
                    already: 0,
                    entries: Vec::new(),
                    delta: None,
                };
                self.commit(&view, change, |_, _| {})?;
                Ok(Some(BatchReport::default()))
            }
            other => other,
        }
    }

    fn rollback_inner(
        &self,
        id: u32,
        dry_run: bool,
        at: Option<&Stamp>,
    ) -> Result<Option<BatchReport>, DirectoryError> {
        let t0 = std::time::Instant::now();
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let seq = at.map(|a| a.seq);
        if let Some(seq) = seq {
            if !Self::in_order(&self.view.load(), seq)? {
                return Ok(None);
            }
        }
        let record = {
            let store = self
                .store
                .as_ref()
                .ok_or_else(|| DirectoryError::Batch("no change log".into()))?;
            let store = store.lock().unwrap_or_else(|p| p.into_inner());
            store.find(id)?
        };
        let record =
            record.ok_or_else(|| DirectoryError::Batch(format!("batch {id} not found")))?;
        if record.head.kind != ChangeKind::Apply {
            return Err(DirectoryError::Batch(format!(
                "change {id} is a {:?}, not a batch",
                record.head.kind
            )));
        }
        if self
            .history_snapshot()
            .iter()
            .any(|c| c.rolls_back == Some(id))
        {
            return Err(DirectoryError::Batch(format!(
                "batch {id} was already rolled back"
            )));
        }
        let view = self.view.load_full();
        let mut report = BatchReport {
            rows: record.entries.len(),
            ..BatchReport::default()
        };
        let mut target = Vec::new();
        for e in &record.entries {
            let Some(m) = view.table.mailbox(e.address.as_bytes()) else {
                report.not_found_count += 1;
                continue;
            };
            let Some(s) = StateId::find(&self.states, &e.from) else {
                report.not_found_count += 1;
                continue;
            };
            if view.origin[m] != id {
                report.changed_since += 1;
                continue;
            }
            target.push((m, s.raw(), e.from_origin, e));
        }
        report.changed = target.len();
        if dry_run {
            report.elapsed_ms = t0.elapsed().as_millis() as u64;
            return Ok(Some(report));
        }
        let new_id = seq.unwrap_or_else(|| self.next_id(&view));
        let change = Change {
            head: ChangeSummary {
                id: new_id,
                time: now_rfc3339(),
                kind: ChangeKind::Rollback,
                source: record.head.source.clone(),
                rolls_back: Some(id),
                count: report.changed,
                uid: at.and_then(|a| a.uid.clone()),
                committed: at.and_then(|a| a.committed.clone()),
            },
            not_found: report.not_found_count,
            already: report.changed_since,
            entries: target
                .iter()
                .map(|(m, _, origin, e)| ChangeEntry {
                    address: e.address.clone(),
                    from: self.states[view.states[*m] as usize].as_str().to_string(),
                    from_origin: *origin,
                    to: e.from.clone(),
                })
                .collect(),
            delta: None,
        };
        self.commit(&view, change, |states, origin| {
            for &(m, s, o, _) in &target {
                states[m] = s;
                origin[m] = o;
            }
        })?;
        report.id = Some(new_id);
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            batch = id,
            rollback = new_id,
            restored = report.changed,
            changed_since = report.changed_since,
            "directory batch rolled back"
        );
        Ok(Some(report))
    }

    /// The change history (batches, rollbacks, reloads), oldest first.
    pub fn history_snapshot(&self) -> Vec<ChangeSummary> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn next_id(&self, view: &View) -> u32 {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter()
            .map(|c| c.id)
            .max()
            .unwrap_or(0)
            .max(view.last_change)
            + 1
    }

    pub(super) fn log(&self, change: &Change) -> Result<(), DirectoryError> {
        if let Some(store) = &self.store {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            store.append(change)?;
        }
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change.head.clone());
        Ok(())
    }

    /// Logs `change` durably, then swaps in a view with `edit` applied to copies of the
    /// state arrays (a few MB at 2M mailboxes: milliseconds).
    pub(super) fn commit(
        &self,
        view: &View,
        change: Change,
        edit: impl FnOnce(&mut Vec<u8>, &mut Vec<u32>),
    ) -> Result<(), DirectoryError> {
        let mut states = view.states.clone();
        let mut origin = view.origin.clone();
        edit(&mut states, &mut origin);
        self.log(&change)?;
        self.view.store(Arc::new(View {
            generation: view.generation + 1,
            table: view.table.clone(),
            file_states: view.file_states.clone(),
            routing: view.routing.clone(),
            states,
            origin,
            last_change: change.head.id,
            fingerprint: view.fingerprint,
        }));
        Ok(())
    }

    /// Writes the current view as the snapshot (after reloads and at start-up).
    pub fn persist_snapshot(&self) -> Result<(), DirectoryError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let stored = self.view.load().stored(&self.states);
        let store = store.lock().unwrap_or_else(|p| p.into_inner());
        store.write_snapshot(&stored)?;
        self.deltas_since_snapshot
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

pub(super) fn now_rfc3339() -> String {
    crate::clock::now_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Re-applies a logged change at start-up.
pub(super) fn replay(view: &mut View, change: &Change, states: &[RouteName]) {
    if change.head.kind == ChangeKind::Delta {
        super::delta::replay(view, change, states);
        view.last_change = view.last_change.max(change.head.id);
        return;
    }
    if matches!(change.head.kind, ChangeKind::Reload | ChangeKind::Base) {
        view.last_change = view.last_change.max(change.head.id);
        return;
    }
    for e in &change.entries {
        let (Some(m), Some(s)) = (
            view.table.mailbox(e.address.as_bytes()),
            StateId::find(states, &e.to),
        ) else {
            warn!(change = change.head.id, address = %e.address, "change log entry no longer applies");
            continue;
        };
        view.states[m] = s.raw();
        view.origin[m] = if change.head.kind == ChangeKind::Apply {
            change.head.id
        } else {
            e.from_origin
        };
    }
    view.last_change = view.last_change.max(change.head.id);
}

#[cfg(test)]
mod tests;
