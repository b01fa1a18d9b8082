//! Spool tests: durability across reopen, torn tails, damage, segment reclaim, the import
//! of the former layout, and corruption told from a torn tail. Disk faults are in
//! `fault_tests.rs`, group commit in `commit_tests.rs`.

use super::*;
use crate::proto::{BodyType, Ret};
use crate::types::Address;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

pub(super) fn env(id: QueueId) -> Envelope {
    Envelope {
        id,
        from: None,
        rcpts: vec![Address::parse("a@nhs.test", false).unwrap()],
        smtputf8: false,
        body: BodyType::SevenBit,
        received_at: 1,
        size: 5,
        client: "127.0.0.1:1".into(),
        ret: None,
        envid: None,
        rcpt_dsn: Vec::new(),
        bounce: false,
        returned_from: Vec::new(),
        taken_from: None,
    }
}

pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(super) fn seg_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub(super) fn ids(o: &Opened) -> Vec<QueueId> {
    o.queued.list().iter().map(|q| q.id.clone()).collect()
}

#[test]
fn store_state_finish_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open(dir.path()).unwrap().spool;
    let (a, b) = (QueueId::generate(), QueueId::generate());
    let la = rt
        .block_on(s.store(&env(a.clone()), Arc::new(b"hello".to_vec())))
        .unwrap();
    let lb = rt
        .block_on(s.store(&env(b.clone()), Arc::new(b"world".to_vec())))
        .unwrap();
    let mut st = DeliveryState::new(1);
    st.attempts = 2;
    st.held = true;
    st.next_attempt_ms = Some(123_456);
    st.rcpts[0].status = RcptStatus::Pending;
    let sa = rt.block_on(s.save_state(&a, &st, None)).unwrap();
    rt.block_on(s.finish(&b, lb, None)).unwrap();
    drop(s);

    let o = Spool::open(dir.path()).unwrap();
    assert_eq!(ids(&o), vec![a.clone()], "b was finished");
    let q = &o.queued.list()[0];
    assert_eq!((q.msg, q.state), (la, Some(sa)));
    assert_eq!(
        (q.attempts, q.held, q.next_attempt_ms),
        (2, true, Some(123_456))
    );
    assert_eq!(q.received_at, 1);
    assert_eq!(o.spool.files().read_message(q.msg).unwrap(), b"hello");
    assert_eq!(o.spool.files().read_envelope(q.msg).unwrap().id, a);
    assert_eq!(o.spool.files().read_state(sa).unwrap().attempts, 2);
}

#[test]
fn a_torn_tail_is_cut_and_the_complete_records_stay() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open(dir.path()).unwrap().spool;
    let kept: Vec<QueueId> = (0..3).map(|_| QueueId::generate()).collect();
    for id in &kept {
        rt.block_on(s.store(&env(id.clone()), Arc::new(vec![b'x'; 100])))
            .unwrap();
    }
    let torn = QueueId::generate();
    rt.block_on(s.store(&env(torn.clone()), Arc::new(vec![b'y'; 100])))
        .unwrap();
    drop(s);
    let seg = dir.path().join("segments").join(&seg_files(dir.path())[0]);
    let full = fs::metadata(&seg).unwrap().len();
    // The last turn: the torn message's record, then the turn's Commit record. Cut inside the
    // record at every length short of whole: each reopen keeps exactly the three complete
    // messages, cuts the file back to them and keeps the cut bytes in `damaged/`.
    let bytes = fs::read(&seg).unwrap();
    let last_len =
        (HEADER_LEN + serde_json::to_vec(&env(torn.clone())).unwrap().len() + 100) as u64;
    let before = full - last_len - HEADER_LEN as u64;
    for cut in [1, 10, HEADER_LEN as u64, last_len - 1] {
        let d2 = tempfile::tempdir().unwrap();
        fs::create_dir_all(d2.path().join("segments")).unwrap();
        let copy = d2.path().join("segments").join(seg.file_name().unwrap());
        fs::write(&copy, &bytes[..(before + cut) as usize]).unwrap();
        let o = Spool::open(d2.path()).unwrap();
        assert_eq!(ids(&o), kept, "cut at {cut}");
        assert_eq!(fs::metadata(&copy).unwrap().len(), before, "cut at {cut}");
        let aside = d2
            .path()
            .join(format!("damaged/0000000001.seg.{before}.torn"));
        assert_eq!(
            fs::read(&aside).unwrap(),
            &bytes[before as usize..(before + cut) as usize],
            "cut at {cut}"
        );
        assert!(o.damaged.len() == 1 && o.damaged[0].torn && o.damaged[0].offset == before);
    }
    // A flipped byte in the last message's body is caught too: nothing was written after
    // that turn, so its sync may not have finished (a torn tail, cut and kept aside).
    let d3 = tempfile::tempdir().unwrap();
    fs::create_dir_all(d3.path().join("segments")).unwrap();
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - HEADER_LEN - 5] ^= 1;
    fs::write(
        d3.path().join("segments").join(seg.file_name().unwrap()),
        &bad,
    )
    .unwrap();
    let o = Spool::open(d3.path()).unwrap();
    assert_eq!(ids(&o), kept);
    assert_eq!(
        fs::read(
            d3.path()
                .join(format!("damaged/0000000001.seg.{before}.torn"))
        )
        .unwrap(),
        &bad[before as usize..]
    );
}

