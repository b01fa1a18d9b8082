//! The real `coexist` binary: crash safety under `kill -9`, config checking, and interop with
//! an SMTP client nobody here wrote (Python's smtplib).

mod common;

use coexist::load::sink::{Sink, SinkOptions};
use common::bin::{cli, free_port, spawn, write_config};
use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let (onprem_addr, cloud_addr) = (free_port(), free_port());
    let cfg = write_config(dir.path(), onprem_addr, cloud_addr);
    // Next hops are down: every message stays queued.
    let mut server = spawn(&cfg);
    let mut ids = Vec::new();
    let mut c = connect(cfg.listen).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..20 {
        let rcpts: &[&str] = if i % 2 == 0 {
            &["alice@nhs.test", "bob@nhs.test"]
        } else {
            &["carol@nhs.test"]
        };
        let r = c
            .mail("x@example.org", rcpts, &sample(&format!("crash{i}")))
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        ids.push(queue_id(&r));
    }
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    drop(server);

    let onprem = Sink::start(onprem_addr, SinkOptions::default())
        .await
        .unwrap();
    let cloud = Sink::start(cloud_addr, SinkOptions::default())
        .await
        .unwrap();
    let _server = spawn(&cfg);
    assert_eq!(wait(&onprem, 10).await, 10);
    assert_eq!(wait(&cloud, 20).await, 20);
    let (on, cl) = (onprem.state.messages(), cloud.state.messages());
    assert_eq!(
        (on.len(), cl.len()),
        (10, 20),
        "one delivery per message and estate, no duplicates"
    );
    let delivered: Vec<String> = on
        .iter()
        .chain(cl.iter())
        .map(|m| received_header(&m.body))
        .collect();
    for id in &ids {
        assert!(
            delivered.iter().any(|h| h.contains(&format!("id {id}"))),
            "{id} lost"
        );
    }
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), free_port()).path;
    let (ok, out, err) = cli(&config, &["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("ok (2 routes, 4 directory entries)"), "{out}");

    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "tls = \"opportunistic\"",
        "tls = \"sometimes\"",
        1,
    );
    std::fs::write(&config, &text).unwrap();
    let (ok, _, err) = cli(&config, &["check-config"]);
    assert!(!ok);
    let line = text.lines().position(|l| l.contains("sometimes")).unwrap() + 1;
    assert!(
        err.contains(&format!("coexist.toml:{line}: key `routes.onprem.tls`")),
        "{err}"
    );

    // A bad directory row is reported with its line.
    let text = text.replace("tls = \"sometimes\"", "tls = \"none\"");
    std::fs::write(&config, &text).unwrap();
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
