//! A fleet's scheduled batches (through the real PostgreSQL): a batch scheduled on a stopped
//! node applied once by another, a node's own schedule moved to the fleet's, and a batch to
//! a route one node lacks left pending for a node that has it, in the schedule's order.
//!
//! Each test works in a schema of its own, dropped afterwards ([`pg::Schema`]).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::BatchUpload;
use common::fleet::*;
use common::pg::{self, Schema};
use common::*;
use std::time::Duration;

/// Issue 23 item 4: a batch scheduled on one node lives in PostgreSQL. The node that took
/// it stops; another lists it, cancels a second one, and applies the first at its time,
/// once, through the fleet log; the first node, back, has it as a change and applies
/// nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_scheduled_on_a_stopped_node_is_applied_once_by_another() {
    use coexist::admin::types::ScheduledStatus;
    let schema = Schema::new("sched").await;
    let hops = hops().await;
    let url = pg::url();
    let a = node(&hops, &schema, "mx1", &url, true).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let first = schedule(&a, "EmailAddress\ndave@nhs.test\n", in_an_hour.clone())
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");
    let second = schedule(&a, "EmailAddress\nalice@nhs.test\n", in_an_hour)
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");
    assert_eq!(first.status, ScheduledStatus::Pending);
    assert_eq!(first.node.as_deref(), Some("mx1"));

    // mx1 stops. mx2 sees both batches and cancels the second.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    let l = scheduled_on(&b).await;
    assert_eq!(
        l.iter().map(|s| (s.id, &s.status)).collect::<Vec<_>>(),
        vec![
            (first.id, &ScheduledStatus::Pending),
            (second.id, &ScheduledStatus::Pending)
        ],
        "{l:?}"
    );
    let (ok, out, err) = bin::cli(
        &b.cli_config(),
        &["directory", "cancel", &second.id.to_string()],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("cancelled:"), "{out}");
    let (ok, out, err) = bin::cli(&b.cli_config(), &["directory", "scheduled"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("weekend.csv (on mx1)  pending") && out.contains("  cancelled at "),
        "{out}"
    );

    // The first batch's time comes (moved to now in PostgreSQL, rather than waiting an
    // hour): mx2 applies it.
    schema
        .execute(&format!(
            "UPDATE scheduled SET at = clock_timestamp() WHERE id = {}",
            first.id
        ))
        .await;
    eventually("dave moved by mx2", || {
        b.route_of("dave@nhs.test").0.as_deref() == Some("cloud")
    })
    .await;
    let l = eventually_async("the batch recorded as applied", || async {
        let l = scheduled_on(&b).await;
        match &l[0].status {
            ScheduledStatus::Applied {
                change: Some(c), ..
            } => Ok((l.clone(), *c)),
            _ => Err(format!("{l:?}")),
        }
    })
    .await;
    let (l, change) = l;
    assert!(
        matches!(l[1].status, ScheduledStatus::Cancelled { .. }),
        "{l:?}"
    );
    assert_eq!(
        b.route_of("dave@nhs.test"),
        (Some("cloud".into()), format!("batch {change}"))
    );
    assert_eq!(b.route_of("alice@nhs.test").0.as_deref(), Some("onprem"));
    let committed = schema
        .value(
            "SELECT string_agg(seq || ' ' || node, ',') FROM changes WHERE source = 'weekend.csv'",
        )
        .await;
    assert_eq!(
        committed,
        Some(format!("{change} mx2")),
        "one change, by mx2"
    );

    // mx1 comes back: it has the change, and applies nothing again.
    let a = Node::start(cfg, dir).await;
    assert_eq!(
        a.route_of("dave@nhs.test"),
        (Some("cloud".into()), format!("batch {change}"))
    );
    let l = scheduled_on(&a).await;
    assert!(
        matches!(l[0].status, ScheduledStatus::Applied { change: Some(c), .. } if c == change),
        "{l:?}"
    );
    // A cancel of a batch no longer pending is refused, from any node.
    let (ok, _, err) = bin::cli(
        &a.cli_config(),
        &["directory", "cancel", &first.id.to_string()],
    );
    assert!(!ok);
    assert!(err.contains("is not pending (applied)"), "{err}");
    let history = a.relay.directory.history_snapshot();
    assert_eq!(
        history.iter().filter(|c| c.source == "weekend.csv").count(),
        1,
        "{history:?}"
    );
}