#[test]
fn damage_in_a_sealed_segment_is_moved_aside_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open(dir.path()).unwrap().spool;
    let (a, b) = (QueueId::generate(), QueueId::generate());
    for id in [&a, &b] {
        rt.block_on(s.store(&env(id.clone()), Arc::new(b"one".to_vec())))
            .unwrap();
    }
    drop(s);
    // Reopening starts a new head: the first segment is now sealed.
    drop(Spool::open(dir.path()).unwrap());
    let start = segment::FILE_HEADER_LEN as u64;
    flip(dir.path(), 1, start + HEADER_LEN as u64 + 3); // inside the first record's envelope
    let o = Spool::open(dir.path()).unwrap();
    assert_eq!(ids(&o), vec![b.clone()]);
    assert_eq!(o.damaged.len(), 1);
    let d = &o.damaged[0];
    assert!(!d.torn && d.offset == start && d.path.ends_with("segments/0000000001.seg"));
    assert!(dir
        .path()
        .join("damaged/0000000001.seg.16.corrupt")
        .exists());
    assert_eq!(
        o.spool
            .files()
            .read_message(o.queued.list()[0].msg)
            .unwrap(),
        b"one"
    );
    drop(o);
    assert_eq!(ids(&Spool::open(dir.path()).unwrap()), vec![b]);
}

#[test]
fn damage_in_a_sealed_segment_without_turn_markers_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("segments")).unwrap();
    let mut bytes = segment::FILE_MAGIC_V1.to_vec();
    let r = message_rec(&env(QueueId::generate()), Arc::new(b"one".to_vec())).unwrap();
    let body = r.body.as_deref().unwrap();
    bytes.extend_from_slice(&segment::encode_header(
        &segment::Salt::NONE,
        r.kind,
        &r.meta,
        body,
    ));
    bytes.extend_from_slice(&r.meta);
    bytes.extend_from_slice(body);
    bytes[8 + HEADER_LEN + 3] ^= 0x20; // inside the first record's envelope
    fs::write(dir.path().join("segments/0000000001.seg"), &bytes).unwrap();
    fs::write(
        dir.path().join("segments/0000000002.seg"),
        segment::Salt::random().unwrap().file_header(),
    )
    .unwrap();
    let err = Spool::open(dir.path()).err().expect("refused").to_string();
    assert!(err.contains("0000000001.seg at offset 8"), "{err}");
    assert!(err.contains("checksum"), "{err}");
}

/// A message body that fills most of a 4 KiB segment.
fn big() -> Arc<Vec<u8>> {
    Arc::new(vec![b'z'; 3000])
}

/// On a spool with 4 KiB segments: message `a` stays queued in segment 1 while `b` (segment
/// 1, finished by a Done in segment 2), `c` and `d` (segment 2) are finished. Returns `a`, its
/// position and the ids of the finished ones.
pub(super) fn one_straggler(
    rt: &tokio::runtime::Runtime,
    s: &Spool,
) -> (QueueId, Loc, [QueueId; 3]) {
    let store = |id: &QueueId| rt.block_on(s.store(&env(id.clone()), big())).unwrap();
    let [a, b, c, d] = [(); 4].map(|_| QueueId::generate());
    let (la, lb) = (store(&a), store(&b));
    assert_eq!((la.seg, lb.seg), (1, 1));
    rt.block_on(s.finish(&b, lb, None)).unwrap(); // Done in segment 2, pinned by 1
    let (lc, ld) = (store(&c), store(&d));
    assert_eq!((lc.seg, ld.seg), (2, 2));
    rt.block_on(s.finish(&c, lc, None)).unwrap();
    rt.block_on(s.finish(&d, ld, None)).unwrap();
    (a, la, [b, c, d])
}

