//! Property tests and a fuzz-style harness (proptest, stable Rust) for everything that reads
//! network input: command parser, address parser, DATA and BDAT readers, header handling,
//! and whole sessions fed random and mutated bytes.
//!
//! The suite runs 256 cases per property; a long run:
//! `COEXIST_FUZZ_CASES=100000 cargo test --release --test fuzz`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::deliver::dot_stuff;
use coexist::smtp::command;
use coexist::smtp::data::{ChunkCollector, DataReader};
use coexist::types::Address;
use common::{connect, harness};
use proptest::prelude::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cases() -> u32 {
    std::env::var("COEXIST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A reply line is `ddd` then ' ' or '-' then text (RFC 5321 4.2).
fn well_formed_reply_line(l: &str) -> bool {
    let b = l.as_bytes();
    b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-')
}

/// `x.y.z` with class 2, 4 or 5 (RFC 3463).
fn well_formed_status(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
}

const SEEDS: &[&[u8]] = &[
    b"EHLO a.test\r\n",
    b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<bob@nhs.test>\r\n",
    b"RCPT TO:<\"q@x\"@nhs.test>\r\n",
    b"DATA\r\n",
    b"BDAT 5 LAST\r\nhello",
    b".\r\n",
    b"RSET\r\n",
    b"STARTTLS\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\0",
    b"VRFY x\r\n",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn command_parser_answers_every_line(line in proptest::collection::vec(any::<u8>(), 0..700), utf8 in any::<bool>()) {
        if let Err(r) = command::parse(&line, utf8) {
            prop_assert!((500..600).contains(&r.code), "{r}");
            prop_assert!(r.status.is_some_and(|s| well_formed_status(&s.to_string())), "{r}");
            prop_assert!(!r.text().contains('\r') && !r.text().contains('\n'));
        }
    }

    #[test]
    fn command_like_lines_parse_or_get_a_5xx(
        verb in prop::sample::select(vec!["MAIL FROM:", "RCPT TO:", "mail from: ", "BDAT ", "EHLO ", "DATA", "VRFY "]),
        rest in "[<>@\"\\\\ %!:,.a-zA-Z0-9=\\[\\]\u{e9}-]{0,80}",
    ) {
        let line = format!("{verb}{rest}");
        match command::parse(line.as_bytes(), true) {
            Ok(_) => {}
            Err(r) => prop_assert!((500..600).contains(&r.code) && r.status.is_some_and(|s| well_formed_status(&s.to_string())), "{line:?} -> {r}"),
        }
    }

    #[test]
    fn parsed_addresses_print_and_parse_back(s in "[a-zA-Z0-9.\"\\\\@%!+_\\[\\]:é-]{0,70}") {
        if let Ok(a) = Address::parse(&s, true) {
            let again = Address::parse(&a.to_string(), true);
            prop_assert!(again.is_ok(), "{s:?} printed as {a} does not parse");
            prop_assert_eq!(again.unwrap().key(), a.key());
        }
    }

    #[test]
    fn data_reader_is_split_invariant_and_bounded(
        input in proptest::collection::vec(prop::sample::select(vec![b'a', b'.', b'\r', b'\n', b'x']), 0..400),
        cut in proptest::collection::vec(1usize..50, 1..20),
        limit in 0usize..300,
    ) {
        let mut whole = DataReader::new(limit);
        let (used_whole, done_whole) = whole.feed(&input);
        let mut pieces = DataReader::new(limit);
        let (mut used, mut done, mut pos, mut i) = (0, false, 0, 0);
        while pos < input.len() && !done {
            let end = (pos + cut[i % cut.len()]).min(input.len());
            let (u, d) = pieces.feed(&input[pos..end]);
            used += u;
            done = d;
            pos += u;
            i += 1;
        }
        prop_assert_eq!(done, done_whole);
        prop_assert_eq!(used, used_whole);
        prop_assert_eq!(pieces.message(), whole.message());
        prop_assert_eq!(pieces.flags(), whole.flags());
        prop_assert!(whole.message().len() <= limit);
    }

    #[test]
    fn dot_stuffing_and_data_reading_round_trip(lines in proptest::collection::vec("[.a-z \r]{0,20}", 0..20), end_crlf in any::<bool>()) {
        let mut msg = lines.join("\r\n").into_bytes();
        if end_crlf && !msg.is_empty() {
            msg.extend_from_slice(b"\r\n");
        }
        let mut wire = Vec::new();
        dot_stuff(&msg, &mut wire);
        let mut r = DataReader::new(1 << 20);
        let (used, done) = r.feed(&wire);
        prop_assert!(done);
        prop_assert_eq!(used, wire.len(), "the end marker is the last thing on the wire");
        let mut expected = msg.clone();
        if !expected.is_empty() && !expected.ends_with(b"\r\n") {
            expected.extend_from_slice(b"\r\n");
        }
        prop_assert_eq!(r.message(), &expected[..]);
    }

    #[test]
    fn chunk_collector_spots_every_bare_lf_and_bare_cr(data in proptest::collection::vec(prop::sample::select(vec![b'a', b'\r', b'\n']), 0..200), cut in 1usize..30) {
        let mut c = ChunkCollector::new(1 << 20);
        for piece in data.chunks(cut) {
            c.push(piece);
        }
        let bare_lf = data.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || data[i - 1] != b'\r'));
        let bare_cr = data.iter().enumerate().any(|(i, &b)| b == b'\r' && data.get(i + 1) != Some(&b'\n'));
        prop_assert_eq!(c.message(), &data[..]);
        let flags = c.finish().flags().clone();
        prop_assert_eq!(flags.bare_lf, bare_lf);
        prop_assert_eq!(flags.bare_cr, bare_cr);
    }

    #[test]
    fn header_stripping_only_removes_matching_fields(
        fields in proptest::collection::vec((prop::sample::select(vec!["X-MS-Exchange-Organization-A", "x-ms-exchange-crosstenant-b", "Subject", "X-Other"]), "[a-z ]{0,10}", any::<bool>()), 0..8),
        body in "[a-zX:-]{0,30}",
    ) {
        let mut msg = Vec::new();
        let mut kept = Vec::new();
        for (name, value, folded) in &fields {
            let mut f = format!("{name}: {value}\r\n");
            if *folded {
                f.push_str("\tmore\r\n");
            }
            msg.extend_from_slice(f.as_bytes());
            if !name.to_ascii_lowercase().starts_with("x-ms-exchange-") {
                kept.extend_from_slice(f.as_bytes());
            }
        }
        msg.extend_from_slice(b"\r\n");
        msg.extend_from_slice(body.as_bytes());
        kept.extend_from_slice(b"\r\n");
        kept.extend_from_slice(body.as_bytes());
        let prefixes = vec!["X-MS-Exchange-Organization-".to_string(), "X-MS-Exchange-CrossTenant-".to_string()];
        let mut out = msg;
        coexist::policy::strip_headers(&mut out, &prefixes);
        prop_assert_eq!(out, kept);
    }
}

