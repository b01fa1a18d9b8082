//! The tracking log on disk: search by each key across sealed and open files, a torn tail
//! cut at the next open, retention by age and size, received counts.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

use super::*;
use crate::config::TrackingConfig;
use std::time::Duration;

fn received(t: u64, qid: &str, from: &str, to: &[&str], mid: &str) -> Event {
    let mut e = Event::new(t, Kind::Received, qid);
    e.sender = Some(from.into());
    e.recipients = to.iter().map(|s| s.to_string()).collect();
    e.message_id = Some(mid.into());
    e
}

fn outcome(t: u64, kind: Kind, qid: &str, rcpt: &str) -> Event {
    let mut e = Event::new(t, kind, qid);
    e.rcpt = Some(rcpt.into());
    e.route = Some("cloud".into());
    e
}

fn query(role: Role, value: &str) -> Query {
    Query {
        role,
        value: value.into(),
        since_ms: 0,
        until_ms: u64::MAX,
        limit: 1000,
    }
}

/// Waits until the writer has written `n` events in all.
fn written(t: &Tracking, n: usize) {
    for _ in 0..500 {
        if t.search(&query(Role::QueueId, "Q1"))
            .map(|f| f.events.len())
            .unwrap_or(0)
            >= n
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("events not written");
}

#[test]
fn events_are_found_by_each_key_in_the_open_file_and_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrackingConfig::default();
    let now = crate::clock::now_ms();
    let t = Tracking::open(dir.path(), &c).unwrap();
    t.log(received(
        now,
        "Q1",
        "Bob@Example.org",
        &["alice@nhs.test", "carol@nhs.test"],
        "m1@example.org",
    ));
    t.log(outcome(now + 1, Kind::Deferred, "Q1", "alice@nhs.test"));
    t.log(outcome(now + 2, Kind::Delivered, "Q1", "alice@nhs.test"));
    t.log(received(
        now + 3,
        "Q2",
        "eve@example.org",
        &["carol@nhs.test"],
        "m2@example.org",
    ));
    written(&t, 3);
    let check = |t: &Tracking| {
        let kinds = |f: Found| {
            f.events
                .iter()
                .map(|e| (e.queue_id.clone(), e.kind))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(t.search(&query(Role::Recipient, "ALICE@nhs.test")).unwrap()),
            vec![
                ("Q1".into(), Kind::Received),
                ("Q1".into(), Kind::Deferred),
                ("Q1".into(), Kind::Delivered)
            ]
        );
        assert_eq!(
            kinds(t.search(&query(Role::Recipient, "carol@nhs.test")).unwrap()).len(),
            2
        );
        assert_eq!(
            kinds(t.search(&query(Role::Sender, "bob@example.ORG")).unwrap()),
            vec![("Q1".into(), Kind::Received)]
        );
        // A Message-ID gives the message's whole life.
        assert_eq!(
            kinds(
                t.search(&query(Role::MessageId, "<M1@example.org>"))
                    .unwrap()
            )
            .len(),
            3
        );
        assert_eq!(
            kinds(t.search(&query(Role::QueueId, "Q2")).unwrap()).len(),
            1
        );
        assert!(t
            .search(&query(Role::Recipient, "nobody@nhs.test"))
            .unwrap()
            .events
            .is_empty());
        // The window.
        let mut q = query(Role::Recipient, "alice@nhs.test");
        q.since_ms = now + 1;
        q.until_ms = now + 1;
        assert_eq!(
            kinds(t.search(&q).unwrap()),
            vec![("Q1".into(), Kind::Deferred)]
        );
        // The limit keeps the newest.
        let mut q = query(Role::Recipient, "alice@nhs.test");
        q.limit = 1;
        let f = t.search(&q).unwrap();
        assert!(f.truncated);
        assert_eq!(kinds(f), vec![("Q1".into(), Kind::Delivered)]);
        assert_eq!(
            t.received_counts(
                &[
                    "carol@nhs.test".into(),
                    "alice@nhs.test".into(),
                    "x@y".into()
                ],
                0,
                u64::MAX
            )
            .unwrap(),
            vec![2, 1, 0]
        );
    };
    check(&t);
    t.close();
    // Sealed: found through the index.
    let logs: Vec<_> = files::list(dir.path()).unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].index.unwrap().events, 4);
    let t = Tracking::open(dir.path(), &c).unwrap();
    check(&t);
}

