//! DSN text: folding, CRLF lines, what RET returns, the report's structure.

use super::*;
use mailparse::MailHeaderMap;

/// A failure as an old state file held it (the display string).
fn fail(text: &str) -> Option<&'static Reason> {
    let r = match crate::proto::LastReply::from_legacy(text) {
        crate::proto::LastReply::Failed(f) => f,
        crate::proto::LastReply::Delivered(r) => Reason::Remote(r),
    };
    Some(Box::leak(Box::new(r)))
}

/// The DSN for `original` whose first recipient failed with `550 5.1.1 no`, returning at
/// most `max_return` bytes of it.
fn failed_dsn(env: &Envelope, original: &[u8], max_return: u64) -> Vec<u8> {
    let f = [Failure {
        rcpt: &env.rcpts[0],
        orcpt: None,
        reply: fail("550 5.1.1 no"),
    }];
    build(
        "mx1.test",
        &QueueId::generate(),
        env,
        original,
        &f,
        Kind::Failed,
        max_return,
    )
}

#[test]
fn status_codes() {
    assert_eq!(status_of(fail("550 5.1.1 no such user")), "5.1.1");
    assert_eq!(status_of(fail("554 5.4.6 loop")), "5.4.6");
    assert_eq!(status_of(fail("550 mailbox unavailable")), "5.0.0");
    assert_eq!(status_of(fail("451 4.4.1 down")), "5.4.1");
    assert_eq!(status_of(None), "5.0.0");
    let expired = Reason::Expired(fail("451 4.3.0 x").cloned().map(Box::new));
    assert_eq!(status_of(Some(&expired)), "5.4.7");
    assert_eq!(delay_status(fail("451 4.4.1 down")), "4.4.1");
    assert_eq!(delay_status(fail("550 5.1.1 no")), "4.0.0");
}

fn envelope(ret: Option<Ret>) -> Envelope {
    Envelope {
        id: QueueId::generate(),
        from: Some(Address::parse("sender@example.org", false).unwrap()),
        rcpts: vec![Address::parse("u@nhs.test", false).unwrap()],
        smtputf8: false,
        body: Default::default(),
        received_at: 1_764_000_000,
        size: 10,
        client: "x".into(),
        ret,
        envid: Some("E1".into()),
        rcpt_dsn: Vec::new(),
        bounce: false,
        returned_from: Vec::new(),
        taken_from: None,
    }
}

