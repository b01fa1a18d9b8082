//! The real `coexist` binary: crash safety under `kill -9` (idle, in the middle of a DATA or
//! BDAT transfer, under load while messages are being spooled and acknowledged, and during a
//! directory batch), config checking, and interop with an SMTP client nobody here wrote
//! (Python's smtplib).

mod common;

use coexist::load::sink::{received_id, Sink, SinkOptions};
use common::bin::{
    cli, spawn, spawn_with, wait_queue_empty, with_raw_value, write_config, BinConfig, Server,
    Start, NOWHERE,
};
use common::*;
use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let (onprem_port, cloud_port) = (DownPort::new(), DownPort::new());
    let mut cfg = write_config(dir.path(), onprem_port.addr, cloud_port.addr);
    // Next hops are down: every message stays queued.
    let mut server = spawn(&mut cfg);
    let mut ids = Vec::new();
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..20 {
        let rcpts: &[&str] = if i % 2 == 0 {
            &["alice@nhs.test", "bob@nhs.test"]
        } else {
            &["carol@nhs.test"]
        };
        let r = c
            .mail("x@example.org", rcpts, &sample(&format!("crash{i}")))
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        ids.push(queue_id(&r));
    }
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    drop(server);

    let (onprem, cloud) = sinks_behind(onprem_port, cloud_port).await;
    let _server = spawn(&mut cfg);
    assert_eq!(wait(&onprem, 10).await, 10);
    assert_eq!(wait(&cloud, 20).await, 20);
    let (on, cl) = (onprem.state.messages(), cloud.state.messages());
    assert_eq!(
        (on.len(), cl.len()),
        (10, 20),
        "one delivery per message and estate, no duplicates"
    );
    let delivered: Vec<String> = on
        .iter()
        .chain(cl.iter())
        .map(|m| received_header(&m.body))
        .collect();
    for id in &ids {
        assert!(
            delivered.iter().any(|h| h.contains(&format!("id {id}"))),
            "{id} lost"
        );
    }
}

/// One flipped bit in an acknowledged message of the segment that was being written (a bad
/// sector found after a `kill -9`) costs that message only: the three acknowledged after it
/// are delivered, the damaged one is logged with file and offset and its bytes are kept in
/// `spool/damaged/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_after_kill_9_costs_only_the_damaged_message() {
    let dir = tempfile::tempdir().unwrap();
    let (onprem_port, cloud_port) = (DownPort::new(), DownPort::new());
    let mut cfg = write_config(dir.path(), onprem_port.addr, cloud_port.addr);
    let mut server = spawn(&mut cfg);
    let mut ids = Vec::new();
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..4 {
        let r = c
            .mail(
                "x@example.org",
                &["carol@nhs.test"],
                &sample(&format!("flip{i}")),
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        ids.push(queue_id(&r));
    }
    kill_9(&mut server);
    drop(server);
    let segments = dir.path().join("spool/segments");
    let mut names: Vec<String> = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let seg = segments.join(names.last().unwrap());
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"flip0")
        .expect("the first message is in the segment being written");
    bytes[at] ^= 0x01; // "flip0" becomes "glip0"
    std::fs::write(&seg, &bytes).unwrap();

    let log = dir.path().join("serve.log");
    let (_onprem, cloud) = sinks_behind(onprem_port, cloud_port).await;
    let _server = spawn_with(
        &mut cfg,
        Start {
            log: Some(&log),
            ..Default::default()
        },
    );
    assert_eq!(wait(&cloud, 3).await, 3);
    wait_queue_empty(&cfg);
    let delivered: Vec<String> = cloud
        .state
        .messages()
        .iter()
        .map(|m| received_header(&m.body))
        .collect();
    assert_eq!(delivered.len(), 3, "{delivered:?}");
    for id in &ids[1..] {
        assert!(
            delivered.iter().any(|h| h.contains(&format!("id {id}"))),
            "{id} lost"
        );
    }
    // The damaged message, kept aside as it was on disk, and the log line naming it.
    let damaged: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("spool/damaged"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let name = damaged[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let seg_name = seg.file_name().unwrap().to_string_lossy().into_owned();
    let offset = name
        .strip_prefix(&format!("{seg_name}."))
        .and_then(|r| r.strip_suffix(".corrupt"))
        .unwrap_or_else(|| panic!("{name}"));
    let kept = std::fs::read(&damaged[0]).unwrap();
    assert!(kept.windows(5).any(|w| w == b"glip0"));
    let logged = std::fs::read_to_string(&log).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("CORRUPT"))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(
        line.contains(seg.to_str().unwrap())
            && line.contains(&format!("offset={offset}"))
            && line.contains(&ids[0]),
        "{line}"
    );
}

