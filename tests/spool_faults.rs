//! Outcomes the spool cannot write (issue 23, items 8 and 12): a state or end record refused
//! by a full disk is kept and written before the next delivery (nobody gets a message twice,
//! `attempts` grows, one DSN); an admin delete whose end record cannot be written is refused;
//! a failed write that cannot be cut off neither stops the next start nor brings back a
//! message whose sender got a `4xx`.
//!
//! The full disk is a small tmpfs the test mounts over the spool (the tests run as root);
//! the failures a tmpfs cannot produce (a failed sync, a failed cut) are made up by the
//! commit stage's test hook, in the real write path.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{Sink, SinkMessage, SinkMode, SinkOptions};
use coexist::queue::Phase;
use coexist::relay;
use coexist::spool::InjectedFaults;
use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for one test; unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs")
            .success();
        assert!(
            ok,
            "cannot mount a tmpfs at {} (root needed)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes `path` until the file system is full; returns the bytes written. Bounded by the
/// file system's size (a few MB) and a count of writes.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 4096];
    let mut written = 0u64;
    for _ in 0..100_000 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    written
}

/// The count of failed writes in a `queue show` note ("… (N failed writes)").
fn failed_writes(note: &str) -> u32 {
    note.rsplit('(')
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How many times each recipient was delivered to, over `msgs` (DSNs left out).
fn per_recipient(msgs: &[SinkMessage]) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.from.is_some()) {
        for r in &m.rcpts {
            *n.entry(r.to_string()).or_default() += 1;
        }
    }
    n
}

fn dsns(msgs: &[SinkMessage]) -> Vec<SinkMessage> {
    msgs.iter().filter(|m| m.from.is_none()).cloned().collect()
}

