//! Inbound ESMTP conversations against the real relay on loopback.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_lists_extensions_and_basic_commands_answer() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    let r = c.expect("EHLO client.test", 250).await;
    for ext in [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "CHUNKING",
    ] {
        assert!(r.text.contains(ext), "{ext} missing in {r:?}");
    }
    assert_eq!(c.expect("NOOP", 250).await.status(), "2.0.0");
    assert_eq!(c.expect("VRFY alice", 252).await.status(), "2.5.2");
    c.expect("HELP", 214).await;
    assert_eq!(c.expect("EXPN staff", 502).await.status(), "5.5.1");
    assert_eq!(c.expect("FOO", 500).await.status(), "5.5.2");
    c.expect("RSET", 250).await;
    assert_eq!(c.expect("QUIT", 221).await.status(), "2.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_out_of_order_get_503() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    assert_eq!(
        c.expect("MAIL FROM:<a@example.org>", 503).await.status(),
        "5.5.1"
    );
    c.expect("EHLO client.test", 250).await;
    assert_eq!(
        c.expect("RCPT TO:<bob@nhs.test>", 503).await.status(),
        "5.5.1"
    );
    assert_eq!(c.expect("DATA", 503).await.status(), "5.5.1");
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    assert_eq!(
        c.expect("MAIL FROM:<a@example.org>", 503).await.status(),
        "5.5.1"
    );
    assert_eq!(c.expect("DATA", 554).await.status(), "5.5.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_gets_every_reply_in_order() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@nhs.test>\r\nRCPT TO:<x@evil.test>\r\nRCPT TO:<alice@nhs.test>\r\nDATA\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(c.reply().await.code);
    }
    assert_eq!(got, vec![250, 250, 550, 250, 354]);
    // Message, end of data and QUIT in one packet.
    let mut tail = sample("pipelined");
    tail.extend_from_slice(b".\r\nQUIT\r\n");
    c.send(&tail).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.text.contains("queued as "), "{r:?}");
    assert_eq!(c.reply().await.code, 221);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(wait(&h.onprem, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_are_joined_exactly() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    let body = b"Subject: bdat\r\n\r\n.line starting with a dot\r\nno final CRLF";
    let (a, b) = body.split_at(20);
    c.send(format!("BDAT {}\r\n", a.len()).as_bytes()).await;
    c.send(a).await;
    assert_eq!(c.reply().await.code, 250);
    // Chunk and a pipelined NOOP in one packet: the NOOP is a command, not data.
    let mut pkt = format!("BDAT {} LAST\r\n", b.len()).into_bytes();
    pkt.extend_from_slice(b);
    pkt.extend_from_slice(b"NOOP\r\n");
    c.send(&pkt).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.text.contains("queued as"));
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let m = &h.cloud.state.messages()[0];
    assert_eq!(
        strip_received(&m.body),
        body,
        "BDAT to a CHUNKING next hop keeps the exact bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_without_transaction_is_consumed_and_refused() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n").await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (503, "5.5.1"), "{r:?}");
    // "QUIT\r\n" was chunk data, so the next command is NOOP.
    assert_eq!(c.reply().await.code, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_injected_plaintext_and_resets_state() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    // EHLO pipelined in clear text after STARTTLS: if it were executed after the handshake,
    // its 250 would answer our first TLS command.
    c.send(b"STARTTLS\r\nEHLO injected.test\r\n").await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (220, "2.0.0"));
    let tcp = c.io.into_inner();
    let tls = tls_connector(&h.certs.ca_pem)
        .connect("mx1.coexist.test".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the relay's certificate, checked against the test CA");
    let mut t = Client {
        io: tokio::io::BufReader::new(tls),
    };
    // State was reset: MAIL needs EHLO again, and nothing answers the injected command.
    assert_eq!(
        t.expect("MAIL FROM:<a@example.org>", 503).await.status(),
        "5.5.1"
    );
    let r = t.expect("EHLO client.test", 250).await;
    assert!(
        !r.text.contains("STARTTLS"),
        "STARTTLS offered twice: {r:?}"
    );
    assert_eq!(t.expect("STARTTLS", 503).await.status(), "5.5.1");
    let r = t
        .mail("a@example.org", &["carol@nhs.test"], &sample("tls"))
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let received = received_header(&h.cloud.state.messages()[0].body);
    assert!(received.contains("with ESMTPS id "), "{received}");
    assert!(
        received.contains("(using TLSv1_3 with cipher"),
        "{received}"
    );
    assert!(received.contains("for <carol@nhs.test>"), "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_before_and_during_data() {
    let h = harness(|c| c.server.max_message_size = 1000).await;
    let mut c = connect(h.addr).await;
    let r = c.expect("EHLO client.test", 250).await;
    assert!(r.text.contains("SIZE 1000"));
    assert_eq!(
        c.expect("MAIL FROM:<a@example.org> SIZE=1001", 552)
            .await
            .status(),
        "5.3.4"
    );
    c.expect("MAIL FROM:<a@example.org> SIZE=900", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 5000 {
        big.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    big.extend_from_slice(b".\r\n");
    c.send(&big).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (552, "5.3.4"), "{r:?}");
    // The session goes on, and BDAT is limited too.
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.send(b"BDAT 1500 LAST\r\n").await;
    c.send(&vec![b'x'; 1500]).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (552, "5.3.4"), "{r:?}");
    c.expect("NOOP", 250).await;
    // Refused at SMTP, so never queued: once the queue is empty, nothing is on its way.
    h.settled().await;
    assert!(h.cloud.state.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_relay_tricks_are_refused() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<alice@nhs.test>", 250).await;
    let tricks = [
        ("<victim@evil.test>", "5.7.1"),
        ("<victim%evil.test@nhs.test>", "5.7.1"),
        ("<evil.test!victim@nhs.test>", "5.7.1"),
        ("<@nhs.test:victim@evil.test>", "5.7.1"),
        ("<@evil.test:bob@nhs.test>", "5.7.1"),
        ("<\"victim@evil.test\"@nhs.test>", "5.7.1"),
        ("<victim@[127.0.0.1]>", "5.7.1"),
        ("<victim@sub.nhs.test>", "5.7.1"),
        ("<victim@nhs.test.evil.test>", "5.7.1"),
        ("<victim@nhs.test.>", "5.1.3"),
        ("<victim@evil.test@nhs.test>", "5.1.3"),
        ("<victim@nhs.tеst>", "5.6.7"), // Cyrillic е without SMTPUTF8
        ("victim@evil.test", "5.1.7"),
        ("<postmaster>", "5.1.1"),
    ];
    for (path, status) in tricks {
        let r = c.cmd(&format!("RCPT TO:{path}")).await;
        assert!(r.code >= 500, "{path} -> {r:?}");
        assert_eq!(r.status(), status, "{path} -> {r:?}");
    }
    // Unicode look-alike with SMTPUTF8 on is still not our domain.
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<a@example.org> SMTPUTF8", 250).await;
    let r = c.cmd("RCPT TO:<victim@nhs.tеst>").await;
    assert_eq!((r.code, r.status()), (550, "5.7.1"), "{r:?}");
    assert_eq!(c.expect("DATA", 554).await.status(), "5.5.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_recipients_follow_directory_unknown() {
    let h = harness(|c| c.directory.unknown = "reject".into()).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@nhs.test>").await;
    assert_eq!((r.code, r.status()), (550, "5.1.1"), "{r:?}");
    c.expect("RCPT TO:<ALICE@NHS.TEST>", 250).await;

    let h2 = harness(|c| c.directory.unknown = "cloud".into()).await;
    let mut c2 = connect(h2.addr).await;
    c2.expect("EHLO client.test", 250).await;
    let r = c2
        .mail("a@example.org", &["nobody@nhs.test"], &sample("unknown"))
        .await;
    assert_eq!(r.code, 250);
    assert_eq!(wait(&h2.cloud, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_gets_421_timeout() {
    let h = harness(|c| c.server.command_timeout = Duration::from_millis(500)).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (421, "4.4.2"), "{r:?}");
    assert!(c.try_reply().await.is_none(), "connection should be closed");
    // A stalled DATA times out the same way.
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: slow\r\n").await;
    assert_eq!(c.reply().await.code, 421);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_line_is_refused_and_session_continues() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let long = format!("NOOP {}", "x".repeat(5000));
    let r = c.cmd(&long).await;
    assert_eq!((r.code, r.status()), (500, "5.5.2"), "{r:?}");
    assert!(r.text.contains("too long"));
    c.expect("NOOP", 250).await;
    // A NUL byte in a command is a syntax error, not a crash.
    c.send(b"NOOP\0\r\n").await;
    assert_eq!(c.reply().await.code, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_errors_and_recipients() {
    let h = harness(|c| {
        c.server.max_errors = 3;
        c.server.max_recipients = 2;
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    let r = c.cmd("RCPT TO:<carol@nhs.test>").await;
    assert_eq!((r.code, r.status()), (452, "4.5.3"));
    // A refused recipient is not a protocol error: three errors are still needed.
    c.expect("BOGUS", 500).await;
    c.expect("BOGUS", 500).await;
    let r = c.cmd("BOGUS").await;
    assert_eq!(r.code, 500);
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (421, "4.7.0"), "{r:?}");
    assert!(c.try_reply().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_421() {
    let h = harness(|c| c.server.max_connections = 1).await;
    let mut first = connect(h.addr).await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("421 4.7.0"), "{text}");
    first.expect("NOOP", 250).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_smuggling_is_refused_as_one_message() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: smuggle\r\n\r\nhi\n.\nMAIL FROM:<admin@nhs.test>\r\nRCPT TO:<carol@nhs.test>\r\nDATA\r\nsmuggled\r\n.\r\n")
        .await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (550, "5.5.2"), "{r:?}");
    c.expect("NOOP", 250).await;
    // Refused at SMTP, so never queued: once the queue is empty, nothing is on its way.
    h.settled().await;
    assert!(h.cloud.state.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_message_is_refused_with_546() {
    let h = harness(|c| c.server.max_hops = 5).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    let mut m = Vec::new();
    for i in 0..6 {
        m.extend_from_slice(
            format!("Received: from hop{i} by hop{i}; Wed, 25 Nov 2026 10:00:00 +0000\r\n")
                .as_bytes(),
        );
    }
    m.extend_from_slice(&sample("loop"));
    let r = c.mail("a@example.org", &["bob@nhs.test"], &m).await;
    assert_eq!((r.code, r.status()), (554, "5.4.6"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_recipients_do_not_end_the_session_until_their_own_limit() {
    // Defaults: max_errors 20, max_rcpt_refusals 100. Twenty-five unknown recipients and one
    // valid one: the message goes through.
    let h = harness(|c| c.directory.unknown = "reject".into()).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    for i in 0..25 {
        let r = c.cmd(&format!("RCPT TO:<nobody{i}@nhs.test>")).await;
        assert_eq!((r.code, r.status()), (550, "5.1.1"), "{r:?}");
    }
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: many unknown\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(wait(&h.cloud, 1).await, 1);

    // Recipients past max_recipients get 452 4.5.3 and are not counted as refusals.
    let h = harness(|c| {
        c.server.max_recipients = 2;
        c.server.max_rcpt_refusals = 2;
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    c.expect("RCPT TO:<alice@nhs.test>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    for _ in 0..5 {
        let r = c.cmd("RCPT TO:<carol@nhs.test>").await;
        assert_eq!((r.code, r.status()), (452, "4.5.3"), "{r:?}");
    }
    c.expect("DATA", 354).await;
    c.send(b"Subject: two of them\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);

    // Harvesting still ends: the refusal limit closes the session.
    let h = harness(|c| {
        c.directory.unknown = "reject".into();
        c.server.max_rcpt_refusals = 5;
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO harvester.test", 250).await;
    c.expect("MAIL FROM:<a@example.org>", 250).await;
    for i in 0..4 {
        c.expect(&format!("RCPT TO:<guess{i}@nhs.test>"), 550).await;
    }
    c.expect("RCPT TO:<guess4@nhs.test>", 550).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (421, "4.7.0"), "{r:?}");
    assert!(r.text.contains("refused recipients"), "{r:?}");
    assert!(c.try_reply().await.is_none());
}