/// Waits (at most 30 s) until the segment files under `dir` are as `done` wants.
pub(super) fn wait_segments(dir: &Path, done: impl Fn(&[String]) -> bool) {
    let t0 = Instant::now();
    while !done(&seg_files(dir)) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            seg_files(dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn segments_are_deleted_when_done_and_a_done_record_outlives_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 4096).unwrap().spool;
    let (a, _, _) = one_straggler(&rt, &s);
    // Segment 2 holds nothing queued but b's Done, which must outlive segment 1 (a).
    std::thread::sleep(Duration::from_millis(200));
    assert!(seg_files(dir.path()).contains(&segment::file_name(2)));
    drop(s);
    let o = Spool::open_sized(dir.path(), 4096).unwrap();
    assert_eq!(ids(&o), vec![a.clone()], "b, c and d stay finished");
    let q = o.queued.list()[0].clone();
    rt.block_on(o.spool.finish(&a, q.msg, q.state)).unwrap();
    wait_segments(dir.path(), |f| f.len() <= 1);
    drop(o);
    assert!(Spool::open(dir.path()).unwrap().queued.is_empty());
}

/// A spool of the former layout (`active/ID.msg` with an envelope line, `ID.state`) is
/// imported at start, including envelopes with `RET` as older versions wrote it.
#[test]
fn the_former_layout_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("active");
    fs::create_dir_all(&active).unwrap();
    fs::create_dir_all(dir.path().join("incoming")).unwrap();
    fs::write(dir.path().join("incoming/junk"), b"x").unwrap();
    let mut ids = Vec::new();
    for ret in [Some("FULL"), Some("HDRS"), None] {
        let id = QueueId::generate();
        let ret = ret.map(|r| format!(r#","ret":"{r}""#)).unwrap_or_default();
        let line = format!(
            r#"{{"id":"{id}","from":{{"local":"s","domain":"example.org"}},"rcpts":[{{"local":"u","domain":"nhs.test"}}],"smtputf8":false,"body":"EightBitMime","received_at":1764000000,"size":5,"client":"192.0.2.1:25"{ret},"envid":"E1","rcpt_dsn":[{{"notify":"FAILURE"}}]}}"#
        );
        fs::write(active.join(format!("{id}.msg")), format!("{line}\nhello")).unwrap();
        ids.push(id);
    }
    fs::write(
        active.join(format!("{}.state", ids[1])),
        br#"{"rcpts":[{"status":"pending","last_reply":"450 4.2.1 try later"}],"attempts":3,"held":true}"#,
    )
    .unwrap();
    let o = Spool::open(dir.path()).unwrap();
    assert_eq!(
        o.queued
            .list()
            .iter()
            .map(|q| q.id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    assert!(!active.exists() && !dir.path().join("incoming").exists());
    let rets: Vec<Option<Ret>> = o
        .queued
        .list()
        .iter()
        .map(|q| o.spool.files().read_envelope(q.msg).unwrap().ret)
        .collect();
    assert_eq!(rets, [Some(Ret::Full), Some(Ret::Hdrs), None]);
    let old = o
        .spool
        .files()
        .read_envelope(o.queued.list()[0].msg)
        .unwrap();
    assert_eq!(old.body, BodyType::EightBitMime);
    assert!(old.dsn(0).wants_failure() && !old.dsn(0).wants_delay());
    assert_eq!(
        o.spool
            .files()
            .read_message(o.queued.list()[0].msg)
            .unwrap(),
        b"hello"
    );
    assert_eq!(
        (o.queued.list()[1].attempts, o.queued.list()[1].held),
        (3, true)
    );
    drop(o);
    // Imported once: a second start finds them in the log.
    assert_eq!(Spool::open(dir.path()).unwrap().queued.len(), 3);
}

#[test]
fn kept_failed_messages_are_files_for_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path()).unwrap().spool;
    let id = QueueId::generate();
    let mut st = DeliveryState::new(1);
    st.rcpts[0].status = RcptStatus::Failed;
    s.files()
        .keep_failed(&env(id.clone()), b"body", &st)
        .unwrap();
    let msg = fs::read_to_string(dir.path().join(format!("failed/{id}.msg"))).unwrap();
    assert!(msg.ends_with("\nbody") && msg.starts_with('{'), "{msg}");
    assert!(
        fs::read_to_string(dir.path().join(format!("failed/{id}.state")))
            .unwrap()
            .contains("failed")
    );
}

#[test]
fn state_written_with_string_replies_still_loads() {
    // The form of a `.state` file before replies were typed.
    let old = br#"{"rcpts":[{"status":"delivered","last_reply":"250 2.0.0 Ok: queued as A"},
            {"status":"failed","last_reply":"message expired in queue; last reply: 451 4.4.1 connect to 127.0.0.1:1 failed: refused"},
            {"status":"pending","last_reply":"450 4.2.1 try later"},{"status":"pending","last_reply":null}],
            "attempts":3}"#;
    let st: DeliveryState = serde_json::from_slice(old).unwrap();
    let shown: Vec<Option<String>> = st
        .rcpts
        .iter()
        .map(|r| r.last_reply.as_ref().map(|l| l.to_string()))
        .collect();
    assert_eq!(
            shown,
            vec![
                Some("250 2.0.0 Ok: queued as A".to_string()),
                Some("message expired in queue; last reply: 451 4.4.1 connect to 127.0.0.1:1 failed: refused".to_string()),
                Some("450 4.2.1 try later".to_string()),
                None
            ]
        );
    let expired = st.rcpts[1].last_reply.as_ref().and_then(|l| l.failure());
    assert!(expired.is_some_and(|f| f.is_expired()));
    // Written back in the typed form, it reads the same.
    let again: DeliveryState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
    assert_eq!(
        again
            .rcpts
            .iter()
            .map(|r| r.last_reply.clone())
            .collect::<Vec<_>>(),
        st.rcpts
            .iter()
            .map(|r| r.last_reply.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_straggler_is_copied_forward_and_its_old_segment_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 4096).unwrap().spool;
    let (a, la, [b, c, d]) = one_straggler(&rt, &s);
    // Segment 3: the head is two segments past a's.
    rt.block_on(s.store(&env(QueueId::generate()), big()))
        .unwrap();
    assert!(s.should_relocate(la));
    let mut st = DeliveryState::new(1);
    st.attempts = 4;
    let (na, ns) = rt
        .block_on(s.relocate(&env(a.clone()), big(), &st, la, None))
        .unwrap();
    assert!(na.seg >= 3);
    wait_segments(dir.path(), |f| !f.contains(&segment::file_name(1)));
    drop(s);
    let o = Spool::open_sized(dir.path(), 4096).unwrap();
    let qa = o
        .queued
        .list()
        .into_iter()
        .find(|q| q.id == a)
        .expect("a still queued");
    assert_eq!((qa.msg, qa.state, qa.attempts), (na, Some(ns), 4));
    assert_eq!(
        o.spool.files().read_message(qa.msg).unwrap(),
        vec![b'z'; 3000]
    );
    assert!(!o
        .queued
        .list()
        .iter()
        .any(|q| q.id == b || q.id == c || q.id == d));
}

