//! coexist: a mail-flow coexistence SMTP relay for mailbox migrations.
//!
//! Data flows one way (see DESIGN.md): [`smtp`] sessions check [`policy`] and the
//! [`directory`], write to the [`spool`], and the [`queue`] plans each attempt with
//! [`route`] and sends it with [`deliver`]. [`relay`] wires them together, after the
//! start-up checks of [`preflight`]; [`load`] holds the traffic tools (sink, load client,
//! demo). [`cli`] is the `coexist` command (one module per command group); it talks to a
//! running server through the [`admin`] API and its types.
//!
//! What every stage shares sits beside the flow rather than in one stage: [`proto`] holds
//! the SMTP vocabulary (envelope parameters, replies) and [`certs`] reads TLS material, so
//! that later stages never import the inbound [`smtp`] module.

#![warn(missing_docs)]

pub mod admin;
pub mod bounce;
pub mod certs;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod directory;
pub mod dirlock;
pub mod fleet;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod preflight;
pub mod proto;
pub mod queue;
pub mod relay;
pub mod route;
pub mod smtp;
pub mod spool;
pub mod types;
