//! The header scans the message stage decides on: removal of internal headers, the hop
//! count and the loop guard's `Received:` check. Streaming scans over the header section:
//! nothing is allocated per line.

/// The end (after its LF) of the header line starting at `pos`, or `None` at the end of the
/// header section (the empty line, or the end of the message). The scans below are streaming
/// scans built on it: nothing is allocated per line, so a header section of millions of
/// tiny fields costs no memory (mailparse would allocate per field).
fn header_line_end(message: &[u8], pos: usize) -> Option<usize> {
    let rest = message.get(pos..).filter(|r| !r.is_empty())?;
    let end = memchr::memchr(b'\n', rest).map_or(message.len(), |i| pos + i + 1);
    let line = &message[pos..end];
    (line != b"\r\n" && line != b"\n").then_some(end)
}

/// The field name of a header line that starts a field (`None` for continuation lines and
/// lines without a colon). Obsolete syntax allows blanks before the colon (RFC 5322 4.5.3).
fn field_name(line: &[u8]) -> Option<&[u8]> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return None;
    }
    let colon = memchr::memchr(b':', line)?;
    let name = &line[..colon];
    let end = name
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    (end > 0).then_some(&name[..end])
}

/// Removes, in place, header fields whose names start with one of `prefixes`
/// (case-insensitive) from the header section, continuation lines included. Every other
/// byte is kept as it was (DESIGN invariant 6), and the message is not copied: kept lines
/// move down over removed ones. Returns the number of fields removed.
pub fn strip_headers(message: &mut Vec<u8>, prefixes: &[String]) -> usize {
    if prefixes.is_empty() {
        return 0;
    }
    let (mut read, mut write) = (0, 0);
    let mut dropping = false;
    let mut removed = 0;
    while let Some(end) = header_line_end(message, read) {
        let line = &message[read..end];
        if let Some(name) = field_name(line) {
            dropping = prefixes.iter().any(|p| {
                name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            });
            removed += usize::from(dropping);
        } else if !matches!(line.first(), Some(b' ' | b'\t')) {
            dropping = false;
        }
        if !dropping {
            if write != read {
                message.copy_within(read..end, write);
            }
            write += end - read;
        }
        read = end;
    }
    if write != read {
        let len = message.len();
        message.copy_within(read..len, write);
        message.truncate(write + len - read);
    }
    removed
}

/// The value of the first field named `name` (case-insensitive) in the header section of
/// `message`, its continuation lines joined (line ends kept), without the name and colon.
pub fn first_field<'a>(message: &'a [u8], name: &[u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    let mut pos = 0;
    while let Some(end) = header_line_end(message, pos) {
        let line = &message[pos..end];
        pos = end;
        if !field_name(line).is_some_and(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        let colon = memchr::memchr(b':', line).unwrap_or(0);
        let mut value = std::borrow::Cow::Borrowed(&line[colon + 1..]);
        while let Some(next) = header_line_end(message, pos) {
            let cont = &message[pos..next];
            if !matches!(cont.first(), Some(b' ' | b'\t')) {
                break;
            }
            value.to_mut().extend_from_slice(cont);
            pos = next;
        }
        return Some(value);
    }
    None
}

/// Number of `Received:` headers in a message's header section (the hop count).
pub fn count_hops(message: &[u8]) -> usize {
    let (mut pos, mut hops) = (0, 0);
    while let Some(end) = header_line_end(message, pos) {
        hops += usize::from(
            field_name(&message[pos..end]).is_some_and(|n| n.eq_ignore_ascii_case(b"received")),
        );
        pos = end;
    }
    hops
}

/// True when a `Received:` header other than the first (ours, just written) says the
/// message was received `by HOSTNAME` (case-insensitive): it has passed through this relay
/// (or a fleet node with the same name) before. Part of the loop guard.
pub fn passed_through(message: &[u8], hostname: &str) -> bool {
    let host = hostname.as_bytes();
    let (mut pos, mut received) = (0, 0usize);
    // Inside a Received field (its continuation lines too).
    let mut inside = false;
    while let Some(end) = header_line_end(message, pos) {
        let line = &message[pos..end];
        match field_name(line) {
            Some(n) => {
                inside = n.eq_ignore_ascii_case(b"received");
                received += usize::from(inside);
            }
            None if matches!(line.first(), Some(b' ' | b'\t')) => {}
            None => inside = false,
        }
        if inside && received > 1 && says_by(line, host) {
            return true;
        }
        pos = end;
    }
    false
}

/// True when `line` holds the word `by` followed by `host` (then a blank, `;`, `(` or the
/// end of the line).
fn says_by(line: &[u8], host: &[u8]) -> bool {
    let words: Vec<&[u8]> = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).any(|w| {
        w[0].eq_ignore_ascii_case(b"by") && {
            let name = w[1]
                .split(|&b| b == b';' || b == b'(')
                .next()
                .unwrap_or_default();
            name.eq_ignore_ascii_case(host)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_through_reads_received_headers_after_ours() {
        let ours = b"Received: from a ([127.0.0.1])\r\n\tby mx.nhs.test (coexist) with ESMTP id X; date\r\n";
        let back = [
            &ours[..],
            b"Received: from onprem ([10.0.0.5])\r\n\tby exch01.nhs.test with ESMTP; d\r\n",
            b"Received: from x ([127.0.0.1])\r\n by MX.nhs.test (coexist) with ESMTP id Y; d\r\n",
            b"Subject: hi\r\n\r\nbody by mx.nhs.test\r\n",
        ]
        .concat();
        assert!(passed_through(&back, "mx.nhs.test"));
        // Only our fresh header, a look-alike name, or the name in the body: not.
        let fresh = [
            &ours[..],
            b"Subject: by mx.nhs.test\r\n\r\nby mx.nhs.test\r\n",
        ]
        .concat();
        assert!(!passed_through(&fresh, "mx.nhs.test"));
        let other = [
            &ours[..],
            b"Received: from x by mx.nhs.test.evil with ESMTP; d\r\n\r\n",
        ]
        .concat();
        assert!(!passed_through(&other, "mx.nhs.test"));
    }

    #[test]
    fn strips_forged_internal_headers_and_keeps_the_rest() {
        let p = vec!["X-MS-Exchange-Organization-".to_string()];
        let m = b"Received: x\r\nx-ms-exchange-organization-AuthAs: Internal\r\n\tcontinued\r\nSubject: hi\r\nX-MS-Exchange-Organization-SCL: -1\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n";
        let mut out = m.to_vec();
        assert_eq!(strip_headers(&mut out, &p), 2);
        assert_eq!(
            out,
            b"Received: x\r\nSubject: hi\r\n\r\nX-MS-Exchange-Organization-Body: stays\r\n"
        );
        let mut kept = b"Subject: x\r\n\r\nbody".to_vec();
        assert_eq!(strip_headers(&mut kept, &p), 0);
        assert_eq!(kept, b"Subject: x\r\n\r\nbody");
    }

    #[test]
    fn counts_received_headers() {
        let m = b"Received: a\r\nReceived: b\r\n\tfolded\r\nReceived : c\r\nX-Received: d\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_hops(m), 3);
    }
}
