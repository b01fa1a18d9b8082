//! The sink next hop's options: shares of deferred and refused recipients, reply delay,
//! per-domain counts.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_delay_and_domain_counts() {
    let lo = "127.0.0.1:0".parse().unwrap();
    let refusing = Sink::start(
        lo,
        SinkOptions {
            reject_share: 1.0,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(refusing.addr).await;
    c.expect("EHLO t.test", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<x@nhs.test>").await.status(), "5.1.1");

    let deferring = Sink::start(
        lo,
        SinkOptions {
            defer_share: 1.0,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(deferring.addr).await;
    c.expect("EHLO t.test", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<x@nhs.test>").await.status(), "4.2.1");

    let slow = Sink::start(
        lo,
        SinkOptions {
            delay: Duration::from_millis(300),
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(slow.addr).await;
    c.expect("EHLO t.test", 250).await;
    // The delay holds back the reply to the end of data: measured from the last byte sent,
    // the 250 comes no sooner than 300 ms (a lower bound only: a slow machine adds time).
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    for r in ["x@nhs.test", "y@other.test", "z@nhs.test"] {
        c.expect(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.expect("DATA", 354).await;
    let mut stuffed = Vec::new();
    coexist::deliver::dot_stuff(&sample("d"), &mut stuffed);
    c.send(&stuffed).await;
    let t0 = std::time::Instant::now();
    let r = c.reply().await;
    let waited = t0.elapsed();
    assert_eq!(r.code, 250, "{r:?}");
    assert!(
        waited >= Duration::from_millis(300),
        "end of data answered after {waited:?}, before the 300 ms delay"
    );
    // Each message waits again.
    let t0 = std::time::Instant::now();
    c.expect("NOOP", 250).await;
    let r = c.mail("a@b.test", &["w@nhs.test"], &sample("e")).await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "second message answered after {:?}",
        t0.elapsed()
    );
    let by = slow.state.by_domain();
    assert_eq!((by["nhs.test"].recipients, by["nhs.test"].messages), (3, 2));
    assert_eq!(
        (by["other.test"].recipients, by["other.test"].messages),
        (1, 1)
    );
    assert_eq!(
        by["nhs.test"].bytes,
        (sample("d").len() + sample("e").len()) as u64
    );
    assert!(
        slow.state.summary().contains("nhs.test=3rcpt/2msg/"),
        "{}",
        slow.state.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_limit_no_smtputf8_and_multi_line_errors() {
    let lo = "127.0.0.1:0".parse().unwrap();
    // At most 2 recipients per transaction.
    let limited = Sink::start(
        lo,
        SinkOptions {
            max_rcpts: 2,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(limited.addr).await;
    c.expect("EHLO t.test", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    c.expect("RCPT TO:<x@nhs.test>", 250).await;
    c.expect("RCPT TO:<y@nhs.test>", 250).await;
    assert_eq!(c.cmd("RCPT TO:<z@nhs.test>").await.status(), "4.5.3");

    // Without SMTPUTF8: not in EHLO, refused on MAIL; everything else as usual.
    let plain = Sink::start(
        lo,
        SinkOptions {
            smtputf8: false,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(plain.addr).await;
    let ehlo = c.expect("EHLO t.test", 250).await;
    assert!(!ehlo.text.contains("SMTPUTF8"), "{}", ehlo.text);
    assert!(ehlo.text.contains("PIPELINING") && ehlo.text.ends_with("\r\n"));
    assert_eq!(c.cmd("MAIL FROM:<a@b.test> SMTPUTF8").await.code, 555);
    assert_eq!(
        c.mail("a@b.test", &["x@nhs.test"], &sample("p")).await.code,
        250
    );
    assert!(!plain.state.messages()[0].smtputf8);

    // Multi-line errors: three lines, the original text first; successes unchanged.
    let multi = Sink::start(
        lo,
        SinkOptions {
            multiline_errors: true,
            ..SinkOptions::default()
        },
    )
    .await
    .unwrap();
    let mut c = connect(multi.addr).await;
    c.expect("EHLO t.test", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    let r = c.cmd("RCPT TO:<reject-me@nhs.test>").await;
    let lines: Vec<&str> = r.text.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.text);
    assert_eq!(lines[0], "550-5.1.1 Sink: mailbox unavailable");
    assert!(lines[1].starts_with("550-5.1.1 ") && lines[2].starts_with("550 5.1.1 "));

    // The reply-editing front is clear text only.
    let dir = tempfile::tempdir().unwrap();
    let certs = write_certs(dir.path());
    let acceptor = coexist::smtp::tls::load_acceptor(&certs.cert, &certs.key).unwrap();
    let refused = Sink::start(
        lo,
        SinkOptions {
            tls: Some(acceptor),
            smtputf8: false,
            ..SinkOptions::default()
        },
    )
    .await;
    assert!(refused.is_err());
}
