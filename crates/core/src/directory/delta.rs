//! Source deltas: what an LDAP sync changed, applied as rows, not as a new whole directory.
//!
//! A delta lists the mailboxes a sync found changed, each as it was before (so its old
//! addresses can be removed) and as it is now (none: deleted, or no longer a mailbox). It
//! is logged whole in the change log (kind `delta`) before it takes effect and replayed
//! from there after a restart, so a 50-mailbox change costs 50 rows on disk and, in a fleet,
//! 50 rows in PostgreSQL. The in-memory index is copied and edited (a few tens of
//! milliseconds at 2 million addresses: memory copies, no parsing, no snapshot).
//!
//! The rule for states is the file reload's: a mailbox whose state at the source changed
//! takes it (its origin becomes this change); one whose state at the source is what it was
//! keeps what batches gave it. A new mailbox takes the source's state.
//!
//! Removed addresses leave their record in the index's arena marked dead
//! ([`super::table::DEAD`]); when dead records hold more than a quarter of it, the delta
//! compacts the arena (mailbox numbers never move).

use super::changes::now_rfc3339;
use super::store::{Change, ChangeKind, ChangeSummary, Stamp};
use super::view::View;
use super::{Directory, DirectoryError, ReloadReport, StateId};
use crate::types::RouteName;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

/// After this many source deltas the snapshot is rewritten, so a restart replays at most
/// that many (each in place, costing what it changed).
pub const SNAPSHOT_EVERY: u32 = 64;

/// One mailbox as its source has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// Every address, primary first (lower case).
    pub addresses: Vec<String>,
    /// Route name.
    pub route: String,
    /// Where its route sends it (`targetAddress`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<String>,
}

/// One mailbox's change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEntry {
    /// The source's id of the entry (Active Directory's `objectGUID`, OpenLDAP's
    /// `entryUUID`, else its DN), so a source can rebuild what it knew after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The mailbox as the source had it before (none: new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Mailbox>,
    /// The mailbox now (none: deleted, or no longer a mailbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Mailbox>,
}

/// What a source sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Where the source's sync stood after it (opaque to the directory; the LDAP source
    /// resumes from it after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The mailboxes changed.
    pub entries: Vec<DeltaEntry>,
}