/// Sinks at the ports that were down until now: they come up.
async fn sinks_behind(onprem: DownPort, cloud: DownPort) -> (Sink, Sink) {
    let lo: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let on = Sink::start(lo, SinkOptions::default()).await.unwrap();
    let cl = Sink::start(lo, SinkOptions::default()).await.unwrap();
    onprem.forward_to(on.addr);
    cloud.forward_to(cl.addr);
    (on, cl)
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let config = cfg.path.clone();
    let (ok, out, err) = cli(&config, &["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("ok (2 routes, 4 directory entries)"), "{out}");

    let (text, line) = with_raw_value(&cfg.text(), "routes.onprem", "tls", "\"sometimes\"");
    std::fs::write(&config, &text).unwrap();
    let (ok, _, err) = cli(&config, &["check-config"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("coexist.toml:{line}: key `routes.onprem.tls`")),
        "{err}"
    );

    // A bad directory row is reported with its line.
    cfg.config.routes.get_mut("onprem").unwrap().tls = coexist::config::TlsPolicy::None;
    cfg.write();
    std::fs::write(
        dir.path().join("directory.csv"),
        "address,state\nok@nhs.test,cloud\nbroken-row\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&config, &["check-config"]);
    assert!(!ok);
    assert!(err.contains("directory.csv:3: expected 2 fields"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_sends_through_starttls() {
    let h = harness(|_| {}).await;
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile={ca:?})
s = smtplib.SMTP("127.0.0.1", {port}, local_hostname="py.client.test", timeout=20)
s.ehlo()
assert s.has_extn("starttls") and s.has_extn("pipelining") and s.has_extn("chunking")
s.starttls(context=ctx)  # checks the certificate for 127.0.0.1 against the test CA
s.ehlo()
msg = b"From: <py@example.org>\r\nSubject: smtplib\r\n\r\n.dot line\r\nbody\r\n"
refused = s.sendmail("py@example.org", ["alice@nhs.test", "bob@nhs.test", "nobody@evil.test"], msg)
print(sorted(refused.keys()), refused["nobody@evil.test"][0])
s.quit()
"#,
        ca = h.dir.path().join("ca.pem").to_str().unwrap(),
        port = h.addr.port()
    );
    std::fs::write(h.dir.path().join("ca.pem"), &h.certs.ca_pem).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 is required (installed by .ci/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "['nobody@evil.test'] 550"
    );
    assert_eq!(wait(&h.onprem, 1).await, 1);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let m = &h.cloud.state.messages()[0];
    assert_eq!(
        strip_received(&m.body),
        b"From: <py@example.org>\r\nSubject: smtplib\r\n\r\n.dot line\r\nbody\r\n"
    );
    assert!(received_header(&m.body).contains("ESMTPS"));
}

/// SIGKILL by PID, and reap.
fn kill_9(server: &mut Server) {
    server.0.kill().unwrap();
    server.0.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_data_or_bdat_delivers_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let (onprem_port, cloud_port) = (DownPort::new(), DownPort::new());
    let mut cfg = write_config(dir.path(), onprem_port.addr, cloud_port.addr);
    // Next hops are down until the restart.
    let mut server = spawn(&mut cfg);
    let before = send_one(cfg.listen(), &["bob@nhs.test"], "acknowledged-before").await;
    assert_eq!(before.code, 250, "{before:?}");

    // A DATA transfer in flight: 354 given, headers and 256 KiB of body sent, no end of data.
    let mut data = connect(cfg.listen()).await;
    data.expect("EHLO client.test", 250).await;
    data.expect("MAIL FROM:<x@example.org>", 250).await;
    data.expect("RCPT TO:<alice@nhs.test>", 250).await;
    data.expect("RCPT TO:<bob@nhs.test>", 250).await;
    data.expect("DATA", 354).await;
    let mut partial = b"From: <x@example.org>\r\nSubject: partial-data\r\n\r\n".to_vec();
    while partial.len() < 256 * 1024 {
        partial.extend_from_slice(b"partial-data body line, the message never ends\r\n");
    }
    data.send(&partial).await;
    // A BDAT transfer in flight: a LAST chunk announced with 100,000 bytes, half of them sent.
    let mut bdat = connect(cfg.listen()).await;
    bdat.expect("EHLO client.test", 250).await;
    bdat.expect("MAIL FROM:<x@example.org>", 250).await;
    bdat.expect("RCPT TO:<carol@nhs.test>", 250).await;
    let mut chunk = b"BDAT 100000 LAST\r\nSubject: partial-bdat\r\n\r\n".to_vec();
    chunk.resize(50_000, b'b');
    bdat.send(&chunk).await;
    // The relay has read all that was sent when it is killed.
    for c in [&data, &bdat] {
        let s = c.io.get_ref();
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        eventually("the relay to read the partial transfers", || {
            unread(local, peer) == 0
        })
        .await;
    }
    kill_9(&mut server);
    drop(server);

    // Neither client gets a 250: the connection just ends.
    for (what, c) in [("DATA", &mut data), ("BDAT", &mut bdat)] {
        let r = tokio::time::timeout(Duration::from_secs(10), c.try_reply())
            .await
            .expect("connection still open after kill -9");
        assert!(r.is_none(), "{what}: a reply after kill -9: {r:?}");
        // Writing more finds the connection gone (the data never completes).
        let _ = c.io.get_mut().write_all(b"\r\n.\r\n").await;
    }

    let (onprem, cloud) = sinks_behind(onprem_port, cloud_port).await;
    let _server = spawn(&mut cfg);
    let after = send_one(cfg.listen(), &["alice@nhs.test", "bob@nhs.test"], "after").await;
    assert_eq!(after.code, 250, "{after:?}");
    assert_eq!(wait(&cloud, 2).await, 2, "the acknowledged messages");
    assert_eq!(wait(&onprem, 1).await, 1);
    // Once the queue is empty, everything the relay held went out: only complete messages.
    wait_queue_empty(&cfg);
    let all: Vec<_> = onprem
        .state
        .messages()
        .into_iter()
        .chain(cloud.state.messages())
        .collect();
    let subjects: Vec<String> = all
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(strip_received(&m.body)).to_string();
            assert!(
                !text.contains("partial-"),
                "a partial message was delivered"
            );
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(all.len(), 3, "{subjects:?}");
    let ids: HashSet<String> = all.iter().filter_map(|m| received_id(&m.body)).collect();
    assert!(ids.contains(&queue_id(&before)) && ids.contains(&queue_id(&after)));
}

/// One client session sending messages until the connection breaks, `stop` is set or `max`
/// messages were sent; the queue id of every `250` goes to `acked`. Never panics: a broken
/// connection is the expected end.
async fn send_until_cut(
    addr: std::net::SocketAddr,
    session: usize,
    max: usize,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    async fn step(c: &mut Client<tokio::net::TcpStream>, bytes: &[u8]) -> Option<Reply> {
        c.io.get_mut().write_all(bytes).await.ok()?;
        tokio::time::timeout(Duration::from_secs(20), c.try_reply())
            .await
            .ok()
            .flatten()
    }
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let mut c = Client {
        io: tokio::io::BufReader::new(s),
    };
    if tokio::time::timeout(Duration::from_secs(20), c.try_reply())
        .await
        .ok()
        .flatten()
        .is_none_or(|r| r.code != 220)
    {
        return;
    }
    if step(&mut c, b"EHLO load.test\r\n")
        .await
        .is_none_or(|r| r.code != 250)
    {
        return;
    }
    for i in 0..max {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let rcpts: &[&str] = match (session + i) % 3 {
            0 => &["alice@nhs.test"],
            1 => &["bob@nhs.test"],
            _ => &["dave@nhs.test", "carol@nhs.test"],
        };
        if step(&mut c, b"MAIL FROM:<load@example.org>\r\n")
            .await
            .is_none_or(|r| r.code != 250)
        {
            return;
        }
        for r in rcpts {
            let line = format!("RCPT TO:<{r}>\r\n");
            if step(&mut c, line.as_bytes())
                .await
                .is_none_or(|r| r.code != 250)
            {
                return;
            }
        }
        if step(&mut c, b"DATA\r\n")
            .await
            .is_none_or(|r| r.code != 354)
        {
            return;
        }
        let mut body = sample(&format!("load-{session}-{i}"));
        body.extend_from_slice(&[b'x'; 2000]);
        body.extend_from_slice(b"\r\n.\r\n");
        match step(&mut c, &body).await {
            Some(r) if r.code == 250 => acked.lock().unwrap().push(queue_id(&r)),
            _ => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let lo: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let opts = SinkOptions {
        keep_bodies: false,
        record: Some(dir.path().join("delivered.txt")),
        ..SinkOptions::default()
    };
    let onprem = Sink::start(lo, opts.clone()).await.unwrap();
    let cloud = Sink::start(lo, opts).await.unwrap();
    let mut cfg = write_config(dir.path(), onprem.addr, cloud.addr);
    let mut server = spawn(&mut cfg);

    // Eight sessions send and deliveries run while the relay is killed: stores, fsyncs and
    // 250s are in flight at that moment.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|n| {
            tokio::spawn(send_until_cut(
                cfg.listen(),
                n,
                10_000,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    eventually("150 acknowledged messages", || {
        let n = acked.lock().unwrap().len();
        if n >= 150 {
            Ok(())
        } else {
            Err(format!("{n} acknowledged"))
        }
    })
    .await;
    kill_9(&mut server);
    drop(server);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("client did not stop")
            .unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= 150);

    let _server = spawn(&mut cfg);
    let record = dir.path().join("delivered.txt");
    eventually("every acknowledged message delivered after kill -9", || {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let delivered: HashSet<&str> = text.lines().filter_map(|l| l.split(' ').next()).collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|id| !delivered.contains(id.as_str()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} of {} missing, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        ))
    })
    .await;
}

/// Total bytes of the files in `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Replaces the files of folder `to` by copies of the files in `from` (not its subfolders,
/// such as `scheduled/`).
fn copy_files(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// How many of `addresses` the running relay has in `state`, through the admin API.
fn count_in_state(cfg: &BinConfig, addresses: &[String], state: &str) -> usize {
    let client = coexist::admin::client::AdminClient::new(cfg.admin(), TOKEN.into());
    let mut n = 0;
    for chunk in addresses.chunks(5000) {
        let body = serde_json::to_vec(&serde_json::json!({ "addresses": chunk })).unwrap();
        let v = client
            .post("/v1/route/explain", &body, "application/json")
            .unwrap();
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), chunk.len());
        n += list.iter().filter(|e| e["state"] == state).count();
    }
    n
}

/// When a round kills the relay.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After the CLI reported the batch applied.
    AfterReply,
    /// This share of a whole apply's time after the CLI started.
    Share(f64),
    /// As soon as the directory store starts to grow (the change is being logged).
    StoreGrows,
}

/// A binary config whose directory has `n` mailboxes on premises, and a batch file (a
/// New-MigrationBatch CSV) naming all of them.
struct BatchSetup {
    _dir: tempfile::TempDir,
    cfg: BinConfig,
    batch: std::path::PathBuf,
    store: std::path::PathBuf,
    addresses: Vec<String>,
}

fn batch_setup(n: usize) -> BatchSetup {
    let dir = tempfile::tempdir().unwrap();
    let addresses: Vec<String> = (0..n).map(|i| format!("user{i}@nhs.test")).collect();
    let mut csv = String::from("address,state\n");
    let mut batch = String::from("EmailAddress\n");
    for a in &addresses {
        csv.push_str(&format!("{a},onprem\n"));
        batch.push_str(&format!("{a}\n"));
    }
    std::fs::write(dir.path().join("directory.csv"), csv).unwrap();
    let batch_file = dir.path().join("batch.csv");
    std::fs::write(&batch_file, batch).unwrap();
    let cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    BatchSetup {
        store: dir.path().join("store"),
        _dir: dir,
        cfg,
        batch: batch_file,
        addresses,
    }
}

/// Runs `coexist directory apply BATCH --state TARGET` against `server` and kills the server
/// (`kill -9`) at `kill` (`whole` is the time a whole apply takes, for `KillAt::Share`).
/// Returns whether the CLI reported the batch applied, and the time from the CLI's start to
/// the kill.
fn apply_and_kill(
    s: &BatchSetup,
    server: &mut Server,
    target: &str,
    kill: KillAt,
    whole: Duration,
) -> (bool, Duration) {
    let base = dir_bytes(&s.store);
    let t0 = Instant::now();
    let mut apply = Command::new(common::bin::BIN)
        .args(["directory", "apply", s.batch.to_str().unwrap()])
        .args(["--state", target, "--config", s.cfg.path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    loop {
        let exited = apply.try_wait().unwrap().is_some();
        let fire = exited
            || match kill {
                KillAt::AfterReply => false,
                KillAt::Share(f) => t0.elapsed() >= whole.mul_f64(f),
                KillAt::StoreGrows => dir_bytes(&s.store) != base,
            };
        if fire {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{kill:?}: apply still running after 60 s"
        );
        // Polled finely: the moment of the kill is what the rounds vary.
        std::thread::sleep(Duration::from_micros(200));
    }
    let at = t0.elapsed();
    kill_9(server);
    let out = apply.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && stdout.contains("applied: id"), at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_directory_batch_applies_all_or_nothing() {
    const N: usize = 20_000;
    let mut s = batch_setup(N);
    // A batch reported applied, then kill -9: it is in force after the restart.
    let mut server = spawn(&mut s.cfg);
    let (reported, whole) =
        apply_and_kill(&s, &mut server, "cloud", KillAt::AfterReply, Duration::ZERO);
    assert!(reported, "the batch was not applied");
    let server = spawn(&mut s.cfg);
    assert_eq!(
        count_in_state(&s.cfg, &s.addresses, "cloud"),
        N,
        "a batch reported applied was lost at restart"
    );
    drop(server);

    // Then the batch back, killed while it is in flight: as the change starts to reach the
    // store, and at shares of a whole apply's time (upload, parse, log, swap). Each round
    // starts from the same store, so a round sees only its own crash.
    let clean = s.store.with_extension("clean");
    copy_files(&s.store, &clean);
    let mut rounds = vec![KillAt::StoreGrows; 3];
    rounds.extend([0.2, 0.4, 0.6, 0.8, 0.95].map(KillAt::Share));
    for round in rounds {
        copy_files(&clean, &s.store);
        let mut server = spawn(&mut s.cfg);
        let (reported, at) = apply_and_kill(&s, &mut server, "onprem", round, whole);
        drop(server);
        let _server = spawn(&mut s.cfg);
        let moved = count_in_state(&s.cfg, &s.addresses, "onprem");
        assert!(
            moved == 0 || moved == N,
            "{round:?} (killed {at:?} after the CLI started): {moved} of {N} addresses moved; a batch applies whole or not at all"
        );
        if reported {
            assert_eq!(moved, N, "{round:?}: a batch reported applied was lost");
        }
    }
}

/// A kill -9 in the middle of appending a batch to the change log leaves a torn record at
/// its end. Made on purpose rather than hoped for from a timed kill: the bytes one batch
/// appends are taken from a run that completes, and a clean store gets only a part of them.
/// At restart the torn change is not in force (its CLI never heard "applied"), and the next
/// batch, reported applied, is in force after another restart: the torn bytes were cut, so
/// the new record was not glued to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applied_after_a_torn_change_log_tail_survives_restart() {
    const N: usize = 2_000;
    let mut s = batch_setup(N);
    let log = s.store.join("changes.log");
    // A first start makes the store; it is kept as the clean state every round starts from.
    drop(spawn(&mut s.cfg));
    let clean = s.store.with_extension("clean");
    copy_files(&s.store, &clean);
    let before = std::fs::read(&log).unwrap().len();
    let mut server = spawn(&mut s.cfg);
    let (reported, _) =
        apply_and_kill(&s, &mut server, "cloud", KillAt::AfterReply, Duration::ZERO);
    assert!(reported, "the batch was not applied");
    drop(server);
    let record = std::fs::read(&log).unwrap()[before..].to_vec();
    assert!(
        record.len() > 16,
        "the batch appended {} bytes",
        record.len()
    );
    // Torn inside the record's header, inside its payload, and one byte short.
    for cut in [5, record.len() / 2, record.len() - 1] {
        copy_files(&clean, &s.store);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, &record[..cut]).unwrap();
        drop(f);
        let mut server = spawn(&mut s.cfg);
        assert_eq!(
            count_in_state(&s.cfg, &s.addresses, "cloud"),
            0,
            "torn after {cut} of {} bytes: a change whose record is torn is in force",
            record.len()
        );
        let (reported, _) =
            apply_and_kill(&s, &mut server, "cloud", KillAt::AfterReply, Duration::ZERO);
        assert!(
            reported,
            "torn after {cut} bytes: the next batch was refused"
        );
        drop(server);
        let _server = spawn(&mut s.cfg);
        assert_eq!(
            count_in_state(&s.cfg, &s.addresses, "cloud"),
            N,
            "torn after {cut} bytes: a batch reported applied after a torn tail was lost at restart"
        );
    }
}

/// The test harness itself: when a port picked for the server is taken by someone else
/// before the server binds it, the harness does not mistake the other listener for the
/// server; it starts the server again on fresh ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_moves_to_fresh_ports_when_one_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let smtp_squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = [
        smtp_squatter.local_addr().unwrap(),
        admin_squatter.local_addr().unwrap(),
    ];
    cfg.config.server.listen = vec![taken[0]];
    cfg.config.admin.as_mut().unwrap().listen = taken[1];
    cfg.write();
    let _server = spawn(&mut cfg);
    assert!(!taken.contains(&cfg.listen()) && !taken.contains(&cfg.admin()));
    let (ok, out, err) = cli(&cfg.path, &["status"]);
    assert!(ok && out.contains("ready: true"), "{out}{err}");
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
}