/// Flips one bit at `off` of segment `n` under `dir`.
pub(super) fn flip(dir: &Path, n: u32, off: u64) {
    let path = dir.join("segments").join(segment::file_name(n));
    let mut b = fs::read(&path).unwrap();
    b[off as usize] ^= 0x04;
    fs::write(&path, &b).unwrap();
}

/// A turn torn by a crash after what segment 1 holds (77 bytes of garbage after its last
/// Commit record): the segment's path and its length before them.
pub(super) fn tear_head(dir: &Path) -> (PathBuf, u64) {
    let seg = dir.join("segments/0000000001.seg");
    let acknowledged = fs::metadata(&seg).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0xAB; 77]).unwrap();
    (seg, acknowledged)
}

/// Four messages acknowledged one after another in the head segment, the relay stopped
/// (nothing written after). Returns their ids and positions.
pub(super) fn four_acknowledged(dir: &Path) -> (Vec<QueueId>, Vec<Loc>) {
    let rt = rt();
    let s = Spool::open(dir).unwrap().spool;
    let ids: Vec<QueueId> = (0..4).map(|_| QueueId::generate()).collect();
    let locs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            rt.block_on(s.store(&env(id.clone()), Arc::new(vec![b'0' + i as u8; 500])))
                .unwrap()
        })
        .collect();
    drop(s);
    (ids, locs)
}

