//! What the admin API acts on in the running relay, as a trait.
//!
//! The relay (the composition root) starts the admin API, so the admin API must not import
//! the relay back: that would make the two one tangle in which neither can be read, built or
//! tested alone. Instead the admin API states here what it needs (the config in force,
//! reload, drain, session count, the queue and the directory) and `relay::Control`
//! implements it, as `relay::RelayHandler` implements the session's `smtp::Handler`.

use crate::config::Config;
use crate::directory::Directory;
use crate::queue::Queue;
use std::sync::Arc;

/// Why a reload was refused, as the relay reports it (the API shows its text).
pub type ReloadRefused = Box<dyn std::error::Error + Send + Sync>;

/// Reload, drain and status of the running relay, and the parts the API reads.
pub trait Controls: Send + Sync + 'static {
    /// The config in force.
    fn config(&self) -> Arc<Config>;
    /// Re-reads and swaps in the config file; the names of the sections that changed.
    /// Blocking (reads files): call it off the async runtime's workers.
    fn reload(&self) -> Result<Vec<String>, ReloadRefused>;
    /// Turns drain mode on or off.
    fn set_draining(&self, on: bool);
    /// True while draining.
    fn draining(&self) -> bool;
    /// SMTP sessions open now.
    fn open_sessions(&self) -> usize;
    /// The scheduler.
    fn queue(&self) -> &Queue;
    /// The live directory.
    fn directory(&self) -> &Arc<Directory>;
    /// The fleet this node belongs to (`[fleet]`), if any.
    fn fleet(&self) -> Option<&crate::fleet::Fleet>;
    /// Batches scheduled for later (`directory apply --at`).
    fn scheduled(&self) -> &Arc<crate::directory::scheduled::ScheduleStore>;
}