/// 60 recipients: 20 on premises (accepted once the full disk comes), 20 in the cloud
/// (deferred until the end), 20 unknown (sent on premises with `unknown_onprem`, refused
/// there with 550: one DSN).
fn recipients() -> (Vec<String>, Vec<String>, Vec<String>) {
    let onprem = (1..=20).map(|i| format!("user{i:02}@nhs.test")).collect();
    let cloud = (1..=20).map(|i| format!("cloud{i:02}@nhs.test")).collect();
    let reject = (1..=20).map(|i| format!("reject{i:02}@nhs.test")).collect();
    (onprem, cloud, reject)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_a_full_disk_refuses_is_written_before_the_next_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (onprem_rcpts, cloud_rcpts, reject_rcpts) = recipients();
    let mut csv = String::from("address,state\n");
    for a in &onprem_rcpts {
        csv += &format!("{a},onprem\n");
    }
    for a in &cloud_rcpts {
        csv += &format!("{a},cloud\n");
    }
    std::fs::write(dir.path().join("directory.csv"), csv).unwrap();
    let spool = dir.path().join("spool");
    let _tmpfs = Tmpfs::mount(&spool, "2m");
    let certs = write_certs(dir.path());
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cloud = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let mut cfg = test_config(dir.path(), &certs, onprem.addr, cloud.addr);
    cfg.spool.min_free_space = 0;
    unknown_onprem(&mut cfg);
    let relay = relay::start(cfg).await.unwrap();

    // First attempt: both next hops defer at the end of data, the unknown are refused.
    onprem.state.set_mode(SinkMode::Defer);
    cloud.state.set_mode(SinkMode::Defer);
    let all: Vec<&str> = onprem_rcpts
        .iter()
        .chain(&cloud_rcpts)
        .chain(&reject_rcpts)
        .map(String::as_str)
        .collect();
    let mut c = connect(relay.local_addrs[0]).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.mail("sender@example.org", &all, &sample("full")).await;
    assert_eq!(r.code, 250, "{r:?}");
    let qid = queue_id(&r);
    let first = queue_deferred(&relay, &qid).await;
    assert_eq!(first.state.attempts, 1);

    // The disk fills up; the on-premises hop now accepts, the cloud still defers.
    let filled = fill(&spool.join("filler"));
    assert!(filled > 0, "nothing written to fill the spool's tmpfs");
    onprem.state.set_mode(SinkMode::Accept);
    relay.queue.flush(&qid).unwrap();
    wait(&onprem, 20).await;

    // Its state cannot be written. Wait until either a recipient got the message twice
    // (the old failure) or the write failed four times (`queue show` counts them): three
    // more tries, each after the time a retry of the old code took to deliver again.
    let seen = eventually(
        "a repeated delivery, or four failed writes of the state",
        || {
            let counts = per_recipient(&onprem.state.messages());
            let twice = counts.values().any(|&n| n > 1);
            let failed = relay
                .queue
                .get(&qid)
                .and_then(|e| e.unwritten)
                .map_or(0, |note| failed_writes(&note));
            (twice || failed >= 4).then_some(counts)
        },
    )
    .await;
    for a in &onprem_rcpts {
        assert_eq!(
            seen.get(a),
            Some(&1),
            "{a} got the message {:?} times while the disk was full",
            seen.get(a)
        );
    }
    let e = relay.queue.get(&qid).expect("still queued");
    assert_eq!(
        e.state.attempts, 2,
        "the second attempt is remembered: {e:?}"
    );
    assert!(
        e.unwritten.is_some(),
        "queue show says the state is not written: {e:?}"
    );
    let shown = relay.queue.view(&e);
    let delivered = shown
        .recipients
        .iter()
        .filter(|r| r.status == "delivered")
        .count();
    assert_eq!(delivered, 20, "{shown:?}");

    // Space again, and the cloud accepts: every recipient exactly once, one DSN.
    std::fs::remove_file(spool.join("filler")).unwrap();
    cloud.state.set_mode(SinkMode::Accept);
    queue_settled(&relay).await;
    let on = onprem.state.messages();
    let cl = cloud.state.messages();
    let counts = per_recipient(&on);
    for a in &onprem_rcpts {
        assert_eq!(counts.get(a), Some(&1), "{a}");
    }
    let counts = per_recipient(&cl);
    for a in &cloud_rcpts {
        assert_eq!(counts.get(a), Some(&1), "{a}");
    }
    for a in &reject_rcpts {
        assert!(!per_recipient(&on).contains_key(a));
    }
    let bounces: Vec<SinkMessage> = dsns(&on).into_iter().chain(dsns(&cl)).collect();
    assert_eq!(bounces.len(), 1, "one DSN to the sender");
    let text = String::from_utf8_lossy(&bounces[0].body);
    for a in &reject_rcpts {
        assert!(
            text.contains(&format!("Final-Recipient: rfc822; {a}")),
            "{a} in the DSN"
        );
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_record_that_cannot_be_written_sends_no_second_dsn_or_delivery() {
    let h = harness(unknown_onprem).await;
    // reject01 is unknown (sent on premises, refused there with 550); bob is in the cloud, which
    // defers first. The DSN goes on premises, which defers it until the end (so the only
    // end record written meanwhile is the original's).
    h.onprem.state.set_mode(SinkMode::Defer);
    h.cloud.state.set_mode(SinkMode::Defer);
    let r = send_one(h.addr, &["reject01@nhs.test", "bob@nhs.test"], "ends").await;
    let qid = queue_id(&r);
    h.deferred(&qid).await;
    hold(&h, &qid).await;

    // Bob is delivered, the DSN spooled, and the end record's sync fails once.
    h.relay.control.inject_spool_faults(InjectedFaults {
        end_syncs: 1,
        ..Default::default()
    });
    h.cloud.state.set_mode(SinkMode::Accept);
    h.relay.queue.release(&qid).unwrap();
    eventually("the original message ended", || {
        h.relay.queue.get(&qid).is_none()
    })
    .await;

    h.onprem.state.set_mode(SinkMode::Accept);
    h.relay.queue.flush_where(|_| true);
    h.settled().await;
    let bob = per_recipient(&h.cloud.state.messages());
    assert_eq!(bob.get("bob@nhs.test"), Some(&1), "bob got it once");
    assert_eq!(dsns(&h.onprem.state.messages()).len(), 1, "one DSN");
}

/// Holds `qid` through the queue and waits until it is held.
async fn hold(h: &Harness, qid: &str) {
    h.relay.queue.hold(qid).unwrap();
    eventually("the message held", || {
        h.relay
            .queue
            .get(qid)
            .is_some_and(|e| e.phase == Phase::Held)
    })
    .await;
}

/// An admin API request; (status, body).
async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http(addr, method, path, Some(TOKEN), None, b"").await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_end_record_cannot_be_written_is_refused() {
    let h = harness(|_| {}).await;
    h.onprem.state.set_mode(SinkMode::Defer);
    let qid = queue_id(&send_one(h.addr, &["alice@nhs.test"], "kept").await);
    h.deferred(&qid).await;
    hold(&h, &qid).await;

    // The end record's sync fails (it is cut off again): the delete is refused.
    h.relay.control.inject_spool_faults(InjectedFaults {
        syncs: 1,
        ..Default::default()
    });
    let api = h.relay.admin_addr.unwrap();
    let (status, body) = admin(api, "POST", &format!("/v1/queue/{qid}/delete")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cannot delete") && body.contains("stays queued"),
        "{body}"
    );
    let e = h.relay.queue.get(&qid).expect("still queued");
    assert_eq!(e.phase, Phase::Held, "as it was before the delete");

    // Across a restart it is still there, as the admin was told; a delete that can be
    // written then removes it for good.
    let h = h.restart().await;
    let e = h
        .relay
        .queue
        .get(&qid)
        .expect("still queued after a restart");
    assert_eq!(e.phase, Phase::Held);
    let api = h.relay.admin_addr.unwrap();
    let (status, body) = admin(api, "POST", &format!("/v1/queue/{qid}/delete")).await;
    assert_eq!(status, 200, "{body}");
    assert!(h.relay.queue.get(&qid).is_none());
    let h = h.restart().await;
    h.onprem.state.set_mode(SinkMode::Accept);
    assert!(
        h.relay.queue.get(&qid).is_none(),
        "a delete is never undone"
    );
    h.settled().await;
    assert_eq!(h.onprem.state.messages().len(), 0, "nothing delivered");
}

fn subjects(sink: &Sink) -> Vec<String> {
    sink.state
        .messages()
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(&m.body).to_string();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect()
}

fn void_markers(spool: &Path) -> Vec<String> {
    std::fs::read_dir(spool.join("segments"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".void-"))
        .collect()
}

/// Sends one message to alice and holds it once deferred (the on-premises sink defers):
/// nothing of it is written while faults are made up, and its segment stays.
async fn send_and_hold(h: &Harness, subject: &str) -> String {
    let r = send_one(h.addr, &["alice@nhs.test"], subject).await;
    assert_eq!(r.code, 250, "{r:?}");
    let qid = queue_id(&r);
    h.deferred(&qid).await;
    hold(h, &qid).await;
    qid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_that_cannot_be_cut_off_stops_no_start_and_brings_nothing_back() {
    let h = harness(|_| {}).await;
    h.onprem.state.set_mode(SinkMode::Defer);
    let spool = h.dir.path().join("spool");
    let one = send_and_hold(&h, "one").await;

    // A short write (a torn record) that cannot be cut off: the sender hears 4xx.
    h.relay.control.inject_spool_faults(InjectedFaults {
        short_writes: 1,
        cuts: 1,
        ..Default::default()
    });
    let r = send_one(h.addr, &["alice@nhs.test"], "two-torn").await;
    assert_eq!(r.code / 100, 4, "{r:?}");
    assert_eq!(void_markers(&spool).len(), 1, "the void end is marked");
    // The spool goes on in a new segment.
    let three = send_and_hold(&h, "three").await;

    // Whole records whose sync failed and that cannot be cut off: 4xx too.
    h.relay.control.inject_spool_faults(InjectedFaults {
        syncs: 1,
        cuts: 1,
        ..Default::default()
    });
    let r = send_one(h.addr, &["alice@nhs.test"], "four-whole").await;
    assert_eq!(r.code / 100, 4, "{r:?}");
    assert_eq!(void_markers(&spool).len(), 2);

    // The next start reads the spool, and neither refused message comes back.
    let h = h.restart().await;
    assert!(
        void_markers(&spool).is_empty(),
        "the void ends were cut at the start"
    );
    h.onprem.state.set_mode(SinkMode::Accept);
    for id in [&one, &three] {
        h.relay.queue.release(id).unwrap();
    }
    h.settled().await;
    let mut got = subjects(&h.onprem);
    got.sort();
    assert_eq!(got, vec!["one", "three"]);
    let h = h.restart().await;
    h.settled().await;
    assert_eq!(subjects(&h.onprem).len(), 2);
}
