//! The directory from a real Active Directory domain controller (Samba 4.17's AD DC, see
//! `tests/common/samba.rs`), read by a non-admin service account over StartTLS with a test
//! CA (issue 29): full and delta rounds, deletions and cleared addresses leaving at the next
//! delta, a mailbox with more addresses than one range, a restart that goes on from its
//! cursor, the DC down (`451 4.4.3`, the current reason in status), a restored DC (new
//! `invocationId`: a full read), a wrong password that never locks the account out, a DC
//! that refuses a plain bind, and a fleet whose LDAP delta is one change of its rows.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::LdapConfig;
use common::samba::{self, Dc, Options};
use common::*;
use ldap3::{LdapConnAsync, LdapConnSettings, Mod};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

const USERS: &str = "CN=Users,DC=corp,DC=test";

fn config(url: &str, dc: &Dc, password_file: &Path, extra: &str) -> LdapConfig {
    toml::from_str(&format!(
        r#"
url = "{url}"
tls_ca_file = "{ca}"
bind_dn = "{svc}"
password_file = "{pw}"
base_dn = "{USERS}"
sync_interval = "1s"
page_size = 25
range_size = 10
timeout = "10s"
{extra}
"#,
        ca = dc.ca.display(),
        svc = samba::SVC_DN,
        pw = password_file.display(),
    ))
    .unwrap()
}

/// An administrator's connection (StartTLS with the test CA).
async fn admin(dc: &Dc) -> ldap3::Ldap {
    let pem = std::fs::read(&dc.ca).unwrap();
    let roots = coexist::certs::roots_from_pem(&pem).unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let settings = LdapConnSettings::new()
        .set_starttls(true)
        .set_config(Arc::new(tls));
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &dc.url())
        .await
        .unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(samba::ADMIN_DN, samba::ADMIN_PW)
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap
}

fn lookup(h: &Harness, a: &str) -> (Option<String>, Option<String>, String) {
    let l = h
        .relay
        .directory
        .lookup(&coexist::types::Address::parse(a, true).unwrap());
    (l.state, l.mailbox, l.origin)
}

fn health(h: &Harness) -> coexist::directory::ldap::LdapHealth {
    h.relay.directory.ldap_health().expect("an LDAP source")
}

fn domains(c: &mut coexist::config::Config) {
    let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
    c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
    c.directory.file = None;
    c.directory.unknown = coexist::config::Unknown::Reject;
}

async fn modify(ldap: &mut ldap3::Ldap, user: &str, mods: Vec<Mod<&str>>) {
    ldap.modify(&format!("CN={user},{USERS}"), mods)
        .await
        .unwrap()
        .success()
        .unwrap();
}

