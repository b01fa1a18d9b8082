//! Whole sessions in memory: a client script is written into one end of a
//! [`tokio::io::duplex`], the session runs on the other end with a recording [`Handler`], and
//! the test reads every reply the session wrote. No socket, no spool, no timing.

use super::*;
use crate::types::Address;
use std::sync::Mutex;
use tokio::io::AsyncReadExt;

/// Records accepted messages; refuses recipients whose local part starts with `reject`.
#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<Incoming>>,
}

impl Handler for Recorder {
    type Context = ();

    fn context(&self) {}

    fn check_rcpt(
        &self,
        _: &(),
        _: &Peer,
        _: Option<&Address>,
        _: &MailParams,
        to: &Address,
    ) -> Result<(), Reply> {
        if to.local().starts_with("reject") {
            return Err(Reply::new(550, "5.1.1", "No such user"));
        }
        Ok(())
    }

    async fn accept(&self, _: &(), msg: Incoming) -> Reply {
        let r = Reply::owned(250, "2.0.0", format!("Queued as {}", msg.id));
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
        r
    }
}

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "mx.test".into(),
        max_message_size: 1 << 20,
        max_recipients: 10,
        max_line_length: 1000,
        max_errors: 10,
        max_rcpt_refusals: 10,
        command_timeout: Duration::from_secs(5),
        max_hops: 30,
        tls: None,
        chunking: true,
        pipelining: true,
        add_received: true,
        data_timeout: Duration::from_secs(5),
        trusted_networks: Vec::new(),
        max_connections_per_ip: 0,
        max_connection_rate_per_ip: 0,
        reserved_connections: 0,
        client_prefix: (32, 128),
        max_session_time: Duration::ZERO,
        junk_command_limit: 0,
        inflight: InflightBudget::new(0),
    }
}

/// Runs one session over an in-memory stream: writes `script` at once (as a pipelining
/// client would), closes the client's writing side, and returns every reply line together
/// with what the handler accepted.
async fn session(script: &[u8]) -> (Vec<String>, Vec<Incoming>) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let handler = Arc::new(Recorder::default());
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("literal address");
    let task = tokio::spawn(run(server, peer, Arc::new(config()), handler.clone()));
    client.write_all(script).await.expect("write script");
    client.shutdown().await.expect("close client side");
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.expect("read replies");
    task.await.expect("session task");
    let replies = String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect();
    let messages = std::mem::take(&mut *handler.messages.lock().expect("not poisoned"));
    (replies, messages)
}

/// The reply lines that end a reply (`250 …`, not `250-…`), so each command counts once.
fn finals(replies: &[String]) -> Vec<&str> {
    replies
        .iter()
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .map(String::as_str)
        .collect()
}

#[tokio::test]
async fn pipelined_transaction_gets_every_reply_in_order() {
    let body = b"Subject: hi\r\n\r\n..dot-stuffed line\r\nbye\r\n";
    let mut script = Vec::new();
    script.extend_from_slice(
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n\
          RCPT TO:<reject@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n",
    );
    script.extend_from_slice(body);
    script.extend_from_slice(b".\r\nQUIT\r\n");
    let (replies, messages) = session(&script).await;
    let codes: Vec<&str> = finals(&replies).iter().map(|l| &l[..3]).collect();
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "550", "250", "354", "250", "221"],
        "{replies:#?}"
    );
    assert!(replies.iter().any(|l| l == "250-PIPELINING"));
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    let rcpts: Vec<String> = m.rcpts.iter().map(|a| a.to_string()).collect();
    assert_eq!(rcpts, ["b@example.com", "c@example.com"]);
    assert_eq!(
        m.from.as_ref().map(|a| a.to_string()).as_deref(),
        Some("a@example.org")
    );
    assert_eq!(m.peer.helo, "client.test");
    // Our Received header first, naming the queue id, then the bytes as sent, unstuffed.
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.starts_with("Received: from client.test ([192.0.2.7])"),
        "{text}"
    );
    assert!(text.contains(&format!("id {}", m.id)), "{text}");
    assert!(
        m.body
            .ends_with(b"Subject: hi\r\n\r\n.dot-stuffed line\r\nbye\r\n"),
        "{text}"
    );
    assert!(finals(&replies)[7].contains(m.id.as_str()));
}

