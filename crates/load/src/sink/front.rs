//! The sink's clear-text front: a small proxy between clients and the sink's session that
//! edits replies on their way out, to play next hops that behave unlike our own session code
//! (no SMTPUTF8 extension, multi-line error replies).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the clear-text front edits the session's replies.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReplyEdit {
    /// Remove `SMTPUTF8` from EHLO replies.
    pub(super) drop_smtputf8: bool,
    /// Send error replies in three lines.
    pub(super) multiline_errors: bool,
}

/// Longest reply the front holds back while waiting for its last line; a longer one is
/// passed on as it is.
const MAX_HELD_REPLY: usize = 64 * 1024;

/// Accepts clients on `outer` and connects each to the session code at `inner`: commands
/// pass unchanged, replies are edited.
pub(super) async fn run_front(outer: TcpListener, inner: SocketAddr, edit: ReplyEdit) {
    loop {
        let client = match outer.accept().await {
            Ok((c, _)) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(inner).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            };
            let down = async {
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    let out = edit_replies(&mut pending, edit);
                    if !out.is_empty() && cw.write_all(&out).await.is_err() {
                        break;
                    }
                }
                let _ = cw.write_all(&pending).await;
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Takes every complete reply from the front of `pending` and returns them edited; an
/// incomplete reply stays in `pending` (unless it grew past [`MAX_HELD_REPLY`]).
fn edit_replies(pending: &mut Vec<u8>, edit: ReplyEdit) -> Vec<u8> {
    let mut out = Vec::new();
    let mut reply: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut taken = 0;
    while let Some(nl) = memchr::memchr(b'\n', &pending[start..]) {
        let line = &pending[start..start + nl + 1];
        start += nl + 1;
        reply.push(line);
        if line.get(3) != Some(&b'-') {
            edit_reply(&reply, edit, &mut out);
            reply.clear();
            taken = start;
        }
    }
    if taken == 0 && pending.len() > MAX_HELD_REPLY {
        taken = pending.len();
        out.extend_from_slice(pending);
    }
    pending.drain(..taken);
    out
}

/// Appends one whole reply (lines with their line ends), edited, to `out`.
fn edit_reply(lines: &[&[u8]], edit: ReplyEdit, out: &mut Vec<u8>) {
    let text = |l: &[u8]| -> Vec<u8> {
        let end = l.len() - usize::from(l.ends_with(b"\n")) - usize::from(l.ends_with(b"\r\n"));
        l.get(4..end).unwrap_or_default().to_vec()
    };
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(lines.len());
    for l in lines {
        if edit.drop_smtputf8 && l.starts_with(b"250") && text(l).eq_ignore_ascii_case(b"SMTPUTF8")
        {
            continue;
        }
        kept.push(l.to_vec());
    }
    let code = lines
        .first()
        .and_then(|l| l.get(..3))
        .unwrap_or_default()
        .to_vec();
    if edit.multiline_errors && kept.len() == 1 && matches!(code.first(), Some(b'4' | b'5')) {
        let first = text(&kept[0]);
        let status: Vec<u8> = first
            .split(|&b| b == b' ')
            .next()
            .filter(|s| s.iter().all(|b| b.is_ascii_digit() || *b == b'.') && s.contains(&b'.'))
            .map(|s| [s, b" "].concat())
            .unwrap_or_default();
        kept = vec![
            [&code[..], b"-", &first[..], b"\r\n"].concat(),
            [
                &code[..],
                b"-",
                &status[..],
                b"(the sink sends error replies in three lines)\r\n",
            ]
            .concat(),
            [&code[..], b" ", &status[..], b"end of the reply\r\n"].concat(),
        ];
    }
    // A removed last line makes the one before it the last.
    if let Some(last) = kept.last_mut() {
        if last.get(3) == Some(&b'-') && lines.last().is_some_and(|l| l.get(3) != Some(&b'-')) {
            last[3] = b' ';
        }
    }
    for l in kept {
        out.extend_from_slice(&l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(input: &[u8], e: ReplyEdit) -> (Vec<u8>, Vec<u8>) {
        let mut pending = input.to_vec();
        let out = edit_replies(&mut pending, e);
        (out, pending)
    }

    const NO_UTF8: ReplyEdit = ReplyEdit {
        drop_smtputf8: true,
        multiline_errors: false,
    };
    const MULTI: ReplyEdit = ReplyEdit {
        drop_smtputf8: false,
        multiline_errors: true,
    };

    #[test]
    fn smtputf8_leaves_ehlo_replies_wherever_it_is() {
        let (out, rest) = edit(b"250-a\r\n250-SMTPUTF8\r\n250 DSN\r\n", NO_UTF8);
        assert_eq!(out, b"250-a\r\n250 DSN\r\n");
        assert!(rest.is_empty());
        // As the last line, the line before it becomes the last.
        let (out, _) = edit(b"250-a\r\n250-DSN\r\n250 SMTPUTF8\r\n", NO_UTF8);
        assert_eq!(out, b"250-a\r\n250 DSN\r\n");
        // An unfinished reply waits for its last line.
        let (out, rest) = edit(b"250 ok\r\n250-a\r\n250-SMT", NO_UTF8);
        assert_eq!(out, b"250 ok\r\n");
        assert_eq!(rest, b"250-a\r\n250-SMT");
    }

    #[test]
    fn error_replies_become_three_lines() {
        let (out, _) = edit(b"250 2.0.0 ok\r\n451 4.3.0 busy\r\n500 bad\r\n", MULTI);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split_inclusive("\r\n").collect();
        assert_eq!(lines[0], "250 2.0.0 ok\r\n");
        assert_eq!(lines[1], "451-4.3.0 busy\r\n");
        assert!(lines[2].starts_with("451-4.3.0 ") && lines[3].starts_with("451 4.3.0 "));
        assert_eq!(lines[4], "500-bad\r\n");
        assert!(lines[5].starts_with("500-(") && lines[6].starts_with("500 end"));
        assert_eq!(lines.len(), 7);
    }
}
