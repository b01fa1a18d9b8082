//! The change log's framing, torn tails and record identities.

use super::*;

fn change(id: u32) -> Change {
    Change {
        head: ChangeSummary {
            id,
            time: "2026-11-01T10:00:00Z".into(),
            kind: ChangeKind::Apply,
            source: format!("b{id}.csv"),
            rolls_back: None,
            count: 1,
            uid: None,
            committed: None,
        },
        not_found: 0,
        already: 0,
        entries: vec![ChangeEntry {
            address: format!("u{id}@nhs.test"),
            from: "onprem".into(),
            from_origin: 0,
            to: "cloud".into(),
        }],
        delta: None,
    }
}

fn ids(store: &Store) -> Vec<u32> {
    store
        .read_log(0)
        .unwrap()
        .1
        .iter()
        .map(|c| c.head.id)
        .collect()
}

/// A fleet change keeps its identity; a record written before identities existed (no
/// `uid` in its JSON) loads without one; `reset` empties the log for good.
#[test]
fn identities_are_kept_and_records_without_them_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let old = serde_json::to_vec(&change(1)).unwrap();
    assert!(!String::from_utf8_lossy(&old).contains("uid"));
    store.append(&change(1)).unwrap();
    let mut c = change(2);
    c.head.uid = Some("9f0c".into());
    c.head.committed = Some("2026-11-01T10:00:00.000001Z".into());
    store.append(&c).unwrap();
    drop(store);
    let mut store = Store::open(dir.path()).unwrap();
    let (list, _) = store.read_log(0).unwrap();
    assert_eq!(list[0].uid, None);
    assert_eq!(list[1].uid.as_deref(), Some("9f0c"));
    assert_eq!(
        list[1].committed.as_deref(),
        Some("2026-11-01T10:00:00.000001Z")
    );
    store.reset().unwrap();
    store.append(&change(7)).unwrap();
    drop(store);
    assert_eq!(ids(&Store::open(dir.path()).unwrap()), vec![7]);
}

/// Every shape a torn append can leave (part of a header, part of a payload, zeros from
/// a file extended but not written, a whole-length record with wrong bytes) is cut off at
/// open, back to the end of the last whole record; appends then continue there.
#[test]
fn torn_tails_are_cut_back_to_the_last_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.log");
    let mut store = Store::open(dir.path()).unwrap();
    store.append(&change(1)).unwrap();
    store.append(&change(2)).unwrap();
    drop(store);
    let whole = fs::read(&path).unwrap();
    let mut last = LOG_FORMAT.frame(&serde_json::to_vec(&change(3)).unwrap());
    let n = last.len();
    last[n - 3] ^= 0x55;
    let tails: Vec<Vec<u8>> = vec![
        last[..5].to_vec(),
        last[..40].to_vec(),
        vec![0u8; 4096],
        last,
    ];
    for tail in tails {
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&tail);
        fs::write(&path, &bytes).unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            whole,
            "tail of {} bytes",
            tail.len()
        );
        assert_eq!(ids(&store), vec![1, 2]);
        store.append(&change(3)).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(ids(&store), vec![1, 2, 3]);
        assert_eq!(
            store.find(3).unwrap().unwrap().entries[0].address,
            "u3@nhs.test"
        );
        drop(store);
        fs::write(&path, &whole).unwrap();
    }

    // A file that is neither format is refused, not overwritten.
    fs::write(&path, b"PK\x03\x04 something else").unwrap();
    let e = Store::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("offset 0: not a coexist change log"), "{e}");
    assert_eq!(fs::read(&path).unwrap(), b"PK\x03\x04 something else");
}
