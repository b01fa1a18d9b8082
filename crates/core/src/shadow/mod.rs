//! Shadow redundancy (`[shadow]`): no acknowledged message on one node only (DESIGN
//! invariant 13).
//!
//! - **A copy before 250.** The spool's [`Replica`](crate::spool::replica::Replica) is the
//!   [`store::Store`]: each message the spool stores is also published to a JetStream
//!   stream with `replicas` copies, in parallel with the local group commit; the session
//!   answers `250` only when both are done. No copy: `451 4.3.0` (`on_failure = "defer"`)
//!   or the local copy only (`"accept"`, counted, shown in readiness). Messages above
//!   JetStream's payload limit go in parts ([`wire`]).
//! - **The copy lives as long as the message.** The spool tells the store each state with
//!   final outcomes (which recipients a survivor must not send to again) and each finished
//!   message (its copy is removed; batched).
//! - **Takeover.** Every node renews a lease in the fleet's PostgreSQL
//!   ([`crate::fleet::leases`]) every `takeover_after / 6`. A node whose lease is older
//!   than `takeover_after` is dead: exactly one survivor claims its queue, takes each of
//!   its copies into its own spool (a new queue id; the envelope says where it came from)
//!   and delivers it as its own, records what it took, and removes the dead node's copy.
//! - **Fencing.** A node that has not renewed its lease for half of `takeover_after`
//!   closes its delivery gate ([`crate::queue::gate`]): it starts no delivery until it
//!   renews, so it has stopped before any survivor may claim its queue. A node that renews
//!   and finds its queue was taken (it was down, or cut off) drops every message taken
//!   (never delivers it again) before it opens the gate; at start that happens before it
//!   listens. A node whose spool is new (its disk was lost) takes back its own copies that
//!   nobody took.
//!
//! - **Safety net.** With `keep_delivered`, the copy of a delivered message is kept that
//!   long, marked with the routes its recipients took, and never taken over; `coexist queue
//!   resubmit` delivers again what went to one route in a window ([`resubmit`]).
//!
//! Files: [`wire`] (subjects and parts), [`store`] (NATS JetStream; its worker, which
//! publishes states and removes finished copies in order, in `worker.rs`), [`node`] (the lease,
//! the fencing and the takeovers of one node), [`resubmit`] (kept copies).

pub mod node;
pub mod resubmit;
pub mod store;
pub mod wire;
mod worker;

pub use crate::fleet::leases::{NodeShadow, ShadowStatus};
pub use node::Shadowing;
pub use resubmit::Resubmitted;

/// What can go wrong with the shadow copies.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// NATS or JetStream refused or did not answer.
    #[error("NATS JetStream: {0}")]
    Nats(String),
    /// A secret file could not be read.
    #[error("shadow credentials: {0}")]
    Secret(String),
    /// The config cannot be used.
    #[error("{0}")]
    Config(String),
    /// A copy read back is not a whole message.
    #[error("damaged shadow copy: {0}")]
    Damaged(String),
    /// The fleet's PostgreSQL (leases, claims).
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// The local spool.
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}
