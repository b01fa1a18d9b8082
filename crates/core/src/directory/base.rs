//! A fleet's base directory (see `crate::fleet`): the whole state of every mailbox, as one
//! node computes it when an admin imports a new directory file, and as every node installs
//! it from PostgreSQL.
//!
//! The importing node merges the new file into its current state exactly as a single node
//! reloads its file ([`super::source::merge`]): mailboxes whose row the new file changed take
//! the file's state, the others keep what batches gave them; the shrink guard applies. The
//! result is written to PostgreSQL whole, so a node that starts from it (a new node, or one
//! far behind) needs only the latest base and the changes after it, never the older ones.

use super::source::merge;
use super::store::{Change, ChangeKind, ChangeSummary, Fingerprint, Stamp};
use super::table::{self, Parsed};
use super::view::View;
use super::{changes::now_rfc3339, Directory, DirectoryError, ReloadReport};
use std::sync::Arc;
use tracing::{info, warn};

/// One row of a base: an address, its mailbox's primary address, the mailbox's state now,
/// its state as the imported file gave it, the change that set the state now, and the
/// mailbox's routing address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRow {
    /// The address (lower case).
    pub address: String,
    /// Primary address of its mailbox (the address itself for a primary).
    pub mailbox: String,
    /// Route name in force.
    pub state: String,
    /// Route name as imported.
    pub file_state: String,
    /// Change id that set `state` (the base's own id for rows the file decided).
    pub origin: u32,
    /// Routing address of its mailbox (the same on every row of the mailbox); empty: none.
    pub routing_address: String,
}

/// A whole base, ready to be written to the fleet or installed.
pub struct Base {
    view: View,
    /// What the import changed (for the importing node's report).
    pub report: ReloadReport,
}

impl Base {
    /// Every row, primaries first (so a node rebuilding the table sees each mailbox's primary
    /// address before its aliases).
    pub fn rows<'a>(
        &'a self,
        names: &'a [crate::types::RouteName],
    ) -> impl Iterator<Item = BaseRow> + 'a {
        let v = &self.view;
        let name = move |s: u8| {
            names
                .get(s as usize)
                .map(|r| r.as_str().to_string())
                .unwrap_or_default()
        };
        let entries = move |primaries: bool| {
            v.table.entries().filter_map(move |(key, m)| {
                let mailbox = v.table.primary_address(m);
                let is_primary = mailbox.as_bytes() == key;
                (is_primary == primaries).then(|| BaseRow {
                    address: String::from_utf8_lossy(key).into_owned(),
                    mailbox: mailbox.to_string(),
                    state: name(v.states[m]),
                    file_state: name(v.file_states[m]),
                    origin: v.origin[m],
                    routing_address: v.routing.get(m).unwrap_or_default().to_string(),
                })
            })
        };
        entries(true).chain(entries(false))
    }

    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.view.table.len()
    }

    /// True when the base lists no address.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A base rebuilt from its rows (as read back from the fleet), primaries first. A row
    /// naming a state that is not a route here fails the whole base: nodes of one fleet must
    /// have the same routes.
    pub fn from_rows(
        rows: &[BaseRow],
        names: &[crate::types::RouteName],
        what: &str,
    ) -> Result<Base, DirectoryError> {
        // The table is built by the directory file's own parser. Only mailboxes with aliases
        // name their mailbox (the parser groups those through a hash map); a primary without
        // aliases is a mailbox of its own, which the parser numbers in row order.
        let grouped: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|r| r.address != r.mailbox)
            .map(|r| r.mailbox.as_str())
            .collect();
        let mut csv = Vec::with_capacity(rows.len() * 40 + 48);
        csv.extend_from_slice(b"address,state,mailbox,routing_address\n");
        for r in rows {
            push_field(&mut csv, &r.address);
            csv.push(b',');
            csv.extend_from_slice(r.state.as_bytes());
            csv.push(b',');
            if grouped.contains(r.mailbox.as_str()) {
                push_field(&mut csv, &r.mailbox);
            }
            csv.push(b',');
            push_field(&mut csv, &r.routing_address);
            csv.push(b'\n');
        }
        let parsed = table::parse(&csv, what, names)?;
        drop(csv);
        let n = parsed.states.len();
        let mut file_states = vec![0u8; n];
        let mut origin = vec![0u32; n];
        // Mailbox m is the m-th row (primaries come first, one per mailbox).
        for (m, r) in rows.iter().take(n).enumerate() {
            let bad = |reason: String| DirectoryError::Row {
                file: what.to_string(),
                line: m + 2,
                reason,
            };
            if parsed.table.primary_address(m) != r.address {
                return Err(bad(format!(
                    "{} is not mailbox {m}'s primary address",
                    r.address
                )));
            }
            file_states[m] = super::StateId::find(names, &r.file_state)
                .ok_or_else(|| bad(format!("unknown state {:?}", r.file_state)))?
                .raw();
            origin[m] = r.origin;
        }
        let view = View {
            generation: 1,
            table: Arc::new(parsed.table),
            file_states: Arc::new(file_states),
            routing: Arc::new(parsed.routing),
            states: parsed.states,
            origin,
            last_change: 0,
            fingerprint: Fingerprint::default(),
        };
        Ok(Base {
            report: ReloadReport::of(view.table.len(), n),
            view,
        })
    }
}

