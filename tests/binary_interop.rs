//! The real `coexist` binary beside its crash tests: config checking, interop with an SMTP
//! client nobody here wrote (Python's smtplib), and the test harness's own start on fresh
//! ports.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::bin::{cli, spawn, with_raw_value, write_config, NOWHERE};
use common::*;
use std::process::Command;

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let config = cfg.path.clone();
    let (ok, out, err) = cli(&config, &["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("ok (2 routes, 4 directory entries)"), "{out}");

    let (text, line) = with_raw_value(&cfg.text(), "routes.onprem", "tls", "\"sometimes\"");
    std::fs::write(&config, &text).unwrap();
    let (ok, _, err) = cli(&config, &["check-config"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("coexist.toml:{line}: key `routes.onprem.tls`")),
        "{err}"
    );

    // A bad directory row is reported with its line.
    cfg.config.routes.get_mut("onprem").unwrap().tls = coexist::config::TlsPolicy::None;
    cfg.write();
    std::fs::write(
        dir.path().join("directory.csv"),
        "address,state\nok@nhs.test,cloud\nbroken-row\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&config, &["check-config"]);
    assert!(!ok);
    assert!(err.contains("directory.csv:3: expected 2 fields"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_sends_through_starttls() {
    let h = harness(|_| {}).await;
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile={ca:?})
s = smtplib.SMTP("127.0.0.1", {port}, local_hostname="py.client.test", timeout=20)
s.ehlo()
assert s.has_extn("starttls") and s.has_extn("pipelining") and s.has_extn("chunking")
s.starttls(context=ctx)  # checks the certificate for 127.0.0.1 against the test CA
s.ehlo()
msg = b"From: <py@example.org>\r\nSubject: smtplib\r\n\r\n.dot line\r\nbody\r\n"
refused = s.sendmail("py@example.org", ["alice@nhs.test", "bob@nhs.test", "nobody@evil.test"], msg)
print(sorted(refused.keys()), refused["nobody@evil.test"][0])
s.quit()
"#,
        ca = h.dir.path().join("ca.pem").to_str().unwrap(),
        port = h.addr.port()
    );
    std::fs::write(h.dir.path().join("ca.pem"), &h.certs.ca_pem).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3 is required (installed by .ci/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "['nobody@evil.test'] 550"
    );
    assert_eq!(wait(&h.onprem, 1).await, 1);
    assert_eq!(wait(&h.cloud, 1).await, 1);
    let m = &h.cloud.state.messages()[0];
    assert_eq!(
        strip_received(&m.body),
        b"From: <py@example.org>\r\nSubject: smtplib\r\n\r\n.dot line\r\nbody\r\n"
    );
    assert!(received_header(&m.body).contains("ESMTPS"));
}

/// The test harness itself: when a port picked for the server is taken by someone else
/// before the server binds it, the harness does not mistake the other listener for the
/// server; it starts the server again on fresh ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_moves_to_fresh_ports_when_one_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let smtp_squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = [
        smtp_squatter.local_addr().unwrap(),
        admin_squatter.local_addr().unwrap(),
    ];
    cfg.config.server.listen = vec![taken[0]];
    cfg.config.admin.as_mut().unwrap().listen = taken[1];
    cfg.write();
    let _server = spawn(&mut cfg);
    assert!(!taken.contains(&cfg.listen()) && !taken.contains(&cfg.admin()));
    let (ok, out, err) = cli(&cfg.path, &["status"]);
    assert!(ok && out.contains("ready: true"), "{out}{err}");
    let mut c = connect(cfg.listen()).await;
    c.expect("EHLO client.test", 250).await;
}