impl Delta {
    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Directory {
    /// Applies a source delta (an LDAP sync's changes) on this node, logged as change
    /// `delta` named `source` (`ldap usn 123`). Refused like a reload when it removes more
    /// than `directory.max_shrink` of the addresses, unless `force`.
    pub fn apply_delta(
        &self,
        delta: &Delta,
        source: &str,
        force: bool,
    ) -> Result<ReloadReport, DirectoryError> {
        let res = self
            .apply_delta_inner(delta, source, force, None)
            .map(|r| r.unwrap_or_else(|| ReloadReport::of(self.len(), 0)));
        // Kept for status like a file reload's outcome (`coexist status`, `/v1/ready`).
        let result = match &res {
            Ok(_) => "ok",
            Err(DirectoryError::Shrink { .. }) => "refused_shrink",
            Err(_) => "failed",
        };
        self.record_load(result, res.as_ref().err());
        res
    }

    /// Applies fleet change `at`, a source delta (see [`Directory::apply_at`] for `at`).
    /// Never refused by the shrink guard: the node that committed it checked it.
    pub fn apply_delta_at(
        &self,
        at: &Stamp,
        delta: &Delta,
        source: &str,
    ) -> Result<Option<ReloadReport>, DirectoryError> {
        self.apply_delta_inner(delta, source, true, Some(at))
    }

    /// What applying `delta` would do, changing nothing (the shrink guard's error included).
    pub fn preview_delta(
        &self,
        delta: &Delta,
        force: bool,
    ) -> Result<ReloadReport, DirectoryError> {
        let view = self.view.load_full();
        let (_, report) = edit(&view, delta, &self.states, 0)?;
        self.delta_shrink(&view, &report, force)?;
        Ok(report)
    }

    fn delta_shrink(
        &self,
        view: &View,
        report: &ReloadReport,
        force: bool,
    ) -> Result<(), DirectoryError> {
        let before = view.table.len();
        if before == 0 {
            return Ok(());
        }
        self.shrink_guard(report.removed_addresses, before, &self.source.name(), force)
            .map(|_| ())
    }

    fn apply_delta_inner(
        &self,
        delta: &Delta,
        source: &str,
        force: bool,
        at: Option<&Stamp>,
    ) -> Result<Option<ReloadReport>, DirectoryError> {
        let t0 = std::time::Instant::now();
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        if let Some(at) = at {
            if !Self::in_order(&view, at.seq)? {
                return Ok(None);
            }
        }
        let id = at.map_or_else(|| self.next_id(&view), |a| a.seq);
        // A delta is always a source's change: the mailboxes it moves show it as their
        // origin (replay at start-up does the same).
        let (mut next, mut report) = edit(&view, delta, &self.states, id)?;
        if at.is_none() {
            self.delta_shrink(&view, &report, force)?;
        }
        if delta.is_empty() && at.is_none() {
            return Ok(Some(report));
        }
        next.generation = view.generation + 1;
        next.last_change = id;
        let change = Change {
            head: ChangeSummary {
                id,
                time: now_rfc3339(),
                kind: ChangeKind::Delta,
                source: source.to_string(),
                rolls_back: None,
                count: report.changed,
                uid: at.and_then(|a| a.uid.clone()),
                committed: at.and_then(|a| a.committed.clone()),
            },
            not_found: 0,
            already: 0,
            entries: Vec::new(),
            delta: Some(delta.clone()),
        };
        self.log(&change)?;
        self.view.store(Arc::new(next));
        // Replay at start-up stays bounded: every so many deltas the snapshot is rewritten
        // (a failure is logged; the change log still holds every delta).
        let n = self
            .deltas_since_snapshot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n >= SNAPSHOT_EVERY {
            if let Err(e) = self.persist_snapshot() {
                warn!(error = %e, "directory snapshot after deltas not written; tried again after the next delta");
            }
        }
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        info!(
            change = id,
            source,
            mailboxes = delta.entries.len(),
            changed = report.changed,
            added = report.added,
            removed = report.removed,
            ms = report.elapsed_ms,
            "directory delta applied"
        );
        Ok(Some(report))
    }
}

impl Directory {
    /// The mailboxes holding these addresses, as a source would give them (addresses
    /// primary first, the state as the source last set it, the routing address): for each
    /// query, the mailbox of its first address the directory lists. One pass over the
    /// index, whatever the number of queries.
    pub fn source_mailboxes(&self, queries: &[Vec<String>]) -> Vec<Option<Mailbox>> {
        let view = self.view.load_full();
        let found: Vec<Option<usize>> = queries
            .iter()
            .map(|q| q.iter().find_map(|a| view.table.mailbox(key(a).as_bytes())))
            .collect();
        let wanted: std::collections::HashSet<usize> = found.iter().flatten().copied().collect();
        let mut addresses: HashMap<usize, Vec<String>> = HashMap::new();
        if !wanted.is_empty() {
            for (k, m) in view.table.entries() {
                if wanted.contains(&m) {
                    addresses
                        .entry(m)
                        .or_default()
                        .push(String::from_utf8_lossy(k).into_owned());
                }
            }
        }
        found
            .into_iter()
            .map(|m| {
                let m = m?;
                Some(self.as_source(&view, m, addresses.get(&m).cloned().unwrap_or_default()))
            })
            .collect()
    }

    /// Mailbox `m` of `view` with `addresses` (any order), as a source gives it.
    fn as_source(&self, view: &View, m: usize, mut addresses: Vec<String>) -> Mailbox {
        let primary = view.table.primary_address(m).to_string();
        addresses.retain(|a| *a != primary);
        addresses.sort();
        addresses.insert(0, primary);
        Mailbox {
            addresses,
            route: self
                .states
                .get(view.file_states[m] as usize)
                .map(|r| r.as_str().to_string())
                .unwrap_or_default(),
            routing: view.routing.get(m).map(str::to_string),
        }
    }

    /// The delta that makes the directory's source content `wanted` (every mailbox, by the
    /// source's id): a full sync commits only this difference. Mailboxes are matched by
    /// primary address, else by any address; mailboxes the directory has that `wanted`
    /// does not are removed. One pass over the index.
    pub fn diff_full(&self, wanted: &HashMap<String, Mailbox>) -> Delta {
        let view = self.view.load_full();
        let mut by_mailbox: Vec<Vec<String>> = vec![Vec::new(); view.table.mailboxes()];
        for (k, m) in view.table.entries() {
            by_mailbox[m].push(String::from_utf8_lossy(k).into_owned());
        }
        let mut seen = vec![false; view.table.mailboxes()];
        let mut entries = Vec::new();
        let mut ids: Vec<&String> = wanted.keys().collect();
        ids.sort();
        for id in ids {
            let now = &wanted[id];
            let normal = Mailbox {
                addresses: now.addresses.iter().map(|a| key(a)).collect(),
                route: now.route.clone(),
                routing: now.routing.clone(),
            };
            let m = normal
                .addresses
                .first()
                .and_then(|a| view.table.mailbox(a.as_bytes()))
                .filter(|&m| !seen[m])
                .or_else(|| {
                    normal
                        .addresses
                        .iter()
                        .find_map(|a| view.table.mailbox(a.as_bytes()))
                        .filter(|&m| !seen[m])
                });
            let before = m.map(|m| {
                seen[m] = true;
                self.as_source(&view, m, std::mem::take(&mut by_mailbox[m]))
            });
            if before.as_ref().is_some_and(|b| same(b, &normal)) {
                continue;
            }
            entries.push(DeltaEntry {
                key: Some(id.clone()),
                before,
                after: Some(normal),
            });
        }
        for (m, addresses) in by_mailbox.into_iter().enumerate() {
            if seen[m] || addresses.is_empty() {
                continue;
            }
            entries.push(DeltaEntry {
                key: None,
                before: Some(self.as_source(&view, m, addresses)),
                after: None,
            });
        }
        Delta {
            cursor: None,
            entries,
        }
    }

