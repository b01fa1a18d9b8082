//! Scheduled batches: `coexist directory apply FILE --at 2026-11-28T22:00Z` keeps the batch
//! and applies it at that time, once.
//!
//! Each one is two files under `directory.store_dir/scheduled/`: `ID.csv` (the batch file as
//! uploaded) and `ID.json` (when, its target state and format, and its status), both written
//! to a temporary name, fsynced and renamed, so a restart finds every scheduled batch whole.
//! The status moves from `pending` to `applied` (with the change id) or `failed` (with why),
//! or to `cancelled` (or `moved`, into a fleet's schedule). A batch due while the relay was stopped is applied at the next start.
//! Applying is idempotent in effect (mailboxes already in the target state are left alone),
//! so a crash between applying and recording it applies nothing twice.
//!
//! This store and [`run`] serve a single node. In a fleet (`[fleet]`) the same records live
//! in PostgreSQL instead (`crate::fleet::scheduled`): any node lists and cancels them, and
//! whichever node is live at a batch's time claims it in the transaction that commits it
//! to the fleet log, so it is applied once across the fleet even when the node that took it
//! is down. A fleet node moves pending batches it finds here (kept before it joined, or by
//! an earlier version) into the fleet's schedule once, marking them `moved`.

use super::{io_err, DirectoryError};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a scheduled batch stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum Status {
    /// Waiting for its time.
    Pending,
    /// Applied as change `change` (`None`: it changed nothing) at `time`.
    Applied {
        /// The change id it became.
        change: Option<u32>,
        /// RFC 3339.
        time: String,
    },
    /// Could not be applied (a row no longer valid, PostgreSQL down past its time, …).
    Failed {
        /// Why.
        error: String,
        /// RFC 3339.
        time: String,
    },
    /// Cancelled by an admin before its time.
    Cancelled {
        /// RFC 3339.
        time: String,
    },
    /// Kept on this node before it was in a fleet (or by an earlier version), then moved to
    /// the fleet's schedule in PostgreSQL, where it is batch `to`.
    Moved {
        /// Its id in the fleet's schedule.
        to: u32,
        /// RFC 3339.
        time: String,
    },
}

/// A scheduled batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Scheduled {
    /// Its id (not a change id: it gets one when applied).
    pub id: u32,
    /// When to apply it (RFC 3339, UTC).
    pub at: String,
    /// Unix seconds of `at`.
    pub at_unix: i64,
    /// The batch file's name.
    pub source: String,
    /// Target state, when the file has no `state` column.
    pub state: Option<String>,
    /// Batch file format (`auto`, or an Exchange report format).
    #[serde(default = "auto")]
    pub format: String,
    /// RFC 3339 time it was scheduled.
    pub created: String,
    /// In a fleet: the node it was scheduled on (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where it stands.
    #[serde(flatten)]
    pub status: Status,
}

fn auto() -> String {
    "auto".into()
}

/// A `--at` that is not a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a time: give it as 2026-11-28T22:00Z or 2026-11-28T23:00:00+01:00")]
pub struct BadTime(pub String);

/// Parses `--at`: RFC 3339 (`2026-11-28T22:00:00Z`, `2026-11-28T23:00:00+01:00`) or the short
/// `2026-11-28T22:00Z` form; returns Unix seconds and the normalized UTC text.
pub fn parse_at(text: &str) -> Result<(i64, String), BadTime> {
    let t = text.trim();
    let parsed = chrono::DateTime::parse_from_rfc3339(t).or_else(|_| {
        // `…T22:00Z` or `…T22:00+01:00` (no seconds): add them.
        let (main, zone) = t.split_at(t.len() - zone_len(t));
        let fixed = match main.find('T') {
            Some(i) if main[i..].matches(':').count() == 1 => format!("{main}:00{zone}"),
            _ => t.to_string(),
        };
        chrono::DateTime::parse_from_rfc3339(&fixed)
    });
    match parsed {
        Ok(d) => {
            let utc = d.with_timezone(&chrono::Utc);
            Ok((
                utc.timestamp(),
                utc.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ))
        }
        Err(_) => Err(BadTime(text.to_string())),
    }
}

/// Length of the zone suffix of `t` (`Z` or `+01:00`).
fn zone_len(t: &str) -> usize {
    if t.ends_with(['Z', 'z']) {
        1
    } else if t.len() > 6 && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') {
        6
    } else {
        0
    }
}

