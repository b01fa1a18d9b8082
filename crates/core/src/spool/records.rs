//! What the spool keeps about a message besides its bytes: the envelope, written once with
//! the message, and the per-recipient delivery state, written again after each attempt. Both
//! are JSON in the log's records; fields added later have defaults, so older spool files still load.

use crate::proto::LastReply;
use crate::proto::{BodyType, RcptDsn, Ret};
use crate::types::{Address, QueueId};
use serde::{Deserialize, Serialize};

/// The envelope of a queued message; written once with the message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Queue id.
    pub id: QueueId,
    /// Reverse path; `None` is `<>`.
    pub from: Option<Address>,
    /// Recipients, in the order accepted.
    pub rcpts: Vec<Address>,
    /// SMTPUTF8 was requested.
    pub smtputf8: bool,
    /// Declared body type.
    pub body: BodyType,
    /// Unix time of acceptance.
    pub received_at: u64,
    /// Message size in bytes (with our Received header).
    pub size: u64,
    /// Client address.
    pub client: String,
    /// DSN `RET` (stored as `"FULL"` or `"HDRS"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// DSN `ENVID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// DSN parameters per recipient (same order as `rcpts`; may be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rcpt_dsn: Vec<RcptDsn>,
    /// A DSN we generated: its recipient (the original sender) may be outside our domains.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bounce: bool,
    /// Routes this message came back from: it had already passed through us (our host name
    /// in a `Received:` header) and arrived from one of the route's next hops. It is never
    /// sent to them again (a routing loop: `5.4.6`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned_from: Vec<String>,
    /// Taken over from a dead node's shadow copies (`[shadow]`): from whom, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_from: Option<TakenFrom>,
}

/// Where a message taken over from a dead node came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenFrom {
    /// The node that accepted it.
    pub node: String,
    /// Its queue id there.
    pub queue_id: String,
    /// Unix time of the takeover.
    pub at: u64,
    /// Not a takeover: an admin's resubmission of a delivered message's kept copy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resubmitted: bool,
}

impl Envelope {
    /// The DSN parameters of recipient `i` (defaults when none were given).
    pub fn dsn(&self, i: usize) -> RcptDsn {
        self.rcpt_dsn.get(i).cloned().unwrap_or_default()
    }
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not yet delivered.
    Pending,
    /// Accepted by a next hop.
    Delivered,
    /// Failed permanently.
    Failed,
}

/// Delivery state of one recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RcptState {
    /// Status.
    pub status: RcptStatus,
    /// Last reply or error seen for it (state files that hold it as a string still load).
    pub last_reply: Option<LastReply>,
    /// The route it was delivered through (kept for `shadow.keep_delivered`, so an admin
    /// can deliver again what went to one route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

/// Mutable delivery state of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryState {
    /// One per envelope recipient, same order.
    pub rcpts: Vec<RcptState>,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Put on hold by an admin: no attempts until released (survives restarts).
    #[serde(default)]
    pub held: bool,
    /// A delay warning was sent to the sender.
    #[serde(default)]
    pub warned: bool,
    /// Unix time in milliseconds of the next attempt, when one is scheduled: a restart
    /// resumes the schedule instead of retrying everything at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    /// The route whose next hops could not be reached at the last attempt: after a restart
    /// the message still waits for that route, which is probed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

impl DeliveryState {
    /// All recipients pending.
    pub fn new(n: usize) -> DeliveryState {
        DeliveryState {
            rcpts: vec![
                RcptState {
                    status: RcptStatus::Pending,
                    last_reply: None,
                    route: None,
                };
                n
            ],
            attempts: 0,
            held: false,
            warned: false,
            next_attempt_ms: None,
            unreachable: None,
        }
    }

    /// Indexes of recipients still pending.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.rcpts.len())
            .filter(|&i| self.rcpts[i].status == RcptStatus::Pending)
            .collect()
    }
}
