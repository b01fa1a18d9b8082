//! The directory from a real OpenLDAP server carrying the Exchange attributes (issue 14):
//! 10,000 mailboxes synced at start, a mailbox moved in LDAP sent to the cloud next hop at
//! its routing address after the next delta sync, a new mailbox picked up, and the server
//! stopped: known recipients still routed, unknown ones deferred with `451 4.4.3` until it
//! is back.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use coexist::config::LdapConfig;
use common::slapd::{self, Slapd};
use common::*;
use ldap3::{LdapConnAsync, Mod};
use std::collections::HashSet;

const USERS: usize = 10_000;

fn ldap_config(url: &str) -> LdapConfig {
    toml::from_str(&format!(
        r#"
url = "{url}"
bind_dn = "{}"
password = "{}"
base_dn = "ou=people,{}"
flavor = "openldap"
sync_interval = "1s"
# The fixture's slapd speaks plain LDAP on loopback (tests/ldap_secrets.rs covers TLS).
allow_plaintext_bind = true
"#,
        slapd::ROOT_DN,
        slapd::ROOT_PW,
        slapd::SUFFIX
    ))
    .unwrap()
}

async fn admin(url: &str) -> ldap3::Ldap {
    let (conn, mut ldap) = LdapConnAsync::new(url).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(slapd::ROOT_DN, slapd::ROOT_PW)
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap
}

fn lookup(h: &Harness, a: &str) -> (Option<String>, String) {
    let l = h
        .relay
        .directory
        .lookup(&coexist::types::Address::parse(a, true).unwrap());
    (l.state, l.origin)
}