#[test]
fn a_torn_tail_is_cut_at_open_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrackingConfig::default();
    let now = crate::clock::now_ms();
    let t = Tracking::open(dir.path(), &c).unwrap();
    t.log(received(now, "Q1", "b@x.org", &["alice@nhs.test"], "m1@x"));
    written(&t, 1);
    // The writer says which file is open after its first record is written.
    let mut open = None;
    for _ in 0..500 {
        open = t.shared.open();
        if open.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = open.expect("an open file").0;
    // A stop without sealing (as kill -9 leaves it): the file has no index.
    std::mem::forget(t);
    // Half a record at its end, as a crash in the middle of a write leaves it.
    let rec = files::FORMAT.frame(br#"{"time_ms":1,"kind":"received","queue_id":"Q9"}"#);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&rec[..rec.len() / 2]);
    std::fs::write(&log, &bytes).unwrap();
    let t = Tracking::open(dir.path(), &c).unwrap();
    let f = t.search(&query(Role::Recipient, "alice@nhs.test")).unwrap();
    assert_eq!(f.events.len(), 1);
    let kept = std::fs::read_dir(dir.path().join("damaged"))
        .unwrap()
        .count();
    assert_eq!(kept, 1, "the torn bytes are kept aside");
    assert_eq!(
        std::fs::metadata(&log).unwrap().len() as usize,
        bytes.len() - rec.len() / 2,
        "the torn record is cut"
    );
    // New events go on in a new file.
    t.log(received(
        now + 5,
        "Q1",
        "b@x.org",
        &["alice@nhs.test"],
        "m1@x",
    ));
    written(&t, 2);
}

#[test]
fn retention_deletes_old_files_then_the_oldest_over_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000u64;
    let now = 100 * day;
    for (i, start) in [now - 40 * day, now - 20 * day, now - 10 * day, now - day]
        .iter()
        .enumerate()
    {
        let path = files::log_path(dir.path(), *start);
        let rec = files::FORMAT.frame(&vec![b' '; 1000 * (i + 1)]);
        let mut bytes = files::FORMAT.magic.to_vec();
        bytes.extend_from_slice(&rec);
        std::fs::write(&path, &bytes).unwrap();
        let mut b = files::IndexBuilder::default();
        b.add(&received(start + 1000, "Q", "a@b", &["c@d"], "m"), 8);
        b.write(&path).unwrap();
    }
    let names = || -> Vec<u64> {
        files::list(dir.path())
            .unwrap()
            .iter()
            .map(|f| f.start_ms)
            .collect()
    };
    // 30 days: the file of 40 days ago goes.
    let r = retain(
        dir.path(),
        None,
        now,
        Duration::from_secs(30 * 86_400),
        u64::MAX,
    )
    .unwrap();
    assert_eq!(r.deleted, 1);
    assert_eq!(names(), vec![now - 20 * day, now - 10 * day, now - day]);
    assert!(!files::idx_path(&files::log_path(dir.path(), now - 40 * day)).exists());
    // Over the size: the oldest go until it fits; the open file never does.
    let open = files::log_path(dir.path(), now - 20 * day);
    let r = retain(
        dir.path(),
        Some(open),
        now,
        Duration::from_secs(30 * 86_400),
        7_000,
    )
    .unwrap();
    assert_eq!(r.deleted, 1);
    assert_eq!(names(), vec![now - 20 * day, now - day]);
    assert!(r.kept_bytes <= 7_000, "{r:?}");
}