/// Every line ends in CRLF, none is longer than 998 octets.
fn assert_well_formed(dsn: &[u8]) {
    for (i, &b) in dsn.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && dsn[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    assert!(dsn.ends_with(b"\r\n"));
    for l in dsn.split(|&b| b == b'\n') {
        assert!(l.len() <= MAX_LINE + 1, "line of {} octets", l.len());
    }
}

/// Field `name` of the per-recipient block of a DSN's delivery-status part, unfolded.
fn recipient_field(dsn: &[u8], name: &str) -> Option<String> {
    let parsed = mailparse::parse_mail(dsn).unwrap();
    let status = parsed.subparts[1].get_body_raw().unwrap();
    let status = String::from_utf8(status).unwrap();
    let block = format!("{}\r\n\r\n", status.split("\r\n\r\n").nth(1).unwrap());
    let fields = mailparse::parse_headers(block.as_bytes()).unwrap().0;
    fields.get_first_value(name)
}

#[test]
fn multi_line_and_hostile_replies_are_folded_with_crlf_only() {
    let env = envelope(None);
    let long_word = "x".repeat(3000);
    let long_words = "word ".repeat(600);
    let cases = [
        "550 5.1.1 first line\nsecond line\nthird line",
        "550 5.7.1 bare\rcarriage return\r\nand CRLF\u{7}bell",
        &format!("554 5.0.0 {long_word}"),
        &format!("554 5.0.0 {long_words}"),
        "550 5.1.1 caf\u{e9} non-ASCII",
        "message expired in queue; last reply: 451 4.3.0 a\nb",
        "",
    ];
    for case in cases {
        let reason = fail(case);
        // What the DSN quotes: the failure as displayed.
        let shown = reason.map(|r| r.to_string()).unwrap_or_default();
        let reply = shown.as_str();
        let f = [Failure {
            rcpt: &env.rcpts[0],
            orcpt: Some("rfc822;u@nhs.test"),
            reply: reason,
        }];
        for kind in [Kind::Failed, Kind::Delayed] {
            let original = b"Subject: hi\r\n\r\nbody\r\n";
            let dsn = build(
                "mx1.test",
                &QueueId::generate(),
                &env,
                original,
                &f,
                kind,
                u64::MAX,
            );
            assert_well_formed(&dsn);
            let diag = recipient_field(&dsn, "Diagnostic-Code").unwrap();
            let want: String = text_lines(reply)
                .iter()
                .map(|l| ascii(l))
                .collect::<Vec<_>>()
                .join(" ");
            if reply.len() < 1000 {
                // Folded at spaces: unfolding gives back the reply's lines.
                assert!(diag.ends_with(&want), "{diag:?} / {want:?}");
            } else {
                assert!(diag.replace(' ', "").contains(&want.replace(' ', "")));
            }
            let text = String::from_utf8_lossy(&dsn).to_string();
            if let Some(l) = text_lines(reply).first() {
                let start = &l[..floor_boundary(l, 9)];
                assert!(text.contains(&format!("<u@nhs.test>: {start}")), "{text}");
            }
        }
    }
    // The first example: each reply line on a continuation line of its own.
    let f = [Failure {
        rcpt: &env.rcpts[0],
        orcpt: None,
        reply: fail(cases[0]),
    }];
    let dsn = build(
        "mx1.test",
        &QueueId::generate(),
        &env,
        b"",
        &f,
        Kind::Failed,
        u64::MAX,
    );
    let text = String::from_utf8(dsn).unwrap();
    assert!(
        text.contains(
            "Diagnostic-Code: smtp; 550 5.1.1 first line\r\n second line\r\n third line\r\n"
        ),
        "{text}"
    );
    assert!(text.contains("<u@nhs.test>: 550 5.1.1 first line\r\n    second line\r\n"));
}

#[test]
fn returned_original_gets_crlf_lines_within_998_octets() {
    let long_header = format!("X-Long: {}\r\n", "h".repeat(2500));
    let long_body = "b".repeat(2500);
    let original =
        format!("Subject: bare\rCR\nX-A: bare LF\r\n{long_header}\r\nbody\nline\r{long_body}");
    let env = envelope(Some(Ret::Full));
    let dsn = failed_dsn(&env, original.as_bytes(), u64::MAX);
    assert_well_formed(&dsn);
    let parsed = mailparse::parse_mail(&dsn).unwrap();
    let returned = parsed.subparts[2].get_body_raw().unwrap();
    let inner = mailparse::parse_mail(&returned).unwrap();
    // The long header is folded (one field), the body lines are all there.
    // (cut inside a word: unfolding shows a space at each cut)
    let long = inner.headers.get_first_value("X-Long").unwrap();
    assert_eq!(long.replace(' ', ""), "h".repeat(2500));
    let body = String::from_utf8(inner.get_body_raw().unwrap()).unwrap();
    assert_eq!(body.replace("\r\n", ""), format!("bodyline{long_body}"));
    // Headers only: the same rules.
    let dsn = failed_dsn(&envelope(None), original.as_bytes(), u64::MAX);
    assert_well_formed(&dsn);
}

#[test]
fn ret_decides_what_is_returned() {
    let original = b"Subject: hello\r\n\r\nsecret body\r\n";
    for (ret, mimetype, body_returned) in [
        (Some(Ret::Full), "message/rfc822", true),
        (Some(Ret::Hdrs), "text/rfc822-headers", false),
        (None, "text/rfc822-headers", false),
    ] {
        let env = envelope(ret);
        let dsn = failed_dsn(&env, original, u64::MAX);
        let parsed = mailparse::parse_mail(&dsn).unwrap();
        assert_eq!(parsed.subparts[2].ctype.mimetype, mimetype, "{ret:?}");
        let returned = parsed.subparts[2].get_body_raw().unwrap();
        let returned = String::from_utf8_lossy(&returned);
        assert!(returned.contains("Subject: hello"), "{ret:?}");
        assert_eq!(returned.contains("secret body"), body_returned, "{ret:?}");
    }
}

#[test]
fn dsn_is_a_parseable_multipart_report() {
    let env = envelope(None);
    let original = b"Subject: hello\r\nX-A: b\r\n\r\nsecret body\r\n";
    let f = [Failure {
        rcpt: &env.rcpts[0],
        orcpt: Some("rfc822;u@nhs.test"),
        reply: fail("550 5.1.1 no such user"),
    }];
    let dsn = build(
        "mx1.test",
        &QueueId::generate(),
        &env,
        original,
        &f,
        Kind::Failed,
        u64::MAX,
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
    let returned = String::from_utf8_lossy(&parsed.subparts[2].get_body_raw().unwrap()).to_string();
    assert!(returned.contains("Subject: hello") && !returned.contains("secret body"));
}

#[test]
fn ret_full_returns_only_headers_above_the_size_cap() {
    let original = b"Subject: hello\r\n\r\nsecret body\r\n";
    let env = envelope(Some(Ret::Full));
    let size = original.len() as u64;
    for (cap, mimetype, body_returned) in [
        (size, "message/rfc822", true),
        (size - 1, "text/rfc822-headers", false),
    ] {
        let dsn = failed_dsn(&env, original, cap);
        assert_well_formed(&dsn);
        let parsed = mailparse::parse_mail(&dsn).unwrap();
        assert_eq!(parsed.subparts[2].ctype.mimetype, mimetype, "{cap}");
        let returned = parsed.subparts[2].get_body_raw().unwrap();
        let returned = String::from_utf8_lossy(&returned);
        assert!(returned.contains("Subject: hello"), "{cap}");
        assert_eq!(returned.contains("secret body"), body_returned, "{cap}");
        let human =
            String::from_utf8_lossy(&parsed.subparts[0].get_body_raw().unwrap()).to_string();
        let note = format!("larger than {cap} bytes: only its headers");
        assert_eq!(human.contains(&note), !body_returned, "{human}");
    }
}

/// A message made only of header lines (no blank line, or a huge header section) comes back
/// cut to the cap, with or without `RET=FULL`: the cap bounds what a forged sender can have
/// reflected, whatever the shape of the message.
#[test]
fn a_header_section_over_the_cap_is_cut_at_a_line_end() {
    let mut original = Vec::new();
    for i in 0..20_000 {
        original.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaaaaaa\r\n").as_bytes());
    }
    for ret in [Some(Ret::Full), Some(Ret::Hdrs), None] {
        let env = envelope(ret);
        let dsn = failed_dsn(&env, &original, 50_000);
        assert_well_formed(&dsn);
        assert!(dsn.len() < 55_000, "{ret:?}: a DSN of {} bytes", dsn.len());
        let parsed = mailparse::parse_mail(&dsn).unwrap();
        assert_eq!(parsed.subparts[2].ctype.mimetype, "text/rfc822-headers");
        let returned = parsed.subparts[2].get_body_raw().unwrap();
        let returned = String::from_utf8_lossy(&returned);
        assert!(returned.starts_with("X-Filler-0: "), "{ret:?}");
        assert!(
            returned.trim_end().ends_with("aaaaaaaaaaaaaaaaaaaa"),
            "{ret:?}: cut inside a line"
        );
        let human =
            String::from_utf8_lossy(&parsed.subparts[0].get_body_raw().unwrap()).to_string();
        assert!(
            human.contains("headers alone are larger than 50000 bytes"),
            "{human}"
        );
    }
}
