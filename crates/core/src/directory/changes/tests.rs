//! Tests of applying and rolling back batches and of the change log's bookkeeping.

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
