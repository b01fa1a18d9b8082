//! The start-up checks that `coexist serve` and `coexist check-config` share.
//!
//! [`check`] is the one list. [`crate::relay::start_with_file`] calls it before it opens
//! anything, and `check-config` calls it and stops there, so a config that passes
//! `check-config` does not then fail these checks in `serve`, and a failure reads the same in
//! both (the [`StartError`] that `serve` prints). The checks write nothing: they read files
//! and, to test a folder, create and remove an empty probe file in it.
//!
//! In the order `serve` meets them:
//!
//! 1. The config is valid: a [`Config`] only exists validated ([`Config::load`] names file,
//!    line and key), including the admin token's strength and the listen address rule.
//! 2. The inbound certificate and key load (the acceptor is kept for `serve`).
//! 3. The TLS material of every route loads (CA file, client certificate and key).
//! 4. The admin API could start: a clear-text listener is on loopback (or explicitly
//!    allowed), its TLS certificate and key load when set, the token is strong (and its
//!    file owner-only), and a missing `admin.token_file` can be written.
//! 5. `spool.dir` and its folders are writable (or can be created).
//! 6. `directory.store_dir` is writable (or can be created), and, where it is the default
//!    (`directory/` under `spool.dir`) and holds no store yet, no store of an earlier version
//!    waits at the former default `var/directory`: starting afresh there would drop the
//!    batches that store holds, so the start is refused with what to set.
//! 7. Not a failure, a warning: files and folders under `spool.dir` and
//!    `directory.store_dir` that the group or others may read (an earlier version created
//!    them 0644 and 0755; see [`crate::fsmode`]). `serve` logs them, `check-config` prints
//!    them; neither changes a mode.
//!
//! The directory file itself is parsed once, by [`crate::directory::Directory::open`] when
//! `serve` starts (with a snapshot from an earlier run, a bad file there is logged and the
//! snapshot stays in force, as for a live reload); `check-config` parses it with
//! [`dry_run_directory`], which is that same load without the table, and reports a bad row
//! in the same words.
//!
//! Not checked before start: whether the listen addresses can be bound (a running server
//! holds them) and whether next hops answer.
#![allow(clippy::disallowed_methods)] // Start-up checks (`serve`, `check-config`), before anything is served.

