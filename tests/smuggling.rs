//! SMTP smuggling and bare line ends: only `<CRLF>.<CRLF>` ends DATA, and a message holding a
//! bare CR or bare LF is refused whole (`550 5.5.2`), in DATA and in BDAT. Whatever follows a
//! fake end of data is message text, never a command.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::*;
use std::time::Duration;

/// The fake ends of data published for SMTP smuggling (SEC Consult, 2023, and later variants).
const FAKE_ENDS: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\n",
    b"\n..\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
];

/// The smuggled transaction that follows the fake end.
const SMUGGLED: &[u8] =
    b"MAIL FROM:<ceo@nhs.test>\r\nRCPT TO:<carol@nhs.test>\r\nDATA\r\nsmuggled\r\n.\r\n";

/// Sends one smuggling attempt in `pieces` writes (split inside the fake end) and returns
/// every reply the relay gave until the connection closed after QUIT.
async fn attempt(h: &Harness, pieces: &[&[u8]]) -> Vec<Reply> {
    let mut c = connect(h.addr).await;
    c.expect("EHLO attacker.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    let s = c.io.get_ref();
    let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    for p in pieces {
        c.send(p).await;
        // The relay reads each piece on its own: the next is sent once it has read this one
        // (the unit tests of the reader cover every split too).
        eventually("the relay to read the piece", || unread(local, peer) == 0).await;
    }
    c.send(b"QUIT\r\n").await;
    let mut replies = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(20), c.try_reply())
        .await
        .expect("relay went silent")
    {
        replies.push(r);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fake_end_of_data_ends_a_message() {
    let h = harness(|_| {}).await;
    for fake in FAKE_ENDS {
        let mut whole = b"Subject: smuggle\r\n\r\nhi".to_vec();
        whole.extend_from_slice(fake);
        whole.extend_from_slice(SMUGGLED);
        let head = b"Subject: smuggle\r\n\r\nhi".len();
        // Unsplit, then split at every position inside the fake end.
        let mut splits = vec![None];
        splits.extend((1..fake.len()).map(|i| Some(head + i)));
        for split in splits {
            let pieces: Vec<&[u8]> = match split {
                None => vec![&whole[..]],
                Some(at) => vec![&whole[..at], &whole[at..]],
            };
            let replies = attempt(&h, &pieces).await;
            let codes: Vec<(u16, String)> = replies
                .iter()
                .map(|r| (r.code, r.status().to_string()))
                .collect();
            assert_eq!(
                codes,
                vec![(550, "5.5.2".to_string()), (221, "2.0.0".to_string())],
                "fake end {fake:?} split at {split:?}: {replies:?}"
            );
        }
    }
    // Refused at SMTP, so never queued: once the queue is empty, nothing is on its way.
    h.settled().await;
    assert!(h.cloud.state.messages().is_empty(), "a message got through");
    assert!(
        h.onprem.state.messages().is_empty(),
        "a message got through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_in_data_is_refused() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: a\rX-MS-Exchange-Organization-AuthAs: Internal\r\n\r\nbody\r\n.\r\n")
        .await;
    let r = c.reply().await;
    assert_eq!((r.code, r.status()), (550, "5.5.2"), "{r:?}");
    assert!(r.text.contains("Bare CR"), "{r:?}");
    // The session goes on, and a clean message still passes.
    let r = c
        .mail("x@example.org", &["bob@nhs.test"], &sample("clean"))
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(h.cloud.state.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_in_bdat_is_refused_across_chunks() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    // A CR inside one chunk; a CR ending one chunk and a non-LF starting the next; a CR as
    // the very last byte of the message.
    let cases: &[&[&[u8]]] = &[
        &[b"Subject: a\rX-Forged: 1\r\n\r\nbody\r\n"],
        &[b"Subject: a\r", b"X-Forged: 1\r\n\r\nbody\r\n"],
        &[b"Subject: a\r\n\r\nbody\r"],
    ];
    for chunks in cases {
        c.expect("MAIL FROM:<x@example.org>", 250).await;
        c.expect("RCPT TO:<bob@nhs.test>", 250).await;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            let mut cmd = format!("BDAT {}{last}\r\n", chunk.len()).into_bytes();
            cmd.extend_from_slice(chunk);
            c.send(&cmd).await;
            let r = c.reply().await;
            if last.is_empty() {
                assert_eq!(r.code, 250, "{r:?}");
            } else {
                assert_eq!((r.code, r.status()), (550, "5.5.2"), "{chunks:?}: {r:?}");
                assert!(r.text.contains("Bare CR"), "{r:?}");
            }
        }
    }
    // A CR that ends one chunk and an LF that starts the next is a CRLF.
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.send(b"BDAT 13\r\nSubject: a\r\n\r").await;
    assert_eq!(c.reply().await.code, 250);
    c.send(b"BDAT 7 LAST\r\n\nbody\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(
        strip_received(&h.cloud.state.messages()[0].body),
        b"Subject: a\r\n\r\nbody\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_premises_headers_are_stripped_from_untrusted_mail() {
    let h = harness(|_| {}).await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO outsider.test", 250).await;
    let forged = b"X-MS-Exchange-CrossPremises-AuthAs: Internal\r\n\
x-ms-exchange-crosspremises-scl: -1\r\n\
\tfolded\r\n\
Subject: hi\r\n\
\r\n\
X-MS-Exchange-CrossPremises-AuthAs: body text stays\r\n";
    let r = c.mail("x@example.org", &["bob@nhs.test"], forged).await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(wait(&h.cloud, 1).await, 1);
    assert_eq!(
        strip_received(&h.cloud.state.messages()[0].body),
        b"Subject: hi\r\n\r\nX-MS-Exchange-CrossPremises-AuthAs: body text stays\r\n"
    );
}
