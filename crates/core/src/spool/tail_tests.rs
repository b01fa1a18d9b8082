//! Recovery tests for what a sender controls and what the disk refuses: message bytes that
//! copy spool records byte for byte, read through by the search after damage; and damaged
//! bytes that cannot be copied to `damaged/`.

use super::fault_tests::{fill, Tmpfs};
use super::inject::{self, Point};
use super::tests::{env, flip, four_acknowledged, ids, rt, tear_head};
use super::*;
use std::fs::{self, OpenOptions};

/// A record as a segment with `salt` frames it; [`segment::Salt::NONE`] (format 1, or
/// format 2 before the salt) is what a sender can build without knowing the segment's salt.
fn framed(salt: &segment::Salt, kind: Kind, meta: &[u8], body: &[u8]) -> Vec<u8> {
    let mut b = segment::encode_header(salt, kind, meta, body).to_vec();
    b.extend_from_slice(meta);
    b.extend_from_slice(body);
    b
}

/// Stores `a` (a plain message), then `m`, whose body (framed with the segment's own salt
/// when `own_salt`: a sender who somehow knew it) is a forged message record for
/// `forged`, a forged `Done` for `a` and a forged `Commit`, between filler; then `b` and
/// another one (so `b`'s turn is proven synced). Returns the positions of `a`, `m` and `b`,
/// and where the forged bytes end in the file.
fn with_forgeries(dir: &Path, own_salt: bool, ids: [&QueueId; 3]) -> (Vec<Loc>, u64) {
    let [a, forged, b] = ids;
    let rt = rt();
    let s = Spool::open(dir).unwrap().spool;
    let head = fs::read(dir.join("segments/0000000001.seg")).unwrap();
    let salt = match segment::parse_file_header(&head) {
        segment::FileHeader::Segment(salt) if own_salt => salt,
        _ => segment::Salt::NONE,
    };
    let la = rt
        .block_on(s.store(&env(a.clone()), Arc::new(b"real a".to_vec())))
        .unwrap();
    let mut body = vec![b'x'; 300];
    let fake = message_rec(&env(forged.clone()), Arc::new(b"forged".to_vec())).unwrap();
    body.extend(framed(&salt, Kind::Message, &fake.meta, b"forged"));
    body.extend(framed(
        &salt,
        Kind::Done,
        &serde_json::to_vec(a).unwrap(),
        &[],
    ));
    body.extend(framed(&salt, Kind::Commit, &[], &[]));
    let forged_end = body.len();
    body.extend(vec![b'y'; 3000]);
    let m = QueueId::generate();
    let lm = rt
        .block_on(s.store(&env(m.clone()), Arc::new(body)))
        .unwrap();
    let lb = rt
        .block_on(s.store(&env(b.clone()), Arc::new(b"real b".to_vec())))
        .unwrap();
    rt.block_on(s.store(&env(QueueId::generate()), Arc::new(b"c".to_vec())))
        .unwrap();
    drop(s);
    let end = lm.off + (HEADER_LEN as u64) + lm.meta_len as u64 + forged_end as u64;
    (vec![la, lm, lb], end)
}

#[test]
fn records_copied_into_a_message_body_are_never_taken_for_records() {
    // A sender's message holds byte-exact records (a message, a Done ending another message,
    // a Commit). Damage makes recovery search for the next record through that body: a torn
    // write of it at a crash, a damaged header of it, or a damaged body and the record after
    // it. After the restart no forged record counts: no extra message, none ended. Even
    // records framed with the segment's own salt are not searched for inside a record whose
    // header is intact (torn, or only its body damaged).
    for (what, own_salt) in [
        ("torn", false),
        ("header", false),
        ("body", false),
        ("torn", true),
        ("body", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (a, forged, b) = (
            QueueId::generate(),
            QueueId::generate(),
            QueueId::generate(),
        );
        let (locs, forged_end) = with_forgeries(dir.path(), own_salt, [&a, &forged, &b]);
        let (la, lm, lb) = (locs[0], locs[1], locs[2]);
        let seg = dir.path().join("segments/0000000001.seg");
        match what {
            // The crash tore the write of the message after the forged bytes (and of `b`).
            "torn" => {
                let f = OpenOptions::new().write(true).open(&seg).unwrap();
                f.set_len(forged_end + 100).unwrap();
            }
            "header" => flip(dir.path(), 1, lm.off + 1),
            _ => {
                flip(dir.path(), 1, forged_end + 10);
                // The turn's Commit record right after the message.
                flip(dir.path(), 1, lb.off - HEADER_LEN as u64 + 1);
            }
        }
        let o = Spool::open(dir.path()).unwrap();
        let mut want = ids(&o);
        if what == "torn" {
            assert_eq!(
                want,
                vec![a.clone()],
                "{what} (own salt: {own_salt}): no forged message, none ended"
            );
        } else {
            assert_eq!(
                want.len(),
                3,
                "{what} (own salt: {own_salt}): no forged message, none ended"
            );
            assert_eq!(want[..2], [a.clone(), b.clone()], "{what}");
        }
        want.sort();
        assert_eq!(
            o.spool.files().read_message(la).unwrap(),
            b"real a",
            "{what}"
        );
        assert_eq!(o.damaged.len(), 1, "{what}: {:?}", o.damaged);
        let d = &o.damaged[0];
        assert_eq!((d.offset, d.torn), (lm.off, what == "torn"), "{what}");
        if what == "torn" {
            assert_eq!(fs::metadata(&seg).unwrap().len(), lm.off, "{what}");
        } else {
            assert_eq!(
                o.spool
                    .files()
                    .read_message(o.queued.list()[1].msg)
                    .unwrap(),
                b"real b"
            );
        }
        drop(o);
        // The next start agrees (and a read-only look too).
        let again = Spool::open(dir.path()).unwrap();
        let mut seen = ids(&again);
        seen.sort();
        assert_eq!(seen, want, "{what}");
        assert!(again.damaged.is_empty(), "{what}");
        drop(again);
        let mut seen: Vec<QueueId> = inspect(dir.path())
            .unwrap()
            .into_iter()
            .map(|q| q.id)
            .collect();
        seen.sort();
        assert_eq!(seen, want, "{what}");
    }
}

fn damaged_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("damaged"))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_torn_tail_that_cannot_be_kept_aside_is_cut_and_the_start_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (sent, _) = four_acknowledged(dir.path());
    let (seg, acknowledged) = tear_head(dir.path());
    let aside = dir.path().join("damaged");
    inject::inject(Point::KeepAside, &aside, 1);
    let o = Spool::open(dir.path());
    inject::clear(&aside);
    let o = o.expect("the start goes on");
    assert_eq!(inject::hits(Point::KeepAside, &aside), 1);
    assert_eq!(ids(&o), sent);
    assert_eq!(fs::metadata(&seg).unwrap().len(), acknowledged);
    assert_eq!(o.damaged.len(), 1);
    let d = &o.damaged[0];
    assert!(d.torn && d.kept.is_none() && !d.left && d.offset == acknowledged);
    assert!(damaged_files(dir.path()).is_empty());
}