#[test]
fn a_flipped_bit_in_an_acknowledged_message_is_corruption_not_a_torn_tail() {
    // A bit flipped in the body of the first message, then (another spool) in its header's
    // length field: either way the three messages after it are kept, and the damaged record
    // is reported with file and offset and kept in `damaged/`.
    let body_bit = |l: Loc| l.off + (HEADER_LEN as u64) + l.meta_len as u64 + 100;
    let length_bit = |l: Loc| l.off + 9;
    for (what, at) in [
        ("body", &body_bit as &dyn Fn(Loc) -> u64),
        ("length", &length_bit),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (sent, locs) = four_acknowledged(dir.path());
        let seg = dir.path().join("segments/0000000001.seg");
        let original = fs::read(&seg).unwrap();
        let first = locs[0];
        let first_len = locs[1].off - first.off - HEADER_LEN as u64; // record, no Commit
        flip(dir.path(), 1, at(first));
        let o = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&o), sent[1..].to_vec(), "{what}");
        for (q, i) in o.queued.list().iter().zip(1u8..) {
            assert_eq!(
                o.spool.files().read_message(q.msg).unwrap(),
                vec![b'0' + i; 500]
            );
        }
        assert_eq!(o.damaged.len(), 1, "{what}");
        let d = &o.damaged[0];
        assert!(!d.torn, "{what}");
        assert_eq!(
            (d.path.clone(), d.offset, d.len),
            (seg.clone(), first.off, first_len)
        );
        if what == "body" {
            assert_eq!(d.id.as_deref(), Some(sent[0].as_str()));
        }
        // The damaged bytes are kept as they were on disk; nothing else changed length.
        let kept = fs::read(
            dir.path()
                .join(format!("damaged/0000000001.seg.{}.corrupt", first.off)),
        )
        .unwrap();
        let mut expected = original[first.off as usize..(first.off + first_len) as usize].to_vec();
        let i = (at(first) - first.off) as usize;
        expected[i] ^= 0x04;
        assert_eq!(kept, expected, "{what}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), original.len() as u64);
        drop(o);
        // The segment reads whole now (sealed by the next start): nothing more to report.
        let again = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&again), sent[1..].to_vec(), "{what}");
        assert!(again.damaged.is_empty());
        drop(again);
        // A read-only look agrees.
        assert_eq!(inspect(dir.path()).unwrap().len(), 3);
    }
}

#[test]
fn corruption_before_a_torn_tail_is_skipped_and_the_tail_cut() {
    // Damage in the first of four acknowledged messages, and the start of a fifth turn torn
    // by the crash (garbage after the last Commit record): the three intact messages stay,
    // the damaged one is set aside as corrupt, the garbage as a torn tail.
    let dir = tempfile::tempdir().unwrap();
    let (sent, locs) = four_acknowledged(dir.path());
    flip(dir.path(), 1, locs[0].off + 40);
    let (seg, acknowledged) = tear_head(dir.path());
    let o = Spool::open(dir.path()).unwrap();
    assert_eq!(ids(&o), sent[1..].to_vec());
    let kinds: Vec<(bool, u64)> = o.damaged.iter().map(|d| (d.torn, d.offset)).collect();
    assert_eq!(kinds, [(false, locs[0].off), (true, acknowledged)]);
    assert_eq!(fs::metadata(&seg).unwrap().len(), acknowledged);
    let torn = dir
        .path()
        .join(format!("damaged/0000000001.seg.{acknowledged}.torn"));
    assert_eq!(fs::read(torn).unwrap(), [0xAB; 77]);
}

#[test]
fn a_segment_without_turn_markers_still_recovers() {
    // Format 1 (before turn markers): three whole messages and a torn fourth.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("segments")).unwrap();
    let mut bytes = segment::FILE_MAGIC_V1.to_vec();
    let sent: Vec<QueueId> = (0..4).map(|_| QueueId::generate()).collect();
    for id in &sent {
        let r = message_rec(&env(id.clone()), Arc::new(b"old".to_vec())).unwrap();
        let body = r.body.as_deref().unwrap();
        bytes.extend_from_slice(&segment::encode_header(
            &segment::Salt::NONE,
            r.kind,
            &r.meta,
            body,
        ));
        bytes.extend_from_slice(&r.meta);
        bytes.extend_from_slice(body);
    }
    let whole = bytes.len() - 20;
    let last = whole
        - (HEADER_LEN
            + message_rec(&env(sent[3].clone()), Arc::new(b"old".to_vec()))
                .unwrap()
                .meta
                .len()
            + 3
            - 20);
    let seg = dir.path().join("segments/0000000001.seg");
    fs::write(&seg, &bytes[..whole]).unwrap();
    let o = Spool::open(dir.path()).unwrap();
    assert_eq!(ids(&o), sent[..3].to_vec());
    assert_eq!(fs::metadata(&seg).unwrap().len(), last as u64);
    assert_eq!(
        fs::read(
            dir.path()
                .join(format!("damaged/0000000001.seg.{last}.torn"))
        )
        .unwrap(),
        &bytes[last..whole]
    );
    assert_eq!(
        o.spool
            .files()
            .read_message(o.queued.list()[0].msg)
            .unwrap(),
        b"old"
    );
    drop(o);
    assert_eq!(ids(&Spool::open(dir.path()).unwrap()), sent[..3].to_vec());
}
