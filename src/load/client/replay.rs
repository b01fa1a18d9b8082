//! Replayed traffic: real messages read from `.eml` files or an mbox and sent in turn, and
//! [`Traffic`], the one source a run draws its messages from (generated or replayed).
//!
//! Replayed messages are sent as they are, apart from line ends made CRLF; the envelope
//! comes from the headers unless the command line names it.

use super::generate::{Generated, Generator};
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

/// Reads messages from a folder of `.eml` files and/or an mbox file. The envelope comes
/// from the headers (From; To and Cc) unless `from`/`to` are given. Lines become CRLF.
pub fn read_messages(
    eml_dir: Option<&std::path::Path>,
    mbox: Option<&std::path::Path>,
    from: Option<&Address>,
    to: &[Address],
) -> std::io::Result<Vec<Generated>> {
    let mut raw: Vec<Vec<u8>> = Vec::new();
    if let Some(dir) = eml_dir {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("eml")))
            .collect();
        paths.sort();
        for p in paths {
            raw.push(std::fs::read(p)?);
        }
    }
    if let Some(path) = mbox {
        let text = std::fs::read(path)?;
        let mut cur: Vec<u8> = Vec::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b"From ") {
                if !cur.is_empty() {
                    raw.push(std::mem::take(&mut cur));
                }
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
        if !cur.is_empty() {
            raw.push(cur);
        }
    }
    let mut out = Vec::new();
    for m in raw {
        let body = to_crlf(&m);
        let (mut sender, mut rcpts) = (None, Vec::new());
        if let Ok((headers, _)) = mailparse::parse_headers(&body) {
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
            sender = addrs("From").into_iter().next();
            rcpts = addrs("To");
            rcpts.extend(addrs("Cc"));
        }
        let sender = from.cloned().or(sender);
        let rcpts = if to.is_empty() { rcpts } else { to.to_vec() };
        if let (Some(from), false) = (sender, rcpts.is_empty()) {
            out.push(Generated { from, rcpts, body });
        }
    }
    Ok(out)
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
