//! Spool tests of disk faults: a failed sync of a new segment, a full disk (a small tmpfs) at
//! rotation, a failed unlink of a finished segment.

use super::tests::{env, ids, one_straggler, rt, seg_files, wait_segments};
use super::*;
use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

fn store_in(rt: &tokio::runtime::Runtime, s: &Spool, id: &QueueId) -> Loc {
    rt.block_on(s.store(&env(id.clone()), Arc::new(b"hello".to_vec())))
        .unwrap()
}

#[test]
fn a_failed_sync_of_a_new_segment_does_not_end_rotation() {
    // Segments of 100 bytes: every commit turn starts a new one. The first new segment's
    // sync fails: the next turn creates it again, and records go to it.
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 100).unwrap().spool;
    inject::inject(inject::Point::NewSegmentSync, dir.path(), 1);
    let sent: Vec<QueueId> = (0..3).map(|_| QueueId::generate()).collect();
    let segs: Vec<u32> = sent.iter().map(|id| store_in(&rt, &s, id).seg).collect();
    assert_eq!(inject::hits(inject::Point::NewSegmentSync, dir.path()), 1);
    assert_eq!(
        segs,
        [1, 1, 2],
        "rotation goes on after the failed creation"
    );
    // (The rotation after the last turn may still be under way.)
    wait_segments(dir.path(), |f| !f.iter().any(|f| segment::is_temp(f)));
    drop(s);
    assert_eq!(ids(&Spool::open_sized(dir.path(), 100).unwrap()), sent);
}

/// A tmpfs of `size` mounted on a new temporary folder, unmounted when dropped.
pub(super) struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub(super) fn mount(size: &str) -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (tests run as root)");
        Tmpfs(d)
    }

    pub(super) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the file system under `dir` to the last page with a file `filler`.
pub(super) fn fill(dir: &Path) {
    let mut f = File::create(dir.join("filler")).unwrap();
    for chunk in [64 << 10, 4096, 1] {
        let buf = vec![b'f'; chunk];
        for _ in 0..100_000 {
            if f.write_all(&buf).is_err() {
                break;
            }
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_at_rotation_does_not_end_rotation() {
    let fs_ = Tmpfs::mount("1m");
    let dir = fs_.path().join("spool");
    let rt = rt();
    let s = Spool::open_sized(&dir, 100).unwrap().spool;
    fill(fs_.path());
    // The record fits in the head segment's page; the new segment's header needs a page
    // the full disk does not have.
    // Every turn rotates (100-byte segments), and a turn is answered only after the
    // previous turn's rotation was tried: the second message still going to segment 1 shows
    // the first rotation failed.
    let sent: Vec<QueueId> = (0..4).map(|_| QueueId::generate()).collect();
    assert_eq!(store_in(&rt, &s, &sent[0]).seg, 1);
    assert_eq!(store_in(&rt, &s, &sent[1]).seg, 1);
    fs::remove_file(fs_.path().join("filler")).unwrap();
    store_in(&rt, &s, &sent[2]);
    assert!(
        store_in(&rt, &s, &sent[3]).seg >= 2,
        "rotation goes on once there is space again: {:?}",
        seg_files(&dir)
    );
    wait_segments(&dir, |f| !f.iter().any(|f| segment::is_temp(f)));
    drop(s);
    assert_eq!(ids(&Spool::open_sized(&dir, 100).unwrap()), sent);
}

#[test]
fn a_failed_unlink_keeps_the_pins_of_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let s = Spool::open_sized(dir.path(), 4096).unwrap().spool;
    let (a, la, _) = one_straggler(&rt, &s);
    // Segment 1 (a's message, b's message) cannot be deleted: segment 2, which holds the
    // Done of b, must stay while it does.
    let one = dir.path().join("segments").join(segment::file_name(1));
    inject::inject(inject::Point::Unlink, &one, 1_000_000);
    rt.block_on(s.finish(&a, la, None)).unwrap();
    // Wait until the deletion was tried twice (the first try is over), or segment 2 went.
    let t0 = Instant::now();
    while inject::hits(inject::Point::Unlink, &one) < 2
        && seg_files(dir.path()).contains(&segment::file_name(2))
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "no retry");
        std::thread::sleep(Duration::from_millis(10));
    }
    let files = seg_files(dir.path());
    drop(s);
    // After a restart no finished message is queued again (b's Done is still on disk).
    let o = Spool::open_sized(dir.path(), 4096).unwrap();
    assert!(o.queued.is_empty(), "queued again: {:?}", ids(&o));
    assert!(
        files.contains(&segment::file_name(1)) && files.contains(&segment::file_name(2)),
        "{files:?}"
    );
    // Once the unlink works again, the retry deletes segment 1 and then segment 2.
    inject::clear(&one);
    wait_segments(dir.path(), |f| {
        !f.contains(&segment::file_name(1)) && !f.contains(&segment::file_name(2))
    });
    drop(o);
    assert!(Spool::open(dir.path()).unwrap().queued.is_empty());
}
