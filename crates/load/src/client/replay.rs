//! Replayed traffic: real messages read from `.eml` files or an mbox and sent in turn, and
//! [`Traffic`], the one source a run draws its messages from (generated or replayed).
//!
//! Replayed messages are sent as they are, apart from line ends made CRLF; the envelope
//! comes from the headers unless the command line names it. Messages that cannot be used
//! are counted by reason ([`Replayed::skipped`]); each kept one carries its original time
//! (Date, else the newest Received), so a replay can keep the shape of the day it came from.

use super::generate::{Generated, Generator};
use crate::report::Skipped;
use crate::types::Address;

/// Where messages come from: generated, or files replayed in turn.
pub enum Traffic {
    /// Synthetic messages.
    Synthetic(Generator),
    /// Messages read from .eml files or an mbox, replayed round-robin.
    Files(Vec<Generated>),
}

impl Traffic {
    /// Message number `n`.
    pub fn message(&self, n: u64) -> Generated {
        match self {
            Traffic::Synthetic(g) => g.message(n),
            Traffic::Files(v) => {
                let m = &v[(n as usize) % v.len().max(1)];
                Generated {
                    from: m.from.clone(),
                    rcpts: m.rcpts.clone(),
                    body: m.body.clone(),
                }
            }
        }
    }
}

/// Replayed messages, with what was skipped and why.
#[derive(Default)]
pub struct Replayed {
    /// The messages to send, in file order (`.eml` files by name, then the mbox).
    pub messages: Vec<Generated>,
    /// Each message's original time (Unix seconds: its Date header, else the newest
    /// Received date), when it has one.
    pub times: Vec<Option<i64>>,
    /// Each message's name (file name, or mbox name and position) for the skipped report.
    pub names: Vec<String>,
    /// Messages not replayed, by reason.
    pub skipped: Skipped,
}

impl Replayed {
    /// For `--timing`: keeps the messages that have an original time, sorted by it, and
    /// counts the others as skipped (`no_date`). Returns the kept messages' times.
    pub fn by_time(&mut self) -> Vec<i64> {
        let messages = std::mem::take(&mut self.messages);
        let times = std::mem::take(&mut self.times);
        let names = std::mem::take(&mut self.names);
        let mut kept = Vec::new();
        for ((m, t), name) in messages.into_iter().zip(times).zip(names) {
            match t {
                Some(t) => kept.push((t, m, name)),
                None => self.skipped.add("no_date", name),
            }
        }
        kept.sort_by_key(|(t, _, _)| *t);
        let mut out = Vec::with_capacity(kept.len());
        for (t, m, name) in kept {
            out.push(t);
            self.messages.push(m);
            self.times.push(Some(t));
            self.names.push(name);
        }
        self.skipped.used = self.messages.len() as u64;
        out
    }
}

