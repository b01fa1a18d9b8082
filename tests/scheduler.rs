//! The scheduler at scale: mail deferred because a route's next hops were down is released
//! when they answer again (not at each message's own retry time), and a restart resumes the
//! schedule written in the spool instead of retrying everything at once.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::Controls;
use coexist::load::sink::{Sink, SinkMode, SinkOptions};
use coexist::queue::{Phase, QueueEntry};
use coexist::spool::InjectedFaults;
use common::*;
use std::time::Duration;

/// A relay whose `cloud` route's next hop refuses connections, with a one-hour backoff and
/// a probe every `probe`, holding `n` messages for that route, each deferred once; returns
/// the port that can come up later, the relay and the messages' queue entries.
async fn mail_for_a_down_route(n: usize, probe: Duration) -> (DownPort, Harness, Vec<QueueEntry>) {
    let down = DownPort::new();
    let h = harness(|c| {
        c.routes.get_mut("cloud").unwrap().next_hops = vec![down.addr.into()];
        c.queue.min_backoff = Duration::from_secs(3600);
        c.queue.max_backoff = Duration::from_secs(3600);
        c.queue.probe_interval = probe;
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let r = c
            .mail(
                "x@example.org",
                &["bob@nhs.test"],
                &sample(&format!("m{i}")),
            )
            .await;
        assert_eq!(r.code, 250, "{}", r.text);
        ids.push(queue_id(&r));
    }
    let mut deferred = Vec::new();
    for id in &ids {
        deferred.push(h.deferred(id).await);
    }
    (down, h, deferred)
}

/// Ten messages for a route whose next hop refuses connections, with a one-hour backoff:
/// when the hop comes up, a probe (every `queue.probe_interval`) gets through and every
/// deferred message goes out, long before its own next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_waiting_for_a_down_route_goes_out_when_it_answers_again() {
    let (down, h, deferred) = mail_for_a_down_route(10, Duration::from_secs(1)).await;
    for e in &deferred {
        let wait = e
            .next_attempt
            .unwrap()
            .saturating_sub(coexist::clock::now_secs());
        assert!(
            wait > 3000,
            "next attempt in {wait} s: the backoff is an hour"
        );
    }
    let back = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    down.forward_to(back.addr);
    assert_eq!(wait(&back, 10).await, 10);
    h.settled().await;
    assert!(h.onprem.state.messages().is_empty());
}

