//! Scheduled batches (issue 14): `directory apply --at` keeps a batch and applies it at its
//! time, once, across a restart; a scheduled batch can be listed and cancelled; a bad row is
//! refused when it is scheduled, not at its time.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, BatchUpload};
use coexist::admin::types::{BatchReply, Scheduled, ScheduledStatus};
use common::*;

fn api(h: &Harness) -> AdminClient {
    AdminClient::new(h.relay.admin_addr.unwrap(), TOKEN.to_string())
}

fn in_seconds(s: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(s))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn schedule(h: &Harness, csv: &str, at: String) -> Result<BatchReply, String> {
    let (api, csv) = (api(h), csv.to_string());
    tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: csv.as_bytes(),
            source: "weekend.csv",
            state: Some("cloud"),
            dry_run: false,
            at: Some(&at),
            format: Default::default(),
        })
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

async fn list(h: &Harness) -> Vec<Scheduled> {
    let api = api(h);
    tokio::task::spawn_blocking(move || api.directory_scheduled().unwrap())
        .await
        .unwrap()
}

fn state_of(h: &Harness, a: &str) -> Option<String> {
    h.relay
        .directory
        .lookup(&coexist::types::Address::parse(a, true).unwrap())
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_batch_is_applied_once_at_its_time_even_across_a_restart() {
    let h = harness(|_| {}).await;
    // Due in a moment: moves alice. Due in an hour: moves dave, then cancelled.
    let r = schedule(&h, "EmailAddress\nalice@nhs.test\n", in_seconds(2))
        .await
        .unwrap();
    let first = r.scheduled.expect("scheduled");
    assert_eq!(first.status, ScheduledStatus::Pending);
    assert_eq!(
        (r.report.id, r.report.changed),
        (None, 1),
        "a preview of now"
    );
    assert_eq!(state_of(&h, "alice@nhs.test").as_deref(), Some("onprem"));
    let later = schedule(&h, "EmailAddress\ndave@nhs.test\n", in_seconds(3600))
        .await
        .unwrap()
        .scheduled
        .unwrap();
    let (ok, out, err) = {
        let dir = h.dir.path().to_path_buf();
        let cfg = cli_config(&h, &dir);
        let id = later.id.to_string();
        tokio::task::spawn_blocking(move || bin::cli(&cfg, &["directory", "cancel", &id]))
            .await
            .unwrap()
    };
    assert!(ok, "{err}");
    assert!(out.starts_with("cancelled:"), "{out}");

    eventually("alice moved at the batch's time", || {
        state_of(&h, "alice@nhs.test").as_deref() == Some("cloud")
    })
    .await;
    let l = eventually_async("the batch recorded as applied", || async {
        let l = list(&h).await;
        match &l[0].status {
            ScheduledStatus::Applied {
                change: Some(_), ..
            } => Ok(l),
            _ => Err(format!("{l:?}")),
        }
    })
    .await;
    assert!(
        matches!(l[1].status, ScheduledStatus::Cancelled { .. }),
        "{l:?}"
    );
    assert_eq!(state_of(&h, "dave@nhs.test").as_deref(), Some("onprem"));

    // One due while the relay is stopped is applied when it starts again, once.
    schedule(&h, "EmailAddress\ndave@nhs.test\n", in_seconds(1))
        .await
        .unwrap();
    let h = h.restart().await;
    eventually("dave moved after the restart", || {
        state_of(&h, "dave@nhs.test").as_deref() == Some("cloud")
    })
    .await;
    let l = eventually_async("the third batch recorded as applied", || async {
        let l = list(&h).await;
        match &l[2].status {
            ScheduledStatus::Applied { .. } => Ok(l),
            _ => Err(format!("{l:?}")),
        }
    })
    .await;
    assert_eq!(l.len(), 3);
    let applies = h
        .relay
        .directory
        .history_snapshot()
        .iter()
        .filter(|c| c.source == "weekend.csv")
        .count();
    assert_eq!(
        applies,
        2,
        "alice's and dave's batches, each once: {:?}",
        h.relay.directory.history_snapshot()
    );

    // A bad row is refused when the batch is scheduled, with its line.
    let e = schedule(&h, "EmailAddress\nnot-an-address\n", in_seconds(60))
        .await
        .unwrap_err();
    assert!(e.contains("weekend.csv:2: bad address"), "{e}");
    let e = schedule(&h, "EmailAddress\na@nhs.test\n", "saturday".into())
        .await
        .unwrap_err();
    assert!(e.contains("is not a time"), "{e}");
}

/// A config file the CLI can use to reach `h`'s admin API.
fn cli_config(h: &Harness, dir: &std::path::Path) -> std::path::PathBuf {
    let mut c = (*h.relay.control.config()).clone();
    c.admin.as_mut().unwrap().listen = h.relay.admin_addr.unwrap();
    let path = dir.join("cli.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    path
}
