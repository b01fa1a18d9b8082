//! Tests of source deltas: rows in, the same directory as a whole reload would give out,
//! batches kept, the shrink guard, and a restart replaying them from the change log.

use super::super::table::Table;
use super::super::tests::{a, cfg, rows, states};
use super::*;
use crate::directory::Resolution;

fn mb(addresses: &[&str], route: &str, routing: Option<&str>) -> Mailbox {
    Mailbox {
        addresses: addresses.iter().map(|s| s.to_string()).collect(),
        route: route.into(),
        routing: routing.map(str::to_string),
    }
}

fn entry(before: Option<Mailbox>, after: Option<Mailbox>) -> DeltaEntry {
    DeltaEntry {
        key: Some("guid".into()),
        before,
        after,
    }
}

fn listed(r: &str) -> Resolution {
    Resolution::Listed(RouteName(r.into()))
}

const FILE: &str = "address,state,mailbox,routing_address\na@nhs.test,onprem,a@nhs.test,\na2@nhs.test,onprem,a@nhs.test,\nb@nhs.test,onprem,,\nc@nhs.test,cloud,,c@t.mail.onmicrosoft.com\nd@nhs.test,onprem,,\ne@nhs.test,onprem,,\nf@nhs.test,onprem,,\ng@nhs.test,onprem,,\nh@nhs.test,onprem,,\ni@nhs.test,onprem,,\nj@nhs.test,onprem,,\nk@nhs.test,onprem,,\nl@nhs.test,onprem,,\nm@nhs.test,onprem,,\no@nhs.test,onprem,,\np@nhs.test,onprem,,\nq@nhs.test,onprem,,\nr@nhs.test,onprem,,\ns@nhs.test,onprem,,\nt@nhs.test,onprem,,\nu@nhs.test,onprem,,\n";

#[test]
fn a_delta_changes_only_its_mailboxes_keeps_batches_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.csv"), FILE).unwrap();
    let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
    // A batch moves b; the source's delta must not undo it.
    d.apply(&rows("EmailAddress\nb@nhs.test\n", "cloud"), "b.csv", false)
        .unwrap();
    let delta = Delta {
        cursor: Some("usn 42".into()),
        entries: vec![
            // a: moved at the source, alias a2 dropped, a3 added, routing address set.
            entry(
                Some(mb(&["a@nhs.test", "a2@nhs.test"], "onprem", None)),
                Some(mb(
                    &["a@nhs.test", "a3@nhs.test"],
                    "cloud",
                    Some("a@t.mail.onmicrosoft.com"),
                )),
            ),
            // b: an attribute the directory does not hold changed: its state stays the batch's.
            entry(
                Some(mb(&["b@nhs.test"], "onprem", None)),
                Some(mb(&["b@nhs.test"], "onprem", None)),
            ),
            // c: deleted.
            entry(
                Some(mb(
                    &["c@nhs.test"],
                    "cloud",
                    Some("c@t.mail.onmicrosoft.com"),
                )),
                None,
            ),
            // n: new, with an alias.
            entry(
                None,
                Some(mb(&["n@nhs.test", "n2@nhs.test"], "cloud", None)),
            ),
            // d: primary address renamed (the old one kept as an alias).
            entry(
                Some(mb(&["d@nhs.test"], "onprem", None)),
                Some(mb(&["dd@nhs.test", "d@nhs.test"], "onprem", None)),
            ),
        ],
    };
    let r = d.apply_delta(&delta, "ldap usn 42", false).unwrap();
    assert_eq!((r.changed, r.added, r.removed), (1, 1, 1), "{r:?}");
    assert_eq!(r.removed_addresses, 2, "a2 and c");
    let check = |d: &Directory| {
        assert_eq!(d.resolve(&a("a@nhs.test")), listed("cloud"));
        assert_eq!(d.resolve(&a("a3@nhs.test")), listed("cloud"));
        assert_eq!(d.resolve(&a("a2@nhs.test")), Resolution::Reject);
        assert_eq!(d.resolve(&a("b@nhs.test")), listed("cloud"), "batch kept");
        assert_eq!(d.resolve(&a("c@nhs.test")), Resolution::Reject);
        assert_eq!(d.resolve(&a("n2@nhs.test")), listed("cloud"));
        assert_eq!(d.resolve(&a("dd@nhs.test")), listed("onprem"));
        let l = d.lookup(&a("a3@nhs.test"));
        assert_eq!(l.mailbox.as_deref(), Some("a@nhs.test"));
        assert_eq!(
            l.routing_address.as_deref(),
            Some("a@t.mail.onmicrosoft.com")
        );
        let l = d.lookup(&a("d@nhs.test"));
        assert_eq!(l.mailbox.as_deref(), Some("dd@nhs.test"));
        assert_eq!(
            d.lookup(&a("n2@nhs.test")).mailbox.as_deref(),
            Some("n@nhs.test")
        );
        assert_eq!(d.len(), 23);
    };
    check(&d);
    assert_eq!(
        d.history_snapshot().last().map(|c| c.kind),
        Some(super::super::store::ChangeKind::Delta)
    );
    drop(d);
    // After a restart the delta comes back from the change log (the file is unchanged).
    let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
    check(&d);
}

