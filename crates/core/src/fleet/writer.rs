//! The directory writer of a fleet node ([`FleetWriter`]): every change is committed to the
//! fleet's log in PostgreSQL first, then applied by every node (see [`super::commit`]);
//! batches for later are kept in PostgreSQL and applied once by whichever node is live at
//! their time ([`super::scheduled`]). The relay chooses it at start instead of the single
//! node's [`crate::directory::LocalWriter`]; its callers do not know which they hold.

use super::{Fleet, FleetError};
use crate::directory::batch::BatchRow;
use crate::directory::delta::Delta;
use crate::directory::scheduled::{ScheduleStore, Scheduled};
use crate::directory::writer::{DirectoryWriter, FleetBatch, LaterBatch, Write, Written};
use crate::directory::{ReloadReport, WriteError};
use crate::types::RouteName;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

impl From<FleetError> for WriteError {
    fn from(e: FleetError) -> WriteError {
        match e {
            FleetError::Directory(d) => WriteError::Directory(d),
            e if e.is_unreachable() => WriteError::Unreachable(Box::new(e)),
            e => WriteError::Refused(Box::new(e)),
        }
    }
}

/// The writer of a fleet node.
pub struct FleetWriter {
    fleet: Fleet,
    /// This node's own scheduled batches (kept before it joined the fleet), moved into the
    /// fleet's schedule by the scheduler.
    local: Arc<ScheduleStore>,
}

impl FleetWriter {
    /// The writer of `fleet`; `local` holds the batches this node kept on disk before.
    pub fn new(fleet: Fleet, local: Arc<ScheduleStore>) -> FleetWriter {
        FleetWriter { fleet, local }
    }
}

impl DirectoryWriter for FleetWriter {
    fn apply(&self, rows: Vec<BatchRow>, source: String, dry_run: bool) -> Write<'_, Written> {
        Box::pin(async move {
            if dry_run {
                // A preview: what it would change on this node's directory, as on a single node.
                let d = self.fleet.inner.directory.clone();
                let report =
                    tokio::task::spawn_blocking(move || d.apply(&rows, &source, true)).await??;
                return Ok(Written {
                    report,
                    progress: None,
                });
            }
            let (report, progress) = self.fleet.apply(rows, source).await?;
            Ok(Written { report, progress })
        })
    }

    fn rollback(&self, id: u32) -> Write<'_, Written> {
        Box::pin(async move {
            let (report, p) = self.fleet.rollback(id).await?;
            Ok(Written {
                report,
                progress: Some(p),
            })
        })
    }

    fn reload(&self, force: bool) -> Write<'_, ReloadReport> {
        // The directory's source on a fleet node refuses (and the refusal is kept for
        // status like any other): the fleet's base comes from `directory import`.
        let d = self.fleet.inner.directory.clone();
        Box::pin(
            async move { Ok(tokio::task::spawn_blocking(move || d.reload_file(force)).await??) },
        )
    }

    fn delta(&self, delta: Delta, source: String, force: bool) -> Write<'_, ReloadReport> {
        Box::pin(async move { Ok(self.fleet.commit_delta(delta, source, force).await?) })
    }

    fn import(&self, text: Vec<u8>, source: String, force: bool) -> Write<'_, FleetBatch> {
        Box::pin(async move { Ok(self.fleet.import(text, source, force).await?) })
    }

    fn schedule(&self, b: LaterBatch) -> Write<'_, Scheduled> {
        Box::pin(async move {
            Ok(self
                .fleet
                .schedule(b.body, b.source, b.state, b.format, b.at)
                .await?)
        })
    }

    fn scheduled(&self) -> Write<'_, Vec<Scheduled>> {
        Box::pin(async move { Ok(self.fleet.scheduled().await?) })
    }

    fn cancel_scheduled(&self, id: u32) -> Write<'_, Scheduled> {
        Box::pin(async move { Ok(self.fleet.cancel_scheduled(id).await?) })
    }

    fn run_scheduler(
        self: Arc<Self>,
        states: Vec<RouteName>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(super::scheduled::run(
            self.fleet.clone(),
            states,
            self.local.clone(),
        ))
    }
}
