//! The shipped `cloud` route (Exchange Online) verifies TLS: `tls = "verify"` against
//! `tls_name = "mail.protection.outlook.com"`. Each test takes the route from the shipped
//! config, changing only its next hop (a loopback sink) and, where a test CA is needed,
//! `tls_ca_file`; a next hop with a self-signed certificate, a certificate for another name,
//! or no STARTTLS gets nothing: the message stays queued, and why is in `coexist queue show`
//! (the CLI against the admin API) and in the admin API's message view that the console
//! shows. With a certificate for the name from a trusted CA, the message is delivered.
//! Also: `check-config` (and `serve`, in its log) warns about opportunistic TLS towards a next
//! hop off this machine.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::{Config, TlsPolicy, DEFAULT_CONFIG};
use coexist::load::sink::SinkOptions;
use common::*;
use std::path::{Path, PathBuf};

/// The name the shipped cloud route checks.
const EXO_NAME: &str = "mail.protection.outlook.com";

/// A harness whose `cloud` route is the shipped one, with only its next hop (the cloud
/// sink, started with `sink`) and `tls_ca_file` changed.
async fn shipped_cloud(sink: SinkOptions, ca: Option<PathBuf>) -> Harness {
    harness_with(sink, |c| {
        let shipped = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        let mut route = shipped.routes["cloud"].clone();
        assert_eq!(route.tls, TlsPolicy::Verify);
        assert_eq!(route.tls_name.as_deref(), Some(EXO_NAME));
        route.next_hops = c.routes["cloud"].next_hops.clone();
        route.tls_ca_file = ca;
        c.routes.insert("cloud".into(), route);
    })
    .await
}

