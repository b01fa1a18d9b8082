//! Segment indexes (`segindex`): written for each segment the commit stage seals, read at
//! start-up instead of the segment's records, and not trusted when they do not match.

use super::tests::{env, flip, rt, seg_files};
use super::*;
use crate::types::Address;
use std::fs;
use std::time::{Duration, Instant};

/// A spool with small segments holding messages in every shape a replay must restore:
/// deferred with a route down, held, finished, copied forward (compaction), and plain.
/// Returns the queued list as a replay that reads every record gives it.
fn busy_spool(dir: &Path) -> Vec<Queued> {
    let rt = rt();
    let s = Spool::open_sized(dir, 2048).unwrap().spool;
    for i in 0..40u32 {
        let id = QueueId::generate();
        let e = env(id.clone());
        let msg = rt.block_on(s.store(&e, Arc::new(vec![b'x'; 300]))).unwrap();
        let mut st = DeliveryState::new(1);
        st.attempts = i % 4;
        st.held = i % 5 == 0;
        st.next_attempt_ms = (i % 3 == 0).then_some(1_000_000 + i as u64);
        st.unreachable =
            (i % 2 == 0).then(|| ["cloud", "onprem"][(i / 2 % 2) as usize].to_string());
        let sl = rt.block_on(s.save_state(&id, &st, None)).unwrap();
        match i % 7 {
            0 => rt.block_on(s.finish(&id, msg, Some(sl))).unwrap(),
            1 => {
                let body = Arc::new(vec![b'y'; 300]);
                rt.block_on(s.relocate(&e, body, &st, msg, Some(sl)))
                    .unwrap();
            }
            _ => {}
        }
    }
    drop(s);
    read_whole(dir)
}

/// The queue as a replay that reads every record gives it (indexes moved away meanwhile).
fn read_whole(dir: &Path) -> Vec<Queued> {
    let segs = dir.join("segments");
    let aside = dir.join("indexes-aside");
    fs::create_dir_all(&aside).unwrap();
    for name in seg_files(dir).into_iter().filter(|n| n.ends_with(".idx")) {
        fs::rename(segs.join(&name), aside.join(&name)).unwrap();
    }
    let whole = recover::inspect(dir).unwrap();
    for e in fs::read_dir(&aside).unwrap() {
        let e = e.unwrap();
        fs::rename(e.path(), segs.join(e.file_name())).unwrap();
    }
    whole
}

fn indexes(dir: &Path) -> Vec<String> {
    seg_files(dir)
        .into_iter()
        .filter(|n| n.ends_with(".idx"))
        .collect()
}

/// Waits (at most 10 s) until every sealed segment (all but the last) has its index.
fn wait_indexed(dir: &Path) {
    let t0 = Instant::now();
    loop {
        let segs = seg_files(dir)
            .into_iter()
            .filter(|n| n.ends_with(".seg"))
            .count();
        if indexes(dir).len() + 1 >= segs || t0.elapsed() > Duration::from_secs(10) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn shown(q: &[Queued]) -> String {
    format!("{q:?}")
}

#[test]
fn a_start_reads_sealed_segments_through_their_indexes_and_finds_the_same_queue() {
    let dir = tempfile::tempdir().unwrap();
    let whole = busy_spool(dir.path());
    wait_indexed(dir.path());
    let n = indexes(dir.path()).len();
    assert!(
        n >= 5,
        "sealed segments indexed: {n} of {:?}",
        seg_files(dir.path())
    );
    assert!(whole.len() > 20 && whole.iter().any(|q| q.unreachable.is_some()));
    let o = Spool::open_sized(dir.path(), 2048).unwrap();
    assert_eq!(shown(&o.queued.list()), shown(&whole));
    assert!(o.damaged.is_empty());

    // Proof the indexes were read: a record's metadata damaged after its segment was
    // indexed goes unnoticed by the start (it shows when the record is read).
    drop(o);
    let first = whole[0].clone();
    assert!(
        indexes(dir.path()).contains(&segindex::file_name(first.msg.seg)),
        "the oldest message's segment is sealed and indexed"
    );
    flip(
        dir.path(),
        first.msg.seg,
        first.msg.off + segment::HEADER_LEN as u64 + 2,
    );
    let o = Spool::open_sized(dir.path(), 2048).unwrap();
    assert!(o.damaged.is_empty(), "{:?}", o.damaged);
    assert_eq!(shown(&o.queued.list()), shown(&whole));
    assert!(o.spool.files().read_envelope(first.msg).is_err());
    // The read found the damage: the segment's index goes, so the next start reads the
    // segment whole and moves the damaged record aside.
    assert!(!indexes(dir.path()).contains(&segindex::file_name(first.msg.seg)));
    drop(o);
    let o = Spool::open_sized(dir.path(), 2048).unwrap();
    assert_eq!(o.damaged.len(), 1, "{:?}", o.damaged);
    // (A message copied forward comes back from its original record when that is still
    // on disk.) What is queued reads whole.
    for q in o.queued.list() {
        assert!(o.spool.files().read_envelope(q.msg).is_ok(), "{}", q.id);
    }
}

#[test]
fn an_index_that_does_not_match_its_segment_is_not_used_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let whole = busy_spool(dir.path());
    wait_indexed(dir.path());
    let segs = dir.path().join("segments");
    let idx = indexes(dir.path());
    assert!(idx.len() >= 3);
    // One cut short, one of another segment, one garbled; and a half-written one and one
    // of a segment that is gone.
    let bytes = fs::read(segs.join(&idx[0])).unwrap();
    fs::write(segs.join(&idx[0]), &bytes[..bytes.len() / 2]).unwrap();
    fs::copy(segs.join(&idx[2]), segs.join(&idx[1])).unwrap();
    let mut b = fs::read(segs.join(&idx[2])).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    fs::write(segs.join(&idx[2]), &b).unwrap();
    fs::write(segs.join("0000009998.idx.tmp"), b"half").unwrap();
    fs::write(segs.join("0000009999.idx"), &bytes).unwrap();
    let o = Spool::open_sized(dir.path(), 2048).unwrap();
    assert_eq!(shown(&o.queued.list()), shown(&whole));
    let left = indexes(dir.path());
    for gone in [&idx[0], &idx[1], &idx[2]] {
        assert!(!left.contains(gone), "{gone} removed: {left:?}");
    }
    assert!(!seg_files(dir.path())
        .iter()
        .any(|n| n.starts_with("000000999")));
}

#[test]
fn a_spent_segment_takes_its_index_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 2048).unwrap().spool;
    let mut sent = Vec::new();
    for _ in 0..30 {
        let id = QueueId::generate();
        let msg = rt
            .block_on(s.store(&env(id.clone()), Arc::new(vec![b'x'; 300])))
            .unwrap();
        sent.push((id, msg));
    }
    wait_indexed(dir.path());
    assert!(indexes(dir.path()).len() >= 3);
    for (id, msg) in &sent {
        rt.block_on(s.finish(id, *msg, None)).unwrap();
    }
    let t0 = Instant::now();
    while !indexes(dir.path()).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        indexes(dir.path()),
        Vec::<String>::new(),
        "{:?}",
        seg_files(dir.path())
    );
}

