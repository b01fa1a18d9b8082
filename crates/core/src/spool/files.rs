//! The spool's blocking file work, in one type: reading records back by position and
//! keeping messages in `failed/` ([`SpoolFiles`]).
//!
//! Nothing here may run on an async worker. Async code reaches it only through the
//! [`super::Spool`] methods that run it on tokio's blocking pool (`read_message`,
//! `read_envelope`, `read_queued`, `blocking`); code that already runs on a blocking thread
//! (a `spawn_blocking` closure, the queue's listings for the admin API, tests) may use it
//! directly through [`super::Spool::files`]. Writes to the log go through the commit
//! thread ([`super::commit`]), never through here.
#![allow(clippy::disallowed_methods)] // The blocking boundary: only ever run off the async workers.

use super::{io_err, json, DeliveryState, Envelope, Loc, Reader, SpoolError};
use crate::types::QueueId;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The spool's files, read and written with blocking calls (see the module doc).
#[derive(Debug)]
pub struct SpoolFiles {
    reader: Reader,
    failed: PathBuf,
}

impl SpoolFiles {
    /// The files of the spool under `dir`.
    pub(super) fn new(dir: &Path) -> SpoolFiles {
        SpoolFiles {
            reader: Reader::new(dir),
            failed: dir.join("failed"),
        }
    }

    /// The reader of the log's records.
    pub(super) fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Reads a queued message's envelope (a few hundred bytes).
    pub fn read_envelope(&self, msg: Loc) -> Result<Envelope, SpoolError> {
        self.reader.read_envelope(msg)
    }

    /// Reads a message's state record.
    pub fn read_state(&self, state: Loc) -> Result<DeliveryState, SpoolError> {
        self.reader.read_state(state)
    }

    /// Reads a queued message's bytes, checked against their checksum.
    pub fn read_message(&self, msg: Loc) -> Result<Vec<u8>, SpoolError> {
        self.reader.read_message(msg)
    }

    /// Reads a queued message's envelope and latest state (a fresh state when it has no
    /// state record yet), checked to belong together.
    pub fn read_queued(
        &self,
        msg: Loc,
        state: Option<Loc>,
    ) -> Result<(Envelope, DeliveryState), SpoolError> {
        let env = self.read_envelope(msg)?;
        let st = match state {
            Some(l) => self.read_state(l)?,
            None => DeliveryState::new(env.rcpts.len()),
        };
        if st.rcpts.len() != env.rcpts.len() {
            return Err(SpoolError::Corrupt {
                path: format!("segment {} at offset {}", msg.seg, msg.off),
                reason: "state record does not match the envelope".into(),
            });
        }
        Ok((env, st))
    }

    /// Keeps a message with failed recipients that cannot be bounced in `failed/` for the
    /// admin (`ID.msg`: envelope line and message; `ID.state`), durably. The caller then
    /// [`finish`](super::Spool::finish)es it in the log.
    pub fn keep_failed(
        &self,
        env: &Envelope,
        message: &[u8],
        state: &DeliveryState,
    ) -> Result<(), SpoolError> {
        // (`message` may be a note in place of bytes that could not be read back.)
        let id = QueueId::from_file_stem(env.id.as_str()).ok_or_else(|| SpoolError::Corrupt {
            path: self.failed.display().to_string(),
            reason: format!("queue id {:?} is not a file name", env.id.as_str()),
        })?;
        let write = |name: String, parts: &[&[u8]]| -> Result<(), SpoolError> {
            let path = self.failed.join(name);
            let mut f = crate::fsmode::create(&path).map_err(io_err(&path))?;
            for p in parts {
                f.write_all(p).map_err(io_err(&path))?;
            }
            f.sync_data().map_err(io_err(&path))
        };
        let mut line = json(env)?;
        line.push(b'\n');
        write(format!("{id}.msg"), &[&line, message])?;
        write(format!("{id}.state"), &[&json(state)?])?;
        File::open(&self.failed)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&self.failed))
    }
}