/// Adds `CN=name` with these addresses and recipient type.
async fn add_user(ldap: &mut ldap3::Ldap, name: &str, addresses: Vec<String>, kind: &str) {
    let addresses: HashSet<&str> = addresses.iter().map(String::as_str).collect();
    ldap.add(
        &format!("CN={name},{USERS}"),
        vec![
            ("objectClass", HashSet::from(["user"])),
            ("sAMAccountName", HashSet::from([name])),
            ("proxyAddresses", addresses),
            ("msExchRecipientTypeDetails", HashSet::from([kind])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
}

/// Restarts `h`'s relay with the LDAP source's ids file removed while it is stopped.
async fn restart_without_ids(h: Harness) -> Harness {
    let cfg = h.relay.control.config();
    let Harness {
        relay,
        onprem,
        cloud,
        dir,
        certs,
        ..
    } = h;
    drop(relay);
    std::fs::remove_file(cfg.directory.store_dir.join("ldap-ids")).unwrap();
    let relay = coexist::relay::start((*cfg).clone()).await.unwrap();
    Harness {
        addr: relay.local_addrs[0],
        relay,
        onprem,
        cloud,
        dir,
        certs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_directory_deltas_deletions_ranges_restart_outage_and_restore() {
    let mut dc = tokio::task::spawn_blocking(|| {
        Dc::start(Options {
            ip: "127.0.0.3",
            users: 200,
            strong_auth: false,
        })
    })
    .await
    .unwrap();
    let mut ldap = admin(&dc).await;
    // A shared mailbox with 41 addresses: read in ranges of 10 (`range_size`).
    let mut aliases = vec!["SMTP:shared@corp.test".to_string()];
    aliases.extend((0..40).map(|i| format!("smtp:alias{i:02}@corp.test")));
    add_user(&mut ldap, "shared", aliases, "4").await;
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), samba::SVC_PW).unwrap();
    let l = config(&dc.url(), &dc, pw.path(), "starttls = true");
    let h = harness(|c| {
        domains(c);
        c.directory.ldap = Some(l);
    })
    .await;

    // The first round (a full read) ran before the relay listened.
    assert_eq!(h.relay.directory.len(), 2 * 200 + 41);
    let (state, _, origin) = lookup(&h, "user0002@corp.test");
    assert_eq!(state.as_deref(), Some("onprem"));
    assert!(origin.starts_with("ldap usn "), "{origin}");
    assert_eq!(
        lookup(&h, "user0001@trust.test").0.as_deref(),
        Some("cloud")
    );
    let (_, mailbox, _) = lookup(&h, "alias39@corp.test");
    assert_eq!(
        mailbox.as_deref(),
        Some("shared@corp.test"),
        "the last range was read"
    );
    let first_full = health(&h).last_full_sync.clone();
    assert!(first_full.is_some());
    let r = send_one(h.addr, &["user0002@corp.test"], "before").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.onprem, 1).await;

    // Changes in AD: a move, a deletion, cleared addresses, a new user.
    modify(
        &mut ldap,
        "user0002",
        vec![
            Mod::Replace("msExchRecipientTypeDetails", HashSet::from(["2147483648"])),
            Mod::Replace(
                "targetAddress",
                HashSet::from(["SMTP:user0002@tenant.mail.onmicrosoft.com"]),
            ),
        ],
    )
    .await;
    ldap.delete(&format!("CN=user0004,{USERS}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    modify(
        &mut ldap,
        "user0006",
        vec![Mod::Delete("proxyAddresses", HashSet::new())],
    )
    .await;
    add_user(
        &mut ldap,
        "newbie",
        vec!["SMTP:newbie@corp.test".into()],
        "1",
    )
    .await;
    eventually("the changes at the next delta", || {
        lookup(&h, "user0002@corp.test").0.as_deref() == Some("cloud")
            && lookup(&h, "user0004@corp.test").0.is_none()
            && lookup(&h, "user0006@trust.test").0.is_none()
            && lookup(&h, "newbie@corp.test").0.as_deref() == Some("onprem")
    })
    .await;
    assert_eq!(
        health(&h).last_full_sync,
        first_full,
        "no full read was needed"
    );
    let kinds: Vec<_> = h
        .relay
        .directory
        .history_snapshot()
        .into_iter()
        .map(|c| c.kind)
        .collect();
    assert!(
        kinds.contains(&coexist::directory::store::ChangeKind::Delta),
        "{kinds:?}"
    );
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<user0004@corp.test>").await;
    assert_eq!((r.code, r.status()), (550, "5.1.1"), "deleted: {r:?}");
    drop(c);

    // A restart goes on from the cursor its last delta logged: no full read before listening.
    let h = h.restart().await;
    assert_eq!(lookup(&h, "user0002@corp.test").0.as_deref(), Some("cloud"));
    let after = health(&h);
    assert!(after.healthy && after.last_full_sync.is_none(), "{after:?}");
    assert!(
        after.usn.is_some() && after.invocation_id.is_some(),
        "{after:?}"
    );
    modify(
        &mut ldap,
        "user0008",
        vec![Mod::Replace(
            "msExchRecipientTypeDetails",
            HashSet::from(["2147483648"]),
        )],
    )
    .await;
    eventually("a delta after the restart", || {
        lookup(&h, "user0008@corp.test").0.as_deref() == Some("cloud")
    })
    .await;
    // A deletion after the restart: the ids kept with the last full read (and the deltas
    // logged since) place it, without a full read.
    ldap.delete(&format!("CN=user0010,{USERS}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    eventually("the deletion at the next delta", || {
        lookup(&h, "user0010@corp.test").0.is_none()
    })
    .await;
    assert_eq!(
        health(&h).last_full_sync,
        None,
        "no full read since the restart"
    );
    // Without those ids (the file lost), a deletion it cannot place makes one full read.
    let h = restart_without_ids(h).await;
    ldap.delete(&format!("CN=user0012,{USERS}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    eventually("the deletion, through a full read", || {
        lookup(&h, "user0012@corp.test").0.is_none() && health(&h).last_full_sync.is_some()
    })
    .await;
    let _ = ldap.unbind().await;

    // The DC goes down: known recipients routed, unknown ones deferred; the reason shown.
    dc.stop();
    eventually("the current reason in status", || {
        let l = health(&h);
        !l.healthy
            && l.error
                .as_deref()
                .is_some_and(|e| e.contains("cannot connect"))
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@corp.test>").await;
    assert_eq!((r.code, r.status()), (451, "4.4.3"), "{r:?}");
    c.expect("RCPT TO:<user0002@corp.test>", 250).await;
    drop(c);
    let api = coexist::admin::client::AdminClient::new(h.relay.admin_addr.unwrap(), TOKEN.into());
    let e = tokio::task::spawn_blocking(move || {
        (
            api.directory_lookup("nobody@corp.test").unwrap(),
            api.ready().unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(
        e.0.rcpt.starts_with("451 4.4.3"),
        "lookup tells the truth: {}",
        e.0.rcpt
    );
    let shown = e.1.directory_ldap.expect("LDAP health in /v1/ready");
    assert!(
        shown.error_since.is_some() && shown.next_try.is_some(),
        "{shown:?}"
    );

    // Restored from a backup: a new invocationId, so the next round reads everything.
    let before_full = health(&h).last_full_sync;
    let before_id = health(&h).invocation_id;
    let id = tokio::task::block_in_place(|| dc.restore());
    assert_ne!(before_id.as_deref(), Some(id.as_str()));
    tokio::task::block_in_place(|| dc.start_again());
    eventually("a full read of the restored DC", || {
        let l = health(&h);
        l.healthy
            && l.invocation_id.as_deref() == Some(id.as_str())
            && l.last_full_sync != before_full
    })
    .await;
    assert_eq!(lookup(&h, "user0002@corp.test").0.as_deref(), Some("cloud"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_never_locks_the_service_account_and_a_plain_bind_is_refused() {
    let dc = tokio::task::spawn_blocking(|| {
        Dc::start(Options {
            ip: "127.0.0.4",
            users: 20,
            strong_auth: true,
        })
    })
    .await
    .unwrap();
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), samba::SVC_PW).unwrap();

    // A DC that requires transport encryption: the reason says so.
    let plain = config(&dc.url(), &dc, pw.path(), "allow_plaintext_bind = true");
    let h = harness(|c| {
        domains(c);
        c.directory.ldap = Some(plain);
    })
    .await;
    eventually("the encryption reason", || {
        health(&h)
            .error
            .is_some_and(|e| e.contains("requires transport encryption"))
    })
    .await;
    drop(h);

    // A wrong password (lockout threshold 5): tried once, then held.
    std::fs::write(pw.path(), "not-the-password").unwrap();
    let l = config(&dc.ldaps_url(), &dc, pw.path(), "");
    let h = harness(|c| {
        domains(c);
        c.directory.ldap = Some(l);
    })
    .await;
    let e = health(&h).error.unwrap_or_default();
    assert!(e.contains("invalid credentials"), "{e}");
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    let mut ldap = admin(&dc).await;
    let (rs, _) = ldap
        .search(
            samba::SVC_DN,
            ldap3::Scope::Base,
            "(objectClass=*)",
            vec!["badPwdCount", "lockoutTime"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let e = ldap3::SearchEntry::construct(rs.into_iter().next().unwrap());
    let attr = |k: &str| {
        e.attrs
            .get(k)
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_else(|| "0".into())
    };
    assert_eq!(attr("badPwdCount"), "1", "one try in 12 s: {:?}", e.attrs);
    assert_eq!(attr("lockoutTime"), "0", "never locked: {:?}", e.attrs);
    assert!(health(&h).failures >= 1);

    // The admin fixes the password file: tried at once, no restart.
    std::fs::write(pw.path(), samba::SVC_PW).unwrap();
    eventually("the source back with the fixed password", || {
        let l = health(&h);
        l.healthy && h.relay.directory.len() == 40
    })
    .await;
    let _ = ldap.unbind().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_fleet_an_ldap_delta_is_one_change_of_its_rows_not_a_new_base() {
    let dc = tokio::task::spawn_blocking(|| {
        Dc::start(Options {
            ip: "127.0.0.5",
            users: 100,
            strong_auth: false,
        })
    })
    .await
    .unwrap();
    let pw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pw.path(), samba::SVC_PW).unwrap();
    let schema = common::pg::Schema::new("ad").await;
    let node = |name: &'static str| {
        let l = config(&dc.ldaps_url(), &dc, pw.path(), "");
        let schema = schema.name.clone();
        move |c: &mut coexist::config::Config| {
            domains(c);
            c.directory.ldap = Some(l);
            c.fleet = Some(common::fleet::member(&common::pg::url(), &schema, name));
        }
    };
    let a = harness(node("mx1")).await;
    let b = harness(node("mx2")).await;
    for h in [&a, &b] {
        eventually("the LDAP base on every node", || {
            lookup(h, "user0002@corp.test").0.as_deref() == Some("onprem")
        })
        .await;
    }
    let bases = schema
        .value("SELECT count(*) FROM changes WHERE kind = 'base'")
        .await;
    let mut ldap = admin(&dc).await;
    modify(
        &mut ldap,
        "user0002",
        vec![Mod::Replace(
            "msExchRecipientTypeDetails",
            HashSet::from(["2147483648"]),
        )],
    )
    .await;
    for h in [&a, &b] {
        eventually("the move on every node", || {
            lookup(h, "user0002@corp.test").0.as_deref() == Some("cloud")
        })
        .await;
    }
    let last = schema
        .value("SELECT kind || ' ' || rows FROM changes WHERE kind <> 'base' ORDER BY seq DESC LIMIT 1")
        .await;
    assert_eq!(last.as_deref(), Some("delta 1"), "one mailbox, one row");
    assert_eq!(
        schema
            .value("SELECT count(*) FROM changes WHERE kind = 'base'")
            .await,
        bases,
        "no new base"
    );
    let _ = ldap.unbind().await;
}