#[tokio::test]
async fn smuggled_end_of_data_is_message_text_and_refused() {
    // `<LF>.<LF>` is not the end of data: the "second message" stays inside the first,
    // which is refused whole for its bare LF; no smuggled MAIL is ever executed.
    let script = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n\
        Subject: one\r\n\r\nbody\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.com>\r\n\
        DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let (replies, messages) = session(script).await;
    assert!(messages.is_empty(), "nothing accepted: {messages:?}");
    let f = finals(&replies);
    assert!(f.iter().any(|l| l.starts_with("550 5.5.2")), "{replies:#?}");
    assert!(
        !f.iter().any(|l| l.contains("evil@example.org")),
        "{replies:#?}"
    );
    assert_eq!(f.last().map(|l| &l[..3]), Some("221"));
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let script = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n\
        BDAT 14\r\nSubject: x\r\n\r\nBDAT 9 LAST\r\nline\r\n.\r\nQUIT\r\n";
    let (replies, messages) = session(script).await;
    let codes: Vec<&str> = finals(&replies).iter().map(|l| &l[..3]).collect();
    assert_eq!(
        codes,
        ["220", "250", "250", "250", "250", "250", "221"],
        "{replies:#?}"
    );
    assert!(replies.iter().any(|l| l == "250 CHUNKING"));
    assert_eq!(messages.len(), 1);
    // BDAT data is taken as is: no dot-unstuffing, no end-of-data marker.
    assert!(messages[0]
        .body
        .ends_with(b"\r\nSubject: x\r\n\r\nline\r\n.\r\n"));
}

#[tokio::test]
async fn refused_bdat_chunk_is_still_read() {
    // No recipient: the chunk is refused but read to its end, so the bytes inside it are
    // never taken for commands (RFC 3030 2).
    let script =
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nBDAT 25 LAST\r\nRCPT TO:<x@example.com>\r\n\
        QUIT\r\n";
    let (replies, messages) = session(script).await;
    assert!(messages.is_empty());
    let codes: Vec<&str> = finals(&replies).iter().map(|l| &l[..3]).collect();
    assert_eq!(codes, ["220", "250", "250", "554", "221"], "{replies:#?}");
}

#[tokio::test]
async fn starttls_is_refused_without_tls_config_and_eof_ends_the_session() {
    // No QUIT: the client just closes, and the session ends without an error reply.
    let (replies, _) = session(b"EHLO c\r\nSTARTTLS\r\n").await;
    assert!(!replies
        .iter()
        .any(|l| l.contains("STARTTLS") && l.starts_with("250")));
    assert_eq!(finals(&replies).last().map(|l| &l[..3]), Some("502"));
}

/// Reads from `s` until `needle` has arrived; returns everything read.
async fn read_until(s: &mut tokio::io::DuplexStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "EOF before {needle:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn starttls_over_an_in_memory_stream_drops_plaintext_injection() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let dev = crate::certs::generate("mx.test").expect("test certificates");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(dev.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(dev.key_pem.as_bytes()).expect("key PEM");
    let mut cfg = config();
    cfg.tls = Some(crate::smtp::tls::acceptor_from(chain, key).expect("acceptor"));
    let roots = crate::certs::roots_from_pem(dev.ca_pem.as_bytes()).expect("CA");
    let client_cfg = rustls::ClientConfig::builder_with_provider(crate::certs::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));

    let (mut client, server) = tokio::io::duplex(1 << 16);
    let handler = Arc::new(Recorder::default());
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("literal address");
    let task = tokio::spawn(run(server, peer, Arc::new(cfg), handler.clone()));
    // A MAIL pipelined in clear text after STARTTLS (CVE-2011-0411) must be dropped.
    client
        .write_all(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
        .await
        .expect("write");
    let clear = read_until(&mut client, "220 2.0.0 Ready to start TLS\r\n").await;
    assert!(clear.contains("250-STARTTLS"), "{clear}");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, client)
        .await
        .expect("TLS handshake");
    tls.write_all(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n\
          Subject: tls\r\n\r\nhi\r\n.\r\nQUIT\r\n",
    )
    .await
    .expect("write over TLS");
    let mut out = Vec::new();
    // The session closes after QUIT without a TLS close_notify exchange being required.
    let _ = tls.read_to_end(&mut out).await;
    task.await.expect("session task");
    let replies = String::from_utf8_lossy(&out);
    assert!(!replies.contains("evil"), "{replies}");
    assert!(
        !replies.contains("STARTTLS"),
        "not offered twice: {replies}"
    );
    let codes: Vec<&str> = replies
        .lines()
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(
        codes,
        ["250", "250", "250", "354", "250", "221"],
        "{replies}"
    );
    let messages = handler.messages.lock().expect("not poisoned");
    assert_eq!(messages.len(), 1);
    assert!(messages[0].peer.tls.is_some());
    let text = String::from_utf8_lossy(&messages[0].body);
    assert!(text.contains("with ESMTPS id"), "{text}");
}