    /// The deltas logged after change `after`, oldest first; `None` when the change log
    /// does not hold an unbroken run of them (a base or reload since, which replaces the
    /// directory whole, or records no longer in the log).
    pub fn deltas_after(&self, after: u32) -> Option<Vec<Delta>> {
        let store = self.store.as_ref()?;
        let (_, tail) = store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_log(after)
            .ok()?;
        let mut out = Vec::new();
        for c in tail {
            match c.head.kind {
                ChangeKind::Delta => out.extend(c.delta),
                ChangeKind::Apply | ChangeKind::Rollback => {}
                ChangeKind::Base | ChangeKind::Reload => return None,
            }
        }
        Some(out)
    }

    /// The folder of this directory's store (`None` in memory).
    pub fn store_dir(&self) -> Option<std::path::PathBuf> {
        Some(
            self.store
                .as_ref()?
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dir
                .clone(),
        )
    }

    /// The cursor of the last source delta this node logged (`None`: none logged, or the
    /// change log cannot be read).
    pub fn last_source_cursor(&self) -> Option<String> {
        let id = self
            .history_snapshot()
            .iter()
            .rev()
            .find(|c| c.kind == ChangeKind::Delta)?
            .id;
        let store = self.store.as_ref()?;
        let change = store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .find(id)
            .ok()??;
        change.delta?.cursor
    }
}

/// True when two mailboxes are the same to the directory (aliases in any order, routing
/// addresses compared without case).
pub fn same(a: &Mailbox, b: &Mailbox) -> bool {
    let set = |m: &Mailbox| {
        let mut v: Vec<String> = m.addresses.iter().skip(1).map(|a| key(a)).collect();
        v.sort();
        v.dedup();
        v
    };
    a.addresses.first().map(|x| key(x)) == b.addresses.first().map(|x| key(x))
        && a.route == b.route
        && a.routing.as_deref().map(str::to_ascii_lowercase)
            == b.routing.as_deref().map(str::to_ascii_lowercase)
        && set(a) == set(b)
}

/// Re-applies a logged delta at start-up, in place (no copy of the index).
pub(super) fn replay(view: &mut View, change: &Change, states: &[RouteName]) {
    let Some(delta) = &change.delta else {
        return;
    };
    if let Err(e) = apply_to(view, delta, states, change.head.id) {
        warn!(change = change.head.id, error = %e, "logged delta no longer applies");
    }
}

/// The directory key of a source's address (as the directory file's parser makes it).
pub fn key(a: &str) -> String {
    crate::types::Address::parse(a, true)
        .map(|x| x.key())
        .unwrap_or_else(|_| a.to_lowercase())
}

/// The view `view` becomes with `delta` (a copy; `view` is left as it is).
fn edit(
    view: &View,
    delta: &Delta,
    states: &[RouteName],
    fresh: u32,
) -> Result<(View, ReloadReport), DirectoryError> {
    let mut next = View {
        generation: view.generation,
        table: Arc::new((*view.table).clone()),
        file_states: view.file_states.clone(),
        routing: view.routing.clone(),
        states: view.states.clone(),
        origin: view.origin.clone(),
        last_change: view.last_change,
        fingerprint: view.fingerprint,
    };
    let report = apply_to(&mut next, delta, states, fresh)?;
    Ok((next, report))
}

/// Applies `delta` to `view` in place: states the source changed get origin `fresh`.
/// Every state is checked before anything changes, so an error leaves `view` whole.
///
/// Each entry's mailbox is found in the index as it was before the delta (by its old primary
/// address, each mailbox claimed once), so entries that pass an address between them (a
/// primary renamed while another mailbox takes it as an alias) never find each other's
/// mailbox. Then every old address that goes is removed, and only
/// then are the new ones added.
fn apply_to(
    view: &mut View,
    delta: &Delta,
    states: &[RouteName],
    fresh: u32,
) -> Result<ReloadReport, DirectoryError> {
    let mut wanted = Vec::with_capacity(delta.entries.len());
    for e in &delta.entries {
        let state = match &e.after {
            Some(a) => Some(
                StateId::find(states, &a.route)
                    .map(StateId::raw)
                    .ok_or_else(|| {
                        DirectoryError::Batch(format!(
                            "delta names state {:?}, which is not a route here",
                            a.route
                        ))
                    })?,
            ),
            None => None,
        };
        let before: Vec<String> = e
            .before
            .iter()
            .flat_map(|b| b.addresses.iter().map(|a| key(a)))
            .collect();
        let after: Vec<String> = e
            .after
            .iter()
            .flat_map(|b| b.addresses.iter().map(|a| key(a)))
            .collect();
        wanted.push((before, after, state));
    }
    let table = Arc::make_mut(&mut view.table);
    let mailboxes_before = table.mailboxes();
    // 1. Each entry's mailbox, by its old primary address in the index as it was (the
    // producer of the delta found it; an entry without `before` is a new mailbox), each
    // mailbox claimed once.
    let mut claimed = std::collections::HashSet::new();
    let found: Vec<Option<usize>> = wanted
        .iter()
        .map(|(before, _, _)| {
            let m = before.first().and_then(|a| table.mailbox(a.as_bytes()))?;
            claimed.insert(m).then_some(m)
        })
        .collect();
    let mut report = ReloadReport::of(0, 0);
    let mut gone = 0usize;
    let mut routing: HashMap<usize, Option<String>> = HashMap::new();
    // 2. Old addresses that go; deleted mailboxes.
    for (i, (before, after, _)) in wanted.iter().enumerate() {
        let Some(m) = found[i] else { continue };
        for a in before.iter().filter(|a| !after.contains(a)) {
            if table.mailbox(a.as_bytes()) == Some(m) {
                table.remove(a.as_bytes());
                gone += 1;
            }
        }
        if after.is_empty() {
            if delta.entries[i].before.is_none() {
                // The delta does not say what it had: whatever it still holds goes.
                let rest: Vec<Vec<u8>> = table
                    .entries()
                    .filter(|&(_, n)| n == m)
                    .map(|(k, _)| k.to_vec())
                    .collect();
                for k in rest {
                    table.remove(&k);
                    gone += 1;
                }
            }
            table.kill_mailbox(m);
            routing.insert(m, None);
            report.removed += 1;
        }
    }
    // 3. Mailboxes as they are now.
    for (i, (_, after, state)) in wanted.iter().enumerate() {
        let (Some(now), Some(primary), Some(state)) =
            (&delta.entries[i].after, after.first(), *state)
        else {
            continue;
        };
        let m = match found[i] {
            Some(m) => {
                // The rule of file reloads: a state the source changed is taken; one it
                // did not change keeps what batches gave it.
                if view.file_states[m] != state {
                    if view.states[m] != state {
                        report.changed += 1;
                    }
                    view.states[m] = state;
                    view.origin[m] = fresh;
                    Arc::make_mut(&mut view.file_states)[m] = state;
                }
                m
            }
            None => {
                view.states.push(state);
                view.origin.push(fresh);
                Arc::make_mut(&mut view.file_states).push(state);
                report.added += 1;
                table.add_mailbox()
            }
        };
        for k in after {
            match table.mailbox(k.as_bytes()) {
                Some(n) if n == m => {}
                other => {
                    if let Some(n) = other {
                        // An address that moved here from another entry's mailbox.
                        table.remove(k.as_bytes());
                        if table.primary_address(n) == k.as_str() {
                            // That mailbox's primary: another of its addresses takes over
                            // (a scan, for this rare case), or it is gone.
                            let next = table
                                .entries()
                                .find(|&(_, x)| x == n)
                                .map(|(k, _)| k.to_vec());
                            match next {
                                Some(p) => {
                                    table.set_primary(n, &p);
                                }
                                None => table.kill_mailbox(n),
                            }
                        }
                    }
                    let _ = table.push(k.as_bytes(), m as u32);
                }
            }
        }
        table.set_primary(m, primary.as_bytes());
        let ra = now.routing.as_deref().map(str::to_ascii_lowercase);
        if view.routing.get(m).map(str::to_ascii_lowercase) != ra {
            routing.insert(m, now.routing.clone());
        }
    }
    let mailboxes = table.mailboxes();
    if !routing.is_empty() || (mailboxes != mailboxes_before && !view.routing.is_empty()) {
        view.routing = Arc::new(view.routing.edited(mailboxes, &routing).ok_or_else(|| {
            DirectoryError::Batch("directory too large (over 4 GiB of routing addresses)".into())
        })?);
    }
    if table.dead_bytes() * 4 > table.arena.len() {
        table.compact();
    }
    report.removed_addresses = gone;
    report.entries = table.len();
    report.mailboxes = table.live_mailboxes();
    Ok(report)
}

#[cfg(test)]
mod tests;
