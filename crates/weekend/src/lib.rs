//! The weekend under fire: the whole system as a migration weekend runs it, with its parts
//! failing while batches flip, checked the way Jepsen checks databases (a real topology, a
//! fault schedule, a history, and a checker).
//!
//! Data flows one way: [`plan`] (sizes, times, the fault schedule) → [`net`] (network
//! namespaces, links, partitions), [`disk`] (a slow disk), [`procs`], [`services`]
//! (PostgreSQL primary and standby, NATS JetStream, OpenLDAP) and [`nodes`] (three coexist
//! nodes) in those namespaces → [`run`] (the schedule: the load through every MX, the
//! admins' batches, LDAP changes and repair, the faults, a sample of every node each
//! second), which writes the [`history`] → [`check`] (the verdict) → [`report`] (HTML).

mod admin;
pub mod check;
pub mod disk;
mod faults;
pub mod history;
mod load;
pub mod net;
pub mod nodes;
pub mod plan;
pub mod procs;
pub mod report;
pub mod run;
pub mod services;
mod watch;
