//! Synthetic traffic: messages generated from a recipient list, a size distribution and a
//! few options (UTF-8 headers, attachments), deterministic per message number so that two
//! runs with the same settings send the same mail.
//!
//! Also the recipient lists a run draws from: the rows of a directory CSV (with whether
//! each mailbox is in the cloud, for `--cloud-share`) or a synthetic list.

use crate::types::Address;

/// One generated message.
pub struct Generated {
    /// Reverse path.
    pub from: Address,
    /// Recipients.
    pub rcpts: Vec<Address>,
    /// Message bytes (CRLF lines).
    pub body: Vec<u8>,
}

/// Synthetic traffic: recipients drawn from a list (or by state with a given share), sizes
/// from a weighted distribution, optional UTF-8 headers and attachments.
#[derive(Default)]
pub struct Generator {
    /// Candidate recipients.
    pub rcpts: Vec<Address>,
    /// Most recipients per message (at least 1).
    pub max_rcpts: usize,
    /// Approximate body size in bytes (when `sizes` is empty).
    pub size: usize,
    /// Weighted sizes: (bytes, weight).
    pub sizes: Vec<(usize, u32)>,
    /// Draw recipients by state: (cloud mailboxes, other mailboxes, share of cloud).
    pub by_state: Option<(Vec<Address>, Vec<Address>, f64)>,
    /// Add a UTF-8 Subject and an 8-bit body line.
    pub utf8: bool,
    /// Share (0..1) of messages with a base64 attachment.
    pub attachment_share: f64,
}

/// Parses a size distribution such as `2k:50,10k:30,100k:15,1m:5` (size:weight).
pub fn parse_sizes(s: &str) -> Result<Vec<(usize, u32)>, String> {
    s.split(',')
        .map(|item| {
            let (size, weight) = item
                .split_once(':')
                .ok_or(format!("{item:?}: want SIZE:WEIGHT"))?;
            let size = size.trim().to_ascii_lowercase();
            let (num, mult) = match size.chars().last() {
                Some('k') => (&size[..size.len() - 1], 1024),
                Some('m') => (&size[..size.len() - 1], 1024 * 1024),
                _ => (size.as_str(), 1),
            };
            let n: usize = num.parse().map_err(|_| format!("{item:?}: bad size"))?;
            let w: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{item:?}: bad weight"))?;
            Ok((n * mult, w))
        })
        .collect()
}