/// The scheduled batches of a single node, on disk.
pub struct ScheduleStore {
    dir: PathBuf,
    lock: Mutex<()>,
}

#[allow(clippy::disallowed_methods)] // Blocking store: used through the writer's blocking tasks.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), DirectoryError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = crate::fsmode::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[allow(clippy::disallowed_methods)] // Blocking store: used through the writer's blocking tasks.
impl ScheduleStore {
    /// Opens (creating) `dir`.
    pub fn open(dir: &Path) -> Result<ScheduleStore, DirectoryError> {
        crate::fsmode::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(ScheduleStore {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    /// Every scheduled batch, by id.
    pub fn list(&self) -> Result<Vec<Scheduled>, DirectoryError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let path = e.map_err(io_err(&self.dir))?.path();
            if path.extension().is_some_and(|x| x == "json") {
                let text = fs::read(&path).map_err(io_err(&path))?;
                let s: Scheduled =
                    serde_json::from_slice(&text).map_err(|e| DirectoryError::Row {
                        file: path.display().to_string(),
                        line: e.line(),
                        reason: e.to_string(),
                    })?;
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Keeps `body` to be applied at `at_unix` (`at` its text); returns the record.
    pub fn add(
        &self,
        body: &[u8],
        source: &str,
        state: Option<&str>,
        format: &str,
        (at_unix, at): (i64, String),
    ) -> Result<Scheduled, DirectoryError> {
        let _l = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.list()?.iter().map(|s| s.id).max().unwrap_or(0) + 1;
        let s = Scheduled {
            id,
            at,
            at_unix,
            source: source.to_string(),
            state: state.map(str::to_string),
            format: format.to_string(),
            created: super::changes::now_rfc3339(),
            node: None,
            status: Status::Pending,
        };
        write_atomic(&self.dir, &format!("{id}.csv"), body)?;
        self.save(&s)?;
        Ok(s)
    }

    fn save(&self, s: &Scheduled) -> Result<(), DirectoryError> {
        let json = serde_json::to_vec_pretty(s).unwrap_or_default();
        write_atomic(&self.dir, &format!("{}.json", s.id), &json)
    }

    /// The batch file of `id`.
    pub fn body(&self, id: u32) -> Result<Vec<u8>, DirectoryError> {
        let p = self.dir.join(format!("{id}.csv"));
        fs::read(&p).map_err(io_err(&p))
    }

    /// Sets the status of `id`; only a pending batch changes (`Err` otherwise).
    pub fn settle(&self, id: u32, status: Status) -> Result<Scheduled, DirectoryError> {
        let _l = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self
            .list()?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| DirectoryError::Batch(format!("no scheduled batch {id}")))?;
        if s.status != Status::Pending {
            return Err(DirectoryError::Batch(format!(
                "scheduled batch {id} is not pending ({})",
                serde_json::to_value(&s.status)
                    .ok()
                    .and_then(|v| v.get("status").and_then(|x| x.as_str()).map(str::to_string))
                    .unwrap_or_default()
            )));
        }
        s.status = status;
        self.save(&s)?;
        Ok(s)
    }

    /// Pending batches due at `now` (Unix seconds), oldest first.
    pub fn due(&self, now: i64) -> Result<Vec<Scheduled>, DirectoryError> {
        let mut v: Vec<Scheduled> = self
            .list()?
            .into_iter()
            .filter(|s| s.status == Status::Pending && s.at_unix <= now)
            .collect();
        v.sort_by_key(|s| (s.at_unix, s.id));
        Ok(v)
    }
}

/// Applies due batches until the process ends: looks every second, applies what is due
/// (oldest first) through `writer` (a single node's [`super::writer::LocalWriter`]), and
/// records the outcome. A batch the writer could not apply for a reason of its own (a task
/// that failed) is tried again; one it refused is recorded as failed.
pub async fn run(
    store: std::sync::Arc<ScheduleStore>,
    states: Vec<crate::types::RouteName>,
    writer: std::sync::Arc<dyn super::writer::DirectoryWriter>,
) {
    use super::writer::WriteError;
    let mut retrying = false;
    loop {
        let now = crate::clock::now_utc().timestamp();
        let due = {
            let st = store.clone();
            tokio::task::spawn_blocking(move || st.due(now))
                .await
                .unwrap_or_else(|e| Err(DirectoryError::Batch(e.to_string())))
        };
        match due {
            Err(e) => tracing::error!(error = %e, "scheduled batches: cannot read them"),
            Ok(due) => {
                for s in due {
                    let rows = {
                        let (st, s, states) = (store.clone(), s.clone(), states.clone());
                        tokio::task::spawn_blocking(move || {
                            let body = st.body(s.id)?;
                            let format = s
                                .format
                                .parse::<super::batch::BatchFormat>()
                                .map_err(|e| DirectoryError::Batch(e.to_string()))?;
                            super::batch::read(
                                format,
                                &body,
                                &s.source,
                                &states,
                                s.state.as_deref(),
                            )
                            .map(|b| b.rows)
                        })
                        .await
                    };
                    let outcome = match rows {
                        Err(e) => Err(WriteError::Task(e)),
                        Ok(Err(e)) => Err(WriteError::Directory(e)),
                        Ok(Ok(rows)) => writer
                            .apply(rows, s.source.clone(), false)
                            .await
                            .map(|w| w.report.id),
                    };
                    let time = super::changes::now_rfc3339();
                    let status = match outcome {
                        Ok(change) => {
                            retrying = false;
                            tracing::info!(scheduled = s.id, change, source = %s.source, "scheduled batch applied");
                            Status::Applied { change, time }
                        }
                        Err(e @ (WriteError::Task(_) | WriteError::Unreachable(_))) => {
                            let why = e.to_string();
                            if !retrying {
                                tracing::warn!(
                                    scheduled = s.id,
                                    why,
                                    "scheduled batch due but cannot be applied now; retrying"
                                );
                                retrying = true;
                            }
                            break;
                        }
                        Err(e) => {
                            let error = e.to_string();
                            tracing::error!(scheduled = s.id, error, "scheduled batch failed");
                            Status::Failed { error, time }
                        }
                    };
                    let (st, id) = (store.clone(), s.id);
                    let settled = tokio::task::spawn_blocking(move || st.settle(id, status))
                        .await
                        .unwrap_or_else(|e| Err(DirectoryError::Batch(e.to_string())));
                    if let Err(e) = settled {
                        tracing::error!(scheduled = s.id, error = %e, "scheduled batch: cannot record its outcome");
                    }
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_the_forms_admins_type() {
        assert_eq!(
            parse_at("2026-11-28T22:00Z").unwrap().1,
            "2026-11-28T22:00:00Z"
        );
        assert_eq!(
            parse_at("2026-11-28T23:00:00+01:00").unwrap().1,
            "2026-11-28T22:00:00Z"
        );
        assert_eq!(
            parse_at("2026-11-28T22:00+01:00").unwrap().1,
            "2026-11-28T21:00:00Z"
        );
        let e = parse_at("saturday").unwrap_err();
        assert_eq!(e, BadTime("saturday".into()));
        assert!(e.to_string().contains("is not a time"), "{e}");
    }

    #[test]
    fn a_batch_is_kept_listed_settled_once_and_survives_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let st = ScheduleStore::open(tmp.path()).unwrap();
        let a = st
            .add(
                b"EmailAddress\na@nhs.test\n",
                "a.csv",
                Some("cloud"),
                "auto",
                parse_at("2026-11-28T22:00Z").unwrap(),
            )
            .unwrap();
        let b = st
            .add(
                b"EmailAddress\nb@nhs.test\n",
                "b.csv",
                Some("cloud"),
                "auto",
                parse_at("2026-11-27T22:00Z").unwrap(),
            )
            .unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        let st = ScheduleStore::open(tmp.path()).unwrap();
        assert_eq!(st.list().unwrap().len(), 2);
        let due = st.due(parse_at("2026-11-28T22:00Z").unwrap().0).unwrap();
        assert_eq!(
            due.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![2, 1],
            "oldest first"
        );
        assert_eq!(st.body(1).unwrap(), b"EmailAddress\na@nhs.test\n");
        st.settle(2, Status::Cancelled { time: "t".into() })
            .unwrap();
        assert!(
            st.settle(2, Status::Pending).is_err(),
            "only pending batches change"
        );
        st.settle(
            1,
            Status::Applied {
                change: Some(7),
                time: "t".into(),
            },
        )
        .unwrap();
        assert!(st.due(i64::MAX).unwrap().is_empty());
    }
}
