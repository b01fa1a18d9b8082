//! coexist-core: the relay itself, every stage a message passes through.
//!
//! Data flows one way (see docs/DESIGN.md): [`smtp`] sessions check [`policy`] and the
//! [`directory`], write to the [`spool`], and the [`queue`] plans each attempt with
//! [`route`] and sends it with [`deliver`]; [`bounce`] writes DSNs back into the spool.
//! [`config`] is the typed configuration every stage reads; [`fleet`] shares the directory
//! between MX nodes through PostgreSQL; [`shadow`] keeps a redundant copy of every message
//! on NATS JetStream and takes over a dead node's queue; [`tracking`] is the message
//! tracking log; [`descriptors`] checks the file descriptor budget.
//!
//! Rule of this crate: it depends only on `coexist-base` (re-exported here under the same
//! module names). It knows nothing of the admin API, the HTTP client, the load tools or the
//! command line: what it needs from above (asking a peer's admin API) it takes as a trait
//! the composition root implements ([`fleet::peers::PeerApi`]).

#![warn(missing_docs)]
// Unit tests set up and inspect files directly (clippy.toml's list is for the relay's code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub use coexist_base::{accept, certs, chunks, clock, dirlock, fsmode, metrics, proto, types};

pub mod bounce;
pub mod config;
pub mod deliver;
pub mod descriptors;
pub mod directory;
pub mod fleet;
pub mod policy;
pub mod queue;
pub mod route;
pub mod shadow;
pub mod smtp;
pub mod spool;
pub mod tracking;