impl Generator {
    fn pick_size(&self, rng: &mut fastrand::Rng) -> usize {
        let total: u32 = self.sizes.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return self.size;
        }
        let mut x = rng.u32(..total);
        for (size, w) in &self.sizes {
            if x < *w {
                return *size;
            }
            x -= w;
        }
        self.size
    }

    fn pick_rcpt(&self, rng: &mut fastrand::Rng) -> Option<Address> {
        let list = match &self.by_state {
            Some((cloud, other, share)) if !cloud.is_empty() && !other.is_empty() => {
                if rng.f64() < *share {
                    cloud
                } else {
                    other
                }
            }
            _ => &self.rcpts,
        };
        (!list.is_empty()).then(|| list[rng.usize(..list.len())].clone())
    }

    /// Message number `n` (deterministic for a given `n`).
    pub fn message(&self, n: u64) -> Generated {
        let mut rng = fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0E1);
        let count = rng.usize(1..=self.max_rcpts.max(1));
        let mut rcpts: Vec<Address> = Vec::with_capacity(count);
        for _ in 0..count {
            if let Some(a) = self.pick_rcpt(&mut rng) {
                if !rcpts.contains(&a) {
                    rcpts.push(a);
                }
            }
        }
        let fallback = Address::parse("postmaster@example.org", false).ok();
        let from = Address::parse(&format!("sender{}@example.org", n % 97), false)
            .ok()
            .or(fallback)
            .unwrap_or_else(|| rcpts[0].clone());
        let to = rcpts.first().map(|a| a.to_string()).unwrap_or_default();
        let subject = if self.utf8 {
            format!("Migración ✓ Überprüfung {n}")
        } else {
            format!("coexist load message {n}")
        };
        let attach = self.attachment_share > 0.0 && rng.f64() < self.attachment_share;
        let boundary = format!("=_coexist_{n}");
        let mut body = format!(
            "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
             Message-ID: <load.{n}@example.org>\r\nDate: {}\r\nMIME-Version: 1.0\r\n",
            crate::clock::now_utc().to_rfc2822()
        )
        .into_bytes();
        let charset = if self.utf8 { "utf-8" } else { "us-ascii" };
        if attach {
            body.extend_from_slice(
                format!(
                    "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n\
                     Content-Type: text/plain; charset={charset}\r\n\r\n"
                )
                .as_bytes(),
            );
        } else {
            body.extend_from_slice(
                format!("Content-Type: text/plain; charset={charset}\r\n\r\n").as_bytes(),
            );
        }
        if self.utf8 {
            body.extend_from_slice("Grüße aus der Migration: ça marche, ¡sí!\r\n".as_bytes());
        }
        let size = self.pick_size(&mut rng);
        let text_target = if attach { size / 3 } else { size };
        const WORDS: [&str; 8] = [
            "mailbox",
            "migration",
            "estate",
            "relay",
            "batch",
            "tenant",
            "route",
            "queue",
        ];
        while body.len() < text_target {
            let mut line = String::with_capacity(78);
            while line.len() < 70 {
                line.push_str(WORDS[rng.usize(..WORDS.len())]);
                line.push(' ');
            }
            if rng.u8(..) < 8 {
                line.insert(0, '.');
            }
            body.extend_from_slice(line.trim_end().as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        if attach {
            body.extend_from_slice(
                format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n\
                     Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
                )
                .as_bytes(),
            );
            const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            while body.len() < size {
                let line: Vec<u8> = (0..76).map(|_| B64[rng.usize(..64)]).collect();
                body.extend_from_slice(&line);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        }
        Generated { from, rcpts, body }
    }
}

/// The addresses of a directory CSV (header `address,state…` skipped), each with whether
/// its state is `cloud`.
pub fn directory_rows(path: &std::path::Path) -> std::io::Result<Vec<(Address, bool)>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split(',');
            let addr = Address::parse(f.next()?.trim(), true).ok()?;
            Some((addr, f.next().is_some_and(|s| s.trim() == "cloud")))
        })
        .collect())
}

/// `count` synthetic recipients `user{i}@nhs.test`.
pub fn synthetic_recipients(count: usize) -> Vec<Address> {
    (0..count)
        .filter_map(|i| Address::parse(&format!("user{i}@nhs.test"), false).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_generator_follows_options() {
        assert_eq!(
            parse_sizes("2k:50,1m:5,100:1").unwrap(),
            vec![(2048, 50), (1 << 20, 5), (100, 1)]
        );
        assert!(parse_sizes("2k").is_err());
        let a = |s: &str| Address::parse(s, false).unwrap();
        let g = Generator {
            max_rcpts: 1,
            sizes: vec![(20_000, 1)],
            by_state: Some((vec![a("c@nhs.test")], vec![a("o@nhs.test")], 0.8)),
            utf8: true,
            attachment_share: 1.0,
            ..Generator::default()
        };
        let mut cloud = 0;
        for n in 0..500 {
            let m = g.message(n);
            assert!(m.body.len() >= 20_000);
            if m.rcpts[0].local() == "c" {
                cloud += 1;
            }
            if n == 0 {
                let text = String::from_utf8(m.body.clone()).unwrap();
                assert!(
                    text.contains("Subject: Migración")
                        && text.contains("Content-Transfer-Encoding: base64")
                );
            }
        }
        assert!(
            (320..480).contains(&cloud),
            "{cloud} of 500 drawn from cloud at share 0.8"
        );
    }
}