#[test]
fn a_delta_that_removes_too_much_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.csv"), FILE).unwrap();
    let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
    let gone = |x: &str| entry(Some(mb(&[x], "onprem", None)), None);
    let delta = Delta {
        cursor: None,
        entries: ["e", "f", "g", "h"]
            .iter()
            .map(|x| gone(&format!("{x}@nhs.test")))
            .collect(),
    };
    let e = d.apply_delta(&delta, "ldap usn 7", false).unwrap_err();
    assert!(
        matches!(
            e,
            DirectoryError::Shrink {
                removed: 4,
                before: 21,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        d.resolve(&a("e@nhs.test")),
        listed("onprem"),
        "nothing changed"
    );
    let r = d.apply_delta(&delta, "ldap usn 7", true).unwrap();
    assert_eq!(r.removed, 4);
    assert_eq!(d.resolve(&a("e@nhs.test")), Resolution::Reject);
}

#[test]
fn entries_that_pass_an_address_between_them_never_find_each_other() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.csv"), FILE).unwrap();
    let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
    // k renames its primary to kk and m takes k as an alias, m listed first.
    let delta = Delta {
        cursor: None,
        entries: vec![
            entry(
                Some(mb(&["m@nhs.test"], "onprem", None)),
                Some(mb(&["m@nhs.test", "k@nhs.test"], "onprem", None)),
            ),
            entry(
                Some(mb(&["k@nhs.test"], "onprem", None)),
                Some(mb(&["kk@nhs.test"], "cloud", None)),
            ),
        ],
    };
    d.apply_delta(&delta, "ldap usn 9", false).unwrap();
    let l = d.lookup(&a("k@nhs.test"));
    assert_eq!(l.mailbox.as_deref(), Some("m@nhs.test"));
    assert_eq!(l.state.as_deref(), Some("onprem"));
    let l = d.lookup(&a("kk@nhs.test"));
    assert_eq!(l.mailbox.as_deref(), Some("kk@nhs.test"));
    assert_eq!(l.state.as_deref(), Some("cloud"));
    // A primary taken by another entry's mailbox: its mailbox keeps its other address.
    let delta = Delta {
        cursor: None,
        entries: vec![entry(
            None,
            Some(mb(&["n@nhs.test", "a@nhs.test"], "cloud", None)),
        )],
    };
    d.apply_delta(&delta, "ldap usn 10", false).unwrap();
    assert_eq!(
        d.lookup(&a("a@nhs.test")).mailbox.as_deref(),
        Some("n@nhs.test")
    );
    assert_eq!(
        d.lookup(&a("a2@nhs.test")).mailbox.as_deref(),
        Some("a2@nhs.test"),
        "the mailbox that lost its primary goes on under its other address"
    );
    assert_eq!(d.lookup(&a("a2@nhs.test")).state.as_deref(), Some("onprem"));
    drop(d);
    let d = Directory::open(&cfg(dir.path(), "reject"), states()).unwrap();
    assert_eq!(d.lookup(&a("kk@nhs.test")).state.as_deref(), Some("cloud"));
    assert_eq!(
        d.lookup(&a("k@nhs.test")).mailbox.as_deref(),
        Some("m@nhs.test")
    );
}

#[test]
fn removing_and_adding_keys_keeps_the_index_exact() {
    // A small table with many collisions: removals shift runs back, lookups stay exact.
    let mut t = Table::default();
    let mut model = std::collections::HashMap::new();
    let mut x: u64 = 7;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for round in 0..4000u32 {
        let k = format!("k{}@t.test", next() % 300);
        if next() % 3 == 0 {
            assert_eq!(t.remove(k.as_bytes()), model.remove(&k), "round {round}");
        } else if let std::collections::hash_map::Entry::Vacant(v) = model.entry(k.clone()) {
            let m = t.add_mailbox() as u32;
            t.push(k.as_bytes(), m).unwrap();
            t.set_primary(m as usize, k.as_bytes());
            v.insert(m as usize);
        }
    }
    for i in 0..300 {
        let k = format!("k{i}@t.test");
        assert_eq!(t.mailbox(k.as_bytes()), model.get(&k).copied(), "{k}");
    }
    assert_eq!(t.len(), model.len());
    assert_eq!(t.entries().count(), model.len());
    assert!(t.is_consistent());
    t.compact();
    assert!(t.is_consistent());
    assert_eq!(t.dead_bytes(), 0);
    for (k, m) in &model {
        assert_eq!(t.mailbox(k.as_bytes()), Some(*m));
        assert_eq!(t.primary_address(*m), k);
    }
}
