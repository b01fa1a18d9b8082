//! coexist-base: the vocabulary every layer of coexist shares, and nothing else.
//!
//! Addresses and domains ([`types`]), the SMTP vocabulary of envelopes, replies and
//! outcomes ([`proto`]), the time of day ([`clock`]), TLS material ([`certs`]), owner-only
//! files ([`fsmode`]), metric names ([`metrics`]), the accept loop's back-off ([`accept`])
//! and the single-instance lock ([`dirlock`]).
//!
//! Rule of this crate: it depends on no other coexist crate, and holds no policy, no state
//! and no I/O beyond reading TLS files and creating files with safe modes. Every other crate
//! re-exports its modules under the same names, so `crate::types::Address` reads the same
//! everywhere.

#![warn(missing_docs)]
// Unit tests set up and inspect files directly (clippy.toml's list is for the relay's code).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod accept;
pub mod certs;
pub mod chunks;
pub mod clock;
pub mod dirlock;
pub mod fsmode;
pub mod metrics;
pub mod proto;
pub mod types;
