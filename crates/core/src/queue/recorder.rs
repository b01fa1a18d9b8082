//! The outcome sink the relay runs with: the record of recent per-recipient outcomes
//! ([`super::recent`], read by `coexist trace` and the console's address search) and the
//! per-minute rates with deferral reasons ([`super::rate`], read by the console's overview).
//! Built by the composition root and shared with the queue (which reports to it as an
//! [`OutcomeSink`]) and the admin API (which reads it); the queue holds no outcome itself.

use super::outcomes::{OutcomeSink, Reported};
use super::rate::Rates;
use super::recent::{cut, Recent, RecentOutcome, RecordedReply, MAX_ORIGIN};

/// The record of recent outcomes and the per-minute rates.
pub struct Recorder {
    recent: Recent,
    rates: Rates,
}

impl Recorder {
    /// A recorder keeping at most `recent_outcomes` recent outcomes
    /// (`queue.recent_outcomes`; 0 keeps none, and the rates are still counted).
    pub fn new(recent_outcomes: usize) -> Recorder {
        Recorder {
            recent: Recent::new(recent_outcomes),
            rates: Rates::default(),
        }
    }

    /// The record of recent per-recipient outcomes (for `coexist trace`).
    pub fn recent(&self) -> &Recent {
        &self.recent
    }

    /// Outcomes per minute over the last hour, and deferral reasons (for the console).
    pub fn rates(&self) -> &Rates {
        &self.rates
    }
}

impl OutcomeSink for Recorder {
    fn wants_detail(&self) -> bool {
        self.recent.enabled()
    }

    fn report(&self, o: &Reported<'_>) {
        let reply = o.reply.map(RecordedReply::of);
        let status = reply.as_ref().and_then(|r| r.status).map(|s| s.to_string());
        let text = reply.as_ref().map_or("", |r| &r.text);
        self.rates
            .record(o.time, o.outcome, status.as_deref(), text);
        if !self.recent.enabled() {
            return;
        }
        self.recent.record(RecentOutcome {
            time: o.time,
            queue_id: o.queue_id.clone(),
            rcpt: o.rcpt.to_string().into_boxed_str(),
            sent_as: o.sent_as.map(|a| a.to_string().into_boxed_str()),
            route: o.route.cloned(),
            next_hop: o.next_hop,
            outcome: o.outcome,
            reply,
            origin: cut(o.origin, MAX_ORIGIN),
        });
    }
}
