//! Reloads the directory when its file changes on disk (inotify via the notify crate).
//! Editors and `mv` replace the file, so the parent directory is watched and events are
//! filtered by name; bursts of events are collapsed into one reload.

use super::Directory;
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

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

/// Starts watching `file` for `directory`. Must be called inside a tokio runtime.
pub fn spawn(directory: Arc<Directory>, file: &std::path::Path) -> notify::Result<FileWatch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let name = file.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
            {
                let _ = tx.send(());
            }
        }
    })?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    watcher.watch(&parent, RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let the writer finish, then take every event that came meanwhile.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while rx.try_recv().is_ok() {}
            if !directory.source_changed() {
                continue;
            }
            let dir = directory.clone();
            // Outcomes (and refusals) are logged by the directory itself.
            if let Err(e) = tokio::task::spawn_blocking(move || dir.reload_file(false)).await {
                warn!(error = %e, "directory reload task failed");
            }
        }
    });
    Ok(FileWatch {
        _watcher: watcher,
        task,
    })
}
