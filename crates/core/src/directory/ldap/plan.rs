//! What a round means for the directory ([`Plan`]), worked out against the directory in
//! force, and what the source records once the directory took it ([`LdapSource::advance`]):
//! entry ids, cursor, health.

use super::{
    delta, now, Delta, DeltaEntry, Directory, Found, LdapHealth, LdapSource, Mailbox, Round,
};
use crate::directory::store::Fingerprint;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a round asks of the directory.
#[derive(Debug)]
pub enum Plan {
    /// Nothing changed.
    Nothing,
    /// Load every mailbox whole (the directory is empty: a first start).
    Whole,
    /// Apply these rows.
    Delta(Delta),
    /// A deletion of an entry this source does not know yet: a full read must decide.
    NeedFull(String),
}

impl LdapSource {
    /// What the directory must do with `round` (see [`Plan`]). Nothing is recorded until
    /// [`LdapSource::advance`].
    pub fn plan(&self, dir: &Directory, round: &Round) -> Plan {
        let mark = round.cursor.mark(self.flavor);
        let cursor = Some(round.cursor.encode());
        match &round.found {
            Found::Full(all) => {
                if dir.is_empty() {
                    let mut c = self.content();
                    c.whole = Some(Arc::new(all.clone()));
                    c.fingerprint = Fingerprint {
                        len: all.len() as u64,
                        mtime_ns: u64::from(crc32fast::hash(mark.as_bytes())),
                    };
                    c.mark = mark;
                    return Plan::Whole;
                }
                let mut d = dir.diff_full(all);
                d.cursor = cursor;
                if d.is_empty() {
                    Plan::Nothing
                } else {
                    Plan::Delta(d)
                }
            }
            Found::Changes { changed, deleted } => {
                let c = self.content();
                let mut queries = Vec::with_capacity(changed.len());
                let mut keep = Vec::with_capacity(changed.len());
                let none: Option<Mailbox> = None;
                for id in deleted {
                    if c.ids.contains_key(id) {
                        queries.push(vec![c.ids[id].clone()]);
                        keep.push((id, &none));
                    } else if !c.complete {
                        return Plan::NeedFull(format!(
                            "entry {id} was deleted, and this source has not read every entry since it started (it may have been a mailbox)"
                        ));
                    }
                }
                for (id, now) in changed {
                    let mut q: Vec<String> = c.ids.get(id).cloned().into_iter().collect();
                    match now {
                        // A new entry (every id is known): a new mailbox, even if it took
                        // an address of another one.
                        Some(_) if q.is_empty() && c.complete => {}
                        // Unknown since this process started: the mailbox that holds its
                        // addresses, if any, is it.
                        Some(m) => q.extend(m.addresses.iter().cloned()),
                        // Not a mailbox, and never one this source knew of.
                        None if q.is_empty() && c.complete => continue,
                        // Not a mailbox now, and this process has not read every entry:
                        // it may have been one (its addresses cleared while the relay was
                        // down); only a full read can tell.
                        None if q.is_empty() => {
                            return Plan::NeedFull(format!(
                                "entry {id} is no longer a mailbox, and this source has not read every entry since it started (it may have been one)"
                            ))
                        }
                        None => {}
                    }
                    queries.push(q);
                    keep.push((id, now));
                }
                drop(c);
                let before = dir.source_mailboxes(&queries);
                let entries: Vec<DeltaEntry> = keep
                    .into_iter()
                    .zip(before)
                    .filter(|((_, now), before)| match (now, before) {
                        (None, None) => false,
                        (Some(a), Some(b)) => !delta::same(a, b),
                        _ => true,
                    })
                    .map(|((id, now), before)| DeltaEntry {
                        key: Some(id.clone()),
                        before,
                        after: now.clone(),
                    })
                    .collect();
                if entries.is_empty() {
                    Plan::Nothing
                } else {
                    Plan::Delta(Delta { cursor, entries })
                }
            }
        }
    }

    /// Records a round the directory took (applied, or nothing to apply): its ids, its
    /// cursor, and health.
    pub fn advance(&self, round: &Round) {
        let mark = round.cursor.mark(self.flavor);
        let known = {
            let mut c = self.content();
            match &round.found {
                Found::Full(all) => {
                    c.ids = all
                        .iter()
                        .filter_map(|(id, m)| Some((id.clone(), m.addresses.first()?.clone())))
                        .collect();
                    c.complete = true;
                }
                Found::Changes { changed, deleted } => {
                    for id in deleted {
                        c.ids.remove(id);
                    }
                    for (id, now) in changed {
                        match now.as_ref().and_then(|m| m.addresses.first()) {
                            Some(p) => {
                                c.ids.insert(id.clone(), p.clone());
                            }
                            None => {
                                c.ids.remove(id);
                            }
                        }
                    }
                }
            }
            c.mark = mark.clone();
            c.ids.len()
        };
        let was = self.healthy.swap(true, Ordering::SeqCst);
        metrics::gauge!(crate::metrics::DIRECTORY_SOURCE_UP).set(1.0);
        if !was {
            tracing::info!(mailboxes = known, mark, "directory: LDAP source healthy");
        }
        let full = matches!(round.found, Found::Full(_));
        let mut h = self.health_mut();
        let last_full = if full {
            Some(now())
        } else {
            h.last_full_sync.clone()
        };
        *h = LdapHealth {
            healthy: true,
            mailboxes: known,
            mark,
            last_sync: Some(now()),
            last_full_sync: last_full,
            usn: round.cursor.usn,
            invocation_id: round.cursor.invocation.clone(),
            timestamp: round.cursor.timestamp.clone(),
            error: None,
            error_since: None,
            failures: 0,
            next_try: None,
        };
    }
}