#[test]
fn corruption_that_cannot_be_kept_aside_is_left_in_place_and_moved_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (sent, locs) = four_acknowledged(dir.path());
    let seg = dir.path().join("segments/0000000001.seg");
    flip(dir.path(), 1, locs[0].off + 40);
    let damaged = fs::read(&seg).unwrap();
    let aside = dir.path().join("damaged");
    inject::inject(Point::KeepAside, &aside, 1);
    let o = Spool::open(dir.path());
    inject::clear(&aside);
    let o = o.expect("the start goes on");
    assert_eq!(inject::hits(Point::KeepAside, &aside), 1);
    assert_eq!(ids(&o), sent[1..].to_vec());
    for (q, i) in o.queued.list().iter().zip(1u8..) {
        assert_eq!(
            o.spool.files().read_message(q.msg).unwrap(),
            vec![b'0' + i; 500]
        );
    }
    assert_eq!(o.damaged.len(), 1);
    let d = &o.damaged[0];
    assert!(!d.torn && d.left && d.kept.is_none());
    assert_eq!((d.path.clone(), d.offset), (seg.clone(), locs[0].off));
    // Not one byte of the segment changed: the damaged record is still there to move aside.
    assert_eq!(fs::read(&seg).unwrap(), damaged);
    assert!(damaged_files(dir.path()).is_empty());
    drop(o);
    // The next start (the disk works again) moves it aside and skips it for good.
    let again = Spool::open(dir.path()).unwrap();
    assert_eq!(ids(&again), sent[1..].to_vec());
    assert_eq!(again.damaged.len(), 1);
    assert!(!again.damaged[0].left && again.damaged[0].kept.is_some());
    assert_eq!(
        damaged_files(dir.path()),
        vec![format!("0000000001.seg.{}.corrupt", locs[0].off)]
    );
    drop(again);
    assert!(Spool::open(dir.path()).unwrap().damaged.is_empty());
}

#[test]
fn a_format_2_segment_without_a_salt_is_refused_not_cut() {
    // Written by a pre-release build: `COEXSEG2`, then records framed without a salt.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("segments")).unwrap();
    let mut bytes = segment::FILE_MAGIC.to_vec();
    let r = message_rec(&env(QueueId::generate()), Arc::new(b"old".to_vec())).unwrap();
    bytes.extend(framed(&segment::Salt::NONE, r.kind, &r.meta, b"old"));
    bytes.extend(framed(&segment::Salt::NONE, Kind::Commit, &[], &[]));
    let seg = dir.path().join("segments/0000000001.seg");
    fs::write(&seg, &bytes).unwrap();
    let err = Spool::open(dir.path()).err().expect("refused").to_string();
    assert!(
        err.contains("0000000001.seg at offset 0") && err.contains("salt"),
        "{err}"
    );
    assert_eq!(fs::read(&seg).unwrap(), bytes, "nothing cut");
    assert!(inspect(dir.path()).is_err());
}

#[test]
fn a_full_damaged_folder_stops_no_start() {
    // `damaged/` on its own full tmpfs: corruption and a torn tail in the head segment. The
    // start goes on; the torn tail is cut, the corruption left in place for a later start.
    let dir = tempfile::tempdir().unwrap();
    let (sent, locs) = four_acknowledged(dir.path());
    flip(dir.path(), 1, locs[0].off + 40);
    let (seg, acknowledged) = tear_head(dir.path());
    let full = Tmpfs::mount("64k");
    fill(full.path());
    fs::remove_dir_all(dir.path().join("damaged")).unwrap();
    std::os::unix::fs::symlink(full.path(), dir.path().join("damaged")).unwrap();
    let o = Spool::open(dir.path()).expect("the start goes on");
    assert_eq!(ids(&o), sent[1..].to_vec());
    let seen: Vec<(u64, bool, bool, bool)> = o
        .damaged
        .iter()
        .map(|d| (d.offset, d.torn, d.left, d.kept.is_some()))
        .collect();
    assert_eq!(
        seen,
        [
            (locs[0].off, false, true, false),
            (acknowledged, true, false, false)
        ]
    );
    assert_eq!(fs::metadata(&seg).unwrap().len(), acknowledged);
    let left: Vec<String> = damaged_files(dir.path())
        .into_iter()
        .filter(|n| n != "filler")
        .collect();
    assert!(left.is_empty(), "no partial copies: {left:?}");
    drop(o);
}
