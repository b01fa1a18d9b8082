//! Traffic tools used by tests, the demo and benchmarks: the sink (a recording SMTP next
//! hop), the load client, and the end-to-end demo.

pub mod client;
pub mod demo;
pub mod sink;
