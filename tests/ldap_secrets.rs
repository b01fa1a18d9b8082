//! Issue 24 item 3: the LDAP bind password never crosses the network in clear. A bind DN
//! with a password over plain `ldap://` without StartTLS is refused by `check-config` and
//! `serve` (file, line, key, and the three fixes named), before anything connects: a fake
//! LDAP server that records every byte is never reached. A config built by code is held
//! to the same rule before the bind. StartTLS still binds, against a slapd that refuses
//! simple binds without TLS.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::LdapConfig;
use common::bin::{self, cli};
use common::slapd::{self, Slapd};
use common::*;
use std::io::Read;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

const SECRET: &str = "svc-ldap-9c1e55d0a7";

/// A TCP listener standing in for an LDAP server: counts connections and keeps every byte.
struct Fake {
    url: String,
    got: Arc<Mutex<(usize, Vec<u8>)>>,
}

impl Fake {
    fn start() -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ldap://{}", l.local_addr().unwrap());
        let got = Arc::new(Mutex::new((0, Vec::new())));
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                g.lock().unwrap().0 += 1;
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        g.lock().unwrap().1.extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Fake { url, got }
    }

    /// (connections, bytes received).
    fn seen(&self) -> (usize, Vec<u8>) {
        self.got.lock().unwrap().clone()
    }
}

fn ldap(url: &str, extra: &str) -> LdapConfig {
    toml::from_str(&format!(
        "url = \"{url}\"\nbind_dn = \"{}\"\npassword = \"{SECRET}\"\nbase_dn = \"ou=people,{}\"\nflavor = \"openldap\"\ntimeout = \"2s\"\n{extra}",
        slapd::ROOT_DN,
        slapd::SUFFIX
    ))
    .unwrap()
}

/// The 1-based line of `key = ` inside `[table]` of `text`.
fn line_in(text: &str, table: &str, key: &str) -> usize {
    let mut current = "";
    for (i, l) in text.lines().enumerate() {
        if l.starts_with('[') {
            current = l.trim_matches(['[', ']']);
        } else if current == table && l.starts_with(&format!("{key} = ")) {
            return i + 1;
        }
    }
    panic!("no {key} in [{table}]:\n{text}")
}

#[test]
fn a_password_over_plain_ldap_is_refused_by_check_config_and_serve_before_any_connection() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = bin::write_config(dir.path(), bin::NOWHERE, bin::NOWHERE);
    cfg.config.directory.file = None;
    cfg.config.directory.ldap = Some(ldap(&fake.url, ""));
    cfg.write();
    let line = line_in(&cfg.text(), "directory.ldap", "url");
    let want = format!("coexist.toml:{line}: key `directory.ldap.url`: ");

    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(!ok, "check-config accepted a password over plain LDAP");
    let serve = bin::serve_exit(&cfg.path, None, "info");
    assert!(serve.exited && !serve.success, "serve started");
    let serve_err = serve.stderr;
    for e in [&err, &serve_err] {
        assert!(e.contains(&want), "{want:?} not in: {e}");
        for fix in ["starttls = true", "ldaps://", "allow_plaintext_bind = true"] {
            assert!(e.contains(fix), "{fix:?} not in: {e}");
        }
        assert!(!e.contains(SECRET), "the password in: {e}");
    }
    // Nothing reached the wire: load failed before any connection.
    assert_eq!(fake.seen(), (0, Vec::new()));

    // The lab opt-in is taken (and check-config does not bind).
    cfg.config.directory.ldap = Some(ldap(&fake.url, "allow_plaintext_bind = true"));
    cfg.write();
    let (ok, _, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    // StartTLS and ldaps:// pass.
    for extra in ["starttls = true", ""] {
        let url = if extra.is_empty() {
            fake.url.replace("ldap://", "ldaps://")
        } else {
            fake.url.clone()
        };
        cfg.config.directory.ldap = Some(ldap(&url, extra));
        cfg.write();
        let (ok, _, err) = cli(&cfg.path, &["check-config"]);
        assert!(ok, "{extra:?}: {err}");
    }
}

/// A config built by code (not loaded from a file) is held to the rule before the bind:
/// the source stays unhealthy (`451 4.4.3`), and the fake server sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_built_by_code_never_sends_the_password_in_clear() {
    let fake = Fake::start();
    let url = fake.url.clone();
    let h = harness(move |c| {
        c.directory.file = None;
        c.directory.ldap = Some(ldap(&url, ""));
    })
    .await;
    // The source is down for the relay: unknown recipients are deferred.
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<alice@nhs.test>").await;
    assert_eq!((r.code, r.status()), (451, "4.4.3"), "{r:?}");
    let (_, bytes) = fake.seen();
    assert!(
        !String::from_utf8_lossy(&bytes).contains(SECRET),
        "the password reached the fake server"
    );
    assert_eq!(fake.seen(), (0, Vec::new()));
}

/// StartTLS binds (slapd refuses simple binds without TLS) and the directory syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_binds_and_syncs() {
    let certs_dir = tempfile::tempdir().unwrap();
    let c = coexist::certs::generate("ldap.corp.test").unwrap();
    let (cert, key, ca) = (
        certs_dir.path().join("ldap.crt"),
        certs_dir.path().join("ldap.key"),
        certs_dir.path().join("ca.crt"),
    );
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    std::fs::write(&ca, &c.ca_pem).unwrap();
    let server = Slapd::start_tls(&slapd::user_ldif(1, "1", None), &cert, &key);
    let url = server.url();
    // Without TLS slapd itself refuses the simple bind (the fixture's setting holds).
    let (conn, mut plain) = ldap3::LdapConnAsync::new(&url).await.unwrap();
    ldap3::drive!(conn);
    let r = plain
        .simple_bind(slapd::ROOT_DN, slapd::ROOT_PW)
        .await
        .unwrap();
    assert_ne!(r.rc, 0, "slapd took a simple bind without TLS");

    let mut l = ldap(
        &url,
        &format!("starttls = true\ntls_ca_file = \"{}\"", ca.display()),
    );
    l.password = Some(slapd::ROOT_PW.into());
    let h = harness(move |c| {
        let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
        c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
        c.directory.file = None;
        c.directory.ldap = Some(l);
    })
    .await;
    let found = h
        .relay
        .directory
        .lookup(&coexist::types::Address::parse("user1@corp.test", true).unwrap());
    assert_eq!(found.state.as_deref(), Some("onprem"), "{:?}", found.origin);
    drop(server);
}