/// While the source is down: a recipient the directory does not know gets `451 4.4.3`, a
/// `known` one is accepted. Returns the session, in its transaction.
async fn unknown_deferred(h: &Harness, known: &str) -> Client<tokio::net::TcpStream> {
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@corp.test>").await;
    assert_eq!((r.code, r.status()), (451, "4.4.3"), "{r:?}");
    c.expect(&format!("RCPT TO:<{known}>"), 250).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mailboxes_follow_active_directory_attributes_and_survive_the_server_going_down() {
    let mut entries = String::new();
    for i in 0..USERS {
        let ldif = if i % 2 == 0 {
            slapd::user_ldif(i, "1", None)
        } else {
            slapd::user_ldif(
                i,
                "2147483648",
                Some(&format!("user{i}@tenant.mail.onmicrosoft.com")),
            )
        };
        entries.push_str(&ldif);
        entries.push('\n');
    }
    let mut server = tokio::task::spawn_blocking(move || Slapd::start(&entries))
        .await
        .unwrap();
    let url = server.url();
    let h = harness(|c| {
        let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
        c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
        c.directory.file = None;
        c.directory.unknown = coexist::config::Unknown::Reject;
        c.directory.ldap = Some(ldap_config(&url));
        c.routes.get_mut("cloud").unwrap().rewrite_domain = Some(d("tenant.mail.onmicrosoft.com"));
    })
    .await;

    // The first full sync ran before the relay listened: every mailbox, aliases included.
    assert_eq!(h.relay.directory.len(), 2 * USERS);
    let (state, origin) = lookup(&h, "user0@corp.test");
    assert_eq!(state.as_deref(), Some("onprem"));
    assert!(origin.starts_with("ldap modifyTimestamp "), "{origin}");
    assert_eq!(lookup(&h, "U1@Trust.test").0.as_deref(), Some("cloud"));
    let r = send_one(h.addr, &["user0@corp.test"], "before-move").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.onprem, 1).await;

    // The mailbox moves: Active Directory turns it into a remote mailbox.
    let mut ldap = admin(&url).await;
    ldap.modify(
        &format!("cn=user0,ou=people,{}", slapd::SUFFIX),
        vec![
            Mod::Replace(
                "msExchRecipientTypeDetails",
                HashSet::from([REMOTE_MAILBOX]),
            ),
            Mod::Replace("msExchRemoteRecipientType", HashSet::from(["4"])),
            Mod::Replace(
                "targetAddress",
                HashSet::from(["SMTP:jdoe.user0@tenant.mail.onmicrosoft.com"]),
            ),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    eventually("the move after a delta sync", || {
        lookup(&h, "u0@trust.test").0.as_deref() == Some("cloud")
    })
    .await;
    assert!(lookup(&h, "user0@corp.test")
        .1
        .starts_with("ldap modifyTimestamp "));
    // Mail to its secondary address goes to the cloud next hop, at the mailbox's own
    // routing address (not the rewritten secondary address Exchange Online would refuse).
    let r = send_one(h.addr, &["u0@trust.test"], "after-move").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.cloud, 1).await;
    let got: Vec<String> = h.cloud.state.messages()[0]
        .rcpts
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(got, vec!["jdoe.user0@tenant.mail.onmicrosoft.com"]);

    // A new mailbox appears with the next delta sync.
    ldap.add(
        &format!("cn=user{USERS},ou=people,{}", slapd::SUFFIX),
        vec![
            (
                "objectClass",
                HashSet::from(["inetOrgPerson", "msExchRecipient"]),
            ),
            ("cn", HashSet::from(["newuser"])),
            ("sn", HashSet::from(["New"])),
            ("msExchRecipientTypeDetails", HashSet::from(["1"])),
            ("proxyAddresses", HashSet::from(["SMTP:new@corp.test"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    eventually("the new mailbox", || {
        lookup(&h, "new@corp.test").0.as_deref() == Some("onprem")
    })
    .await;

    // The server goes away: the state in force stays; unknown recipients are deferred.
    // (Blocking briefly: kill, then wait for the process.)
    server.stop();
    eventually("the source to be seen down", || {
        h.relay.directory.source_down()
    })
    .await;
    let mut c = unknown_deferred(&h, "user2@corp.test").await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: during outage\r\n\r\nHello.\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.code, 250);
    wait(&h.onprem, 2).await;

    // Back: unknown recipients are refused again.
    server.run();
    eventually("the source to be healthy again", || {
        !h.relay.directory.source_down()
    })
    .await;
    let mut c = connect(h.addr).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<x@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@corp.test>").await;
    assert_eq!((r.code, r.status()), (550, "5.1.1"), "{r:?}");
    drop(server);
}

/// With `[fleet]`, one node at a time syncs LDAP (an advisory lock) and commits what changed
/// to the fleet log: every node routes by it, and every node defers unknown recipients while
/// the source is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_fleet_one_node_syncs_and_every_node_follows() {
    let mut entries = String::new();
    for i in 0..100 {
        entries.push_str(&slapd::user_ldif(i, "1", None));
        entries.push('\n');
    }
    let mut server = tokio::task::spawn_blocking(move || Slapd::start(&entries))
        .await
        .unwrap();
    let url = server.url();
    let schema = common::pg::Schema::new("ldap").await;
    let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
    let fleet_node = |name: &'static str| {
        let (url, schema) = (url.clone(), schema.name.clone());
        move |c: &mut coexist::config::Config| {
            c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
            c.directory.file = None;
            c.directory.unknown = coexist::config::Unknown::Reject;
            c.directory.ldap = Some(ldap_config(&url));
            c.fleet = Some(common::fleet::member(&common::pg::url(), &schema, name));
        }
    };
    let a = harness(fleet_node("mx1")).await;
    let b = harness(fleet_node("mx2")).await;
    for h in [&a, &b] {
        eventually("the LDAP base on every node", || {
            lookup(h, "user0@corp.test").0.as_deref() == Some("onprem")
        })
        .await;
    }
    set_type(&url, 7..8, REMOTE_MAILBOX).await;
    for h in [&a, &b] {
        eventually("the move on every node", || {
            let (state, origin) = lookup(h, "u7@trust.test");
            state.as_deref() == Some("cloud") && origin.starts_with("ldap modifyTimestamp ")
        })
        .await;
    }
    server.stop();
    for h in [&a, &b] {
        eventually("every node to see the source down", || {
            h.relay.directory.source_down()
        })
        .await;
        unknown_deferred(h, "user7@corp.test").await;
    }
    drop(server);
}

/// `msExchRecipientTypeDetails` of a remote (Exchange Online) user mailbox.
const REMOTE_MAILBOX: &str = "2147483648";
/// `msExchRecipientTypeDetails` of a mail contact (not a mailbox).
const CONTACT: &str = "64";

/// Sets `msExchRecipientTypeDetails` of `cn=user{i}` for each `i` in `users` to `value`
/// (e.g. [`REMOTE_MAILBOX`]: the mailbox moved; [`CONTACT`]: the next delta sync drops it).
async fn set_type(url: &str, users: std::ops::Range<usize>, value: &str) {
    let mut ldap = admin(url).await;
    for i in users {
        ldap.modify(
            &format!("cn=user{i},ou=people,{}", slapd::SUFFIX),
            vec![Mod::Replace(
                "msExchRecipientTypeDetails",
                HashSet::from([value]),
            )],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    }
    let _ = ldap.unbind().await;
}

/// Issue 23 item 6b: a sync refused by `directory.max_shrink` is tried again at the next
/// sync, not only when the source changes again: once the limit is raised (a config
/// reload), the following sync applies the source as it is, with no change in LDAP.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_refused_by_max_shrink_is_retried_at_the_next_sync() {
    let mut entries = String::new();
    for i in 0..50 {
        entries.push_str(&slapd::user_ldif(i, "1", None));
        entries.push('\n');
    }
    let server = tokio::task::spawn_blocking(move || Slapd::start(&entries))
        .await
        .unwrap();
    let url = server.url();
    let h = harness(|c| {
        let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
        c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
        c.directory.file = None;
        c.directory.unknown = coexist::config::Unknown::Reject;
        c.directory.ldap = Some(ldap_config(&url));
    })
    .await;
    assert_eq!(h.relay.directory.len(), 100);

    // 10 of 50 mailboxes stop being mailboxes: 20% of the addresses, above the 10% limit.
    set_type(&url, 0..10, CONTACT).await;
    eventually("the sync refused by the shrink guard", || {
        h.relay.directory.reload_status().last_result.as_deref() == Some("refused_shrink")
    })
    .await;
    assert_eq!(lookup(&h, "user3@corp.test").0.as_deref(), Some("onprem"));

    // The admin raises the limit (what a config reload does); LDAP does not change again.
    h.relay
        .directory
        .set_max_shrink(coexist::config::Percent::parse("50%").unwrap());
    // The directory is swapped in before the sync's status is recorded: wait for both.
    eventually("the source applied at a later sync, and its status", || {
        lookup(&h, "user3@corp.test").0.is_none()
            && h.relay.directory.reload_status().last_result.as_deref() == Some("ok")
    })
    .await;
    assert_eq!(h.relay.directory.len(), 80);
    drop(server);
}

/// A node of an LDAP fleet in `schema`, named `name`.
fn ldap_fleet_node(
    url: String,
    schema: String,
    name: &'static str,
) -> impl FnOnce(&mut coexist::config::Config) {
    move |c: &mut coexist::config::Config| {
        let d = |s: &str| coexist::types::Domain::parse(s, false).unwrap();
        c.server.accepted_domains = vec![d("corp.test"), d("trust.test")];
        c.directory.file = None;
        c.directory.unknown = coexist::config::Unknown::Reject;
        c.directory.ldap = Some(ldap_config(&url));
        c.fleet = Some(common::fleet::member(&common::pg::url(), &schema, name));
    }
}

fn api(h: &Harness) -> coexist::admin::client::AdminClient {
    coexist::admin::client::AdminClient::new(h.relay.admin_addr.unwrap(), TOKEN.to_string())
}

/// Issue 23 items 6a and 6c: in an LDAP fleet, a batch's move survives the mailbox's
/// primary address being renamed in LDAP (every sync that changes something is a new
/// base), and the batch can still be rolled back after those bases: the mailbox it moved
/// and nothing changed since goes back, one whose state LDAP changed since keeps LDAP's,
/// on every node, a node started afterwards included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_fleet_a_batch_survives_renames_and_syncs_and_rolls_back() {
    let mut entries = String::new();
    for i in 0..20 {
        entries.push_str(&slapd::user_ldif(i, "1", None));
        entries.push('\n');
    }
    let server = tokio::task::spawn_blocking(move || Slapd::start(&entries))
        .await
        .unwrap();
    let url = server.url();
    let schema = common::pg::Schema::new("ldapbatch").await;
    let a = harness(ldap_fleet_node(url.clone(), schema.name.clone(), "mx1")).await;
    let b = harness(ldap_fleet_node(url.clone(), schema.name.clone(), "mx2")).await;
    for h in [&a, &b] {
        eventually("the LDAP base on every node", || {
            lookup(h, "user5@corp.test").0.as_deref() == Some("onprem")
        })
        .await;
    }

    // A batch moves user5 and user6 to the cloud.
    let reply = {
        let api = api(&a);
        tokio::task::spawn_blocking(move || {
            api.directory_apply(&coexist::admin::client::BatchUpload {
                body: b"EmailAddress\nuser5@corp.test\nuser6@corp.test\n",
                source: "wave1.csv",
                state: Some("cloud"),
                dry_run: false,
                at: None,
                format: Default::default(),
            })
            .unwrap()
        })
        .await
        .unwrap()
    };
    let batch = reply.report.id.expect("committed");
    assert_eq!(reply.report.changed, 2);

    // In LDAP: user5's primary address is renamed (the old one kept as a secondary, as
    // Exchange does); user6 becomes a remote mailbox (LDAP itself says cloud now).
    let mut ldap = admin(&url).await;
    ldap.modify(
        &format!("cn=user5,ou=people,{}", slapd::SUFFIX),
        vec![Mod::Replace(
            "proxyAddresses",
            HashSet::from([
                "SMTP:jane.doe@corp.test",
                "smtp:user5@corp.test",
                "smtp:u5@trust.test",
            ]),
        )],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    set_type(&url, 6..7, REMOTE_MAILBOX).await;
    for h in [&a, &b] {
        eventually("the renamed mailbox still where the batch put it", || {
            lookup(h, "jane.doe@corp.test") == (Some("cloud".into()), format!("batch {batch}"))
                && lookup(h, "user6@corp.test").1.starts_with("ldap ")
        })
        .await;
    }

    // The rollback, from the other node, after those LDAP bases.
    let rb = {
        let api = api(&b);
        tokio::task::spawn_blocking(move || {
            api.directory_rollback(batch).map_err(|e| e.to_string())
        })
        .await
        .unwrap()
        .unwrap()
    };
    assert_eq!(
        (rb.report.changed, rb.report.changed_since),
        (1, 1),
        "{rb:?}"
    );
    let c = harness(ldap_fleet_node(url.clone(), schema.name.clone(), "mx3")).await;
    for h in [&a, &b, &c] {
        eventually("the rollback on every node", || {
            lookup(h, "u5@trust.test").0.as_deref() == Some("onprem")
                && lookup(h, "user6@corp.test").0.as_deref() == Some("cloud")
        })
        .await;
        // The same state on every node. (The origin's wording may differ: a node started
        // from a later base does not know that change 1 was a base.)
        assert_eq!(
            lookup(h, "jane.doe@corp.test").0,
            lookup(&a, "jane.doe@corp.test").0
        );
    }
    let again = {
        let api = api(&c);
        tokio::task::spawn_blocking(move || api.directory_rollback(batch).unwrap_err().to_string())
            .await
            .unwrap()
    };
    assert!(again.contains("already rolled back"), "{again}");
    drop(server);
}
