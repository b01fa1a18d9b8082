use super::*;
use crate::types::QueueId;

fn key() -> QueueKey {
    QueueId::generate().key().unwrap()
}

fn entry(slot: Slot, due_ms: u64) -> Entry {
    Entry {
        msg: Loc {
            seg: 1,
            meta_len: 10,
            off: 8,
        },
        state: None,
        due_ms,
        attempts: 0,
        route: NO_ROUTE,
        slot,
        asks: Asks::default(),
    }
}

#[test]
fn ready_first_then_due_in_time_order() {
    let mut ix = Index::default();
    let (a, b, c) = (key(), key(), key());
    ix.insert(a, entry(Slot::Deferred, 300));
    ix.insert(b, entry(Slot::Deferred, 100));
    ix.insert(c, entry(Slot::Ready, 0));
    assert_eq!(ix.next(50, |_| usize::MAX).map(|x| x.0), Some(c));
    assert_eq!(
        ix.next(50, |_| usize::MAX).map(|x| x.0),
        None,
        "nothing due at 50"
    );
    assert_eq!(ix.next_due(), Some(100));
    assert_eq!(ix.next(1000, |_| usize::MAX).map(|x| x.0), Some(b));
    assert_eq!(ix.next(1000, |_| usize::MAX).map(|x| x.0), Some(a));
    assert_eq!(ix.census().count, [0, 3, 0, 0]);
}

#[test]
fn a_flushed_message_leaves_a_stale_timer_item_that_is_skipped() {
    let mut ix = Index::default();
    let a = key();
    ix.insert(a, entry(Slot::Deferred, 100));
    assert!(matches!(ix.ask(a, Asks::FLUSH), Ok(None)));
    assert_eq!(ix.next(0, |_| usize::MAX).map(|x| x.0), Some(a));
    ix.settle(a, None, 1, NO_ROUTE, Settle::Deferred(500))
        .unwrap();
    assert_eq!(ix.next_due(), Some(500), "the item at 100 is stale");
    assert!(ix.next(200, |_| usize::MAX).is_none());
}

#[test]
fn requests_to_a_busy_message_wait_for_it_to_settle() {
    let mut ix = Index::default();
    let a = key();
    ix.insert(a, entry(Slot::Ready, 0));
    ix.next(0, |_| usize::MAX).unwrap();
    assert!(matches!(ix.ask(a, Asks::HOLD), Ok(None)));
    assert!(matches!(ix.ask(a, Asks::DELETE), Ok(None)));
    let asks = ix
        .settle(a, None, 1, NO_ROUTE, Settle::Deferred(9))
        .unwrap_err();
    assert!(asks.has(Asks::HOLD) && asks.has(Asks::DELETE));
    assert_eq!(ix.get(a).unwrap().slot, Slot::Busy);
    ix.settle(a, None, 1, NO_ROUTE, Settle::Held).unwrap();
    assert_eq!(ix.census().count[Slot::Held as usize], 1);
    // Held: a release makes it busy for the caller to write the change.
    assert!(ix.ask(a, Asks::RELEASE).unwrap().is_some());
}

#[test]
fn a_route_that_answers_again_releases_its_messages() {
    let mut ix = Index::default();
    let mut mine = Vec::new();
    for i in 0..10 {
        let k = key();
        let mut e = entry(Slot::Deferred, 1_000_000);
        e.route = if i % 2 == 0 { 3 } else { 4 };
        if e.route == 3 {
            mine.push(k);
        }
        ix.insert(k, e);
    }
    let (n1, next) = ix.release_route(3, None, 4);
    assert_eq!(n1, 4);
    assert_eq!(ix.release_route(3, next, 4), (1, None));
    let mut got = Vec::new();
    while let Some((k, _)) = ix.next(0, |_| usize::MAX) {
        got.push(k);
    }
    assert_eq!(got, mine, "oldest first, only route 3");
    assert!(ix.probe_route(4).is_some());
}

