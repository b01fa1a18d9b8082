//! One directory writer (issue 25, item 4): on a fleet node every way of changing the
//! directory (the writer called in process, the admin API's batch, a batch scheduled for
//! later and applied by the scheduler, a rollback, a base import) goes through the fleet's
//! writer, so each one is a change in the fleet's log in PostgreSQL; a file reload, which a
//! fleet node has no file for, is refused and changes nothing.
//!
//! Needs the PostgreSQL of the fleet tests (see tests/common/pg.rs).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, BatchUpload};
use coexist::config::FleetConfig;
use coexist::directory::batch;
use coexist::load::sink::{Sink, SinkOptions};
use coexist::relay::{self, Running};
use common::pg::{self, Schema};
use common::*;
use std::time::Duration;

/// The fleet log's changes, oldest first, as `KIND SOURCE`.
async fn log(schema: &Schema) -> Vec<String> {
    schema
        .value("SELECT string_agg(kind || ' ' || source, '|' ORDER BY seq) FROM changes")
        .await
        .map(|s| s.split('|').map(str::to_string).collect())
        .unwrap_or_default()
}

/// Sends batch `csv` (target `state`) to `relay`'s admin API, now or `at` a time.
async fn upload(relay: &Running, csv: &str, state: &str, at: Option<String>) {
    let api = AdminClient::new(relay.admin_addr.unwrap(), TOKEN.to_string());
    let (csv, state) = (csv.to_string(), state.to_string());
    tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: csv.as_bytes(),
            source: if at.is_some() { "later.csv" } else { "api.csv" },
            state: Some(&state),
            dry_run: false,
            at: at.as_deref(),
            format: Default::default(),
        })
    })
    .await
    .unwrap()
    .expect("the batch is taken");
}

fn state_of(relay: &Running, address: &str) -> Option<String> {
    let a = coexist::types::Address::parse(address, true).unwrap();
    relay.directory.lookup(&a).state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_write_of_a_fleet_node_is_a_change_in_the_fleet_log() {
    let schema = Schema::new("writer").await;
    let lo = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cloud = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let mut cfg = test_config(dir.path(), &certs, onprem.addr, cloud.addr);
    cfg.fleet = Some(FleetConfig {
        postgres: pg::url(),
        schema: schema.name.clone(),
        node: "n1".into(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(120),
    });
    let relay = relay::start(cfg).await.unwrap();
    let seed = log(&schema).await;
    assert_eq!(seed.len(), 1, "seeded from directory.file: {seed:?}");
    assert!(seed[0].starts_with("base "), "{seed:?}");
    let writer = relay.control.writer.clone();

    // The writer, called in process.
    let rows = batch::parse(
        b"EmailAddress\nalice@nhs.test\n",
        "direct.csv",
        relay.directory.states(),
        Some("cloud"),
    )
    .unwrap();
    let w = writer
        .apply(rows, "direct.csv".into(), false)
        .await
        .unwrap();
    let direct = w.report.id.expect("a change");
    assert_eq!(w.progress.expect("fleet progress").seq, direct);
    assert_eq!(state_of(&relay, "alice@nhs.test").as_deref(), Some("cloud"));

    // The admin API, now and for later (the scheduler applies it through the fleet).
    upload(&relay, "EmailAddress\nbob@nhs.test\n", "onprem", None).await;
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    upload(&relay, "EmailAddress\ndave@nhs.test\n", "cloud", Some(past)).await;
    eventually_async("the scheduled batch in the fleet log", || async {
        let l = log(&schema).await;
        if l.len() == 4 {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await;
    assert_eq!(state_of(&relay, "dave@nhs.test").as_deref(), Some("cloud"));

    // A reload: a fleet node has no file of its own.
    let e = writer.reload(false).await.unwrap_err().to_string();
    assert!(e.contains("coexist directory import"), "{e}");

    // A rollback, then a new base.
    writer.rollback(direct).await.unwrap();
    assert_eq!(
        state_of(&relay, "alice@nhs.test").as_deref(),
        Some("onprem")
    );
    let b = writer
        .import(
            DIRECTORY
                .replace("carol@nhs.test,cloud", "carol@nhs.test,onprem")
                .into_bytes(),
            "import.csv".into(),
            false,
        )
        .await
        .unwrap();
    assert!(b.id.is_some(), "{b:?}");
    assert_eq!(
        state_of(&relay, "carol@nhs.test").as_deref(),
        Some("onprem")
    );

    let l = log(&schema).await;
    assert_eq!(l.len(), 6, "{l:?}");
    assert_eq!(
        [&l[1], &l[2], &l[3], &l[5]],
        [
            "apply direct.csv",
            "apply api.csv",
            "apply later.csv",
            "base import.csv"
        ],
        "{l:?}"
    );
    assert!(l[4].starts_with("rollback "), "{l:?}");
    if let Some(f) = &relay.control.fleet {
        f.stop();
    }
}
