//! SMTP slots that a few addresses cannot exhaust: sessions reserved for trusted networks,
//! clients counted per network (IPv6 /64 by default), a session lifetime cap and a junk
//! command limit. Clients connect from chosen loopback addresses (all of 127.0.0.0/8 is
//! loopback on Linux) to play trusted and untrusted hosts.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `addr` from the local address `from` (any port).
async fn stream_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A session from `from` that got its `220` greeting.
async fn greeted_from(from: &str, addr: SocketAddr) -> Client<TcpStream> {
    let mut c = Client {
        io: BufReader::new(stream_from(from.parse().unwrap(), addr).await),
    };
    let r = c.reply().await;
    assert_eq!(r.code, 220, "{from}: {r:?}");
    c
}

/// Everything the relay says to a connection from `from` until it closes it (a refusal).
async fn refusal_from(from: &str, addr: SocketAddr) -> String {
    let mut s = stream_from(from.parse().unwrap(), addr).await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the refused connection is closed")
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_clients_get_in_when_untrusted_ones_hold_every_other_slot() {
    let h = harness(|c| {
        c.server.max_connections = 4;
        c.server.reserved_connections = Some(2);
        c.policy.trusted_networks = vec!["127.0.0.2/32".parse().unwrap()];
    })
    .await;
    // The internet (127.0.0.1 here) gets max_connections - reserved_connections ...
    let _u1 = greeted_from("127.0.0.1", h.addr).await;
    let _u2 = greeted_from("127.0.0.1", h.addr).await;
    let refused = refusal_from("127.0.0.1", h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections, try again later"),
        "{refused}"
    );
    // ... and on-premises Exchange still gets in, up to max_connections.
    let mut t1 = greeted_from("127.0.0.2", h.addr).await;
    t1.expect("EHLO exchange.corp.test", 250).await;
    let _t2 = greeted_from("127.0.0.2", h.addr).await;
    let refused = refusal_from("127.0.0.2", h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections"),
        "{refused}"
    );
    let refused = refusal_from("127.0.0.1", h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_count_a_network_as_one_client() {
    // IPv4 per address by default: two addresses of one /24 are two clients.
    let h = harness(|c| c.policy.max_connections_per_ip = 1).await;
    let _a = greeted_from("127.0.0.2", h.addr).await;
    let _b = greeted_from("127.0.0.3", h.addr).await;
    let refused = refusal_from("127.0.0.2", h.addr).await;
    assert!(
        refused.starts_with("421 4.7.0 Too many connections from your address (limit 1)"),
        "{refused}"
    );

    // ipv4_client_prefix = 24: the whole /24 is one client.
    let h = harness(|c| {
        c.policy.max_connections_per_ip = 1;
        c.policy.ipv4_client_prefix = 24;
    })
    .await;
    let _a = greeted_from("127.0.0.2", h.addr).await;
    let refused = refusal_from("127.0.0.3", h.addr).await;
    assert!(
        refused
            .starts_with("421 4.7.0 Too many connections from your network 127.0.0.0/24 (limit 1)"),
        "{refused}"
    );

    // IPv6 (::1 is the only IPv6 loopback address): counted per /64 by default, per
    // address with 128.
    for (prefix, whom) in [(64, "your network ::/64"), (128, "your address")] {
        let h = harness(|c| {
            c.server.listen = vec!["[::1]:0".parse().unwrap()];
            c.policy.max_connections_per_ip = 1;
            c.policy.ipv6_client_prefix = prefix;
        })
        .await;
        let _a = greeted_from("::1", h.addr).await;
        let refused = refusal_from("::1", h.addr).await;
        assert!(
            refused.starts_with(&format!(
                "421 4.7.0 Too many connections from {whom} (limit 1)"
            )),
            "{prefix}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_at_max_session_time_but_a_transfer_is_not_cut() {
    let h = harness(|c| c.server.max_session_time = Duration::from_secs(1)).await;
    let host = h.relay.control.config().server.hostname.clone();
    let expired = format!("421 4.4.2 {host} Error: session time limit exceeded");

    // A transfer that spans the limit is finished and accepted; the next command ends it.
    let mut c = connect(h.addr).await;
    c.expect("EHLO slow.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    c.expect("RCPT TO:<bob@nhs.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: long\r\n\r\nfirst half\r\n").await;

    // An idle session, opened after the transfer's, is told and closed at the limit, long
    // before command_timeout (300 s). Once it is, the transfer's session is past its limit
    // too: it started earlier.
    let mut idle = connect(h.addr).await;
    idle.expect("EHLO idle.test", 250).await;
    let r = idle.reply().await;
    assert!(r.text.starts_with(&expired), "{r:?}");
    assert!(idle.try_reply().await.is_none(), "closed after the 421");

    c.send(b"second half\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let r = c.cmd("NOOP").await;
    assert!(r.text.starts_with(&expired), "{r:?}");
    assert!(c.try_reply().await.is_none(), "closed after the 421");
    assert_eq!(wait(&h.cloud, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_commands_past_the_limit_end_the_session() {
    // The shipped limit (100), for everyone, trusted networks included; an accepted
    // message starts the count over.
    let h = harness(|c| c.policy.trusted_networks = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let host = h.relay.control.config().server.hostname.clone();
    let mut c = connect(h.addr).await;
    c.expect("EHLO exchange.corp.test", 250).await;
    let mut junk = String::new();
    for cmd in ["NOOP", "RSET", "VRFY bob", "HELP"].iter().cycle().take(99) {
        junk.push_str(cmd);
        junk.push_str("\r\n");
    }
    c.send(junk.as_bytes()).await;
    for _ in 0..99 {
        let r = c.reply().await;
        assert!(matches!(r.code, 250 | 252 | 214), "{r:?}");
    }
    assert_eq!(
        c.mail("x@nhs.test", &["bob@nhs.test"], b"Subject: x\r\n\r\nx\r\n")
            .await
            .code,
        250
    );
    c.send("NOOP\r\n".repeat(100).as_bytes()).await;
    for _ in 0..100 {
        assert_eq!(c.reply().await.code, 250);
    }
    let r = c.cmd("NOOP").await;
    assert!(
        r.text
            .starts_with(&format!("421 4.7.0 {host} Error: too many junk commands")),
        "{r:?}"
    );
    assert!(c.try_reply().await.is_none(), "closed after the 421");
}
