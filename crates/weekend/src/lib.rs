//! The weekend under fire: the whole system as a migration weekend runs it, with its parts
//! failing while batches flip, checked the way Jepsen checks databases (a real topology, a
//! fault schedule, a history, and a checker).
//!
//! Data flows one way: [`plan`] (sizes, times, the fault schedule) → [`net`] (network
//! namespaces, links, partitions) and [`services`] (PostgreSQL primary and standby, NATS
//! JetStream, OpenLDAP, three coexist nodes, in those namespaces) → [`run`] (load through
//! every MX, batches, LDAP changes, faults on the schedule, a sample of every node each
//! second), which writes the [`history`] → [`check`] (the verdict) → [`report`] (HTML).

pub mod check;
pub mod disk;
pub mod history;
pub mod net;
pub mod nodes;
pub mod plan;
pub mod procs;
pub mod report;
pub mod run;
pub mod services;
