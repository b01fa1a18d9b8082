//! The directory's durability and reload rules against the real binary: a failed change-log
//! append must not swallow later batches, a half-written or shrunken directory file must not
//! be loaded, and a file edit wins over earlier batches the same way live and at restart.

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::bin::{cli, write_config, BinConfig, Server, BIN};
use common::DIRECTORY;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Setup {
    dir: tempfile::TempDir,
    bin: BinConfig,
    _sinks: (Sink, Sink),
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn config(&self) -> &Path {
        &self.bin.path
    }
}

/// A relay config in a temp dir whose directory file is `directory` (written first).
async fn setup(directory: &str, tweak: impl FnOnce(String) -> String) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("directory.csv"), directory).unwrap();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let onprem = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cloud = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let bin = write_config(dir.path(), onprem.addr, cloud.addr);
    let text = tweak(std::fs::read_to_string(&bin.path).unwrap());
    std::fs::write(&bin.path, text).unwrap();
    Setup {
        dir,
        bin,
        _sinks: (onprem, cloud),
    }
}

/// Starts `coexist serve`, its log (RUST_LOG=info) going to `log`; with `fsize_kib`, under a
/// file size limit (`ulimit -f`, SIGXFSZ ignored) so that writes past it fail with EFBIG the
/// way they fail with ENOSPC on a full disk.
fn start(s: &Setup, log: &str, fsize_kib: Option<u64>) -> Server {
    let mut cmd = match fsize_kib {
        Some(kib) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "trap '' XFSZ; ulimit -f {kib} && exec \"$0\" \"$@\""
                ))
                .arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let log = std::fs::File::create(s.path(log)).unwrap();
    let child = cmd
        .args(["serve", "--config", s.config().to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(s.bin.listen).is_err()
        || std::net::TcpStream::connect(s.bin.admin).is_err()
    {
        assert!(
            !server.wait_exit(Duration::from_millis(20)),
            "relay exited at start"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "relay did not start"
        );
    }
    server
}

fn stop(server: Server) {
    let mut server = server;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
}

/// `directory lookup` output for `address`.
fn lookup(s: &Setup, address: &str) -> String {
    let (ok, out, err) = cli(s.config(), &["directory", "lookup", address]);
    assert!(ok, "{err}");
    out
}

fn apply(s: &Setup, name: &str, rows: &str, state: &str) -> (bool, String, String) {
    let file = s.path(name);
    std::fs::write(&file, format!("EmailAddress\n{rows}")).unwrap();
    cli(
        s.config(),
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
    let s = setup(&directory, |t| t).await;
    // First start without a limit writes the snapshot (bigger than the limit below).
    stop(start(&s, "relay0.log", None));

    let server = start(&s, "relay1.log", Some(16));
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

    let server = start(&s, "relay2.log", None);
    assert!(
        lookup(&s, "alice@nhs.test").contains(&format!("state   cloud (from batch {alice})")),
        "the batch after the failed append survives a restart"
    );
    let (ok, out, err) = apply(&s, "dave.csv", "dave@nhs.test\n", "cloud");
    assert!(ok, "{err}");
    let dave = applied_id(&out);
    stop(server);

    let _server = start(&s, "relay3.log", None);
    assert!(lookup(&s, "alice@nhs.test").contains("state   cloud"));
    assert!(lookup(&s, "dave@nhs.test").contains("state   cloud"));
    assert!(lookup(&s, "user7@nhs.test").contains("state   onprem"));
    let (ok, _, err) = cli(s.config(), &["directory", "rollback", &alice.to_string()]);
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

/// A third route, so that a file edit can move a mailbox to a state other than the one a
/// batch gave it.
fn with_archive_route(text: String) -> String {
    let onprem = text
        .split("[routes.onprem]\nnext_hops = [\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_string();
    format!("{text}\n[routes.archive]\nnext_hops = [\"{onprem}\"]\n")
}

/// Item 9, one scenario for both ways a file edit is loaded: erin is `archive` in the file;
/// batch 1 moves erin and alice to `cloud`; then the file is edited to put erin `onprem`
/// (alice's row is untouched). The edit is loaded live (`directory reload`) or at the next
/// start; either way erin takes the file's state and alice keeps the batch's.
async fn file_edit_after_a_batch(live: bool) {
    let file = format!("{DIRECTORY}erin@nhs.test,archive\n");
    let s = setup(&file, with_archive_route).await;
    let server = start(&s, "relay1.log", None);
    assert!(lookup(&s, "erin@nhs.test").contains("state   archive (from file"));
    let (ok, out, err) = apply(&s, "b.csv", "erin@nhs.test\nalice@nhs.test\n", "cloud");
    assert!(ok, "{err}");
    assert_eq!(applied_id(&out), 1);
    let edited = file.replace("erin@nhs.test,archive", "erin@nhs.test,onprem");
    let server = if live {
        replace_directory(&s, &edited);
        let (ok, _, err) = cli(s.config(), &["directory", "reload"]);
        assert!(ok, "{err}");
        server
    } else {
        stop(server);
        replace_directory(&s, &edited);
        start(&s, "relay2.log", None)
    };
    let check = |when: &str| {
        let erin = lookup(&s, "erin@nhs.test");
        assert!(
            erin.contains("state   onprem (from file"),
            "{when}: the row the edit changed takes the file's state: {erin}"
        );
        let alice = lookup(&s, "alice@nhs.test");
        assert!(
            alice.contains("state   cloud (from batch 1)"),
            "{when}: a row the edit did not change keeps its batch state: {alice}"
        );
    };
    check(if live { "live reload" } else { "restart" });
    stop(server);
    let _server = start(&s, "relay3.log", None);
    check("the restart after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_after_a_batch_wins_on_live_reload() {
    file_edit_after_a_batch(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_after_a_batch_wins_at_restart() {
    file_edit_after_a_batch(false).await;
}