/// Appends a CSV field, quoted when it holds a separator, a quote or a line end (a quoted
/// local part may).
fn push_field(csv: &mut Vec<u8>, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        csv.push(b'"');
        csv.extend_from_slice(field.replace('"', "\"\"").as_bytes());
        csv.push(b'"');
    } else {
        csv.extend_from_slice(field.as_bytes());
    }
}

impl Directory {
    /// The base that importing `parsed` as fleet change `seq` gives: merged into the state in
    /// force (see the module doc), refused when it removes more than `directory.max_shrink`
    /// of the addresses unless `force`. Changes nothing.
    pub fn merge_base(
        &self,
        parsed: Parsed,
        seq: u32,
        source: &str,
        force: bool,
    ) -> Result<Base, DirectoryError> {
        let t0 = std::time::Instant::now();
        let view = self.view.load_full();
        // Rows the file decided carry the base's id as their origin (`base N` in lookups).
        let (next, mut report) = merge(Some(&view), parsed, Fingerprint::default(), seq);
        let (removed, forced) = self.check_shrink(&view, &next, source, force)?;
        report.removed_addresses = removed;
        report.forced = forced;
        report.elapsed_ms = t0.elapsed().as_millis() as u64;
        Ok(Base { view: next, report })
    }

    /// Installs `base` as fleet change `seq`: the snapshot is written first, then the
    /// change is logged, so a restart finds the base in the snapshot. A base is the whole
    /// state, so it may skip changes this node has not applied (they are moot). `Ok(false)`
    /// when this node has it already.
    pub fn install_base(
        &self,
        at: &Stamp,
        base: Base,
        source: &str,
    ) -> Result<bool, DirectoryError> {
        self.install_base_inner(at, base, source, false)
    }

    /// Installs `base` as fleet change `at` whatever this node has applied, emptying the
    /// change log first: for a store that belongs to another fleet (its numbers mean
    /// nothing in this one). The log is emptied before the snapshot is written, so a crash
    /// in between leaves an older snapshot of the old fleet, which the fleet id marker
    /// (written by the caller afterwards) still names: it is replaced again.
    pub fn replace_base(&self, at: &Stamp, base: Base, source: &str) -> Result<(), DirectoryError> {
        self.install_base_inner(at, base, source, true).map(|_| ())
    }

    fn install_base_inner(
        &self,
        at: &Stamp,
        base: Base,
        source: &str,
        replace: bool,
    ) -> Result<bool, DirectoryError> {
        let seq = at.seq;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.view.load_full();
        if replace {
            if let Some(store) = &self.store {
                store.lock().unwrap_or_else(|p| p.into_inner()).reset()?;
            }
            self.history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        } else if seq <= view.last_change {
            return Ok(false);
        }
        let mut next = base.view;
        next.generation = view.generation + 1;
        next.last_change = seq;
        let count = next.table.mailboxes();
        self.view.store(Arc::new(next));
        self.persist_snapshot()?;
        self.log(&Change {
            head: ChangeSummary {
                id: seq,
                time: now_rfc3339(),
                kind: ChangeKind::Base,
                source: source.to_string(),
                rolls_back: None,
                count,
                uid: at.uid.clone(),
                committed: at.committed.clone(),
            },
            not_found: 0,
            already: 0,
            entries: Vec::new(),
            delta: None,
        })?;
        info!(
            change = seq,
            source,
            mailboxes = count,
            "fleet base installed"
        );
        Ok(true)
    }

