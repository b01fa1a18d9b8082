//! Issue 24 item 4: the fleet's connection to PostgreSQL over TLS, against a server the
//! test starts with TLS on and a `pg_hba.conf` that refuses connections without it
//! (`tests/common/pg_tls.rs`). `verify-full` with the right CA joins and commits; a wrong
//! CA or a certificate for another name is refused with an error that says what was
//! checked and never holds the password; `sslmode=disable` is refused by the server;
//! `require` and `verify-ca` connect.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, BatchUpload};
use coexist::config::FleetConfig;
use common::pg_tls::{PgTls, PASSWORD};
use common::*;
use std::time::Duration;

fn fleet(postgres: String) -> FleetConfig {
    FleetConfig {
        postgres,
        schema: "coexist".into(),
        node: "mx1".into(),
        max_lag: Duration::from_secs(300),
        commit_timeout: Duration::from_secs(10),
    }
}

/// What `check-config` asks: connects with `postgres` and reads the fleet's head.
async fn probe(postgres: String) -> Result<(u32, usize), String> {
    coexist::fleet::probe(&fleet(postgres))
        .await
        .map_err(|e| e.to_string())
}

async fn server(names: &'static [&'static str]) -> PgTls {
    tokio::task::spawn_blocking(|| PgTls::start(names))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_full_with_the_right_ca_joins_the_fleet_and_commits_a_batch() {
    let pg = server(&["localhost", "127.0.0.1"]).await;
    let postgres = pg.conn(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={}", pg.ca.display()),
    );
    let h = harness(|c| c.fleet = Some(fleet(postgres))).await;
    // Seeded from the node's file: base 1.
    assert_eq!(
        h.relay
            .directory
            .lookup(&coexist::types::Address::parse("alice@nhs.test", true).unwrap())
            .state
            .as_deref(),
        Some("onprem")
    );
    let api = AdminClient::new(h.relay.admin_addr.unwrap(), TOKEN.to_string());
    let r = tokio::task::spawn_blocking(move || {
        api.directory_apply(&BatchUpload {
            body: b"EmailAddress\nalice@nhs.test\n",
            source: "batch.csv",
            state: Some("cloud"),
            dry_run: false,
            at: None,
            format: Default::default(),
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!((r.report.id, r.report.changed), (Some(2), 1));
    // The server has the change, and every connection of the node is encrypted.
    assert_eq!(
        pg.psql("SELECT count(*) FROM coexist.changes WHERE seq = 2 AND kind = 'apply'"),
        "1"
    );
    let (tls, clear) = (
        pg.psql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'coexist%' AND s.ssl"),
        pg.psql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'coexist%' AND NOT s.ssl"),
    );
    assert!(tls.parse::<u32>().unwrap() >= 1, "{tls}");
    assert_eq!(clear, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_ca_or_name_is_refused_with_a_clear_error_that_holds_no_password() {
    // A certificate for `localhost` only: 127.0.0.1 is another name.
    let pg = server(&["localhost"]).await;
    let (ca, other) = (pg.ca.display(), pg.other_ca.display());
    let by_name = |tls: &str| pg.conn("localhost hostaddr=127.0.0.1", tls);
    let by_ip = |tls: &str| pg.conn("127.0.0.1", tls);
    let refused = |r: Result<(u32, usize), String>, why: &[&str]| {
        let e = r.unwrap_err();
        assert!(!e.contains(PASSWORD), "the password in: {e}");
        for w in why {
            assert!(e.contains(w), "{w:?} not in: {e}");
        }
        e
    };

    // The right CA, the right name: connects.
    probe(by_name(&format!("sslmode=verify-full sslrootcert={ca}")))
        .await
        .unwrap();
    // The right CA, another name.
    let e = refused(
        probe(by_ip(&format!("sslmode=verify-full sslrootcert={ca}"))).await,
        &[
            "PostgreSQL is unreachable",
            "sslmode=verify-full",
            "name the host",
        ],
    );
    assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");
    // Another CA.
    let e = refused(
        probe(by_name(&format!("sslmode=verify-full sslrootcert={other}"))).await,
        &["sslmode=verify-full", "signed by a CA in sslrootcert"],
    );
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    refused(
        probe(by_ip(&format!("sslmode=verify-ca sslrootcert={other}"))).await,
        &["sslmode=verify-ca", "UnknownIssuer"],
    );
    // `require` with a root checks the chain, as libpq does.
    refused(
        probe(by_ip(&format!("sslmode=require sslrootcert={other}"))).await,
        &["UnknownIssuer"],
    );
    // verify-ca checks the chain only: another name is fine.
    probe(by_ip(&format!("sslmode=verify-ca sslrootcert={ca}")))
        .await
        .unwrap();
    // require: encrypted, not verified.
    probe(by_ip("sslmode=require")).await.unwrap();
    // disable: the server takes no connection without TLS.
    refused(
        probe(by_ip("sslmode=disable")).await,
        &["pg_hba.conf rejects connection", "no encryption"],
    );
    // verify-full without a root is a config error, not a silent downgrade.
    refused(
        probe(by_ip("sslmode=verify-full")).await,
        &["needs sslrootcert=FILE"],
    );
}
