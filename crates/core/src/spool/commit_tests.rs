//! Group commit: records waiting together share one sync, and the commit stage's two waits
//! for company (`commit::Pace`): a `Done` lingering for the next message, new messages
//! gathering when they come fast, and neither when nothing calls for it.

use super::tests::{env, rt};
use super::*;
use std::time::{Duration, Instant};

/// Waits for company: `Done` records up to `secs`, new messages none.
fn lingering(secs: u64) -> commit::Pace {
    commit::Pace {
        linger: Duration::from_secs(secs),
        gather: Duration::ZERO,
    }
}

/// Waits (at most 30 s) until `n` requests wait for the commit stage unanswered.
fn wait_for_jobs(s: &Spool, n: usize) {
    let t0 = Instant::now();
    while s.jobs_waiting_for_test() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "requests did not queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A runtime with two worker threads (tasks that wait while the test thread looks on).
fn rt_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn records_waiting_together_share_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt_threads();
    let s = Arc::new(Spool::open(dir.path()).unwrap().spool);
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    s.jobs.send(Job::Pause(gate_rx)).unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let s = s.clone();
            rt.spawn(async move {
                s.store(&env(QueueId::generate()), Arc::new(b"m".to_vec()))
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Every store is waiting for the commit stage (none answered while it is paused).
    wait_for_jobs(&s, 50);
    assert!(tasks.iter().all(|t| !t.is_finished()));
    drop(gate_tx);
    let locs: Vec<Loc> = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    assert_eq!(
        s.commit_stats(),
        (1, 50),
        "one fdatasync for the 50 messages"
    );
    let mut offs: Vec<u64> = locs.iter().map(|l| l.off).collect();
    offs.dedup();
    assert_eq!(offs.len(), 50);
}

/// A `Done` (nobody outside waits for it) lingers for company: a new message stored while
/// it waits shares its sync. The linger is an hour here, so the message, which a client
/// waits for, must end it at once: it is never held back itself.
#[test]
fn a_done_waits_for_the_next_message_and_shares_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt_threads();
    let s = Arc::new(
        Spool::open_tuned(dir.path(), commit::SEGMENT_SIZE, lingering(3600))
            .unwrap()
            .spool,
    );
    let first = env(QueueId::generate());
    let msg = rt
        .block_on(s.store(&first, Arc::new(b"m".to_vec())))
        .unwrap();
    assert_eq!(s.commit_stats(), (1, 1), "a message is synced at once");
    let s2 = s.clone();
    let id = first.id.clone();
    let done = rt.spawn(async move { s2.finish(&id, msg, None).await });
    // The Done is with the commit stage (taken, lingering) and not answered.
    wait_for_jobs(&s, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.is_finished(), "a lone Done lingers");
    assert_eq!(s.commit_stats(), (1, 1));
    // A new message: stored without waiting out the hour, in the same sync as the Done.
    let second = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            s.store(&env(QueueId::generate()), Arc::new(b"n".to_vec())),
        )
        .await
    });
    assert!(second
        .expect("the message did not wait for the linger")
        .is_ok());
    rt.block_on(done).unwrap().unwrap();
    assert_eq!(
        s.commit_stats(),
        (2, 3),
        "the Done and the message share one sync"
    );
}

/// With no new message coming in (a queue draining after a restart), a `Done` is synced at
/// once even with an hour's linger.
#[test]
fn a_done_does_not_wait_when_no_message_is_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let id = QueueId::generate();
    let s = Spool::open(dir.path()).unwrap().spool;
    rt.block_on(s.store(&env(id.clone()), Arc::new(b"m".to_vec())))
        .unwrap();
    drop(s);
    let o = Spool::open_tuned(dir.path(), commit::SEGMENT_SIZE, lingering(3600)).unwrap();
    let msg = o.queued.list()[0].msg;
    let done = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), o.spool.finish(&id, msg, None)).await
    });
    assert!(done.expect("the Done waited for the linger").is_ok());
    assert_eq!(o.spool.commit_stats(), (1, 1));
}

/// New messages coming fast and together wait a moment for each other: after a turn of two
/// messages, the next message stored waits for company, and one stored a moment later
/// shares its sync. A message alone, the first of all, does not wait.
#[test]
fn messages_coming_fast_gather_into_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt_threads();
    let pace = commit::Pace {
        linger: commit::LINGER,
        gather: Duration::from_secs(5),
    };
    let s = Arc::new(
        Spool::open_tuned(dir.path(), commit::SEGMENT_SIZE, pace)
            .unwrap()
            .spool,
    );
    let store = |s: &Arc<Spool>| {
        let s = s.clone();
        rt.spawn(async move {
            s.store(&env(QueueId::generate()), Arc::new(b"m".to_vec()))
                .await
        })
    };
    rt.block_on(store(&s)).unwrap().unwrap();
    assert_eq!(s.commit_stats(), (1, 1), "the first message alone, at once");
    // Two messages in one turn (held back until both wait).
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    s.jobs.send(Job::Pause(gate_rx)).unwrap();
    let two = [store(&s), store(&s)];
    wait_for_jobs(&s, 2);
    drop(gate_tx);
    for t in two {
        rt.block_on(t).unwrap().unwrap();
    }
    assert_eq!(s.commit_stats(), (2, 3));
    let b = store(&s);
    // Without the wait, the next message's turn would be synced well within this.
    std::thread::sleep(Duration::from_millis(100));
    let c = store(&s);
    rt.block_on(b).unwrap().unwrap();
    rt.block_on(c).unwrap().unwrap();
    assert_eq!(s.commit_stats(), (3, 5), "the next two share one sync");
}