    /// The shrink guard of file reloads and base imports: the addresses `next` drops, and
    /// whether that many were let through by `force`.
    pub(super) fn check_shrink(
        &self,
        view: &View,
        next: &View,
        source: &str,
        force: bool,
    ) -> Result<(usize, bool), DirectoryError> {
        let before = view.table.len();
        let removed = view
            .table
            .keys()
            .filter(|k| next.table.mailbox(k).is_none())
            .count();
        self.shrink_guard(removed, before, source, force)
            .map(|forced| (removed, forced))
    }

    /// The shrink guard itself, for any load of the source (a reload, a base, a source
    /// delta): `removed` of `before` addresses go. `Ok(true)` when only `force` let it
    /// through.
    pub(super) fn shrink_guard(
        &self,
        removed: usize,
        before: usize,
        source: &str,
        force: bool,
    ) -> Result<bool, DirectoryError> {
        let limit = self.max_shrink();
        if removed as f64 <= limit.fraction() * before as f64 {
            return Ok(false);
        }
        if !force {
            return Err(DirectoryError::Shrink {
                file: source.to_string(),
                removed,
                before,
                share: removed as f64 * 100.0 / before as f64,
                limit,
            });
        }
        warn!(
            source,
            removed,
            before,
            "directory load forced although it removes more than directory.max_shrink"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{a, cfg, rows, states};
    use super::*;
    use crate::directory::Resolution;
    use crate::types::RouteName;

    /// A fleet node's directory with its store under `dir/name`.
    fn open_at(dir: &std::path::Path, name: &str) -> Directory {
        Directory::open_local(
            &cfg(dir, "reject"),
            states(),
            &dir.join(name),
            Default::default(),
        )
        .unwrap()
    }

    /// A base merged on one node, written as rows and rebuilt on another, resolves the
    /// same: aliases with their mailbox, batches kept where the file did not change, the
    /// base's id as the origin where it did.
    #[test]
    fn a_merged_base_round_trips_through_its_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let one = open_at(tmp.path(), "one");
        let first = table::parse(
            b"address,state,mailbox\na@nhs.test,onprem,m1\nalias@nhs.test,onprem,m1\nb@nhs.test,onprem,\n",
            "d.csv",
            &states(),
        )
        .unwrap();
        let base = one.merge_base(first, 1, "d.csv", false).unwrap();
        assert!(one.install_base(&Stamp::seq(1), base, "d.csv").unwrap());
        assert!(one
            .apply_at(
                &Stamp::seq(2),
                &rows("EmailAddress\nb@nhs.test\n", "cloud"),
                "b.csv"
            )
            .unwrap()
            .is_some());
        let second = table::parse(
            b"address,state,mailbox\na@nhs.test,cloud,m1\nalias@nhs.test,cloud,m1\nb@nhs.test,onprem,\nc@nhs.test,onprem,\n",
            "d2.csv",
            &states(),
        )
        .unwrap();
        let base = one.merge_base(second, 3, "d2.csv", false).unwrap();
        assert_eq!((base.report.changed, base.report.added), (1, 1));
        let written: Vec<BaseRow> = base.rows(&states()).collect();
        assert_eq!(written.len(), 4);
        assert!(
            written[..3].iter().all(|r| r.address == r.mailbox),
            "primaries first"
        );
        assert_eq!(written[3].address, "alias@nhs.test");
        assert!(one.install_base(&Stamp::seq(3), base, "d2.csv").unwrap());

        let two = open_at(tmp.path(), "two");
        let rebuilt = Base::from_rows(&written, &states(), "fleet base 3").unwrap();
        assert!(two.install_base(&Stamp::seq(3), rebuilt, "d2.csv").unwrap());
        let cloud = Resolution::Listed(RouteName("cloud".into()));
        for d in [&one, &two] {
            assert_eq!(d.resolve(&a("alias@nhs.test")), cloud);
            assert_eq!(d.lookup(&a("a@nhs.test")).origin, "base 3");
            assert_eq!(
                d.lookup(&a("b@nhs.test")).origin,
                "batch 2",
                "the batch survives"
            );
            assert_eq!(d.resolve(&a("b@nhs.test")), cloud);
            assert_eq!(d.lookup(&a("c@nhs.test")).state.as_deref(), Some("onprem"));
        }
        assert!(
            !two.install_base(
                &Stamp::seq(3),
                Base::from_rows(&written, &states(), "x").unwrap(),
                "d2.csv"
            )
            .unwrap(),
            "applied already"
        );
        let e = two
            .apply_at(
                &Stamp::seq(5),
                &rows("EmailAddress\nb@nhs.test\n", "onprem"),
                "b.csv",
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("fleet change 5 is out of order"),
            "{e}"
        );
        drop(two);
        // A restart of the second node finds the base in its snapshot.
        let two = open_at(tmp.path(), "two");
        assert_eq!(
            (two.applied(), two.resolve(&a("alias@nhs.test"))),
            (3, cloud)
        );
    }

    /// A base carries each mailbox's routing address on every row of the mailbox; a node
    /// that rebuilds the base from its rows resolves the same routing addresses (one with a
    /// quoted local part holding a comma and a quote included).
    #[test]
    fn routing_addresses_round_trip_through_base_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |name: &str| open_at(tmp.path(), name);
        let one = open("one");
        let parsed = table::parse(
            b"address,state,mailbox,routing_address\n\
              a@nhs.test,cloud,m1,\n\
              alias@other.test,cloud,m1,a@tenant.test\n\
              b@nhs.test,onprem,,\"\"\"b,\\\"\"x\"\"@tenant.test\"\n\
              c@nhs.test,onprem,,\n",
            "d.csv",
            &states(),
        )
        .unwrap();
        let base = one.merge_base(parsed, 1, "d.csv", false).unwrap();
        let written: Vec<BaseRow> = base.rows(&states()).collect();
        let ra: Vec<(&str, &str)> = written
            .iter()
            .map(|r| (r.address.as_str(), r.routing_address.as_str()))
            .collect();
        assert_eq!(
            ra,
            vec![
                ("a@nhs.test", "a@tenant.test"),
                ("b@nhs.test", "\"b,\\\"x\"@tenant.test"),
                ("c@nhs.test", ""),
                ("alias@other.test", "a@tenant.test"),
            ]
        );
        assert!(one.install_base(&Stamp::seq(1), base, "d.csv").unwrap());
        let two = open("two");
        let rebuilt = Base::from_rows(&written, &states(), "fleet base 1").unwrap();
        assert_eq!(rebuilt.rows(&states()).collect::<Vec<_>>(), written);
        assert!(two.install_base(&Stamp::seq(1), rebuilt, "d.csv").unwrap());
        for d in [&one, &two] {
            let routed = |s: &str| {
                d.resolve_routed(&a(s))
                    .routing_address
                    .map(|r| r.to_string())
            };
            assert_eq!(routed("alias@other.test").as_deref(), Some("a@tenant.test"));
            assert_eq!(routed("a@nhs.test").as_deref(), Some("a@tenant.test"));
            assert_eq!(
                routed("b@nhs.test").as_deref(),
                Some("\"b,\\\"x\"@tenant.test")
            );
            assert_eq!(routed("c@nhs.test"), None);
        }
        // Rows of a base written before routing addresses (the column's default, '').
        let old: Vec<BaseRow> = written
            .iter()
            .cloned()
            .map(|r| BaseRow {
                routing_address: String::new(),
                ..r
            })
            .collect();
        let rebuilt = Base::from_rows(&old, &states(), "fleet base 2").unwrap();
        assert!(rebuilt
            .rows(&states())
            .all(|r| r.routing_address.is_empty()));
    }
}