#[test]
fn a_route_at_its_limit_does_not_hold_up_the_others() {
    let mut ix = Index::default();
    // A released backlog of route 3 (older), then fresh mail (no route).
    let backlog: Vec<QueueKey> = (0..5)
        .map(|_| {
            let k = key();
            let mut e = entry(Slot::Ready, 0);
            e.route = 3;
            ix.insert(k, e);
            k
        })
        .collect();
    let fresh: Vec<QueueKey> = (0..3)
        .map(|_| {
            let k = key();
            ix.insert(k, entry(Slot::Ready, 0));
            k
        })
        .collect();
    let cap = |tag: u16| if tag == 3 { 2 } else { usize::MAX };
    // Taken in turn: one of each route, not all of the older backlog first.
    let mut fresh_left = fresh.clone();
    let mut first: Vec<u16> = (0..2)
        .map(|_| {
            let (k, e) = ix.next(0, cap).unwrap();
            fresh_left.retain(|f| *f != k);
            e.route
        })
        .collect();
    first.sort_unstable();
    assert_eq!(first, vec![3, NO_ROUTE]);
    let mut got = 2;
    while let Some((k, _)) = ix.next(0, cap) {
        fresh_left.retain(|f| *f != k);
        got += 1;
    }
    // Two of the backlog (its limit), and every fresh message.
    assert_eq!(got, 5);
    assert_eq!(
        fresh_left.len(),
        0,
        "fresh mail left behind: {fresh_left:?}"
    );
    // One of route 3 settles: the next of its backlog may go.
    ix.settle(backlog[0], None, 1, NO_ROUTE, Settle::Deferred(10_000))
        .unwrap();
    assert_eq!(ix.next(0, cap).map(|x| x.0), Some(backlog[2]));
    assert!(ix.next(0, cap).is_none());
    assert_eq!(ix.census().count[Slot::Ready as usize], 2);
}

#[test]
fn the_timer_does_not_keep_the_items_of_released_messages() {
    let mut ix = Index::default();
    for _ in 0..3 {
        for _ in 0..5_000 {
            let mut e = entry(Slot::Deferred, 1_000_000);
            e.route = 2;
            ix.insert(key(), e);
        }
        let mut from = None;
        loop {
            from = ix.release_route(2, from, 1000).1;
            if from.is_none() {
                break;
            }
        }
        while let Some((k, _)) = ix.next(0, |_| usize::MAX) {
            ix.settle(k, None, 1, 2, Settle::Deferred(2_000_000))
                .unwrap();
        }
    }
    assert_eq!(ix.census().count[Slot::Deferred as usize], 15_000);
    assert!(ix.timer.len() <= 2 * 15_000 + 1024, "{}", ix.timer.len());
}

#[test]
fn timer_items_are_16_bytes_and_order_by_time_then_key() {
    assert_eq!(std::mem::size_of::<Due>(), 16);
    let (a, b) = (
        QueueKey::from_u128(1).unwrap(),
        QueueKey::from_u128(2).unwrap(),
    );
    let max = QueueKey::from_u128((1 << 68) - 1).unwrap();
    assert!(Due::new(5, b) < Due::new(6, a));
    assert!(Due::new(5, a) < Due::new(5, b));
    assert!(Due::new(5, max) < Due::new(6, a));
    let far = Due::new(u64::MAX, max);
    assert_eq!((far.ms(), far.key()), (Due::MAX_MS, Some(max)));
    let now = Due::new(1_765_000_000_000, a);
    assert_eq!((now.ms(), now.key()), (1_765_000_000_000, Some(a)));
}

#[test]
fn entries_are_40_bytes_and_keep_offsets_past_4_gib() {
    assert_eq!(std::mem::size_of::<Stored>(), 40);
    let mut ix = Index::default();
    let k = key();
    let far = |off: u64| Loc {
        seg: 7,
        meta_len: 99,
        off,
    };
    let mut e = entry(Slot::Ready, 0);
    e.msg = far(5 << 30);
    e.state = Some(far(u64::from(u32::MAX)));
    ix.insert(k, e);
    let got = ix.get(k).unwrap();
    assert_eq!(
        (got.msg, got.state),
        (far(5 << 30), Some(far(u64::from(u32::MAX))))
    );
    // A nearer state record replaces the far one; the message record moves near too.
    ix.next(0, |_| 10).unwrap();
    let near = far(4096);
    ix.settle(k, Some(near), 1, NO_ROUTE, Settle::Ready)
        .unwrap();
    ix.moved(k, far(8192));
    let got = ix.get(k).unwrap();
    assert_eq!((got.msg, got.state), (far(8192), Some(near)));
    assert!(ix.far.is_empty());
    ix.moved(k, far(6 << 30));
    assert_eq!(ix.get(k).unwrap().msg, far(6 << 30));
    assert_eq!(ix.remove(k).unwrap().msg, far(6 << 30));
    assert!(ix.far.is_empty() && ix.is_empty());
    // No state record yet: none comes back.
    ix.insert(k, entry(Slot::Held, 0));
    assert_eq!(ix.get(k).unwrap().state, None);
}
