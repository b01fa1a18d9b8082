//! Inbound SMTP: listener, TLS, the ESMTP session, the command parser, replies, the
//! DATA/BDAT readers and the memory budget of messages in transfer.

pub mod budget;
pub mod command;
pub mod data;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;

pub use reply::Reply;
pub use session::{Handler, Incoming, Peer, SessionConfig};
