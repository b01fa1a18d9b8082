//! The sink next hop's options: shares of deferred and refused recipients, reply delay,
//! per-domain counts.

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
    assert_eq!(
        c.mail(
            "a@b.test",
            &["x@nhs.test", "y@other.test", "z@nhs.test"],
            &sample("d")
        )
        .await
        .code,
        250
    );
    let by = slow.state.by_domain();
    assert_eq!((by["nhs.test"].recipients, by["nhs.test"].messages), (2, 1));
    assert_eq!(
        (by["other.test"].recipients, by["other.test"].messages),
        (1, 1)
    );
    assert_eq!(by["nhs.test"].bytes, sample("d").len() as u64);
    assert!(
        slow.state.summary().contains("nhs.test=2rcpt/1msg/"),
        "{}",
        slow.state.summary()
    );
}
