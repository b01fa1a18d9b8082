//! The checker's rules, each on a small history made by hand.

use super::*;
use crate::history::FaultKind;
use serde_json::json;
use Estate::{Cloud, Onprem};

const T0: i64 = 1_700_000_000_000;
const A: &str = "a@corp.test";
const B: &str = "b@corp.test";
/// max_lag + attempt of the default rules.
const W: i64 = 90_000;

fn base() -> History {
    let initial = [(A.to_string(), Onprem), (B.to_string(), Cloud)].into();
    let (rules, span_ms) = (Some(DEFAULT_RULES), (T0, T0 + 3_600_000));
    History {
        initial,
        rules,
        span_ms,
        ..History::default()
    }
}

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a test fixture")
}

fn sent(h: &mut History, at: i64, qid: &str, rcpts: &[&str], refused: Option<u16>) {
    let refused: Vec<_> = refused
        .iter()
        .map(|c| json!({"rcpt": B, "code": c, "reply": format!("{c} no")}))
        .collect();
    let v = json!({"at_ms": T0 + at, "node": "mx1", "qid": qid, "accepted": rcpts,
        "refused": refused});
    h.sent.push(from(v));
}

fn deliver(h: &mut History, at: i64, estate: Estate, qid: &str, rcpts: &[&str], crc: u32) {
    let v = json!({"estate": estate, "qid": qid, "rcpts": rcpts, "crc": crc, "at_ms": T0 + at});
    h.deliveries.push(from(v));
}

fn move_a(h: &mut History, from_ms: i64, to_ms: i64, state: Estate) {
    let v = json!({"from_ms": T0 + from_ms, "to_ms": T0 + to_ms, "state": state,
        "source": "batch 1", "addresses": [A]});
    h.moves.push(from(v));
}

fn fault(h: &mut History, kind: FaultKind, start: i64, end: i64) {
    let v = json!({"start_ms": T0 + start, "end_ms": T0 + end, "kind": kind,
        "target": "mx2", "detail": ""});
    h.faults.push(from(v));
}

fn final_state(h: &mut History, node: &str, address: &str, state: &str) {
    let v = json!({"node": node, "address": address, "state": state, "origin": "base 5"});
    h.finals.push(from(v));
}

#[test]
fn a_node_left_on_a_mailbox_s_old_side_after_the_run_has_diverged() {
    let mut h = base();
    move_a(&mut h, 1_000, 2_000, Cloud);
    final_state(&mut h, "mx1", A, "cloud");
    final_state(&mut h, "mx1", B, "cloud");
    let v = check(&h);
    assert_eq!((v.final_checked, v.diverged.count), (2, 0), "{v:?}");
    final_state(&mut h, "mx2", A, "onprem");
    let v = check(&h);
    assert_eq!(v.diverged.count, 1, "{v:?}");
    assert!(v.diverged.examples[0].contains("mx2 routes a@corp.test to onprem"));
    assert!(!v.passed());
}

fn sample(h: &mut History, at: i64, node: &str, ready: bool, applied: u32) {
    let v = json!({"at_ms": T0 + at, "node": node, "up": true, "ready": ready,
        "applied": applied, "postgres_up": true, "queue": 0});
    h.samples.push(from(v));
}

#[test]
fn a_clean_history_passes() {
    let mut h = base();
    sent(&mut h, 1_000, "Q1", &[A, B], None);
    deliver(&mut h, 2_000, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 2_000, Cloud, "Q1", &[B], 7);
    sample(&mut h, 0, "mx1", true, 3);
    sample(&mut h, 1_000, "mx2", true, 3);
    let v = check(&h);
    assert!(v.passed(), "{v:#?}");
    assert_eq!((v.acknowledged, v.delivered, v.routed), (2, 2, 2));
    assert_eq!(
        (v.unacknowledged_deliveries, v.max_stale_delivery_ms),
        (0, 0)
    );
}

#[test]
fn a_lost_recipient_is_found_and_an_unacknowledged_delivery_only_counted() {
    let mut h = base();
    sent(&mut h, 1_000, "Q1", &[A, B], None);
    deliver(&mut h, 2_000, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 2_000, Onprem, "Q9", &[A], 7);
    let v = check(&h);
    assert_eq!((v.acknowledged, v.delivered, v.lost.count), (2, 1, 1));
    let e = &v.lost.examples[0];
    assert!(
        e.contains("b@corp.test in queue id Q1 (accepted by mx1 at") && e.contains("(+1.0s)"),
        "{e}"
    );
    assert_eq!((v.unacknowledged_deliveries, v.violations()), (1, 1));
}

