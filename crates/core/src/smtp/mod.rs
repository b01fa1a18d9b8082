//! Inbound SMTP: listener, TLS, the ESMTP session, the command parser, the DATA/BDAT
//! readers and the memory budget of messages in transfer.
//!
//! The words a session speaks (envelope parameters, replies) are not defined here but in
//! [`crate::proto`], which the later stages share; TLS files are read by [`crate::certs`].

pub mod budget;
pub mod command;
pub mod data;
pub mod server;
pub mod session;
pub mod tls;

pub use session::{Handler, Incoming, Peer, SessionConfig};
