//! The directory's durability and reload rules against the real binary: a failed change-log
//! append must not swallow later batches, a half-written or shrunken directory file must not
//! be loaded, and a file edit wins over earlier batches the same way live and at restart.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::Config;
use coexist::load::sink::SinkOptions;
use common::bin::{cli, spawn_with, with_sinks_in, Server, Setup, Start};
use common::{eventually_blocking, DIRECTORY};

/// A relay config in a temp dir whose directory file is `directory` (written first).
async fn setup(directory: &str, tweak: impl FnOnce(&mut Config)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("directory.csv"), directory).unwrap();
    with_sinks_in(dir, SinkOptions::default(), tweak).await
}

/// Starts `coexist serve`, its log (RUST_LOG=info) going to `log`; with `fsize_kib`, under a
/// file size limit (`ulimit -f`, SIGXFSZ ignored) so that writes past it fail with EFBIG the
/// way they fail with ENOSPC on a full disk.
fn start(s: &mut Setup, log: &str, fsize_kib: Option<u64>) -> Server {
    let log = s.path(log);
    spawn_with(
        &mut s.cfg,
        Start {
            log: Some(&log),
            fsize_kib,
            ..Start::default()
        },
    )
}

fn stop(server: Server) {
    let mut server = server;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
}

/// `directory lookup` output for `address`.
fn lookup(s: &Setup, address: &str) -> String {
    let (ok, out, err) = cli(&s.cfg.path, &["directory", "lookup", address]);
    assert!(ok, "{err}");
    out
}

fn apply(s: &Setup, name: &str, rows: &str, state: &str) -> (bool, String, String) {
    let file = s.path(name);
    std::fs::write(&file, format!("EmailAddress\n{rows}")).unwrap();
    cli(
        &s.cfg.path,
        &[
            "directory",
            "apply",
            file.to_str().unwrap(),
            "--state",
            state,
        ],
    )
}

/// The id in `applied: id N`.
fn applied_id(out: &str) -> u32 {
    out.split("id ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no id in {out:?}"))
}

/// Item 7: an append that fails half-way (here EFBIG under a file size limit, as ENOSPC on a
/// full disk) must not leave bytes that swallow the next batch: the next batch is applied,
/// survives a restart and can be rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_does_not_swallow_later_batches() {
    let mut directory = DIRECTORY.to_string();
    for i in 0..1500 {
        directory.push_str(&format!("user{i}@nhs.test,onprem\n"));
    }
    let mut s = setup(&directory, |_| {}).await;
    // First start without a limit writes the snapshot (bigger than the limit below).
    stop(start(&mut s, "relay0.log", None));

    let server = start(&mut s, "relay1.log", Some(16));
    let all: String = (0..1500).map(|i| format!("user{i}@nhs.test\n")).collect();
    let (ok, _, err) = apply(&s, "big.csv", &all, "cloud");
    assert!(
        !ok,
        "a 100 KB change record cannot be written under a 16 KiB limit"
    );
    assert!(err.contains("changes.log"), "{err}");
    assert!(lookup(&s, "user7@nhs.test").contains("state   onprem"));
    let (ok, out, err) = apply(&s, "alice.csv", "alice@nhs.test\n", "cloud");
    assert!(ok, "the next (small) batch is applied: {err}");
    let alice = applied_id(&out);
    stop(server);

    let server = start(&mut s, "relay2.log", None);
    assert!(
        lookup(&s, "alice@nhs.test").contains(&format!("state   cloud (from batch {alice})")),
        "the batch after the failed append survives a restart"
    );
    let (ok, out, err) = apply(&s, "dave.csv", "dave@nhs.test\n", "cloud");
    assert!(ok, "{err}");
    let dave = applied_id(&out);
    stop(server);

    let _server = start(&mut s, "relay3.log", None);
    assert!(lookup(&s, "alice@nhs.test").contains("state   cloud"));
    assert!(lookup(&s, "dave@nhs.test").contains("state   cloud"));
    assert!(lookup(&s, "user7@nhs.test").contains("state   onprem"));
    let (ok, _, err) = cli(&s.cfg.path, &["directory", "rollback", &alice.to_string()]);
    assert!(ok, "rollback finds the batch: {err}");
    assert!(lookup(&s, "alice@nhs.test").contains("state   onprem"));
    let _ = dave;
}

/// Writes `text` as the directory file the safe way: a new file, fsynced, renamed over.
fn replace_directory(s: &Setup, text: &str) {
    use std::io::Write;
    let tmp = s.path("directory.csv.new");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, s.path("directory.csv")).unwrap();
}

/// A third route (to the on-premises sink), so that a file edit can move a mailbox to a
/// state other than the one a batch gave it.
fn with_archive_route(c: &mut Config) {
    let archive = c.routes["onprem"].clone();
    c.routes.insert("archive".into(), archive);
}

