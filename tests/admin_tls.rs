//! The admin API over TLS (issue 24, item 8): with `admin.tls_cert`/`tls_key` it answers
//! https only, the CLI reaches it with https and checks its certificate, a non-loopback
//! listen address needs no clear-text opt-in; and the token never goes to a peer in clear
//! over the network.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::admin::client::{AdminClient, ClientError, Target};
use common::bin::{cli, spawn, write_config, NOWHERE};
use common::*;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The admin certificate of a test: for `name`, with its CA written beside it.
struct AdminCerts {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    ca_pem: String,
}

fn admin_certs(dir: &Path, name: &str) -> AdminCerts {
    let c = coexist::certs::generate(name).unwrap();
    let certs = AdminCerts {
        cert: dir.join("admin.crt"),
        key: dir.join("admin.key"),
        ca: dir.join("admin-ca.pem"),
        ca_pem: c.ca_pem.clone(),
    };
    std::fs::write(&certs.cert, &c.cert_pem).unwrap();
    std::fs::write(&certs.key, &c.key_pem).unwrap();
    std::fs::write(&certs.ca, &c.ca_pem).unwrap();
    certs
}

fn with_tls(c: &mut coexist::config::Config, certs: &AdminCerts) {
    let a = c.admin.as_mut().unwrap();
    a.tls_cert = Some(certs.cert.clone());
    a.tls_key = Some(certs.key.clone());
    a.tls_ca_file = Some(certs.ca.clone());
}

/// Writes `request` on a fresh connection to `addr` and reads until the server closes it.
async fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("the connection stayed open")
}

/// One request over TLS (trusting `ca_pem`, checking `name`); the response's text.
async fn https(addr: SocketAddr, ca_pem: &str, name: &str, request: &str) -> String {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut s = tls_connector(ca_pem).connect(name, tcp).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).to_string()
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("no answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_over_tls_answers_https_with_the_token_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let certs = admin_certs(dir.path(), "mx1.coexist.test");
    let h = harness(|c| with_tls(c, &certs)).await;
    let api = h.relay.admin_addr.unwrap();
    let name = "mx1.coexist.test";

    let ok = https(
        api,
        &certs.ca_pem,
        name,
        &format!("GET /v1/health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    let refused = https(
        api,
        &certs.ca_pem,
        name,
        &format!("GET /v1/health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    // Clear HTTP gets no HTTP answer: the connection ends in a TLS alert or nothing.
    let plain = raw(
        api,
        format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        !plain.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&plain)
    );

    // The client checks the certificate: the right CA and name pass, another CA does not.
    let target = Target {
        addr: api,
        tls_name: Some(name.to_string()),
    };
    let ready = tokio::task::spawn_blocking({
        let (target, ca) = (target.clone(), certs.ca.clone());
        move || {
            AdminClient::connect(&target, TOKEN.into(), Duration::from_secs(10), Some(&ca))
                .unwrap()
                .ready()
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(ready.ready);
    let other_dir = tempfile::tempdir().unwrap();
    let other = admin_certs(other_dir.path(), name);
    let e = tokio::task::spawn_blocking(move || {
        AdminClient::connect(
            &target,
            TOKEN.into(),
            Duration::from_secs(10),
            Some(&other.ca),
        )
        .unwrap()
        .ready()
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(e, ClientError::Unreachable { .. }) && e.to_string().contains("cert"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_uses_https_when_the_config_has_admin_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let certs = admin_certs(dir.path(), &cfg.config.server.hostname.clone());
    with_tls(&mut cfg.config, &certs);
    cfg.write();
    let _server = spawn(&mut cfg);
    for args in [&["status"][..], &["queue", "list"][..]] {
        let (ok, out, err) = cli(&cfg.path, args);
        assert!(ok, "{args:?}: {out} {err}");
    }
    let (_, out, _) = cli(&cfg.path, &["status"]);
    assert!(out.contains("ready: true"), "{out}");

    // Without the CA, the CLI does not trust the certificate (the system roots do not hold
    // the test CA) and says why.
    cfg.config.admin.as_mut().unwrap().tls_ca_file = None;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["status"]);
    assert!(!ok, "trusted a certificate of an unknown CA");
    assert!(err.contains("cannot reach the admin API"), "{err}");

    // A non-loopback listen address is valid with TLS, without the clear-text opt-in.
    let a = cfg.config.admin.as_mut().unwrap();
    a.listen = "0.0.0.0:8025".parse().unwrap();
    a.allow_plaintext_remote = false;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    cfg.config.admin.as_mut().unwrap().tls_key = None;
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(
        !ok && err.contains("key `admin.tls_cert`: needs `tls_key` too"),
        "{err}"
    );
}

/// This machine's own address off loopback, if it has one (the address it would send
/// from; a UDP `connect` sends nothing).
fn own_address() -> Option<IpAddr> {
    ["192.0.2.1:9", "10.255.255.1:9", "198.51.100.1:9"]
        .iter()
        .find_map(|to| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(to).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

#[test]
fn a_peer_in_clear_off_loopback_never_gets_the_token() {
    // A fake admin API on this machine's own non-loopback address: what a peer's row in
    // the nodes table could name.
    let Some(ip) = own_address() else {
        eprintln!(
            "no address off loopback here: the decision is covered by fleet::peers' unit test"
        );
        return;
    };
    let fake = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = fake.local_addr().unwrap();
    let here = coexist::fleet::peers::host_scope();
    let target = coexist::fleet::peers::reach(Some(&addr.to_string()), None, None, &here).unwrap();
    assert!(!target.may_carry_token());
    let e = AdminClient::for_peer(&target, TOKEN.into(), Duration::from_secs(2), None)
        .err()
        .expect("a client for a clear-text peer off loopback");
    assert!(
        e.to_string()
            .starts_with(&format!("not sending the admin token to http://{addr}")),
        "{e}"
    );
    // Nothing connected to the fake peer (a connection would wait in its backlog).
    fake.set_nonblocking(true).unwrap();
    assert_eq!(
        fake.accept().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock),
        "the clear-text peer was contacted"
    );
    fake.set_nonblocking(false).unwrap();

    // The same peer written as https is asked, over TLS: what reaches it is a TLS
    // handshake, not the token.
    let tls = coexist::fleet::peers::reach(
        Some(&format!("https://{addr}")),
        Some("mx2.coexist.test"),
        None,
        &here,
    )
    .unwrap();
    assert!(tls.may_carry_token());
    let client = match AdminClient::for_peer(&tls, TOKEN.into(), Duration::from_secs(5), None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no system roots to build an https client with: {e}");
            return;
        }
    };
    let ask = std::thread::spawn(move || client.fleet_node().err());
    let (mut s, _) = fake.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 4096];
    let n = s.read(&mut got).unwrap_or(0);
    got.truncate(n);
    drop(s);
    assert!(ask.join().unwrap().is_some(), "the fake peer answered");
    assert!(
        !String::from_utf8_lossy(&got).contains(TOKEN),
        "the token reached the fake peer: {got:?}"
    );
    assert_eq!(got.first(), Some(&0x16), "not a TLS handshake: {got:?}");
}
