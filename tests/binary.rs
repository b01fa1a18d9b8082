//! The real `coexist` binary: crash safety of the spool under `kill -9` (idle, in the middle
//! of a DATA or BDAT transfer, under load while messages are being spooled and acknowledged,
//! with a torn tail and with a flipped bit after it). During a directory batch:
//! `binary_directory.rs`; config checks and smtplib: `binary_interop.rs`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{received_id, Sink, SinkOptions};
use common::bin::{spawn, spawn_with, wait_queue_empty, with_sinks_in, write_config, Start};
use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    server.kill_9();
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
    server.kill_9();
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

/// The last whole message record in the bytes of a segment of format 2 (`COEXSEG2`, the
/// salt, then records: magic, kind, three zero bytes, meta_len, body_len, two checksums,
/// metadata, body; see `spool::segment`). The walk stops at the first record that is not
/// whole (a tail the kill may have torn already).
fn last_message_record(seg: &[u8]) -> std::ops::Range<usize> {
    assert_eq!(&seg[..8], b"COEXSEG2", "a segment of format 2");
    let salt = u32::from_le_bytes(seg[8..12].try_into().unwrap());
    let magic = (0x5245_5843_u32 ^ salt).to_le_bytes();
    let (mut off, mut last) = (16, None);
    while off + 24 <= seg.len() && seg[off..off + 4] == magic {
        let field =
            |i: usize| u32::from_le_bytes(seg[off + i..off + i + 4].try_into().unwrap()) as usize;
        let end = off + 24 + field(8) + field(12);
        if end > seg.len() {
            break;
        }
        if seg[off + 4] == 1 {
            last = Some(off..end);
        }
        off = end;
    }
    last.expect("a whole message record in the segment")
}

/// The segment being written: the last `NNNNNNNNNN.seg` of `spool/segments`.
fn newest_segment(spool: &std::path::Path) -> std::path::PathBuf {
    let mut names: Vec<String> = std::fs::read_dir(spool.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    spool
        .join("segments")
        .join(names.last().expect("a segment"))
}

/// Messages acknowledged under load are all delivered after `kill -9`, and the segment that
/// was being written ends in a torn record for sure: whatever the kill cut short, the first
/// half of a message record (header intact, body running past the end of the file, as a
/// kill in the middle of its write leaves it) is appended before the restart. Recovery must
/// cut that tail and keep its bytes in `spool/damaged/` as torn (not corrupt), and start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_message_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SinkOptions {
        keep_bodies: false,
        record: Some(dir.path().join("delivered.txt")),
        ..SinkOptions::default()
    };
    let mut s = with_sinks_in(dir, opts, |_| {}).await;
    let mut server = s.spawn();

    // Eight sessions send and deliveries run while the relay is killed: stores, fsyncs and
    // 250s are in flight at that moment.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|n| {
            tokio::spawn(send_until_cut(
                s.cfg.listen(),
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
    server.kill_9();
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

    // The torn tail, made for sure.
    let spool = s.path("spool");
    let seg = newest_segment(&spool);
    let bytes = std::fs::read(&seg).unwrap();
    let record = last_message_record(&bytes);
    let half = &bytes[record.start..record.start + record.len() / 2];
    let torn_at = bytes.len() as u64;
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, half).unwrap();
    drop(f);
    let end = torn_at + half.len() as u64;

    let _server = s.spawn();
    let record_file = s.path("delivered.txt");
    eventually("every acknowledged message delivered after kill -9", || {
        let text = std::fs::read_to_string(&record_file).unwrap_or_default();
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

    // Cut and kept aside as torn: one `.torn` file for the segment, from the first damage
    // (the appended half record, or a write the kill cut short before it) to the end.
    let seg_name = seg.file_name().unwrap().to_string_lossy().into_owned();
    let damaged: Vec<(String, u64)> = std::fs::read_dir(spool.join("damaged"))
        .map(|it| {
            it.map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect()
        })
        .unwrap_or_default();
    let torn: Vec<(u64, u64)> = damaged
        .iter()
        .filter_map(|(name, len)| {
            let offset = name
                .strip_prefix(&format!("{seg_name}."))?
                .strip_suffix(".torn")?;
            Some((offset.parse().unwrap(), *len))
        })
        .collect();
    assert!(
        !damaged.iter().any(|(name, _)| name.ends_with(".corrupt")),
        "a torn tail was taken for corruption: {damaged:?}"
    );
    assert_eq!(torn.len(), 1, "{damaged:?}");
    let (offset, len) = torn[0];
    assert!(
        offset <= torn_at && offset + len == end,
        "torn {offset}+{len}, appended {torn_at}..{end}: {damaged:?}"
    );
}