/// A sink presenting `cert_pem`/`key_pem` over STARTTLS.
fn tls_sink(dir: &Path, cert_pem: &str, key_pem: &str) -> SinkOptions {
    let (cert, key) = (dir.join("sink.crt"), dir.join("sink.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    SinkOptions {
        tls: Some(coexist::smtp::tls::load_acceptor(&cert, &key).unwrap()),
        keep_bodies: true,
        ..SinkOptions::default()
    }
}

/// A CA (written to `dir/test-ca.crt`) and a certificate it issued for `name`.
fn ca_and_cert(dir: &Path, name: &str) -> (PathBuf, coexist::certs::DevCerts) {
    let c = coexist::certs::generate(name).unwrap();
    let ca = dir.join("test-ca.crt");
    std::fs::write(&ca, &c.ca_pem).unwrap();
    (ca, c)
}

/// What `coexist queue show ID` prints for the relay of `h` (the binary, against the
/// relay's admin API, through a config file that names it).
fn queue_show(h: &Harness, id: &str) -> String {
    let mut cfg = (*h.relay.control.config()).clone();
    cfg.admin.as_mut().unwrap().listen = h.relay.admin_addr.unwrap();
    let path = h.dir.path().join("cli.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let (ok, out, err) = bin::cli(&path, &["queue", "show", id]);
    assert!(ok, "{err}");
    out
}

/// The message view the console shows (`GET /v1/queue/ID`): recipient 0's last reply.
async fn console_reply(h: &Harness, id: &str) -> String {
    let admin = h.relay.admin_addr.unwrap();
    let path = format!("/v1/queue/{id}");
    let (status, _, body) = http(admin, "GET", &path, Some(TOKEN), None, b"").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["recipients"][0]["address"], "bob@nhs.test", "{body}");
    assert_eq!(v["recipients"][0]["status"], "deferred", "{body}");
    v["recipients"][0]["last_reply"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Sends a message to bob (cloud), waits until it is deferred, and checks that the sink got
/// nothing and that `queue show` and the console's view give a reply containing `why`.
async fn refused(h: &Harness, why: &str) {
    let r = send_one(h.addr, &["bob@nhs.test"], "to the cloud").await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = queue_id(&r);
    let entry = h.deferred(&id).await;
    assert!(entry.state.attempts >= 1);
    assert!(
        h.cloud.state.messages().is_empty(),
        "the cloud sink got the message"
    );
    let shown = queue_show(h, &id);
    assert!(
        shown.contains("bob@nhs.test") && shown.contains("451 4.4.1") && shown.contains(why),
        "queue show: {shown}"
    );
    let reply = console_reply(h, &id).await;
    assert!(
        reply.starts_with("451 4.4.1") && reply.contains(why),
        "console: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cloud_route_refuses_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let c = rcgen::generate_simple_self_signed(vec![EXO_NAME.to_string()]).unwrap();
    let sink = tls_sink(dir.path(), &c.cert.pem(), &c.signing_key.serialize_pem());
    let h = shipped_cloud(sink, None).await;
    refused(&h, "invalid peer certificate: UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cloud_route_refuses_a_certificate_for_another_name() {
    let dir = tempfile::tempdir().unwrap();
    // Issued by a CA the route trusts, but for another name than Exchange Online's.
    let (ca, c) = ca_and_cert(dir.path(), "mx.attacker.test");
    let sink = tls_sink(dir.path(), &c.cert_pem, &c.key_pem);
    let h = shipped_cloud(sink, Some(ca)).await;
    refused(
        &h,
        "certificate not valid for name \"mail.protection.outlook.com\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cloud_route_refuses_a_next_hop_without_starttls() {
    let sink = SinkOptions {
        keep_bodies: true,
        ..SinkOptions::default()
    };
    let h = shipped_cloud(sink, None).await;
    refused(&h, "does not offer STARTTLS and the route requires TLS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cloud_route_delivers_to_a_certificate_for_the_name_from_a_trusted_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, c) = ca_and_cert(dir.path(), EXO_NAME);
    let sink = tls_sink(dir.path(), &c.cert_pem, &c.key_pem);
    let h = shipped_cloud(sink, Some(ca)).await;
    let r = send_one(h.addr, &["bob@nhs.test"], "to the cloud").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.cloud, 1).await;
    h.settled().await;
    let got = h.cloud.state.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "delivered without TLS");
    assert_eq!(got[0].rcpts[0].to_string(), "bob@nhs.test");
}

#[test]
fn check_config_warns_about_opportunistic_tls_off_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = bin::write_config(dir.path(), bin::NOWHERE, bin::NOWHERE);
    let (ok, out, err) = bin::cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    assert!(!out.contains("warning"), "loopback next hops: {out}");

    // On-premises Exchange across the network, with opportunistic TLS.
    let onprem = cfg.config.routes.get_mut("onprem").unwrap();
    onprem.next_hops = vec![coexist::config::NextHop::parse("exchange.corp.test:25").unwrap()];
    onprem.tls = TlsPolicy::Opportunistic;
    cfg.write();
    let (ok, out, err) = bin::cli(&cfg.path, &["check-config"]);
    assert!(ok, "a warning does not refuse the config: {err}");
    let text = cfg.text();
    let table = text.lines().position(|l| l == "[routes.onprem]").unwrap();
    let line = table
        + text
            .lines()
            .skip(table)
            .position(|l| l.starts_with("tls = "))
            .unwrap()
        + 1;
    let want = format!(
        "warning: {}:{line}: key `routes.onprem.tls`: tls = \"opportunistic\" checks no \
         certificate and falls back to clear text toward next hop exchange.corp.test:25",
        cfg.path.display()
    );
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("use tls = \"verify\""), "{out}");

    // `serve` logs the same warning at start.
    let log = dir.path().join("serve.log");
    let how = bin::Start {
        log: Some(&log),
        ..Default::default()
    };
    let server = bin::spawn_with(&mut cfg, how);
    drop(server);
    let logged = std::fs::read_to_string(&log).unwrap();
    let want = want.trim_start_matches("warning: ");
    assert!(
        logged
            .lines()
            .any(|l| l.contains("WARN") && l.contains(want)),
        "{logged}"
    );

    // `required` inside a trusted network is not warned about.
    cfg.config.routes.get_mut("onprem").unwrap().tls = TlsPolicy::Required;
    cfg.write();
    let (ok, out, err) = bin::cli(&cfg.path, &["check-config"]);
    assert!(ok, "{err}");
    assert!(!out.contains("warning"), "{out}");
}

/// On a machine without CA certificates (a bare container), the shipped cloud route would
/// trust nothing and hold every message: `check-config` says so before the first delivery.
#[test]
fn check_config_warns_when_the_cloud_route_has_no_cas_to_verify_against() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = bin::write_config(dir.path(), bin::NOWHERE, bin::NOWHERE);
    // The shipped cloud route (the tests' shared config relaxes it for loopback doubles).
    let shipped = Config::parse(DEFAULT_CONFIG, "default").unwrap().routes["cloud"].clone();
    let cloud = cfg.config.routes.get_mut("cloud").unwrap();
    cloud.tls = shipped.tls;
    cloud.tls_name = shipped.tls_name;
    cfg.write();
    let run = |no_roots: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_coexist"));
        cmd.args(["check-config", "--config", cfg.path.to_str().unwrap()]);
        if no_roots {
            // rustls-native-certs reads these instead of the system store when set.
            let empty = dir.path().join("no-cas");
            std::fs::create_dir_all(&empty).unwrap();
            cmd.env("SSL_CERT_FILE", empty.join("none.pem"))
                .env("SSL_CERT_DIR", &empty);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let warning = "key `routes.cloud.tls`: tls = \"verify\" checks certificates against the \
                   system's trusted CAs, and this machine has none";
    assert!(!run(false).contains(warning), "this machine has CAs");
    let out = run(true);
    assert!(out.contains(warning), "{out}");
    assert!(!out.contains("routes.onprem.tls"), "{out}");
}
