//! coexist-server: the running MX node, put together.
//!
//! [`relay`] is the composition root: it builds the listeners, directory, spool, queue and
//! outbound side from a config, after the start-up checks of [`preflight`], and serves the
//! [`admin`] API, metrics and console beside them.
//!
//! Rule of this crate: it depends on `coexist-api`, `coexist-core` and `coexist-base`
//! (re-exported here under the same module names); nothing below it knows it exists. It
//! carries no load or chart code: `cargo tree -p coexist-server` has no plotters.

#![warn(missing_docs)]
// Unit tests set up and inspect files directly (clippy.toml's list is for the relay's code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub use coexist_base::{accept, certs, clock, dirlock, fsmode, metrics, proto, types};
pub use coexist_core::{
    bounce, config, deliver, descriptors, directory, fleet, policy, queue, route, shadow, smtp,
    spool, tracking,
};

pub mod admin;
pub mod preflight;
pub mod relay;