/// Issue 23 item 4: batches a node kept on its own disk (scheduled before it joined the
/// fleet, or by a version that kept them there) move to the fleet's schedule, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_own_scheduled_batches_move_to_the_fleet() {
    use coexist::admin::types::ScheduledStatus;
    use coexist::directory::scheduled::{parse_at, ScheduleStore};
    let schema = Schema::new("adopt").await;
    let hops = hops().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &hops, &schema, "mx1", &pg::url(), true);
    let local_dir = cfg.directory.store_dir.join("scheduled");
    let at = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    ScheduleStore::open(&local_dir)
        .unwrap()
        .add(
            b"EmailAddress\ncarol@nhs.test\n",
            "old.csv",
            Some("onprem"),
            "auto",
            parse_at(&at).unwrap(),
        )
        .unwrap();
    let a = Node::start(cfg, dir).await;
    let l = eventually_async("the node's own batch in the fleet's schedule", || async {
        let l = scheduled_on(&a).await;
        if l.len() == 1 {
            Ok(l)
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await;
    assert_eq!(
        (l[0].source.as_str(), &l[0].status, l[0].at.as_str()),
        ("old.csv", &ScheduledStatus::Pending, at.as_str())
    );
    let local = ScheduleStore::open(&local_dir).unwrap().list().unwrap();
    assert!(
        matches!(local[0].status, ScheduledStatus::Moved { to, .. } if to == l[0].id),
        "{local:?}"
    );
    // Moved once: a restart does not move it again.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    let a = Node::start(cfg, dir).await;
    let l = scheduled_on(&a).await;
    assert_eq!(l.len(), 1, "{l:?}");
}

/// Review item 5: during a rolling config change one node lacking a route must not fail a
/// valid scheduled batch for the whole fleet. A batch to state `exo` (a route only mx1 has
/// yet) comes due while only mx2 is up: mx2 leaves it pending, and the next one (valid
/// everywhere) waits behind it, so the schedule's order holds; mx1, back, applies it, then
/// the next one follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_batch_to_a_route_one_node_lacks_stays_pending_for_another() {
    use coexist::admin::types::ScheduledStatus;
    let schema = Schema::new("schedroute").await;
    let hops = hops().await;
    let url = pg::url();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_config(dir.path(), &hops, &schema, "mx1", &url, true);
    let cloud = cfg.routes["cloud"].clone();
    cfg.routes.insert("exo".into(), cloud);
    let a = Node::start(cfg, dir).await;
    let b = node(&hops, &schema, "mx2", &url, false).await;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let api = a.api();
    let at = in_an_hour.clone();
    let exo = tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: b"EmailAddress\ndave@nhs.test\n",
            source: "exo.csv",
            state: Some("exo"),
            dry_run: false,
            at: Some(&at),
            format: Default::default(),
        })
    })
    .await
    .unwrap()
    .unwrap()
    .scheduled
    .expect("scheduled");
    let valid = schedule(&a, "EmailAddress\nalice@nhs.test\n", in_an_hour)
        .await
        .unwrap()
        .scheduled
        .expect("scheduled");

    // mx1 stops; both batches come due (the same time: taken in id order, exo first). mx2
    // cannot apply exo's and must not let the later batch overtake it: a few of its rounds
    // (one a second) pass with mx1 down.
    let Node { relay, dir, cfg } = a;
    drop(relay);
    schema.execute("UPDATE scheduled SET at = now()").await;
    // Proves a negative (nothing is applied meanwhile), so it is a wait of a few of mx2's
    // rounds rather than a wait on an event; what mx2 does in them (a `warn` per round) is
    // not visible outside its log.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let l = scheduled_on(&b).await;
    let status = |id: u32| l.iter().find(|s| s.id == id).map(|s| s.status.clone());
    assert_eq!(status(exo.id), Some(ScheduledStatus::Pending), "{l:?}");
    assert_eq!(
        status(valid.id),
        Some(ScheduledStatus::Pending),
        "the later batch overtook the one left pending: {l:?}"
    );

    // mx1, which has the route, comes back and applies it; then the later one follows, in
    // the schedule's order.
    let a = Node::start(cfg, dir).await;
    eventually_async("dave moved to exo and alice to the cloud", || async {
        if a.route_of("dave@nhs.test").0.as_deref() == Some("exo")
            && a.route_of("alice@nhs.test").0.as_deref() == Some("cloud")
        {
            Ok(())
        } else {
            Err(format!("{:?}", scheduled_on(&a).await))
        }
    })
    .await;
    let l = scheduled_on(&a).await;
    let change = |id: u32| {
        l.iter().find(|s| s.id == id).and_then(|s| match s.status {
            ScheduledStatus::Applied { change, .. } => change,
            _ => None,
        })
    };
    let (first, second) = (change(exo.id), change(valid.id));
    assert!(
        first.is_some() && second.is_some() && first < second,
        "applied out of order: {l:?}"
    );
}