/// Waits until the circuit of the next hop `hop` lets a connection through (it opens for a
/// while after each refused connection), then a second more for the rounding of its view.
async fn circuit_closed(h: &Harness, hop: std::net::SocketAddr) {
    let hop = hop.to_string();
    eventually_async("the next hop's circuit lets a probe through", || async {
        h.relay
            .control
            .outbound()
            .hop_views()
            .iter()
            .all(|v| v.next_hop != hop || v.resumes_in_s == 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

/// A message whose attempt found its route down a moment before the route answered again,
/// and which was still writing its new state (a stalled disk) when the route's release went
/// by, goes out with the rest rather than after its own one-hour backoff (issue 30, part 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_failing_as_its_route_comes_back_is_released_with_the_rest() {
    // No probes of their own during the test: only the flushes below attempt anything.
    let (down, h, deferred) = mail_for_a_down_route(2, Duration::from_secs(3600)).await;
    let (first, second) = (
        deferred[0].envelope.id.to_string(),
        deferred[1].envelope.id.to_string(),
    );
    circuit_closed(&h, down.addr).await;

    // The first message is attempted again while the hop still refuses; writing what it
    // learned then takes 10 s.
    h.relay.control.inject_spool_faults(InjectedFaults {
        stalls: 1,
        stall: Duration::from_secs(10),
        ..Default::default()
    });
    h.relay.queue.flush(&first).unwrap();
    let (hop, down_addr) = (down.addr.to_string(), down.addr);
    eventually_async("the first message's attempt is refused", || async {
        h.relay
            .control
            .outbound()
            .hop_views()
            .iter()
            .any(|v| v.next_hop == hop && v.resumes_in_s > 0)
    })
    .await;

    // Meanwhile the hop comes back and the second message gets through: the route's mail is
    // released while the first message is still busy writing its state.
    let back = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    down.forward_to(back.addr);
    circuit_closed(&h, down_addr).await;
    h.relay.queue.flush(&second).unwrap();
    assert_eq!(wait(&back, 1).await, 1);
    assert_eq!(
        h.relay.queue.get(&first).map(|e| e.phase),
        Some(Phase::Active),
        "the first message is still writing its state when the release goes by"
    );

    // Once written, the first message goes out too (not in an hour).
    assert_eq!(wait(&back, 2).await, 2);
    h.settled().await;
}

/// A message deferred with a one-hour backoff keeps its attempts and its next attempt time
/// across a restart (read from the spool), rather than being retried at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_schedule_from_the_spool() {
    let h = harness(|c| {
        c.queue.min_backoff = Duration::from_secs(3600);
        c.queue.max_backoff = Duration::from_secs(3600);
    })
    .await;
    h.cloud.state.set_mode(SinkMode::Defer);
    let r = send_one(h.addr, &["bob@nhs.test"], "resume").await;
    assert_eq!(r.code, 250);
    let qid = queue_id(&r);
    let before = h.deferred(&qid).await;
    assert_eq!(before.state.attempts, 1);
    let due = before.next_attempt.unwrap();

    // Same spool, same config, new relay: the hop accepts now, but the message's next
    // attempt is an hour away.
    h.cloud.state.set_mode(SinkMode::Accept);
    let h = h.restart().await;
    let e = h
        .relay
        .queue
        .get(&qid)
        .expect("still queued after the restart");
    assert_eq!(e.phase, Phase::Deferred);
    assert_eq!(e.state.attempts, 1);
    assert_eq!(
        e.next_attempt,
        Some(due),
        "the schedule written before the restart"
    );
    assert_eq!(
        e.state.rcpts[0]
            .last_reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default()[..9],
        *"451 4.3.0"
    );
    // An admin flush sends it now.
    h.relay.queue.flush(&qid).unwrap();
    assert_eq!(wait(&h.cloud, 1).await, 1);
    h.settled().await;
}

/// Mail waiting for a route that was down keeps waiting for it across a restart: the new
/// relay probes that route at once and releases the mail when it answers, instead of waiting
/// out each message's one-hour backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_mail_for_a_down_route_goes_out_when_it_answers() {
    let (down, h, _) = mail_for_a_down_route(3, Duration::from_secs(1)).await;
    let h = h.restart().await;
    let back = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    down.forward_to(back.addr);
    assert_eq!(wait(&back, 3).await, 3);
    h.settled().await;
}

/// The queue keeps time by the clock the relay is started with: on a manual clock a
/// message deferred with a one-hour backoff waits for that clock, not the wall's, and goes
/// out once the test moves the clock past its next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_retries_when_the_clock_it_is_given_reaches_the_next_attempt() {
    use coexist::clock::Clock;
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let lo = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cloud = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let mut cfg = test_config(dir.path(), &certs, onprem.addr, cloud.addr);
    cfg.queue.min_backoff = Duration::from_secs(3600);
    cfg.queue.max_backoff = Duration::from_secs(3600);
    // A day ahead of the wall clock (what the queue schedules shows whose time it keeps),
    // within the message's lifetime, with no delay warning.
    cfg.queue.max_lifetime = Duration::from_secs(30 * 86_400);
    cfg.queue.delay_warning = Duration::ZERO;
    let clock = Clock::manual(coexist::clock::now_ms() + 86_400_000);
    let relay = coexist::relay::start_with_clock(cfg, None, clock.clone())
        .await
        .unwrap();
    cloud.state.set_mode(SinkMode::Defer);
    let r = send_one(relay.local_addrs[0], &["bob@nhs.test"], "clock").await;
    assert_eq!(r.code, 250);
    let qid = queue_id(&r);
    let e = queue_deferred(&relay, &qid).await;
    assert_eq!(e.state.attempts, 1);
    let due = e.next_attempt.unwrap();
    assert_eq!(
        due,
        clock.now_secs() + 3600,
        "an hour after the attempt, by the queue's (stopped) clock"
    );

    cloud.state.set_mode(SinkMode::Accept);
    clock.advance(Duration::from_secs(3601));
    assert_eq!(wait(&cloud, 1).await, 1);
    queue_settled(&relay).await;
}
