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
        store.write_snapshot(&stored)
    }
}

pub(super) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Re-applies a logged change at start-up.
pub(super) fn replay(view: &mut View, change: &Change, states: &[RouteName]) {
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
mod tests {
    use super::super::tests::{a, cfg, rows, states};
    use super::*;
    use crate::directory::Resolution;
    use crate::types::RouteName;
    use std::path::{Path, PathBuf};

    #[test]
    fn batches_apply_roll_back_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), "address,state,mailbox\na@nhs.test,onprem,m1\nalias@nhs.test,onprem,m1\nb@nhs.test,onprem,\nc@nhs.test,cloud,\n").unwrap();
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        assert_eq!(d.resolve(&a("ALIAS@nhs.test")), onprem);
        let preview = d
            .apply(
                &rows(
                    "EmailAddress\na@nhs.test\nc@nhs.test\nz@nhs.test\n",
                    "cloud",
                ),
                "b.csv",
                true,
            )
            .unwrap();
        assert_eq!(
            (
                preview.id,
                preview.changed,
                preview.already,
                preview.not_found_count
            ),
            (None, 1, 1, 1)
        );
        assert_eq!(
            d.resolve(&a("a@nhs.test")),
            onprem,
            "dry run changes nothing"
        );
        let r = d
            .apply(
                &rows(
                    "EmailAddress\na@nhs.test\nc@nhs.test\nz@nhs.test\n",
                    "cloud",
                ),
                "b.csv",
                false,
            )
            .unwrap();
        assert_eq!(r.id, Some(1));
        assert_eq!(
            d.resolve(&a("alias@nhs.test")),
            cloud,
            "aliases move with their mailbox"
        );
        assert_eq!(d.lookup(&a("a@nhs.test")).origin, "batch 1");
        assert_eq!(d.resolve(&a("z@nhs.test")), Resolution::Reject);
        drop(d);

        // Restart: snapshot unchanged, batch replayed from the log.
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        let rb = d.rollback(1).unwrap();
        assert_eq!((rb.id, rb.changed), (Some(2), 1));
        assert_eq!(d.resolve(&a("alias@nhs.test")), onprem);
        assert_eq!(
            d.lookup(&a("a@nhs.test")).origin,
            format!("file {}", dir.path().join("d.csv").display())
        );
        assert!(d.rollback(1).is_err(), "a batch is rolled back once");
        drop(d);
        let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), onprem);
        assert_eq!(d.history_snapshot().len(), 2);
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "b2.csv",
            false,
        )
        .unwrap();
        drop(d);

        // A route added that sorts first shifts the state numbers: the snapshot is renumbered.
        let more = vec![
            RouteName("archive".into()),
            RouteName("cloud".into()),
            RouteName("onprem".into()),
        ];
        let d = Directory::open(&cfg(dir.path(), "reject"), more).unwrap();
        assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
        assert_eq!(d.resolve(&a("a@nhs.test")), onprem);
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("store").join("changes.log")
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(log_file(dir)).unwrap().len()
    }

    /// Writes `bytes` as the change log, fsynced, as a crash would have left it.
    fn put_log(dir: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::File::create(log_file(dir)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }

    const ABC: &str = "address,state\na@nhs.test,onprem\nb@nhs.test,onprem\nc@nhs.test,onprem\n";

    /// Item 7: an append cut short by a crash leaves a torn record at the end of the log. At
    /// the next start it is cut off (the file shrinks back to the last whole record), and a
    /// batch applied after that survives the following restart and can be rolled back.
    #[test]
    fn torn_log_tail_is_cut_at_start_and_later_batches_survive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let c = cfg(dir.path(), "reject");
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        let d = Directory::open(&c, states()).unwrap();
        d.apply(
            &rows("EmailAddress\na@nhs.test\n", "cloud"),
            "one.csv",
            false,
        )
        .unwrap();
        let after_one = log_len(dir.path());
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "two.csv",
            false,
        )
        .unwrap();
        drop(d);
        // The crash: batch two's record lost its last bytes.
        let bytes = std::fs::read(log_file(dir.path())).unwrap();
        put_log(dir.path(), &bytes[..bytes.len() - 5]);

        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(
            log_len(dir.path()),
            after_one,
            "the torn record is cut off at start"
        );
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud, "batch one is whole");
        assert_eq!(d.resolve(&a("b@nhs.test")), onprem, "batch two was torn");
        let three = d
            .apply(
                &rows("EmailAddress\nc@nhs.test\n", "cloud"),
                "three.csv",
                false,
            )
            .unwrap()
            .id
            .unwrap();
        drop(d);

        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        assert_eq!(
            d.resolve(&a("c@nhs.test")),
            cloud,
            "a batch applied after the torn one survives a restart"
        );
        let rb = d.rollback(three).unwrap();
        assert_eq!(rb.changed, 1, "and rollback finds it");
        assert_eq!(d.resolve(&a("c@nhs.test")), onprem);
    }

    /// Item 7: damage inside the log (not at its end) stops the start with the file and the
    /// offset of the damaged record, instead of skipping a change silently.
    #[test]
    fn damage_in_the_middle_of_the_log_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let c = cfg(dir.path(), "reject");
        let d = Directory::open(&c, states()).unwrap();
        for (who, name) in [("a", "one.csv"), ("b", "two.csv"), ("c", "three.csv")] {
            d.apply(
                &rows(&format!("EmailAddress\n{who}@nhs.test\n"), "cloud"),
                name,
                false,
            )
            .unwrap();
        }
        drop(d);
        let mut bytes = std::fs::read(log_file(dir.path())).unwrap();
        let mid = bytes.len() / 6; // inside the first of three records
        bytes[mid] = if bytes[mid] == b'~' { b'!' } else { b'~' };
        put_log(dir.path(), &bytes);
        let e = match Directory::open(&c, states()) {
            Ok(_) => panic!("a damaged change log was accepted"),
            Err(e) => e.to_string(),
        };
        let file = log_file(dir.path()).display().to_string();
        // The first record starts right after the 8-byte file header.
        assert!(
            e.contains(&file) && e.contains("offset 8"),
            "error names the file and the record's offset: {e}"
        );
    }

    /// Item 7: a log in the line format of earlier versions is read, not lost: converted to
    /// framed records (the old file kept), its torn last line dropped, and a batch that the
    /// old code glued onto a torn line recovered.
    #[test]
    fn line_format_log_is_converted_and_a_glued_batch_recovered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        let change = |id: u32, who: &str| {
            format!(
                r#"{{"id":{id},"time":"2026-11-01T10:00:00Z","kind":"apply","source":"b{id}.csv","count":1,"not_found":0,"already":0,"entries":[{{"address":"{who}@nhs.test","from":"onprem","from_origin":0,"to":"cloud"}}]}}"#
            )
        };
        let two = change(2, "b");
        let four = change(4, "a");
        let v1 = format!(
            "{}\n{}{}\n{}",
            change(1, "a"),
            &two[..40],
            change(3, "c"),
            &four[..30]
        );
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        put_log(dir.path(), v1.as_bytes());
        let c = cfg(dir.path(), "reject");
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        let onprem = Resolution::Listed(RouteName("onprem".into()));
        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("a@nhs.test")), cloud);
        assert_eq!(d.resolve(&a("b@nhs.test")), onprem, "batch 2 was torn");
        assert_eq!(
            d.lookup(&a("c@nhs.test")).origin,
            "batch 3",
            "glued batch recovered"
        );
        let ids: Vec<u32> = d.history_snapshot().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 3]);
        let old = dir.path().join("store").join("changes.log.v1");
        assert_eq!(std::fs::read(&old).unwrap(), v1.as_bytes(), "old file kept");
        assert!(std::fs::read(log_file(dir.path()))
            .unwrap()
            .starts_with(b"COEXLOG2"));
        d.apply(
            &rows("EmailAddress\nb@nhs.test\n", "cloud"),
            "b5.csv",
            false,
        )
        .unwrap();
        drop(d);
        let d = Directory::open(&c, states()).unwrap();
        assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
        assert_eq!(d.rollback(3).unwrap().changed, 1);
        assert_eq!(d.resolve(&a("c@nhs.test")), onprem);
        drop(d);

        // A damaged line in the middle of an old log is an error with its offset.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.csv"), ABC).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let first = change(1, "a");
        put_log(
            dir.path(),
            format!("{first}\n{{\"id\":2,garbage\n{}\n", change(3, "c")).as_bytes(),
        );
        let e = match Directory::open(&cfg(dir.path(), "reject"), states()) {
            Ok(_) => panic!("a damaged old log was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&format!(
                "changes.log: change log damaged at offset {}",
                first.len() + 1
            )),
            "{e}"
        );
    }
}
