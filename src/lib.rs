//! coexist: a mail-flow coexistence SMTP relay for mailbox migrations.
//!
//! This crate is the `coexist` command ([`cli`], one module per command group) on top of the
//! workspace's crates, which it re-exports under their module names so that
//! `coexist::config::Config` or `coexist::relay::start` name the same item wherever they are
//! read from (tests, benches, the command line). The crates, bottom to top (see docs/DESIGN.md
//! for the rule each boundary keeps):
//!
//! | crate | modules |
//! |---|---|
//! | `coexist-base` | [`types`], [`proto`], [`clock`], [`certs`], [`fsmode`], [`metrics`], [`accept`], [`dirlock`] |
//! | `coexist-core` | [`config`], [`smtp`], [`policy`], [`directory`], [`spool`], [`queue`], [`route`], [`deliver`], [`bounce`], [`fleet`], [`descriptors`] |
//! | `coexist-api` | [`admin::types`], [`admin::client`] |
//! | `coexist-server` | [`admin`], [`relay`], [`preflight`] |
//! | `coexist-load` | [`load`] (client, sink, demo, the report document) |
//! | `coexist-report` | the `coexist-report` program (charts, HTML), run by `coexist report` |

#![warn(missing_docs)]
// Unit tests set up and inspect files directly (clippy.toml's list is for the relay's code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub use coexist_base::{accept, certs, clock, dirlock, fsmode, metrics, proto, types};
pub use coexist_core::{
    bounce, config, deliver, descriptors, directory, fleet, policy, queue, route, shadow, smtp,
    spool, tracking,
};
pub use coexist_server::{admin, preflight, relay};

/// The traffic tools (crate `coexist-load`): load client, sink, demo, report document.
pub mod load {
    pub use coexist_load::*;
}

pub mod cli;
