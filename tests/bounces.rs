//! Bounces: DSNs (RFC 3464) that a mail client can parse, per-recipient failures, RET and
//! NOTIFY, no bounce of a bounce, and DSN parameters passed on to next hops.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::load::sink::SinkMessage;
use common::*;
use mailparse::MailHeaderMap;
use std::time::Duration;

fn dsns(msgs: &[SinkMessage]) -> Vec<&SinkMessage> {
    msgs.iter().filter(|m| m.from.is_none()).collect()
}

async fn wait_dsn(sink: &coexist::load::sink::Sink) -> SinkMessage {
    eventually("a DSN", || {
        dsns(&sink.state.messages()).first().map(|m| (*m).clone())
    })
    .await
}

fn spool_files(dir: &std::path::Path, sub: &str) -> usize {
    std::fs::read_dir(dir.join("spool").join(sub))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_bounces_that_recipient_only_with_a_parseable_dsn() {
    let h = harness(unknown_onprem).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    // reject-me is unknown, so it goes on premises (not the shipped `unknown = "reject"`),
    // where the sink refuses it with 550.
    c.expect("MAIL FROM:<x@example.org> ENVID=QQ123", 250).await;
    c.expect(
        "RCPT TO:<reject-me@nhs.test> ORCPT=rfc822;reject-me@nhs.test",
        250,
    )
    .await;
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut body = Vec::new();
    coexist::deliver::dot_stuff(&sample("mixed"), &mut body);
    c.send(&body).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250);
    let qid = queue_id(&r);

    let dsn = wait_dsn(&h.onprem).await;
    assert_eq!(
        dsn.rcpts[0].to_string(),
        "x@example.org",
        "the DSN goes to the sender"
    );
    let parsed = mailparse::parse_mail(&dsn.body).unwrap();
    assert_eq!(parsed.ctype.mimetype, "multipart/report");
    assert_eq!(
        parsed.ctype.params.get("report-type").map(String::as_str),
        Some("delivery-status")
    );
    assert_eq!(
        parsed.headers.get_first_value("To").unwrap(),
        "<x@example.org>"
    );
    let status = String::from_utf8_lossy(&parsed.subparts[1].get_body_raw().unwrap()).to_string();
    for want in [
        "Final-Recipient: rfc822; reject-me@nhs.test",
        "Original-Recipient: rfc822;reject-me@nhs.test",
        "Original-Envelope-Id: QQ123",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
        &format!("X-Coexist-Queue-ID: {qid}"),
    ] {
        assert!(status.contains(want), "{want} missing:\n{status}");
    }
    assert!(
        !status.contains("alice"),
        "delivered recipients are not in the DSN"
    );
    let returned = String::from_utf8_lossy(&parsed.subparts[2].get_body_raw().unwrap()).to_string();
    assert_eq!(parsed.subparts[2].ctype.mimetype, "text/rfc822-headers");
    assert!(
        returned.contains("Subject: mixed") && !returned.contains("Hello."),
        "{returned}"
    );
    // alice got her copy; the original left the spool (invariant 2: DSN spooled first).
    assert!(h
        .onprem
        .state
        .messages()
        .iter()
        .any(|m| m.rcpts[0].to_string() == "alice@nhs.test"));
    h.settled().await;
    assert_eq!(spool_files(h.dir.path(), "active"), 0);
    assert_eq!(spool_files(h.dir.path(), "failed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ret_full_returns_the_whole_message_and_notify_never_sends_none() {
    let h = harness(unknown_onprem).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org> RET=FULL", 250).await;
    c.expect("RCPT TO:<reject-full@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut body = Vec::new();
    coexist::deliver::dot_stuff(&sample("full"), &mut body);
    c.send(&body).await;
    assert_eq!(c.reply().await.code, 250);
    let dsn = wait_dsn(&h.onprem).await;
    let parsed = mailparse::parse_mail(&dsn.body).unwrap();
    assert_eq!(parsed.subparts[2].ctype.mimetype, "message/rfc822");
    assert!(String::from_utf8_lossy(&dsn.body).contains("Hello."));

    // NOTIFY=NEVER: the failure is final, no DSN, nothing kept.
    let h = harness(unknown_onprem).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<reject-quiet@nhs.test> NOTIFY=NEVER", 250)
        .await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: quiet\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    // Once the message has its outcome, a DSN (if one were made) would have been queued
    // before it and delivered.
    h.settled().await;
    assert_eq!(spool_files(h.dir.path(), "active"), 0);
    assert!(dsns(&h.onprem.state.messages()).is_empty());
    assert_eq!(spool_files(h.dir.path(), "failed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sender_never_gets_a_bounce() {
    let h = harness(unknown_onprem).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .mail("", &["reject-me@nhs.test"], &sample("bounce of bounce"))
        .await;
    assert_eq!(r.code, 250);
    let qid = queue_id(&r);
    // The message has its outcome (kept in failed/); a DSN would have been queued first.
    h.settled().await;
    let failed = h.dir.path().join(format!("spool/failed/{qid}.state"));
    let text = std::fs::read_to_string(&failed).expect("kept in failed/");
    assert!(text.contains("550 5.1.1"), "{text}");
    assert!(dsns(&h.onprem.state.messages()).is_empty(), "no DSN for <>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_are_passed_to_next_hops_that_offer_dsn() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.cmd("EHLO client.test").await;
    assert!(r.text.contains("DSN"), "{r:?}");
    c.expect("MAIL FROM:<x@example.org> RET=HDRS ENVID=ABC", 250)
        .await;
    c.expect(
        "RCPT TO:<bob@nhs.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@nhs.test",
        250,
    )
    .await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let m = &h.cloud.state.messages()[0];
    assert_eq!(m.rcpt_dsn[0].notify.as_deref(), Some("SUCCESS,FAILURE"));
    assert_eq!(m.rcpt_dsn[0].orcpt.as_deref(), Some("rfc822;bob@nhs.test"));
    assert_eq!(m.envid.as_deref(), Some("ABC"));
    assert_eq!(m.ret, Some(coexist::proto::Ret::Hdrs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delay_warning_then_delivery() {
    let h = harness(|c| c.queue.delay_warning = Duration::from_secs(1)).await;
    h.cloud.state.set_mode(coexist::load::sink::SinkMode::Defer);
    let r = send_one(h.addr, &["bob@nhs.test"], "slow").await;
    assert_eq!(r.code, 250);
    let qid = queue_id(&r);
    let warning = wait_dsn(&h.onprem).await;
    assert_eq!(warning.rcpts[0].to_string(), "x@example.org");
    let text = String::from_utf8_lossy(&warning.body).to_string();
    assert!(
        text.contains("Subject: Delayed Mail (still being retried)"),
        "{text}"
    );
    assert!(
        text.contains("Action: delayed") && text.contains("Status: 4.3.0"),
        "{text}"
    );
    // The message is still queued and goes out when the next hop recovers; one warning only.
    assert!(h.relay.queue.get(&qid).is_some());
    // Another failed attempt after the one that warned (a warning is queued at the end of an
    // attempt, before the message is deferred): it sends no second warning.
    let warned_at = h.deferred(&qid).await.state.attempts;
    eventually("another attempt", || {
        let e = h.relay.queue.get(&qid)?;
        (e.phase == coexist::queue::Phase::Deferred && e.state.attempts > warned_at).then_some(())
    })
    .await;
    h.cloud
        .state
        .set_mode(coexist::load::sink::SinkMode::Accept);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    h.settled().await;
    assert_eq!(dsns(&h.onprem.state.messages()).len(), 1);
}

/// Every line ends in CRLF: no bare LF, no bare CR, and no line over 998 octets.
fn assert_crlf_only(msg: &[u8]) {
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    for line in msg.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "line over 998 octets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_line_refusal_gives_a_well_formed_dsn_with_the_whole_reply() {
    // The next hops answer every error in three lines. The DSN goes to the sender through
    // the on-premises next hop, which, like coexist itself, refuses bare LF and bare CR.
    let opts = coexist::load::sink::SinkOptions {
        multiline_errors: true,
        ..Default::default()
    };
    let h = harness_with(opts, unknown_onprem).await;
    let r = send_one(h.addr, &["reject-me@nhs.test"], "multi").await;
    assert_eq!(r.code, 250);
    let dsn = wait_dsn(&h.onprem).await;
    assert_crlf_only(&dsn.body);
    let parsed = mailparse::parse_mail(&dsn.body).unwrap();
    assert_eq!(parsed.ctype.mimetype, "multipart/report");
    let human = String::from_utf8_lossy(&parsed.subparts[0].get_body_raw().unwrap()).to_string();
    for want in [
        "Sink: mailbox unavailable",
        "three lines",
        "end of the reply",
    ] {
        assert!(human.contains(want), "{want} missing:\n{human}");
    }
    // The delivery-status fields, parsed as header fields (continuation lines unfolded).
    let status = parsed.subparts[1].get_body_raw().unwrap();
    let status = String::from_utf8(status).unwrap();
    let blocks: Vec<&str> = status.split("\r\n\r\n").collect();
    let block = format!("{}\r\n\r\n", blocks[1]);
    let rcpt = mailparse::parse_headers(block.as_bytes()).unwrap().0;
    let diag = rcpt
        .get_first_value("Diagnostic-Code")
        .expect("Diagnostic-Code");
    assert!(
        diag.starts_with("smtp; 550 5.1.1 Sink: mailbox unavailable"),
        "{diag}"
    );
    assert!(
        diag.contains("three lines") && diag.contains("end of the reply"),
        "{diag}"
    );
    assert_eq!(rcpt.get_first_value("Status").as_deref(), Some("5.1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_warning_with_a_multi_line_reply_is_well_formed() {
    let opts = coexist::load::sink::SinkOptions {
        multiline_errors: true,
        ..Default::default()
    };
    let h = harness_with(opts, |c| c.queue.delay_warning = Duration::from_secs(1)).await;
    h.cloud.state.set_mode(coexist::load::sink::SinkMode::Defer);
    assert_eq!(send_one(h.addr, &["bob@nhs.test"], "slow").await.code, 250);
    let warning = wait_dsn(&h.onprem).await;
    assert_crlf_only(&warning.body);
    let text = String::from_utf8_lossy(&warning.body).to_string();
    assert!(
        text.contains("Action: delayed") && text.contains("Status: 4.3.0"),
        "{text}"
    );
    let parsed = mailparse::parse_mail(&warning.body).unwrap();
    let status = String::from_utf8_lossy(&parsed.subparts[1].get_body_raw().unwrap()).to_string();
    let unfolded = status.replace("\r\n ", " ");
    assert!(
        unfolded.contains("Diagnostic-Code: smtp; 451 4.3.0 Sink: deferring on request")
            && unfolded.contains("end of the reply"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ret_full_returns_only_the_headers_of_a_message_over_max_return_size() {
    // The shipped cap (50,000 bytes, Postfix's bounce_size_limit); unknown addresses go on
    // premises, where the sink refuses the `reject` ones.
    let h = harness(unknown_onprem).await;
    assert_eq!(h.relay.control.config().bounce.max_return_size, 50_000);
    let send = |subject: &'static str, body_size: usize| {
        let addr = h.addr;
        async move {
            let mut c = connect(addr).await;
            c.expect("EHLO client.test", 250).await;
            c.expect("MAIL FROM:<x@example.org> RET=FULL", 250).await;
            c.expect(&format!("RCPT TO:<reject-{subject}@nhs.test>"), 250)
                .await;
            c.expect("DATA", 354).await;
            let line = format!("{}\r\n", "b".repeat(98));
            let mut msg = format!("Subject: {subject}\r\n\r\n").into_bytes();
            while msg.len() < body_size {
                msg.extend_from_slice(line.as_bytes());
            }
            let mut stuffed = Vec::new();
            coexist::deliver::dot_stuff(&msg, &mut stuffed);
            c.send(&stuffed).await;
            assert_eq!(c.reply().await.code, 250);
        }
    };
    send("big", 60_000).await;
    send("small", 20_000).await;
    let all = eventually("two DSNs", || {
        let msgs = h.onprem.state.messages();
        let d: Vec<SinkMessage> = dsns(&msgs).into_iter().cloned().collect();
        (d.len() == 2).then_some(d)
    })
    .await;
    for dsn in all {
        let text = String::from_utf8_lossy(&dsn.body).to_string();
        let parsed = mailparse::parse_mail(&dsn.body).unwrap();
        let returned =
            String::from_utf8_lossy(&parsed.subparts[2].get_body_raw().unwrap()).to_string();
        let human =
            String::from_utf8_lossy(&parsed.subparts[0].get_body_raw().unwrap()).to_string();
        let note = "larger than 50000 bytes: only its headers are";
        if text.contains("Subject: big") {
            assert_eq!(parsed.subparts[2].ctype.mimetype, "text/rfc822-headers");
            assert!(!returned.contains("bbbb"), "the body is not returned");
            assert!(human.contains(note), "{human}");
            assert!(dsn.body.len() < 10_000, "{} bytes", dsn.body.len());
        } else {
            assert!(text.contains("Subject: small"), "{text}");
            assert_eq!(parsed.subparts[2].ctype.mimetype, "message/rfc822");
            assert!(
                returned.contains(&"b".repeat(98)),
                "the whole message comes back"
            );
            assert!(!human.contains(note), "{human}");
        }
    }
}
