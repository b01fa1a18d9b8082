//! Reloads the directory when its file changes on disk (inotify via the notify crate).
//!
//! Only a complete file is loaded. A file is complete when its writer closes it
//! (`IN_CLOSE_WRITE`) or when a file is renamed into its place (`IN_MOVED_TO`), the way
//! postmap and most tools replace a file. Plain writes (`IN_MODIFY`) and the creation of a
//! new, still empty file only mean that a writer is at work: reloading then could load a file
//! cut at a row boundary, which parses, and would drop every mailbox after the cut (their
//! queued mail would take the default route and the states batches gave them would be lost
//! when the full file returns). Safest for writers: write a new file, then rename it over the
//! old one. A reload that would remove more than `directory.max_shrink` of the addresses is
//! refused anyway ([`Directory::reload_file`], through the directory's writer).
//!
//! Editors and `mv` replace the file, so the parent directory is watched and events are
//! filtered by name; a burst of events (a close followed by a rename) is collapsed into one
//! reload.

use super::{Directory, DirectoryWriter, WriteError};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How long a burst of events may take before the reload (an editor's close, then rename).
const SETTLE: Duration = Duration::from_millis(200);

/// What a file-system event means for the directory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Not about the file, or nothing to act on.
    None,
    /// Written in place or newly created: a writer is at work, the file may be partial.
    Writing,
    /// Closed by its writer, or renamed into place: the file is complete.
    Complete,
}

/// Classifies `ev` for the file named `name` in the watched directory.
pub fn classify(ev: &notify::Event, name: &OsStr) -> Change {
    let is = |p: &Path| p.file_name() == Some(name);
    let any = || ev.paths.iter().any(|p| is(p));
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) if any() => Change::Complete,
        // A rename into place: `To` carries the new name; `Both` carries (from, to).
        EventKind::Modify(ModifyKind::Name(RenameMode::To))
            if ev.paths.first().is_some_and(|p| is(p)) =>
        {
            Change::Complete
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both))
            if ev.paths.get(1).is_some_and(|p| is(p)) =>
        {
            Change::Complete
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Any)) if any() => Change::Complete,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) | EventKind::Create(_)
            if any() =>
        {
            Change::Writing
        }
        // The kernel dropped events: look at the file again (the shrink limit still applies).
        _ if ev.need_rescan() => Change::Complete,
        _ => Change::None,
    }
}

/// Keeps the watch alive; dropping it stops watching.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `file` for `directory`; a complete new file is reloaded through
/// `writer`. Must be called inside a tokio runtime.
pub fn spawn(
    directory: Arc<Directory>,
    writer: Arc<dyn DirectoryWriter>,
    file: &Path,
) -> notify::Result<FileWatch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            match classify(&ev, &name) {
                Change::None => {}
                c => {
                    let _ = tx.send(c);
                }
            }
        }
    })?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    watcher.watch(&parent, RecursiveMode::NonRecursive)?;
    let shown = file.display().to_string();
    let task = tokio::spawn(async move {
        // A writer is at work on the file (logged once per write).
        let mut writing = false;
        while let Some(change) = rx.recv().await {
            if change == Change::Writing {
                if !writing {
                    info!(file = %shown, "directory file is being written in place; it is reloaded when the writer closes it (safer: write a new file, then rename it over the old one)");
                    writing = true;
                }
                continue;
            }
            // Complete. Take the rest of a burst; if a new write started after the close,
            // wait for that one to be closed too.
            writing = false;
            tokio::time::sleep(SETTLE).await;
            while let Ok(c) = rx.try_recv() {
                writing = c == Change::Writing;
            }
            if writing || !directory.source_changed() {
                continue;
            }
            // Outcomes (and refusals) are logged by the directory itself.
            if let Err(WriteError::Task(e)) = writer.reload(false).await {
                warn!(error = %e, "directory reload task failed");
            }
        }
    });
    Ok(FileWatch {
        _watcher: watcher,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange};

    fn ev(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        for p in paths {
            e = e.add_path(p.into());
        }
        e
    }

    #[test]
    fn only_a_closed_or_renamed_file_is_complete() {
        let name = OsStr::new("d.csv");
        let c = |kind, paths: &[&str]| classify(&ev(kind, paths), name);
        let close = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(c(close, &["/x/d.csv"]), Change::Complete);
        assert_eq!(c(close, &["/x/other.csv"]), Change::None);
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(c(to, &["/x/d.csv"]), Change::Complete);
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(c(both, &["/x/d.csv.new", "/x/d.csv"]), Change::Complete);
        assert_eq!(
            c(both, &["/x/d.csv", "/x/d.csv~"]),
            Change::None,
            "renamed away (an editor's backup)"
        );
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert_eq!(c(from, &["/x/d.csv"]), Change::None);
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(c(data, &["/x/d.csv"]), Change::Writing);
        assert_eq!(
            c(EventKind::Create(CreateKind::File), &["/x/d.csv"]),
            Change::Writing
        );
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert_eq!(c(open, &["/x/d.csv"]), Change::None);
    }
}
