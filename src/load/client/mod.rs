//! The load client: N concurrent SMTP sessions sending generated or replayed messages,
//! bounded in count and time, with a latency histogram (HDR) per message (MAIL to the final
//! reply).
//!
//! One concept per file:
//! - `generate.rs`: synthetic messages ([`Generator`]) and the recipient lists they draw
//!   from;
//! - `replay.rs`: messages read from `.eml` files or an mbox, and [`Traffic`], the source a
//!   run takes its messages from;
//! - `run.rs`: the sessions themselves ([`run`] with its [`LoadOptions`]);
//! - `report.rs`: what a run measured ([`LoadReport`]) and how it is printed.

mod generate;
mod replay;
mod report;
mod run;

pub use generate::{directory_rows, parse_sizes, synthetic_recipients, Generated, Generator};
pub use replay::{read_messages, Traffic};
pub use report::{LoadReport, Phases, Second};
pub use run::{run, LoadOptions};