#[test]
fn a_delivery_to_the_old_estate_long_after_a_move_is_misrouted() {
    let mut h = base();
    move_a(&mut h, 10_000, 20_000, Cloud);
    deliver(&mut h, 20_000 + W - 1, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 20_000 + W + 1, Onprem, "Q2", &[A], 7);
    deliver(&mut h, 1_000, Onprem, "Q3", &["nobody@corp.test"], 7);
    let v = check(&h);
    assert_eq!((v.misrouted.count, v.unknown.count), (1, 1), "{v:#?}");
    assert!(v.misrouted.examples[0].contains("Q2"));
    assert!(v.unknown.examples[0].contains("nobody@corp.test"));
    assert_eq!(v.max_stale_delivery_ms, W + 1);
}

#[test]
fn a_delivery_in_the_move_window_is_fine_either_side_but_not_before_it() {
    let mut h = base();
    move_a(&mut h, 10_000, 20_000, Cloud);
    move_a(&mut h, 600_000, 610_000, Onprem);
    deliver(&mut h, 15_000, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 15_000, Cloud, "Q2", &[A], 7);
    deliver(&mut h, 500_000, Cloud, "Q3", &[A], 7);
    assert!(check(&h).passed());
    deliver(&mut h, 5_000, Cloud, "Q4", &[A], 7);
    deliver(&mut h, 610_000 + W + 1, Cloud, "Q5", &[A], 7);
    deliver(&mut h, 610_000 + W + 1, Onprem, "Q6", &[A], 7);
    let v = check(&h);
    assert_eq!(v.misrouted.count, 2, "{v:#?}");
    assert!(v.misrouted.examples[1].contains("Q5: it had left cloud 90.0s before"));
    assert!(v.misrouted.examples[0].contains("Q4: it had not been in cloud"));
}

#[test]
fn a_duplicate_is_explained_by_a_node_kill_and_otherwise_a_violation() {
    let mut h = base();
    sent(&mut h, 1_000, "Q1", &[A], None);
    deliver(&mut h, 2_000, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 40_000, Onprem, "Q1", &[A], 7);
    fault(&mut h, FaultKind::SlowLink, 0, 100_000);
    let v = check(&h);
    assert_eq!((v.duplicates.count, v.duplicates_explained), (1, 0));
    assert!(v.duplicates.examples[0].contains("delivered 2 times"));
    fault(&mut h, FaultKind::NodeKill, 30_000, 35_000);
    let v = check(&h);
    assert_eq!((v.duplicates.count, v.duplicates_explained), (0, 1));
    assert!(v.passed());
}

#[test]
fn differing_contents_of_one_message_are_corrupted() {
    let mut h = base();
    sent(&mut h, 1_000, "Q1", &[A], None);
    deliver(&mut h, 2_000, Onprem, "Q1", &[A], 7);
    deliver(&mut h, 3_000, Onprem, "Q1", &[A], 8);
    fault(&mut h, FaultKind::NodeKill, 0, 10_000);
    let v = check(&h);
    assert_eq!((v.corrupted.count, v.duplicates_explained), (1, 1));
    assert!(v.corrupted.examples[0].contains("00000007"));
}

#[test]
fn a_550_is_a_violation_and_a_451_is_not() {
    let mut h = base();
    for (i, code) in [550, 451, 451].into_iter().enumerate() {
        sent(&mut h, 1_000, &format!("Q{i}"), &[], Some(code));
    }
    sent(&mut h, 2_000, "", &[], None);
    (h.sent[3].qid, h.sent[3].error) = (None, Some("connection reset".into()));
    let v = check(&h);
    assert_eq!((v.refused_5xx.count, v.violations()), (1, 1));
    assert!(v.refused_5xx.examples[0].contains("550 no"));
    assert_eq!(v.deferred_by_code, [(451, 2)].into());
    assert_eq!(v.session_errors, 1);
}

#[test]
fn a_stale_ready_sample_is_found_and_a_draining_one_is_not() {
    let mut h = base();
    let bound = 35_000;
    sample(&mut h, 0, "mx1", true, 5);
    sample(&mut h, 1_000, "mx1", true, 6);
    sample(&mut h, 1_000 + bound, "mx2", true, 5);
    sample(&mut h, 2_000 + bound, "mx2", true, 5);
    sample(&mut h, 2_000 + bound, "mx3", false, 5);
    let v = check(&h);
    assert_eq!(v.stale.count, 1, "{v:#?}");
    assert_eq!(v.stale_by_node, [("mx2".to_string(), 1)].into());
    assert!(v.stale.examples[0].contains("on change 5 while change 6 had been out 36.0s"));
    // While a failover that lost change 6 is being repaired, a node that follows
    // PostgreSQL (on change 5) is not stale.
    fault(&mut h, FaultKind::PgFailoverLost, 1_500, 1_600);
    assert_eq!(
        check(&h).stale.count,
        1,
        "the window ends max_lag + slack after"
    );
    fault(&mut h, FaultKind::PgFailoverLost, 1_500, 10_000);
    assert_eq!(check(&h).stale.count, 0);
}
