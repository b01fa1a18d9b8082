//! Files holding mail or addresses are owner-only whatever the umask (issue 24, item 7).
//!
//! This binary sets the umask of its process to 022 (the usual one outside the systemd unit)
//! before it starts anything: the umask is process-wide, so these tests live in a binary of
//! their own. The relay then runs end to end (a message accepted and delivered, a batch
//! applied and rolled back, a batch scheduled and one applied at its time, a restart), and
//! every file and folder it wrote under the spool and the directory store must have no bit
//! for the group or others. A spool left 0644 by an earlier version is reported by
//! `check-config` and in the log of `serve`.
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::bin::{cli, write_config, NOWHERE};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The umask every test here runs under.
fn umask_022() {
    // SAFETY: umask(2) cannot fail and touches no memory; the value is process-wide, which
    // is why this binary holds only tests that want this same value.
    unsafe {
        libc::umask(0o022);
    }
}

/// Every path under `root` (itself included) with its mode.
fn walk(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), m.permissions().mode() & 0o7777));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn in_seconds(s: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(s))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn post(api: std::net::SocketAddr, path: &str, body: &[u8]) -> String {
    let (code, _, text) = http(api, "POST", path, Some(TOKEN), Some("text/csv"), body).await;
    assert_eq!(code, 200, "{path}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_store_and_scheduled_batches_are_owner_only_under_umask_022() {
    umask_022();
    // The umask is in force: a file made the ordinary way is readable by others.
    let probe = tempfile::tempdir().unwrap();
    std::fs::write(probe.path().join("plain"), b"x").unwrap();
    let plain = std::fs::metadata(probe.path().join("plain")).unwrap();
    assert_eq!(plain.permissions().mode() & 0o777, 0o644);

    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();

    // Mail accepted and delivered on both routes.
    let r = send_one(h.addr, &["alice@nhs.test", "bob@nhs.test"], "modes").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.onprem, 1).await;
    wait(&h.cloud, 1).await;

    // A batch, its rollback (undo records), a batch scheduled far ahead and one due at once.
    let reply = post(
        api,
        "/v1/directory/batches?state=cloud&source=weekend.csv",
        b"address\ndave@nhs.test\n",
    )
    .await;
    let id: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let id = id["id"].as_u64().expect("batch id");
    post(api, &format!("/v1/directory/batches/{id}/rollback"), b"").await;
    let later = format!(
        "/v1/directory/batches?state=cloud&source=later.csv&at={}",
        in_seconds(3600)
    );
    post(api, &later, b"address\nalice@nhs.test\n").await;
    let soon = format!(
        "/v1/directory/batches?state=cloud&source=soon.csv&at={}",
        in_seconds(1)
    );
    post(api, &soon, b"address\ndave@nhs.test\n").await;
    eventually_async("the due batch to be applied", || async {
        let (_, _, list) = http(
            api,
            "GET",
            "/v1/directory/scheduled",
            Some(TOKEN),
            None,
            b"",
        )
        .await;
        if list.contains("\"applied\"") {
            Ok(())
        } else {
            Err(list)
        }
    })
    .await;
    h.settled().await;
    // A restart writes the snapshot and opens every file again.
    let h = h.restart().await;
    let r = send_one(h.addr, &["carol@nhs.test"], "after restart").await;
    assert_eq!(r.code, 250, "{r:?}");
    wait(&h.cloud, 2).await;
    h.settled().await;

    let spool = h.dir.path().join("spool");
    let store = h.dir.path().join("directory-store");
    let mut all = walk(&spool);
    all.extend(walk(&store));
    let names: Vec<String> = all.iter().map(|(p, _)| p.display().to_string()).collect();
    for want in [
        "/spool/segments/",
        "/spool/failed",
        "/spool/damaged",
        "/spool/coexist.lock",
        "/directory-store/changes.log",
        "/directory-store/snapshot.bin",
        "/directory-store/scheduled/",
        "/directory-store/coexist.lock",
    ] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "nothing like {want} in {names:#?}"
        );
    }
    let open: Vec<String> = all
        .iter()
        .filter(|(_, m)| m & 0o077 != 0)
        .map(|(p, m)| format!("{} {m:04o}", p.display()))
        .collect();
    assert!(open.is_empty(), "readable by group or others: {open:#?}");
    for (p, m) in &all {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{}", p.display());
    }
}

#[test]
fn check_config_warns_about_a_spool_an_earlier_version_left_readable() {
    umask_022();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), NOWHERE, NOWHERE);
    let spool = cfg.config.spool.dir.clone();
    // What an earlier version left under umask 022: folders 0755, a segment 0644.
    std::fs::create_dir_all(spool.join("segments")).unwrap();
    std::fs::write(spool.join("segments/0000000001.seg"), b"").unwrap();
    let (ok, out, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{out}{err}");
    let want = format!(
        "warning: spool.dir {}: 3 file(s) or folder(s) readable by group or others",
        spool.display()
    );
    assert!(out.contains(&want), "want {want:?} in {out}");
    assert!(
        out.contains(&format!("run `chmod -R go-rwx {}`", spool.display())),
        "{out}"
    );

    // Once tightened, nothing to say.
    let ok = std::process::Command::new("chmod")
        .args(["-R", "go-rwx", spool.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (ok, out, err) = cli(&cfg.path, &["check-config"]);
    assert!(ok, "{out}{err}");
    assert!(!out.contains("readable by group"), "{out}");
}
