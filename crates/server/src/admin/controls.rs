//! What the admin API acts on in the running relay, as a trait.
//!
//! The relay (the composition root) starts the admin API, so the admin API must not import
//! the relay back: that would make the two one tangle in which neither can be read, built or
//! tested alone. Instead the admin API states here what it needs (the config in force,
//! reload, drain, session count, the queue, its outcome sink, the outbound side, the
//! directory and its writer) and `relay::Control`
//! implements it, as `relay::RelayHandler` implements the session's `smtp::Handler`.

use crate::config::Config;
use crate::deliver::states::HopState;
use crate::deliver::Transport;
use crate::directory::Directory;
use crate::queue::recorder::Recorder;
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
    /// What the queue reports outcomes to: the recent outcomes (`coexist trace`) and the
    /// per-minute rates (the console).
    fn outcomes(&self) -> &Recorder;
    /// The tracking log, when it is on.
    fn tracking(&self) -> Option<&std::sync::Arc<crate::tracking::Tracking>>;
    /// The outbound side: the next hops' states.
    fn outbound(&self) -> &Transport;
    /// The spool's commit counters (syncs, records) and segment files.
    fn spool_stats(&self) -> (u64, u64, usize);
    /// Every configured next hop with its state, from the outbound side and the
    /// scheduler's route health.
    fn hop_states(&self) -> Vec<HopState> {
        self.outbound()
            .hop_states(&self.config(), &self.queue().routes_down())
    }
    /// The live directory.
    fn directory(&self) -> &Arc<Directory>;
    /// The fleet this node belongs to (`[fleet]`), if any: its status, for reading only
    /// (directory changes go through [`Controls::writer`]).
    fn fleet(&self) -> Option<&crate::fleet::Fleet>;
    /// This node's shadow side (`[shadow]`), if any: copies, lease, takeovers.
    fn shadow(&self) -> Option<&Arc<crate::shadow::Shadowing>>;
    /// Where directory changes go (this node's directory, or the fleet's log), chosen at
    /// start: batches, rollbacks, reloads, imports and batches for later.
    fn writer(&self) -> &Arc<dyn crate::directory::DirectoryWriter>;
}
