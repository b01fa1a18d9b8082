//! The weekend under fire, CI size (issue 28): `coexist-weekend run --smoke` builds the
//! whole topology in network namespaces (three coexist nodes with `[fleet]` and `[shadow]`,
//! a PostgreSQL primary and standby, three NATS JetStream servers, OpenLDAP, two next
//! hops), sends a day's curve of mail through all three MX nodes while batches flip and
//! every kind of fault is injected once, and checks the history: nothing lost or
//! misrouted, every duplicate explained by a fault, no valid recipient refused with 5xx, no
//! node routing on a stale directory past `fleet.max_lag`. About 90 seconds; needs root
//! (network namespaces), as CI runs. The ten-minute run is `bench/weekend.sh`.
#![allow(clippy::disallowed_methods)] // Tests read the run's files directly.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `coexist-weekend`, built beside `coexist` by `cargo build --bins` (the README's test
/// command builds every program first).
fn weekend_bin() -> PathBuf {
    let p = std::path::Path::new(common::bin::BIN).with_file_name("coexist-weekend");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

#[test]
fn a_smoke_weekend_with_every_fault_loses_and_misroutes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(weekend_bin())
        .args(["run", "--smoke", "--seed", "3", "--out"])
        .arg(out.path())
        .output()
        .expect("coexist-weekend runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the weekend failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains("PASSED: 0 violation(s)"), "{stdout}");

    // The verdict is backed by a real history: mail acknowledged and delivered to both
    // estates, every fault of the schedule injected and repaired, every node sampled.
    let verdict: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("verdict.json")).unwrap()).unwrap();
    let acked = verdict["acknowledged"].as_u64().unwrap();
    assert!(acked > 500, "{verdict}");
    assert_eq!(verdict["delivered"].as_u64(), Some(acked), "{verdict}");
    for estate in ["onprem", "cloud"] {
        let rec = std::fs::read_to_string(out.path().join(format!("sink-{estate}.rec"))).unwrap();
        assert!(rec.lines().count() > 100, "{estate}: {rec}");
    }
    let faults = std::fs::read_to_string(out.path().join("faults.jsonl")).unwrap();
    for kind in [
        "pg_failover_lost",
        "ldap_down",
        "node_kill",
        "node_partition",
        "hop_throttle",
        "hop_refuse",
        "nats_down",
        "slow_link",
        "slow_disk",
    ] {
        assert!(
            faults.contains(&format!("\"{kind}\"")),
            "{kind} missing: {faults}"
        );
    }
    let moves = std::fs::read_to_string(out.path().join("moves.jsonl")).unwrap();
    assert_eq!(
        moves.lines().count(),
        6,
        "three batches, the batch the failover loses, two LDAP changes: {moves}"
    );
    // The failover lost that batch's commit; the admin's import repaired the log, and
    // every node then routes the sampled mailboxes where their last change put them.
    assert!(moves.contains("(lost, 500 mailboxes"), "{moves}");
    assert!(
        verdict["final_checked"].as_u64().unwrap() > 3 * 1_000,
        "{verdict}"
    );
    let samples = std::fs::read_to_string(out.path().join("samples.jsonl")).unwrap();
    for node in ["mx1", "mx2", "mx3"] {
        assert!(samples.contains(&format!("\"node\":\"{node}\"")), "{node}");
    }
    let report = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(
        report.contains("PASSED") && report.contains("<svg"),
        "report.html"
    );
    // Nothing of the run is left behind: no namespace of its own.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains("cxw-"),
        "namespaces left: {}",
        String::from_utf8_lossy(&ns.stdout)
    );
}