/// Without indexes, sealed segments are walked in windows: messages of every size (tiny,
/// a few KiB, over a window, with metadata over 2 KiB), some finished, all come back with
/// their bodies and envelopes, whatever falls on a window's edge.
#[test]
fn segments_without_indexes_walked_in_windows_restore_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 256 << 10).unwrap().spool;
    let sizes = [10usize, 3000, 70_000, 200, 9000, 5120, 130_000, 1];
    let mut kept = Vec::new();
    for i in 0..120usize {
        let mut e = env(QueueId::generate());
        if i % 9 == 0 {
            // An envelope longer than the first read at a record (2 KiB).
            e.rcpts = (0..60)
                .map(|k| Address::parse(&format!("recipient-{k:04}@nhs.test"), false).unwrap())
                .collect();
        }
        let body: Vec<u8> = (0..sizes[i % sizes.len()])
            .map(|k| (k % 251) as u8)
            .collect();
        let msg = rt.block_on(s.store(&e, Arc::new(body.clone()))).unwrap();
        if i % 4 == 3 {
            rt.block_on(s.finish(&e.id, msg, None)).unwrap();
        } else {
            kept.push((e.id.clone(), e.rcpts.len(), body));
        }
    }
    drop(s);
    for name in seg_files(dir.path())
        .into_iter()
        .filter(|n| n.ends_with(".idx"))
    {
        fs::remove_file(dir.path().join("segments").join(name)).unwrap();
    }
    let segs: Vec<String> = seg_files(dir.path())
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    assert!(segs.len() > 5, "several sealed segments");
    // Each sealed segment walks through without damage (a misread would make the replay
    // fall back to reading it whole, which would hide it).
    for name in &segs[..segs.len() - 1] {
        let n = segment::number(name).unwrap();
        let mut routes = gathered::Routes::default();
        let path = dir.path().join("segments").join(name);
        let items = recover::read_sealed(&path, n, &mut routes).expect("walked without damage");
        assert!(!items.is_empty(), "{name}");
    }
    let o = Spool::open(dir.path()).unwrap();
    let mut got: Vec<(QueueId, usize, Vec<u8>)> = o
        .queued
        .list()
        .iter()
        .map(|q| {
            let f = o.spool.files();
            (
                q.id.clone(),
                f.read_envelope(q.msg).unwrap().rcpts.len(),
                f.read_message(q.msg).unwrap(),
            )
        })
        .collect();
    got.sort_by_key(|x| x.0.to_string());
    kept.sort_by_key(|x| x.0.to_string());
    assert_eq!(got.len(), kept.len());
    assert!(got == kept, "every kept message back whole");
}
