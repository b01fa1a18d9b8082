//! A tiny authoritative DNS server on loopback for MX tests (UDP; A and MX records).
//! Written for the tests only: enough of RFC 1035 to answer hickory's queries.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::UdpSocket;

/// One record.
#[derive(Clone, Debug)]
pub enum Rec {
    /// MX with preference and exchange (`"."` for a null MX).
    Mx(u16, String),
    /// IPv4 address.
    A(Ipv4Addr),
}

/// Starts the server; `zone` maps lower-case names (no trailing dot) to records.
pub async fn start(zone: Vec<(&str, Rec)>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let mut map: HashMap<String, Vec<Rec>> = HashMap::new();
    for (name, rec) in zone {
        map.entry(name.to_string()).or_default().push(rec);
    }
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            if let Some(resp) = answer(&buf[..n], &map) {
                let _ = sock.send_to(&resp, peer).await;
            }
        }
    });
    addr
}

fn encode_name(name: &str, out: &mut Vec<u8>) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn answer(q: &[u8], zone: &HashMap<String, Vec<Rec>>) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
    let question = &q[12..pos + 4];
    let name = labels.join(".");
    let recs = zone.get(&name);
    let mut answers = Vec::new();
    let mut count = 0u16;
    for r in recs.into_iter().flatten() {
        let (rtype, rdata) = match r {
            Rec::A(ip) if qtype == 1 => (1u16, ip.octets().to_vec()),
            Rec::Mx(pref, host) if qtype == 15 => {
                let mut d = pref.to_be_bytes().to_vec();
                encode_name(host, &mut d);
                (15u16, d)
            }
            _ => continue,
        };
        answers.extend_from_slice(&[0xC0, 0x0C]);
        answers.extend_from_slice(&rtype.to_be_bytes());
        answers.extend_from_slice(&1u16.to_be_bytes());
        answers.extend_from_slice(&60u32.to_be_bytes());
        answers.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        answers.extend_from_slice(&rdata);
        count += 1;
    }
    let rcode: u8 = if recs.is_none() { 3 } else { 0 };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    out.push(0x84 | (q[2] & 0x01)); // QR, AA, RD copied
    out.push(0x80 | rcode); // RA, rcode
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    out.extend_from_slice(&answers);
    Some(out)
}
