//! Operating the real binary: metrics from real traffic, config reload (good, bad, under
//! load), drain, and SIGTERM during load.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::AdminClient;
use coexist::load::sink::{Sink, SinkOptions};
use common::bin::{cli, spawn, wait_queue_empty, with_raw_value, with_sinks, BinConfig, Setup};
use common::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The value of a sample `name{labels}` in Prometheus text, where every given label matches.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn scrape(cfg: &BinConfig) -> String {
    let c = AdminClient::new(cfg.admin(), TOKEN.into());
    match c.get("/metrics").unwrap() {
        serde_json::Value::String(s) => s,
        other => panic!("not text: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_real_traffic() {
    let Setup {
        onprem,
        cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let _server = spawn(&mut cfg);

    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..3 {
        assert_eq!(
            c.mail(
                "x@example.org",
                &["alice@nhs.test", "bob@nhs.test"],
                &sample(&format!("m{i}"))
            )
            .await
            .code,
            250
        );
    }
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<victim@evil.test>").await.code, 550);
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: smuggle\r\n\r\na\n.\nb\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 550);
    c.expect("QUIT", 221).await;
    assert_eq!(wait(&onprem, 3).await, 3);
    assert_eq!(wait(&cloud, 3).await, 3);
    // Outcomes are counted before a message leaves the queue.
    wait_queue_empty(&cfg);

    let text = scrape(&cfg);
    let get = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(
        get(
            "coexist_messages_total",
            &[("result", "accepted"), ("status", "2.0.0")]
        ),
        3.0
    );
    assert_eq!(
        get(
            "coexist_messages_total",
            &[("result", "rejected"), ("status", "5.5.2")]
        ),
        1.0
    );
    assert_eq!(
        get("coexist_recipients_rejected_total", &[("status", "5.7.1")]),
        1.0
    );
    assert_eq!(
        get("coexist_recipients_accepted_total", &[("route", "onprem")]),
        3.0
    );
    assert_eq!(
        get("coexist_recipients_accepted_total", &[("route", "cloud")]),
        4.0
    );
    let hop = cloud.addr.to_string();
    assert_eq!(
        get(
            "coexist_delivery_recipients_total",
            &[("route", "cloud"), ("next_hop", &hop), ("outcome", "sent")]
        ),
        3.0
    );
    assert_eq!(
        get(
            "coexist_delivery_latency_seconds_count",
            &[("route", "onprem")]
        ),
        3.0
    );
    // Ours only: the test harness learns that the server is up from its log.
    assert_eq!(get("coexist_smtp_sessions_total", &[]), 1.0);
    assert_eq!(get("coexist_directory_entries", &[]), 4.0);
    assert_eq!(get("coexist_queue_messages", &[("state", "active")]), 0.0);
    let bytes: usize = (0..3).map(|i| sample(&format!("m{i}")).len()).sum();
    assert_eq!(get("coexist_message_bytes_total", &[]), bytes as f64);
    assert!(get("coexist_directory_lookup_seconds_count", &[]) >= 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_bad_reloads_change_nothing() {
    let Setup {
        onprem,
        cloud: _cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let other = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default())
        .await
        .unwrap();
    let _server = spawn(&mut cfg);

    // Load: 4 sessions sending to alice (on premises) until told to stop (5000 each at most).
    let acked = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), cfg.listen());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            c.expect("EHLO load.test", 250).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 5000 {
                let r = c
                    .mail(
                        "x@example.org",
                        &["alice@nhs.test"],
                        &sample(&format!("t{t}m{i}")),
                    )
                    .await;
                assert_eq!(r.code, 250, "{r:?}");
                *acked.lock().unwrap() += 1;
                i += 1;
            }
        }));
    }
    let delivered = |sink: &Sink| {
        sink.state
            .recipients
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    eventually("the load to reach the on-premises hop", || {
        delivered(&onprem) >= 20
    })
    .await;

    // A valid reload moves the on-premises route to another next hop, under load.
    cfg.config.routes.get_mut("onprem").unwrap().next_hops = vec![other.addr.into()];
    cfg.write();
    let (ok, out, err) = cli(&cfg.path, &["reload"]);
    assert!(ok, "{err}");
    assert!(out.contains("routes.onprem"), "{out}");
    eventually("the load to reach the new hop", || delivered(&other) >= 20).await;

    // A config with a syntax error is refused with file and line; so is a restart-only change.
    let (text, line) = with_raw_value(&cfg.text(), "server", "max_errors", "twenty");
    std::fs::write(&cfg.path, text).unwrap();
    let (ok, _, err) = cli(&cfg.path, &["reload"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("coexist.toml:{line}: key `server.max_errors`")),
        "{err}"
    );
    let mut restart_only = cfg.config.clone();
    restart_only.server.listen = vec!["127.0.0.1:1".parse().unwrap()];
    BinConfig {
        path: cfg.path.clone(),
        config: restart_only,
    }
    .write();
    let (ok, _, err) = cli(&cfg.path, &["reload"]);
    assert!(!ok);
    assert!(err.contains("need a restart: server.listen"), "{err}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = *acked.lock().unwrap();
    // After the refused reloads the valid one is still in force: new mail goes to `other`.
    let before = delivered(&other);
    assert_eq!(
        send_one(cfg.listen(), &["alice@nhs.test"], "after")
            .await
            .code,
        250
    );
    let total = acked + 1;
    eventually("every acknowledged message delivered", || {
        let got = delivered(&onprem) + delivered(&other);
        (got >= total).then_some(()).ok_or(format!("{got}/{total}"))
    })
    .await;
    // Every message has its outcome: nothing more is coming, so none came twice.
    wait_queue_empty(&cfg);
    assert_eq!(
        delivered(&onprem) + delivered(&other),
        total,
        "no duplicates"
    );
    assert!(delivered(&other) > before);
    assert!(delivered(&onprem) > 0, "mail before the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_421_and_readiness_follows() {
    let Setup {
        onprem: _onprem,
        cloud: _cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let _server = spawn(&mut cfg);
    let mut open = connect(cfg.listen()).await;
    open.expect("EHLO client.test", 250).await;

    let (ok, out, _) = cli(&cfg.path, &["drain"]);
    assert!(ok);
    assert!(
        out.contains("draining: true; SMTP sessions still open: 1"),
        "{out}"
    );
    let (_, out, err) = cli(&cfg.path, &["status"]);
    assert!(out.contains("ready: false; draining: true"), "{out}{err}");
    let mut s = tokio::net::TcpStream::connect(cfg.listen()).await.unwrap();
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("421 4.3.2 "),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // The session already open finishes its work.
    assert_eq!(
        open.mail("x@example.org", &["bob@nhs.test"], &sample("drain"))
            .await
            .code,
        250
    );

    assert!(cli(&cfg.path, &["drain", "--off"]).0);
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
    let (_, out, _) = cli(&cfg.path, &["status"]);
    assert!(out.contains("ready: true; draining: false"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_keeps_every_acknowledged_message() {
    let Setup {
        onprem,
        cloud,
        mut cfg,
        dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    // A short grace period, so SIGTERM cuts sessions in the middle of the load.
    cfg.config.server.shutdown_timeout = Duration::from_secs(1);
    cfg.write();
    let mut server = spawn(&mut cfg);

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (acked, addr) = (acked.clone(), cfg.listen());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            if c.cmd("EHLO load.test").await.code != 250 {
                return;
            }
            for i in 0..5000 {
                let mut body = sample(&format!("t{t}m{i}"));
                body.extend_from_slice(&vec![b'x'; 2000]);
                body.extend_from_slice(b"\r\n");
                // Any failure (421, closed connection) ends this sender; only 250s count.
                let Some(r) = try_mail(&mut c, &["alice@nhs.test", "bob@nhs.test"], &body).await
                else {
                    return;
                };
                if r.code != 250 {
                    return;
                }
                acked.lock().unwrap().push(queue_id(&r));
            }
        }));
    }
    eventually("the load to get going", || {
        acked.lock().unwrap().len() >= 20
    })
    .await;
    server.signal("TERM");
    assert!(
        server.wait_exit(Duration::from_secs(40)),
        "relay did not stop after SIGTERM"
    );
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "load never got going");
    assert!(
        acked.len() < 20_000,
        "SIGTERM should have cut the sessions short"
    );

    // Every acknowledged message was delivered or is in the spool. (The relay has exited: a
    // message leaves the spool only after its next hop has taken it.)
    let delivered: HashSet<String> = onprem
        .state
        .messages()
        .iter()
        .chain(cloud.state.messages().iter())
        .filter_map(|m| {
            let h = received_header(&m.body);
            h.split(" id ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(|id| id.trim_end_matches(';').to_string())
        })
        .collect();
    let spooled: HashSet<String> = spooled(&dir.path().join("spool"))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in &acked {
        assert!(
            delivered.contains(id) || spooled.contains(id),
            "{id} acknowledged but lost ({} acked, {} delivered, {} spooled; some delivered: {:?})",
            acked.len(),
            delivered.len(),
            spooled.len(),
            delivered.iter().take(3).collect::<Vec<_>>()
        );
    }
}

/// A DATA transaction that returns `None` if the server goes away at any step.
async fn try_mail(
    c: &mut Client<tokio::net::TcpStream>,
    rcpts: &[&str],
    body: &[u8],
) -> Option<Reply> {
    let mut cmds = String::from("MAIL FROM:<x@example.org>\r\n");
    for r in rcpts {
        cmds.push_str(&format!("RCPT TO:<{r}>\r\n"));
    }
    cmds.push_str("DATA\r\n");
    tokio::io::AsyncWriteExt::write_all(c.io.get_mut(), cmds.as_bytes())
        .await
        .ok()?;
    for _ in 0..rcpts.len() + 2 {
        let r = c.try_reply().await?;
        if r.code >= 400 {
            return Some(r);
        }
    }
    let mut stuffed = Vec::new();
    coexist::deliver::dot_stuff(body, &mut stuffed);
    tokio::io::AsyncWriteExt::write_all(c.io.get_mut(), &stuffed)
        .await
        .ok()?;
    c.try_reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_progress_keep_the_config_they_started_with() {
    let Setup {
        onprem: _onprem,
        cloud,
        mut cfg,
        dir: _dir,
    } = with_sinks(SinkOptions::default(), |_| {}).await;
    let _server = spawn(&mut cfg);
    let mut old = connect(cfg.listen()).await;
    old.expect("EHLO client.test", 250).await;

    cfg.config.server.accepted_domains =
        vec![coexist::types::Domain::parse("other.test", false).unwrap()];
    cfg.write();
    let (ok, out, err) = cli(&cfg.path, &["reload"]);
    assert!(ok, "{err}");
    assert!(out.contains("server"), "{out}");

    let mut new = connect(cfg.listen()).await;
    new.expect("EHLO client.test", 250).await;
    new.expect("MAIL FROM:<x@example.org>", 250).await;
    assert_eq!(new.cmd("RCPT TO:<bob@nhs.test>").await.status(), "5.7.1");
    assert_eq!(
        old.mail("x@example.org", &["bob@nhs.test"], &sample("old rules"))
            .await
            .code,
        250
    );
    assert_eq!(wait(&cloud, 1).await, 1);
}
