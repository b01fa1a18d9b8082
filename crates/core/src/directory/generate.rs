//! Synthetic directories for tests, demos and benchmarks (`coexist directory generate`).

use std::io::{self, Write};

/// The domain of synthetic mailbox `i` among `domains` domains: `nhs.test`, then
/// `trust1.nhs.test`, `trust2.nhs.test`, ...
pub fn domain(i: usize, domains: usize) -> String {
    match i % domains.max(1) {
        0 => "nhs.test".to_string(),
        k => format!("trust{k}.nhs.test"),
    }
}

/// Writes `count` rows `userN@DOMAIN,STATE` with header `address,state`; a share
/// `cloud_share` (0..=1) of them is `cloud`, the rest `onprem`, chosen by a fixed seed so the
/// same arguments give the same file.
pub fn write(out: impl Write, count: usize, domains: usize, cloud_share: f64) -> io::Result<()> {
    let mut w = io::BufWriter::with_capacity(1 << 20, out);
    writeln!(w, "address,state")?;
    let mut rng = fastrand::Rng::with_seed(0xC0E1_5717);
    let domains: Vec<String> = (0..domains.max(1)).map(|k| domain(k, domains)).collect();
    for i in 0..count {
        let state = if rng.f64() < cloud_share {
            "cloud"
        } else {
            "onprem"
        };
        writeln!(w, "user{i}@{},{state}", domains[i % domains.len()])?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    #[test]
    fn generates_requested_shape() {
        let mut out = Vec::new();
        super::write(&mut out, 1000, 4, 0.25).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1001);
        let cloud = text.lines().filter(|l| l.ends_with(",cloud")).count();
        assert!((150..350).contains(&cloud), "{cloud}");
        assert!(text.contains("user3@trust3.nhs.test,"));
    }
}
