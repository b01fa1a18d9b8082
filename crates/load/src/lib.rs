//! Traffic tools used by tests, the demo and benchmarks: the sink (a recording SMTP next
//! hop), the load client, the end-to-end demo and the fleet demo, and the reports made from
//! load runs (the document; charts and HTML are drawn by the separate `coexist-report`
//! program, so that no process that serves mail carries the chart libraries).
//!
//! Rule of this crate: it depends on `coexist-server` (the demo starts whole relays in
//! process) and the crates below it, re-exported here under the same module names for its
//! own use; nothing but the command line depends on it.

#![warn(missing_docs)]
#![allow(clippy::disallowed_methods)] // Load tool, sink and demo: test doubles and CLI tools, not the relay.

pub(crate) use coexist_server::{certs, clock, types};
pub(crate) use coexist_server::{config, deliver, directory, fleet, metrics, proto, relay, smtp};

pub mod client;
pub mod demo;
pub mod fleet_demo;
pub mod report;
pub mod sink;
