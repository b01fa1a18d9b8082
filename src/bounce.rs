//! Delivery Status Notifications (RFC 3464): the bounce sent to the envelope sender when
//! recipients fail permanently or expire. The DSN goes back into the spool like any message,
//! from the null sender `<>`.

use crate::spool::Envelope;
use crate::types::{Address, QueueId};
use std::fmt::Write;

/// One failed recipient to report.
pub struct Failure<'a> {
    /// The recipient.
    pub rcpt: &'a Address,
    /// ORCPT as the client gave it (`rfc822;addr`).
    pub orcpt: Option<&'a str>,
    /// The last reply or error.
    pub reply: &'a str,
}

/// The enhanced status code for a failure: taken from the reply when it has one,
/// `5.4.7` for an expired message, else `5.0.0`.
pub fn status_of(reply: &str) -> String {
    if reply.starts_with("message expired") {
        return "5.4.7".into();
    }
    let code = reply.split(' ').nth(1).unwrap_or("");
    let parts: Vec<&str> = code.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    if ok && (parts[0] == "5" || parts[0] == "4") {
        format!("5.{}.{}", parts[1], parts[2])
    } else {
        "5.0.0".into()
    }
}

/// The header section of a message (up to, not including, the blank line).
fn header_section(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => &message[..i + 2],
        None => message,
    }
}

/// What a DSN reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recipients failed for good (`Action: failed`).
    Failed,
    /// Recipients are still being retried (`Action: delayed`, a warning).
    Delayed,
}

/// The enhanced status code for a delay: the reply's own 4.x.x code, else `4.0.0`.
fn delay_status(reply: &str) -> String {
    let code = reply.split(' ').nth(1).unwrap_or("");
    let ok = code.starts_with("4.") && code.split('.').count() == 3 && code.len() <= 9;
    if ok {
        code.to_string()
    } else {
        "4.0.0".into()
    }
}

/// Builds the DSN message (CRLF lines) for `failures` of the message `env`/`original`.
/// With `RET=FULL` the whole original is returned, otherwise its headers.
pub fn build(
    hostname: &str,
    dsn_id: &QueueId,
    env: &Envelope,
    original: &[u8],
    failures: &[Failure<'_>],
    kind: Kind,
) -> Vec<u8> {
    let (subject, intro, action) = match kind {
        Kind::Failed => (
            "Undelivered Mail Returned to Sender",
            "could not be delivered to one or more\r\nrecipients. The reasons are below.",
            "failed",
        ),
        Kind::Delayed => (
            "Delayed Mail (still being retried)",
            "has not yet been delivered to one or more\r\nrecipients. It is still being retried; you do not need to send it again.",
            "delayed",
        ),
    };
    let boundary = format!("{dsn_id}/{hostname}");
    let sender = env.from.as_ref().map(|a| a.to_string()).unwrap_or_default();
    let now = chrono::Utc::now().to_rfc2822();
    let arrival = chrono::DateTime::from_timestamp(env.received_at as i64, 0)
        .map(|d| d.to_rfc2822())
        .unwrap_or_else(|| now.clone());
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        m,
        "From: MAILER-DAEMON@{hostname} (Mail Delivery System)\r\n\
         To: <{sender}>\r\n\
         Subject: {subject}\r\n\
         Date: {now}\r\n\
         Message-ID: <{dsn_id}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message (queue id {}) {intro}\r\n\
         \r\n",
        env.id
    );
    for f in failures {
        let _ = write!(m, "<{}>: {}\r\n", f.rcpt, f.reply);
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Coexist-Queue-ID: {}\r\n",
        env.id
    );
    if let Some(e) = &env.envid {
        let _ = write!(m, "Original-Envelope-Id: {e}\r\n");
    }
    let _ = write!(m, "Arrival-Date: {arrival}\r\n");
    for f in failures {
        let _ = write!(m, "\r\nFinal-Recipient: rfc822; {}\r\n", f.rcpt);
        if let Some(o) = f.orcpt {
            let _ = write!(m, "Original-Recipient: {o}\r\n");
        }
        let status = match kind {
            Kind::Failed => status_of(f.reply),
            Kind::Delayed => delay_status(f.reply),
        };
        let _ = write!(m, "Action: {action}\r\nStatus: {status}\r\n");
        if f.reply.len() > 3 && f.reply.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", f.reply);
        } else {
            let _ = write!(m, "Diagnostic-Code: X-coexist; {}\r\n", f.reply);
        }
    }
    let full = env.ret.as_deref() == Some("FULL");
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
        if full {
            "message/rfc822"
        } else {
            "text/rfc822-headers"
        }
    );
    let mut out = m.into_bytes();
    if full {
        out.extend_from_slice(original);
        if !original.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(header_section(original));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailparse::MailHeaderMap;

    #[test]
    fn status_codes() {
        assert_eq!(status_of("550 5.1.1 no such user"), "5.1.1");
        assert_eq!(status_of("554 5.4.6 loop"), "5.4.6");
        assert_eq!(status_of("550 mailbox unavailable"), "5.0.0");
        assert_eq!(
            status_of("message expired in queue; last reply: 451 4.3.0 x"),
            "5.4.7"
        );
    }

    #[test]
    fn dsn_is_a_parseable_multipart_report() {
        let env = Envelope {
            id: QueueId::generate(),
            from: Some(Address::parse("sender@example.org", false).unwrap()),
            rcpts: vec![Address::parse("u@nhs.test", false).unwrap()],
            smtputf8: false,
            body: Default::default(),
            received_at: 1_764_000_000,
            size: 10,
            client: "x".into(),
            ret: None,
            envid: Some("E1".into()),
            rcpt_dsn: Vec::new(),
            bounce: false,
        };
        let original = b"Subject: hello\r\nX-A: b\r\n\r\nsecret body\r\n";
        let f = [Failure {
            rcpt: &env.rcpts[0],
            orcpt: Some("rfc822;u@nhs.test"),
            reply: "550 5.1.1 no such user",
        }];
        let dsn = build(
            "mx1.test",
            &QueueId::generate(),
            &env,
            original,
            &f,
            Kind::Failed,
        );
        let parsed = mailparse::parse_mail(&dsn).unwrap();
        assert_eq!(parsed.ctype.mimetype, "multipart/report");
        assert_eq!(
            parsed.headers.get_first_value("Auto-Submitted").unwrap(),
            "auto-replied"
        );
        assert_eq!(parsed.subparts.len(), 3);
        assert_eq!(parsed.subparts[1].ctype.mimetype, "message/delivery-status");
        let status = parsed.subparts[1].get_body_raw().unwrap();
        let status = String::from_utf8_lossy(&status);
        for want in [
            "Final-Recipient: rfc822; u@nhs.test",
            "Action: failed",
            "Status: 5.1.1",
            "Original-Envelope-Id: E1",
            "Original-Recipient: rfc822;u@nhs.test",
        ] {
            assert!(status.contains(want), "{want} missing in {status}");
        }
        let returned =
            String::from_utf8_lossy(&parsed.subparts[2].get_body_raw().unwrap()).to_string();
        assert!(returned.contains("Subject: hello") && !returned.contains("secret body"));
    }
}