/// Whole sessions: mutated seed traffic against a real relay; every reply line is well
/// formed, and the server keeps serving afterwards.
#[test]
fn sessions_survive_mutated_traffic() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = harness(|c| {
            c.server.command_timeout = Duration::from_millis(300);
            c.server.max_message_size = 10_000;
            c.policy.max_connections_per_ip = 0;
        })
        .await;
        let n = cases().min(20_000) as u64;
        let mut rng = fastrand_seed();
        for case in 0..n {
            let mut input = Vec::new();
            for _ in 0..rng.usize(1..12) {
                let seed = SEEDS[rng.usize(..SEEDS.len())];
                let mut piece = seed.to_vec();
                for _ in 0..rng.usize(0..3) {
                    if piece.is_empty() {
                        break;
                    }
                    let i = rng.usize(..piece.len());
                    match rng.u8(..4) {
                        0 => piece[i] = rng.u8(..),
                        1 => {
                            piece.remove(i);
                        }
                        2 => piece.insert(i, rng.u8(..)),
                        _ => piece.truncate(i),
                    }
                }
                input.extend_from_slice(&piece);
            }
            let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            let text = String::from_utf8_lossy(&out);
            for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                assert!(
                    well_formed_reply_line(line),
                    "case {case}: bad reply line {line:?} for input {input:?}"
                );
            }
        }
        let mut c = connect(h.addr).await;
        c.expect("EHLO still.alive.test", 250).await;
    });
}

fn fastrand_seed() -> fastrand::Rng {
    let seed = std::env::var("COEXIST_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xC0E1);
    fastrand::Rng::with_seed(seed)
}
