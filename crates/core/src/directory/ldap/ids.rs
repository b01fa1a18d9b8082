//! The entry ids the LDAP source knows, kept across restarts: `ldap-ids` in the directory's
//! store folder, written after each full read the directory took (one line per entry:
//! `id TAB primary address`, after a header naming the directory change it matches). At
//! start-up it is read back and brought up to date from the deltas logged since (each
//! carries its entries' ids), so a deletion seen after a restart finds its mailbox without
//! a full read. Written whole to a temporary file, fsynced and renamed: a crash leaves the
//! old file or the new one. A file that cannot be read, or a change log that no longer
//! holds every delta since, only costs one full read.
//!
//! Runs on the blocking pool (the caller's `spawn_blocking`).

use super::Mailbox;
use crate::directory::delta::Delta;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

/// The file's name in the store folder.
const NAME: &str = "ldap-ids";
/// Its first line.
const MAGIC: &str = "coexist ldap-ids 1";

/// Writes `ids` as matching directory change `change`.
pub fn save(dir: &Path, change: u32, ids: &HashMap<String, String>) -> std::io::Result<()> {
    let tmp = dir.join(format!("{NAME}.tmp"));
    let mut w = std::io::BufWriter::with_capacity(1 << 20, crate::fsmode::create(&tmp)?);
    writeln!(w, "{MAGIC} {change}")?;
    for (id, primary) in ids {
        if id.contains(['\t', '\n']) || primary.contains(['\t', '\n']) {
            continue;
        }
        writeln!(w, "{id}\t{primary}")?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(NAME))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the ids and the change they match (`None`: no file, or not one of ours).
pub fn load(dir: &Path) -> Option<(u32, HashMap<String, String>)> {
    let f = std::fs::File::open(dir.join(NAME)).ok()?;
    let mut lines = std::io::BufReader::with_capacity(1 << 20, f).lines();
    let head = lines.next()?.ok()?;
    let change = head.strip_prefix(MAGIC)?.trim().parse().ok()?;
    let mut ids = HashMap::new();
    for line in lines {
        let line = line.ok()?;
        let (id, primary) = line.split_once('\t')?;
        ids.insert(id.to_string(), primary.to_string());
    }
    Some((change, ids))
}

/// Brings `ids` up to date with `deltas` (logged after the file's change).
pub fn replay(ids: &mut HashMap<String, String>, deltas: &[Delta]) {
    for d in deltas {
        for e in &d.entries {
            let Some(id) = &e.key else { continue };
            match e.after.as_ref().and_then(|m: &Mailbox| m.addresses.first()) {
                Some(p) => {
                    ids.insert(id.clone(), p.clone());
                }
                None => {
                    ids.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::delta::DeltaEntry;

    #[test]
    fn ids_round_trip_and_follow_the_deltas_since() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = HashMap::new();
        ids.insert("g1".to_string(), "a@corp.test".to_string());
        ids.insert("g2".to_string(), "b@corp.test".to_string());
        save(dir.path(), 7, &ids).unwrap();
        let (change, mut back) = load(dir.path()).unwrap();
        assert_eq!((change, &back), (7, &ids));
        let m = |a: &str| Mailbox {
            addresses: vec![a.into()],
            route: "cloud".into(),
            routing: None,
        };
        replay(
            &mut back,
            &[Delta {
                cursor: None,
                entries: vec![
                    DeltaEntry {
                        key: Some("g1".into()),
                        before: None,
                        after: None,
                    },
                    DeltaEntry {
                        key: Some("g3".into()),
                        before: None,
                        after: Some(m("c@corp.test")),
                    },
                ],
            }],
        );
        assert_eq!(back.len(), 2);
        assert_eq!(back["g3"], "c@corp.test");
        assert!(load(&dir.path().join("nowhere")).is_none());
    }
}
