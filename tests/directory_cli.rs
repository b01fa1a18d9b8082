//! Live migration batches against the real binary: CLI → admin API → directory → routing.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::bin::{cli, write_config, BinConfig, Server, BIN, NOWHERE};
use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    onprem: Sink,
    cloud: Sink,
    bin: BinConfig,
}

impl Setup {
    /// The relay's SMTP address (known once it runs).
    fn listen(&self) -> SocketAddr {
        self.bin.listen()
    }
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cloud = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let bin = write_config(dir.path(), onprem.addr, cloud.addr);
    Setup {
        dir,
        config: bin.path.clone(),
        onprem,
        cloud,
        bin,
    }
}

fn spawn(s: &mut Setup) -> Server {
    common::bin::spawn(&mut s.bin)
}

async fn send(addr: SocketAddr, rcpts: &[&str], subject: &str) {
    let r = send_one(addr, rcpts, subject).await;
    assert_eq!(r.code, 250, "{r:?}");
}

fn rcpts_of(sink: &Sink) -> Vec<String> {
    let mut v: Vec<String> = sink
        .state
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.iter().map(|a| a.to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_moves_mail_rollback_restores_and_bad_rows_change_nothing() {
    let mut s = setup().await;
    let _server = spawn(&mut s);
    send(s.listen(), &["alice@nhs.test", "dave@nhs.test"], "before").await;
    assert_eq!(wait(&s.onprem, 2).await, 2);

    // A New-MigrationBatch CSV moves alice (and names someone not in the directory).
    let batch = s.dir.path().join("evening.csv");
    std::fs::write(
        &batch,
        "EmailAddress,BadItemLimit\r\nAlice@nhs.test,10\r\nghost@nhs.test,10\r\n",
    )
    .unwrap();
    let (ok, out, err) = cli(
        &s.config,
        &[
            "directory",
            "diff",
            batch.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("rows 2, changed 1, already in state 0, not found 1"),
        "{out}"
    );
    assert!(out.contains("ghost@nhs.test"), "{out}");
    let (ok, out, err) = cli(
        &s.config,
        &[
            "directory",
            "apply",
            batch.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("applied: id 1"), "{out}");

    let (ok, out, _) = cli(&s.config, &["directory", "lookup", "ALICE@nhs.test"]);
    assert!(ok);
    assert!(out.contains("state   cloud (from batch 1)"), "{out}");
    assert!(
        out.contains(&format!("route   cloud -> {}", s.cloud.addr)),
        "{out}"
    );
    let (ok, out, _) = cli(
        &s.config,
        &["route", "explain", "dave@nhs.test", "who@elsewhere.test"],
    );
    assert!(ok);
    assert!(out.contains("state   onprem (from file"), "{out}");
    assert!(
        out.contains("rcpt    550 5.7.1 Relay access denied"),
        "{out}"
    );

    send(s.listen(), &["alice@nhs.test", "dave@nhs.test"], "after").await;
    assert_eq!(wait(&s.cloud, 1).await, 1);
    assert_eq!(wait(&s.onprem, 3).await, 3);
    assert_eq!(rcpts_of(&s.cloud), vec!["alice@nhs.test"], "alice moved");
    assert_eq!(
        rcpts_of(&s.onprem),
        vec!["alice@nhs.test", "dave@nhs.test", "dave@nhs.test"],
        "dave did not"
    );

    // A batch with a malformed row is refused whole, with its line.
    let bad = s.dir.path().join("bad.csv");
    std::fs::write(&bad, "EmailAddress\ndave@nhs.test\nnot an address\n").unwrap();
    let (ok, _, err) = cli(
        &s.config,
        &[
            "directory",
            "apply",
            bad.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("422 bad.csv:3: bad address \"not an address\""),
        "{err}"
    );
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "dave@nhs.test"]);
    assert!(out.contains("state   onprem"), "{out}");

    // Rollback restores routing.
    let (ok, out, err) = cli(&s.config, &["directory", "rollback", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("rollback of batch 1: id 2"), "{out}");
    send(s.listen(), &["alice@nhs.test"], "rolled back").await;
    assert_eq!(wait(&s.onprem, 4).await, 4);
    assert_eq!(rcpts_of(&s.cloud).len(), 1);

    let (ok, out, _) = cli(&s.config, &["directory", "batches"]);
    assert!(ok);
    assert!(
        out.contains("apply") && out.contains("evening.csv") && out.contains("(undoes 1)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_refused() {
    let mut s = setup().await;
    let _server = spawn(&mut s);
    let mut wrong = BinConfig {
        path: s.dir.path().join("wrong.toml"),
        config: s.bin.config.clone(),
    };
    wrong.config.admin.as_mut().unwrap().token = Some("9c0d2e4f6a8b1c3d5e7f9a0b2c4d6e8f".into());
    wrong.write();
    let (ok, _, err) = cli(&wrong.path, &["directory", "lookup", "alice@nhs.test"]);
    assert!(!ok);
    assert!(err.contains("401 missing or wrong bearer token"), "{err}");
    let client = coexist::admin::client::AdminClient::new(s.bin.admin(), String::new());
    let e = client.get("/v1/health").unwrap_err().to_string();
    assert!(e.starts_with("401"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_file_is_picked_up_and_batches_survive_restart() {
    let mut s = setup().await;
    let log = s.dir.path().join("serve.log");
    let mut server = common::bin::spawn_with(
        &mut s.bin,
        common::bin::Start {
            log: Some(&log),
            ..Default::default()
        },
    );
    let batch = s.dir.path().join("b.csv");
    std::fs::write(&batch, "EmailAddress\nalice@nhs.test\n").unwrap();
    assert!(
        cli(
            &s.config,
            &[
                "directory",
                "apply",
                batch.to_str().unwrap(),
                "--state",
                "cloud"
            ]
        )
        .0
    );

    // The admin edits the file. A broken edit (dave moved, and a bad row on line 6) is
    // refused whole: the watcher logs the file, line and reason, `directory reload` answers
    // the same, and the old state stays in force (dave on premises, alice's batch kept).
    let file = s.dir.path().join("directory.csv");
    let moved = DIRECTORY.replace("dave@nhs.test,onprem", "dave@nhs.test,cloud");
    std::fs::write(&file, format!("{moved}broken\n")).unwrap();
    let bad_row = format!("{}:6: expected 2 fields", file.display());
    let l = eventually("the watcher to report the broken file", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains(&bad_row))
            .map(str::to_string)
            .ok_or(text)
    })
    .await;
    assert!(l.contains("directory file refused"), "{l}");
    let (ok, out, err) = cli(&s.config, &["directory", "reload"]);
    assert!(!ok, "broken file accepted: {out}");
    assert!(err.contains(&format!("422 {bad_row}")), "{err}");
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "dave@nhs.test"]);
    assert!(out.contains("state   onprem (from file"), "{out}");
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "alice@nhs.test"]);
    assert!(out.contains("state   cloud (from batch 1)"), "{out}");
    let (_, out, _) = cli(&s.config, &["directory", "batches"]);
    assert!(
        !out.contains("reload"),
        "a refused file was recorded: {out}"
    );
    send(s.listen(), &["dave@nhs.test"], "broken edit").await;
    assert_eq!(
        wait(&s.onprem, 1).await,
        1,
        "dave's mail still goes on premises"
    );

    // The fixed file is picked up.
    std::fs::write(&file, &moved).unwrap();
    eventually("the edit to be picked up", || {
        let (_, out, _) = cli(&s.config, &["directory", "lookup", "dave@nhs.test"]);
        if out.contains("state   cloud") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "alice@nhs.test"]);
    assert!(
        out.contains("state   cloud (from batch 1)"),
        "batch kept across the reload: {out}"
    );

    // Restart: the batch is still in force (snapshot + change log), and mail follows it.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    let _server = spawn(&mut s);
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "alice@nhs.test"]);
    assert!(out.contains("state   cloud (from batch 1)"), "{out}");
    send(
        s.listen(),
        &["alice@nhs.test", "dave@nhs.test", "bob@nhs.test"],
        "restart",
    )
    .await;
    assert_eq!(wait(&s.cloud, 3).await, 3);
    assert_eq!(
        s.onprem.state.messages().len(),
        1,
        "only the mail sent before dave moved"
    );
}

#[test]
fn generate_writes_a_synthetic_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.csv");
    let o = Command::new(BIN)
        .args([
            "directory",
            "generate",
            "--count",
            "1000",
            "--domains",
            "4",
            "--cloud-share",
            "0.5",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("address,state\nuser0@nhs.test,"));
    assert_eq!(text.lines().count(), 1001);
    let states = vec![
        coexist::types::RouteName("cloud".into()),
        coexist::types::RouteName("onprem".into()),
    ];
    let parsed = coexist::directory::table::parse(text.as_bytes(), "d.csv", &states).unwrap();
    assert_eq!(parsed.table.len(), 1000);
}

/// A `Get-MigrationUser | Export-Csv -Encoding UTF8` as Windows PowerShell 5 writes it:
/// BOM, `#TYPE`, CRLF, every field quoted, a comma inside a field. alice completed (with
/// warnings), dave failed, ghost (not in the directory) is still syncing, carol's Identity is
/// a GUID but her EmailAddress is given.
const MIGRATION_USERS: &str = "\u{feff}#TYPE Microsoft.Exchange.Data.Storage.Management.MigrationUser\r\n\
    \"Identity\",\"BatchId\",\"EmailAddress\",\"Status\",\"StatusSummary\",\"ErrorSummary\"\r\n\
    \"alice@nhs.test\",\"Evening 14\",\"Alice@nhs.test\",\"CompletedWithWarnings\",\"Completed\",\"\"\r\n\
    \"dave@nhs.test\",\"Evening 14\",\"dave@nhs.test\",\"Failed\",\"Failed\",\"Error: TooManyBadItemsPermanentException, limit 10\"\r\n\
    \"ghost@nhs.test\",\"Evening 14\",\"ghost@nhs.test\",\"Syncing\",\"Active\",\"\"\r\n\
    \"6f0c9e1a-2b3d-4c5e-8f70-9a1b2c3d4e5f\",\"Evening 14\",\"carol@nhs.test\",\"Completed\",\"Completed\",\"\"\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_report_moves_only_completed_users() {
    let mut s = setup().await;
    let _server = spawn(&mut s);
    let report = s.dir.path().join("evening-users.csv");
    std::fs::write(&report, MIGRATION_USERS).unwrap();
    let path = report.to_str().unwrap();
    let grouped =
        "not completed (left as they are): Failed 1 (dave@nhs.test), Syncing 1 (ghost@nhs.test)";

    // The preview: alice moves, carol is in the cloud already, the others are listed.
    let (ok, out, err) = cli(
        &s.config,
        &["directory", "diff", path, "--format", "migration-users"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("preview: nothing applied"), "{out}");
    assert!(
        out.contains("rows 2, changed 1, already in state 1, not found 0"),
        "{out}"
    );
    assert!(out.contains(grouped), "{out}");

    // Without --state a report moves its completed users to cloud.
    let (ok, out, err) = cli(
        &s.config,
        &["directory", "apply", path, "--format", "migration-users"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("applied: id 1"), "{out}");
    assert!(out.contains(grouped), "{out}");
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "alice@nhs.test"]);
    assert!(out.contains("state   cloud (from batch 1)"), "{out}");
    assert!(
        out.contains(&format!("route   cloud -> {}", s.cloud.addr)),
        "{out}"
    );
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "dave@nhs.test"]);
    assert!(
        out.contains("state   onprem (from file"),
        "failed user moved: {out}"
    );

    // Mail follows: the completed user's to Exchange Online, the failed user's on premises.
    send(s.listen(), &["alice@nhs.test"], "to alice").await;
    send(s.listen(), &["dave@nhs.test"], "to dave").await;
    assert_eq!(wait(&s.cloud, 1).await, 1);
    assert_eq!(wait(&s.onprem, 1).await, 1);
    assert_eq!(rcpts_of(&s.cloud), vec!["alice@nhs.test"]);
    assert_eq!(rcpts_of(&s.onprem), vec!["dave@nhs.test"]);

    // The JSON answer carries the grouping; an ordinary batch's does not.
    let client = coexist::admin::client::AdminClient::new(s.bin.admin(), TOKEN.into());
    let v = client
        .post(
            "/v1/directory/batches?source=r.csv&dry_run=true&format=migration-users",
            MIGRATION_USERS.as_bytes(),
            "text/csv",
        )
        .unwrap();
    assert_eq!(
        v["not_completed"][0],
        serde_json::json!({"status": "Failed", "count": 1, "addresses": ["dave@nhs.test"]}),
        "{v}"
    );
    let v = client
        .post(
            "/v1/directory/batches?source=r.csv&dry_run=true&state=cloud",
            MIGRATION_USERS.as_bytes(),
            "text/csv",
        )
        .unwrap();
    assert!(v.get("not_completed").is_none(), "{v}");
    assert_eq!(
        (&v["changed"], &v["already"]),
        (&serde_json::json!(1), &serde_json::json!(2)),
        "the plain reading would move dave, who failed: {v}"
    );

    // A report whose row has no address is refused whole, naming the line.
    let bad = s.dir.path().join("moves.csv");
    std::fs::write(
        &bad,
        "#TYPE Microsoft.Exchange.Management.RecipientTasks.MoveRequest\r\n\
         \"DisplayName\",\"Status\",\"Identity\"\r\n\
         \"Doe, John\",\"Completed\",\"dave@nhs.test\"\r\n\
         \"Jones, Ann\",\"Completed\",\"NHS\\ajones\"\r\n",
    )
    .unwrap();
    let (ok, _, err) = cli(
        &s.config,
        &[
            "directory",
            "apply",
            bad.to_str().unwrap(),
            "--format",
            "migration-users",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("422 moves.csv:4: no address: Identity \"NHS\\\\ajones\" is not an address"),
        "{err}"
    );
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "dave@nhs.test"]);
    assert!(out.contains("state   onprem"), "{out}");

    // Off-boarding: a Get-MoveRequest export moves its completed users back on premises.
    let back = s.dir.path().join("offboard.csv");
    std::fs::write(
        &back,
        "#TYPE Microsoft.Exchange.Management.RecipientTasks.MoveRequest\r\n\
         \"DisplayName\",\"Status\",\"Identity\"\r\n\
         \"Carol, C\",\"Completed\",\"carol@nhs.test\"\r\n\
         \"Bob, B\",\"InProgress\",\"bob@nhs.test\"\r\n",
    )
    .unwrap();
    let (ok, out, err) = cli(
        &s.config,
        &[
            "directory",
            "apply",
            back.to_str().unwrap(),
            "--format",
            "migration-users",
            "--state",
            "onprem",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("applied: id 2"), "{out}");
    assert!(
        out.contains("not completed (left as they are): InProgress 1 (bob@nhs.test)"),
        "{out}"
    );
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "carol@nhs.test"]);
    assert!(out.contains("state   onprem (from batch 2)"), "{out}");
    let (_, out, _) = cli(&s.config, &["directory", "lookup", "bob@nhs.test"]);
    assert!(out.contains("state   cloud (from file"), "{out}");

    // Rolling back the report's batch brings alice back; dave was never in it.
    let (ok, out, err) = cli(&s.config, &["directory", "rollback", "1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("rollback of batch 1: id 3"), "{out}");
    assert!(out.contains("rows 1, changed 1"), "{out}");
    send(s.listen(), &["alice@nhs.test"], "rolled back").await;
    assert_eq!(wait(&s.onprem, 2).await, 2);
    assert_eq!(rcpts_of(&s.onprem), vec!["alice@nhs.test", "dave@nhs.test"]);
    assert_eq!(rcpts_of(&s.cloud).len(), 1);
}

/// Where admin API route explain puts `address` (its `state`, or `null` when unlisted).
fn state_of(bin: &BinConfig, address: &str) -> serde_json::Value {
    let client = coexist::admin::client::AdminClient::new(bin.admin(), TOKEN.into());
    let body = serde_json::to_vec(&serde_json::json!({ "addresses": [address] })).unwrap();
    let v = client
        .post("/v1/route/explain", &body, "application/json")
        .unwrap();
    v[0]["state"].clone()
}

/// A config file in `dir` for a relay whose paths are relative to `dir` (its working
/// directory), with no `directory.store_dir`: the store takes its default.
fn relative_config(dir: &std::path::Path, name: &str, csv: &str) -> BinConfig {
    let mut bin = write_config(dir, NOWHERE, NOWHERE);
    bin.path = dir.join(format!("{name}.toml"));
    bin.config.spool.dir = PathBuf::from(format!("{name}-spool"));
    bin.config.directory.file = Some(PathBuf::from(format!("{name}.csv")));
    // What the default resolves to, so a rewrite by the harness (fresh ports) changes nothing.
    bin.config.directory.store_dir = PathBuf::from(format!("{name}-spool/directory"));
    std::fs::write(dir.join(format!("{name}.csv")), csv).unwrap();
    bin.write();
    let text: String = bin
        .text()
        .lines()
        .filter(|l| !l.starts_with("store_dir = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&bin.path, text).unwrap();
    bin
}

fn serve_in(dir: &std::path::Path, bin: &mut BinConfig) -> Server {
    common::bin::spawn_with(
        bin,
        common::bin::Start {
            cwd: Some(dir),
            ..Default::default()
        },
    )
}

/// `coexist serve` (or `check-config`) run in `dir` that must stop at start: its stderr.
fn refused_in(dir: &std::path::Path, bin: &BinConfig, cmd: &str) -> String {
    let out = Command::new(BIN)
        .args([cmd, "--config", bin.path.to_str().unwrap()])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{cmd} did not refuse to start");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Two configs started from one folder with relative paths and no `directory.store_dir`:
/// each keeps its directory state beside its own spool. Before, both used `var/directory`
/// there: the second routed on the first one's directory, and refused its own, smaller file
/// with the shrink guard. A second relay on the same spool is refused, naming the process.
/// A store of an earlier version at the former default stops the start with what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_configs_in_one_folder_do_not_share_directory_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big: String = std::iter::once("address,state\n".to_string())
        .chain((0..100).map(|i| format!("user{i}@nhs.test,onprem\n")))
        .collect();
    let mut a = relative_config(d, "a", &big);
    let mut b = relative_config(
        d,
        "b",
        "address,state\nuser0@nhs.test,cloud\nother@nhs.test,onprem\n",
    );

    let server_a = serve_in(d, &mut a);
    assert_eq!(state_of(&a, "user50@nhs.test"), "onprem");
    std::fs::write(d.join("batch.csv"), "address\nuser1@nhs.test\n").unwrap();
    let batch = d.join("batch.csv");
    let (ok, out, err) = cli(
        &a.path,
        &[
            "directory",
            "apply",
            batch.to_str().unwrap(),
            "--state",
            "cloud",
        ],
    );
    assert!(ok, "{out}{err}");
    // The same config a second time: refused before it touches the spool.
    let said = refused_in(d, &a, "serve");
    assert!(
        said.contains("is in use by another coexist process")
            && said.contains(&format!("pid {}", server_a.0.id())),
        "{said}"
    );
    drop(server_a);

    let _server_b = serve_in(d, &mut b);
    assert_eq!(
        state_of(&b, "user0@nhs.test"),
        "cloud",
        "b routes on its own file"
    );
    assert_eq!(state_of(&b, "user50@nhs.test"), serde_json::Value::Null);
    let (ok, out, err) = cli(&b.path, &["status"]);
    assert!(ok && !out.contains("refused"), "{out}{err}");
    assert!(d.join("a-spool/directory/changes.log").exists());
    assert!(!d.join("var/directory").exists());

    // A's batch is still A's after B ran.
    drop(_server_b);
    let _server_a = serve_in(d, &mut a);
    assert_eq!(state_of(&a, "user1@nhs.test"), "cloud");
    assert_eq!(state_of(&a, "user50@nhs.test"), "onprem");
    drop(_server_a);

    // A store left at the former default by an earlier version, and a config with a fresh
    // spool: starting afresh would drop its batches.
    std::fs::create_dir_all(d.join("var/directory")).unwrap();
    std::fs::copy(
        d.join("a-spool/directory/changes.log"),
        d.join("var/directory/changes.log"),
    )
    .unwrap();
    let c = relative_config(d, "c", &big);
    for cmd in ["serve", "check-config"] {
        let said = refused_in(d, &c, cmd);
        assert!(
            said.contains("var/directory") && said.contains("directory.store_dir"),
            "{cmd}: {said}"
        );
    }
}