/// Reads messages from a folder of `.eml` files and/or an mbox file. The envelope comes
/// from the headers (From; To and Cc) unless `from`/`to` are given. Lines become CRLF.
/// A message that cannot be read or has no sender or recipients is skipped and counted;
/// only a folder or mbox that cannot be read at all is an error.
pub fn read_messages(
    eml_dir: Option<&std::path::Path>,
    mbox: Option<&std::path::Path>,
    from: Option<&Address>,
    to: &[Address],
) -> std::io::Result<Replayed> {
    let mut out = Replayed::default();
    let mut raw: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(dir) = eml_dir {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("eml")))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.skipped.found += 1;
            match std::fs::read(&p) {
                Ok(bytes) => raw.push((name, bytes)),
                Err(_) => out.skipped.add("unreadable", name),
            }
        }
    }
    if let Some(path) = mbox {
        let text = std::fs::read(path)?;
        let mbox_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cur: Vec<u8> = Vec::new();
        let mut push = |cur: &mut Vec<u8>, raw: &mut Vec<(String, Vec<u8>)>| {
            if !cur.is_empty() {
                out.skipped.found += 1;
                let name = format!("{mbox_name} #{}", out.skipped.found);
                raw.push((name, std::mem::take(cur)));
            }
        };
        for line in text.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b"From ") {
                push(&mut cur, &mut raw);
                continue;
            }
            // mboxrd quoting: ">From " at a line start stands for "From ".
            let line = if line.starts_with(b">From ") {
                &line[1..]
            } else {
                line
            };
            cur.extend_from_slice(line);
        }
        push(&mut cur, &mut raw);
    }
    for (name, m) in raw {
        let body = to_crlf(&m);
        let (sender, rcpts, time) = match mailparse::parse_headers(&body) {
            Ok((headers, _)) if !headers.is_empty() => {
                use mailparse::MailHeaderMap;
                let addrs = |name: &str| -> Vec<Address> {
                    headers
                        .get_all_values(name)
                        .iter()
                        .filter_map(|v| mailparse::addrparse(v).ok())
                        .flat_map(|l| l.iter().cloned().collect::<Vec<_>>())
                        .flat_map(|a| match a {
                            mailparse::MailAddr::Single(s) => vec![s.addr],
                            mailparse::MailAddr::Group(g) => {
                                g.addrs.into_iter().map(|s| s.addr).collect()
                            }
                        })
                        .filter_map(|s| Address::parse(&s, true).ok())
                        .collect()
                };
                let mut rcpts = addrs("To");
                rcpts.extend(addrs("Cc"));
                (
                    addrs("From").into_iter().next(),
                    rcpts,
                    original_time(&headers),
                )
            }
            _ => {
                out.skipped.add("unparseable", name);
                continue;
            }
        };
        let Some(sender) = from.cloned().or(sender) else {
            out.skipped.add("no_sender", name);
            continue;
        };
        let rcpts = if to.is_empty() { rcpts } else { to.to_vec() };
        if rcpts.is_empty() {
            out.skipped.add("no_recipients", name);
            continue;
        }
        out.messages.push(Generated {
            from: sender,
            rcpts,
            body,
        });
        out.times.push(time);
        out.names.push(name);
    }
    out.skipped.used = out.messages.len() as u64;
    Ok(out)
}

/// When a message was originally sent: its Date header, else the newest date among its
/// Received headers (the text after the last `;`), as Unix seconds.
fn original_time(headers: &[mailparse::MailHeader<'_>]) -> Option<i64> {
    use mailparse::MailHeaderMap;
    if let Some(t) = headers
        .get_first_value("Date")
        .and_then(|d| mailparse::dateparse(d.trim()).ok())
    {
        return Some(t);
    }
    headers
        .get_all_values("Received")
        .iter()
        .filter_map(|r| r.rsplit_once(';'))
        .filter_map(|(_, d)| mailparse::dateparse(d.trim()).ok())
        .max()
}

fn to_crlf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + m.len() / 40);
    let mut prev = 0u8;
    for &b in m {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_are_counted_and_times_come_from_date_or_received() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        w(
            "1.eml",
            "From: a@example.org\nTo: b@nhs.test\nDate: Tue, 24 Nov 2026 10:00:30 +0000\n\nx\n",
        );
        w(
            "2.eml",
            "Received: from a by b; Tue, 24 Nov 2026 09:00:00 +0000\nReceived: from c by a; Tue, 24 Nov 2026 10:00:00 +0000\nFrom: a@example.org\nTo: b@nhs.test\n\nx\n",
        );
        w("3.eml", "From: a@example.org\nTo: b@nhs.test\n\nno date\n");
        w("4.eml", "From: a@example.org\nSubject: nobody\n\nx\n");
        w("5.eml", "To: b@nhs.test\n\nno sender\n");
        w("6.eml", "");
        let mut r = read_messages(Some(dir.path()), None, None, &[]).unwrap();
        assert_eq!((r.skipped.found, r.skipped.used), (6, 3));
        let reasons: Vec<_> = r.skipped.reasons.keys().cloned().collect();
        assert_eq!(reasons, vec!["no_recipients", "no_sender", "unparseable"]);
        assert_eq!(r.skipped.reasons["no_recipients"].examples, vec!["4.eml"]);
        assert_eq!(r.times[0].unwrap() - r.times[1].unwrap(), 30);

        let times = r.by_time();
        assert_eq!(times.len(), 2);
        assert_eq!(r.names, vec!["2.eml", "1.eml"]);
        assert_eq!(r.skipped.reasons["no_date"].examples, vec!["3.eml"]);
        assert_eq!(r.skipped.used, 2);

        // --from and --to fill in what the headers lack.
        let a = Address::parse("x@nhs.test", false).unwrap();
        let r = read_messages(Some(dir.path()), None, Some(&a), std::slice::from_ref(&a)).unwrap();
        assert_eq!(r.messages.len(), 5);
        assert_eq!(r.skipped.total(), 1);
    }
}
