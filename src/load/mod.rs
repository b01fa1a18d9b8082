//! Traffic tools used by tests, the demo and benchmarks: the sink (a recording SMTP next
//! hop), the load client, the end-to-end demo and the fleet demo, and the reports made from
//! load runs (charts, HTML).

pub mod client;
pub mod demo;
pub mod fleet_demo;
pub mod report;
pub mod sink;
