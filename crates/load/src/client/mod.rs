//! The load client: N concurrent SMTP sessions sending generated or replayed messages,
//! bounded in count and time, with a latency histogram (HDR) per message (MAIL to the final
//! reply).
//!
//! One concept per file:
//! - `generate.rs`: synthetic messages ([`Generator`]) and the recipient lists they draw
//!   from;
//! - `replay.rs`: messages read from `.eml` files or an mbox, and [`Traffic`], the source a
//!   run takes its messages from;
//! - `run.rs`: the sessions themselves ([`run`] with its [`LoadOptions`]), paced or not;
//! - `series.rs`: throughput and latency over time, in buckets that fit the run's length;
//! - `metrics.rs`: the relay's per-route counts, scraped from its `/metrics` during the run;
//! - `report.rs`: what a run measured ([`LoadReport`]), the summary it prints and the
//!   report document ([`crate::report::RunReport`]) made from it.

mod generate;
mod metrics;
mod replay;
mod report;
mod run;
mod series;

pub use generate::{directory_rows, parse_sizes, synthetic_recipients, Generated, Generator};
pub use metrics::{MetricsError, Scraper};
pub use replay::{read_messages, Replayed, Traffic};
pub use report::{LoadReport, Phases};
pub use run::{run, LoadOptions, Observed, Observer, Offsets};