/// Item 9, one scenario for both ways a file edit is loaded: erin is `archive` in the file;
/// batch 1 moves erin and alice to `cloud`; then the file is edited to put erin `onprem`
/// (alice's row is untouched). The edit is loaded live (`directory reload`) or at the next
/// start; either way erin takes the file's state and alice keeps the batch's.
async fn file_edit_after_a_batch(live: bool) {
    let file = format!("{DIRECTORY}erin@nhs.test,archive\n");
    let mut s = setup(&file, with_archive_route).await;
    let server = start(&mut s, "relay1.log", None);
    assert!(lookup(&s, "erin@nhs.test").contains("state   archive (from file"));
    let (ok, out, err) = apply(&s, "b.csv", "erin@nhs.test\nalice@nhs.test\n", "cloud");
    assert!(ok, "{err}");
    assert_eq!(applied_id(&out), 1);
    let edited = file.replace("erin@nhs.test,archive", "erin@nhs.test,onprem");
    let server = if live {
        replace_directory(&s, &edited);
        let (ok, _, err) = cli(&s.cfg.path, &["directory", "reload"]);
        assert!(ok, "{err}");
        server
    } else {
        stop(server);
        replace_directory(&s, &edited);
        start(&mut s, "relay2.log", None)
    };
    let check = |s: &Setup, when: &str| {
        let erin = lookup(s, "erin@nhs.test");
        assert!(
            erin.contains("state   onprem (from file"),
            "{when}: the row the edit changed takes the file's state: {erin}"
        );
        let alice = lookup(s, "alice@nhs.test");
        assert!(
            alice.contains("state   cloud (from batch 1)"),
            "{when}: a row the edit did not change keeps its batch state: {alice}"
        );
    };
    check(&s, if live { "live reload" } else { "restart" });
    stop(server);
    let _server = start(&mut s, "relay3.log", None);
    check(&s, "the restart after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_after_a_batch_wins_on_live_reload() {
    file_edit_after_a_batch(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_after_a_batch_wins_at_restart() {
    file_edit_after_a_batch(false).await;
}

/// The test directory plus `user0..user{n-1}@nhs.test` (onprem).
fn big_directory(n: usize) -> String {
    let mut d = DIRECTORY.to_string();
    for i in 0..n {
        d.push_str(&format!("user{i}@nhs.test,onprem\n"));
    }
    d
}

/// Waits (bounded) until the relay's log `log` has a line containing `text`.
fn wait_for_log(s: &Setup, log: &str, text: &str) {
    eventually_blocking(&format!("{text:?} in {log}"), || {
        std::fs::read_to_string(s.path(log)).is_ok_and(|l| l.contains(text))
    })
}

/// Waits (bounded) until `cond` holds for the output of `coexist status --json`.
fn wait_for_status(
    s: &Setup,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually_blocking(what, || {
        let v = status(s);
        if cond(&v) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
}

fn status(s: &Setup) -> serde_json::Value {
    let (ok, out, err) = cli(&s.cfg.path, &["status", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// The Prometheus text of the running relay.
fn metrics(s: &Setup) -> String {
    let client = coexist::admin::client::AdminClient::new(s.cfg.admin(), common::TOKEN.into());
    match client.get("/metrics").unwrap() {
        serde_json::Value::String(t) => t,
        v => panic!("not metrics text: {v}"),
    }
}

/// Item 8: a directory file being written in place is not loaded until its writer closes it.
/// Here the writer stops after 99 of 104 rows (cut at a row boundary, 5% fewer addresses, so
/// the shrink limit would let it through): nothing may change until the file is closed, and
/// then the whole new file is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_being_written_is_not_loaded_before_it_is_closed() {
    use std::io::Write;
    let mut s = setup(&big_directory(100), |_| {}).await;
    let _server = start(&mut s, "relay.log", None);
    let edited = big_directory(100).replace("dave@nhs.test,onprem", "dave@nhs.test,cloud");
    let cut = edited.match_indices('\n').nth(99).unwrap().0 + 1; // header + 99 rows
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(s.path("directory.csv"))
        .unwrap();
    f.write_all(&edited.as_bytes()[..cut]).unwrap();
    f.sync_data().unwrap();
    // The relay saw the write (and waits for the close).
    wait_for_log(&s, "relay.log", "directory file is being written in place");
    let last = lookup(&s, "user99@nhs.test");
    assert!(
        last.contains("state   onprem (from file"),
        "a mailbox after the cut vanished while the file was being written: {last}"
    );
    assert!(
        lookup(&s, "dave@nhs.test").contains("state   onprem (from file"),
        "nothing of the partial file is loaded"
    );
    f.write_all(&edited.as_bytes()[cut..]).unwrap();
    f.sync_data().unwrap();
    drop(f);
    eventually_blocking("the closed file to be loaded", || {
        lookup(&s, "dave@nhs.test").contains("state   cloud (from file")
    });
    assert!(lookup(&s, "user99@nhs.test").contains("state   onprem (from file"));
    assert_eq!(status(&s)["directory_entries"], 104);
    assert!(metrics(&s).contains("coexist_directory_reloads_total{result=\"ok\"} 1"));
}

/// Item 8: a file renamed into place that removes more than `directory.max_shrink` (10%) of
/// the addresses is refused, by the watcher, `directory reload` and SIGHUP alike, with a log
/// line, a metric and the reason in `coexist status`; `directory reload --force` applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunken_file_is_refused_unless_forced() {
    let full = big_directory(100);
    let mut s = setup(&full, |_| {}).await;
    let server = start(&mut s, "relay.log", None);
    assert_eq!(status(&s)["directory_entries"], 104);
    // Half the file (cut at a row boundary, so it parses), renamed into place.
    let cut = full.match_indices('\n').nth(52).unwrap().0 + 1; // header + 52 rows
    replace_directory(&s, &full[..cut]);
    let v = wait_for_status(&s, "the watcher's reload", |v| {
        v["directory_reload"]["last_result"].is_string() || v["directory_entries"] != 104
    });
    assert_eq!(
        v["directory_entries"], 104,
        "the shrunken file was loaded: {v}"
    );
    assert_eq!(
        v["directory_reload"]["last_result"], "refused_shrink",
        "{v}"
    );
    let why = "removes 52 of 104 addresses (50.0%), more than directory.max_shrink (10%)";
    let reason = v["directory_reload"]["last_refused"]["reason"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains(why) && reason.contains("directory.csv"),
        "{reason}"
    );
    assert!(lookup(&s, "user99@nhs.test").contains("state   onprem (from file"));
    wait_for_log(&s, "relay.log", why);
    let (_, out, _) = cli(&s.cfg.path, &["status"]);
    assert!(
        out.contains("last refused directory file reload: refused_shrink at ") && out.contains(why),
        "{out}"
    );

    let (ok, _, err) = cli(&s.cfg.path, &["directory", "reload"]);
    assert!(!ok);
    assert!(
        err.contains(why) && err.contains("coexist directory reload --force"),
        "{err}"
    );
    server.signal("HUP");
    eventually_blocking("SIGHUP to try the file", || {
        let m = metrics(&s);
        if m.contains("coexist_directory_reloads_total{result=\"refused_shrink\"} 3") {
            Ok(())
        } else {
            Err(m)
        }
    });
    assert_eq!(status(&s)["directory_entries"], 104);

    let (ok, out, err) = cli(&s.cfg.path, &["directory", "reload", "--force"]);
    assert!(ok, "{err}");
    assert!(out.contains("reloaded (forced): 52 addresses"), "{out}");
    assert!(lookup(&s, "user99@nhs.test").contains("(from unlisted)"));
    let m = metrics(&s);
    assert!(
        m.contains("coexist_directory_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert_eq!(status(&s)["directory_reload"]["last_result"], "ok");
}

/// Item 8 at start-up: with a snapshot present, a file that shrank while the relay was down
/// is the same case: the relay starts, keeps the directory it had (batches included), and
/// says why in the log and in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_shrank_while_stopped_is_refused_at_start() {
    let full = big_directory(100);
    let mut s = setup(&full, |_| {}).await;
    let server = start(&mut s, "relay1.log", None);
    let (ok, _, err) = apply(&s, "b.csv", "alice@nhs.test\n", "cloud");
    assert!(ok, "{err}");
    stop(server);
    let cut = full.match_indices('\n').nth(52).unwrap().0 + 1;
    replace_directory(&s, &full[..cut]);

    let _server = start(&mut s, "relay2.log", None);
    let v = status(&s);
    assert_eq!(
        v["directory_entries"], 104,
        "the shrunken file was loaded at start: {v}"
    );
    assert_eq!(
        v["directory_reload"]["last_result"], "refused_shrink",
        "{v}"
    );
    assert!(lookup(&s, "alice@nhs.test").contains("state   cloud (from batch 1)"));
    assert!(lookup(&s, "user99@nhs.test").contains("state   onprem (from file"));
    let log = std::fs::read_to_string(s.path("relay2.log")).unwrap();
    assert!(
        log.contains("removes 52 of 104 addresses")
            && log.contains("serving the directory as it was before the restart"),
        "{log}"
    );
    let (ok, _, err) = cli(&s.cfg.path, &["directory", "reload", "--force"]);
    assert!(ok, "{err}");
    assert_eq!(status(&s)["directory_entries"], 52);
}