use crate::config::Config;
use crate::deliver::tls::RouteTls;
use crate::directory::{DirectoryError, FileSource, Source};
use crate::spool::SpoolError;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use tokio_rustls::TlsAcceptor;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] crate::certs::TlsError),
    /// Spool unusable.
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    /// The outbound side could not be set up (outbound TLS files, DNS).
    #[error("delivery: {0}")]
    Delivery(#[from] crate::deliver::SetupError),
    /// Directory unusable.
    #[error("directory: {0}")]
    Directory(#[from] crate::directory::DirectoryError),
    /// The fleet could not be joined.
    #[error("fleet: {0}")]
    Fleet(#[from] crate::fleet::FleetError),
    /// The shadow copies (NATS JetStream) could not be set up.
    #[error("shadow: {0}")]
    Shadow(#[from] crate::shadow::ShadowError),
    /// The tracking log's folder could not be opened.
    #[error("tracking log {0}: {1}")]
    Tracking(std::path::PathBuf, std::io::Error),
    /// The admin API could not start.
    #[error("admin API: {0}")]
    Admin(#[from] crate::admin::AdminError),
    /// A listen address could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    /// A start-up task failed.
    #[error("start-up task failed: {0}")]
    Task(String),
    /// The spool or the directory store is in use by another process.
    #[error("{0}")]
    Lock(#[from] crate::dirlock::LockError),
}

/// What the checks found that `serve` uses or an admin should know.
pub struct Preflight {
    /// The inbound TLS acceptor, when `[tls]` is set.
    pub acceptor: Option<TlsAcceptor>,
    /// Each route's outbound TLS settings, loaded once here and handed to the queue.
    pub route_tls: HashMap<String, RouteTls>,
    /// `admin.token_file` when it does not exist yet: `serve` will write a fresh token there.
    pub new_token_file: Option<PathBuf>,
    /// Warnings about files and folders holding mail or addresses that the group or others
    /// may read (check 7), one per folder.
    pub readable: Vec<String>,
}

impl std::fmt::Debug for Preflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preflight")
            .field("acceptor", &self.acceptor.is_some())
            .field("routes_with_tls", &self.route_tls.len())
            .field("new_token_file", &self.new_token_file)
            .field("readable", &self.readable)
            .finish()
    }
}

/// Runs every start-up check on `config` (see the module docs); the first failure is the
/// error `serve` would stop with.
pub fn check(config: &Config) -> Result<Preflight, StartError> {
    let acceptor = match &config.tls {
        Some(t) => Some(crate::smtp::tls::load_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let route_tls =
        crate::deliver::tls::route_tls(config).map_err(crate::deliver::SetupError::from)?;
    let new_token_file = match &config.admin {
        Some(admin) => match crate::admin::check(admin)? {
            Some(path) => {
                let parent = path.parent().unwrap_or(Path::new(""));
                writable_dir(parent).map_err(|source| {
                    crate::admin::AdminError::Token(crate::admin::token::TokenError::File {
                        path: path.clone(),
                        source,
                    })
                })?;
                Some(path)
            }
            None => None,
        },
        None => None,
    };
    let spool = &config.spool.dir;
    for dir in std::iter::once(spool.clone()).chain(crate::spool::FOLDERS.map(|f| spool.join(f))) {
        writable_dir(&dir).map_err(|source| SpoolError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let store = &config.directory.store_dir;
    writable_dir(store).map_err(|source| DirectoryError::Io {
        file: store.display().to_string(),
        source,
    })?;
    legacy_store(config)?;
    Ok(Preflight {
        acceptor,
        route_tls,
        new_token_file,
        readable: readable(config),
    })
}

/// Check 7: the warnings for `spool.dir` and `directory.store_dir` (the store once when it
/// lies under the spool, as by default).
fn readable(config: &Config) -> Vec<String> {
    let spool = &config.spool.dir;
    let store = &config.directory.store_dir;
    let mut roots = vec![("spool.dir", spool)];
    if !store.starts_with(spool) {
        roots.push(("directory.store_dir", store));
    }
    roots
        .into_iter()
        .filter_map(|(key, root)| {
            crate::fsmode::exposed(root).map(|e| crate::fsmode::warning(key, root, &e))
        })
        .collect()
}

/// Check 6's second half: `directory.store_dir` at its default, empty, while the default of
/// earlier versions (`var/directory`, from the working directory) holds a store.
fn legacy_store(config: &Config) -> Result<(), DirectoryError> {
    use crate::config::{DEFAULT_STORE_FOLDER, LEGACY_STORE_DIR};
    let store = &config.directory.store_dir;
    let has_store = |dir: &Path| {
        ["changes.log", "snapshot.bin", "fleet"]
            .iter()
            .any(|f| dir.join(f).exists())
    };
    let legacy = Path::new(LEGACY_STORE_DIR);
    if *store != config.spool.dir.join(DEFAULT_STORE_FOLDER) || has_store(store) {
        return Ok(());
    }
    if !has_store(legacy) {
        return Ok(());
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    Err(DirectoryError::Batch(format!(
        "directory.store_dir is not set and now defaults to {store} (under spool.dir), which holds no directory store, while {old} (the default of earlier versions, in {cwd}) does: set directory.store_dir = \"{LEGACY_STORE_DIR}\" to keep its batches, or move that folder to {store}",
        store = store.display(),
        old = LEGACY_STORE_DIR,
        cwd = cwd.display(),
    )))
}

/// Loads the directory file as `serve` does at its first start, and drops the table: the
/// number of addresses, or the error `serve` would stop with (a bad row names file and line).
pub fn dry_run_directory(config: &Config) -> Result<usize, StartError> {
    let Some(path) = config.directory.file.clone() else {
        // A fleet node without a file: its directory comes from PostgreSQL.
        return Ok(0);
    };
    let source = FileSource { path };
    let parsed = source.load(&config.route_names())?;
    Ok(parsed.table.len())
}

/// Checks that `dir` is a folder this process can create files in; when it does not exist
/// yet, the same of the nearest folder above it, where it would be created.
pub fn writable_dir(dir: &Path) -> io::Result<()> {
    let mut at = dir;
    loop {
        let here = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        match std::fs::metadata(here) {
            Ok(m) if m.is_dir() => return probe(here),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is a file, not a folder", here.display()),
                ))
            }
            // Not there, or a file stands in the way higher up: look further up.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                match at.parent() {
                    Some(p) => at = p,
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates and removes an empty file in `dir`.
fn probe(dir: &Path) -> io::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".coexist-preflight-{}-{n}", std::process::id());
    let path = dir.join(name);
    let why = |e: io::Error| io::Error::new(e.kind(), format!("cannot write in it: {e}"));
    crate::fsmode::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(why)?;
    std::fs::remove_file(&path).map_err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_folder_is_checked_where_it_would_be_created() {
        let tmp = tempfile::tempdir().unwrap();
        writable_dir(&tmp.path().join("a/b/c")).unwrap();
        assert!(!tmp.path().join("a").exists(), "nothing is created");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_in_the_way_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let e = writable_dir(&file.join("spool")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
        assert!(
            e.to_string()
                .contains(&format!("{} is a file", file.display())),
            "{e}"
        );
    }

    #[test]
    fn a_relative_folder_is_checked_against_the_working_directory() {
        writable_dir(Path::new("no-such-folder-here/x")).unwrap();
    }
}
