//! coexist-api: the admin API's wire types and the HTTP client that speaks it.
//!
//! [`types`] are the JSON bodies the admin API serves (many are the relay core's own view
//! types, re-exported); [`client`] is the one client of that API, used by the command line,
//! by `coexist trace` across the fleet and, through [`coexist_core::fleet::peers::PeerApi`],
//! by a node asking its peers while PostgreSQL is unreachable.
//!
//! Rule of this crate: it depends on `coexist-core` and `coexist-base` only; it serves
//! nothing (the server is `coexist-server`).

#![warn(missing_docs)]
// Unit tests set up and inspect files directly (clippy.toml's list is for the relay's code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use coexist_core::{
    certs, config, deliver, directory, fleet, policy, queue, route, shadow, tracking,
};

pub mod client;
pub mod types;
