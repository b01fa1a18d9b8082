//! The outcome sink the relay runs with: the [`Recorder`] (rates for the console, and the
//! record of recent outcomes when there is no tracking log) and the tracking log, which
//! gets one event per outcome and per admin action or DSN.

use super::event::{Event, EventReply, Kind};
use super::Tracking;
use crate::proto::LastReply;
use crate::queue::outcomes::{Noted, NotedKind, OutcomeSink, Reported};
use crate::queue::recorder::Recorder;
use std::sync::Arc;

/// Longest reply text an event keeps (a next hop's reply is at most a few lines).
const MAX_REPLY: usize = 4096;

/// Reports to the recorder and, when there is one, to the tracking log.
pub struct Tee {
    /// Rates, and recent outcomes when the recorder keeps them.
    pub recorder: Arc<Recorder>,
    /// The tracking log.
    pub tracking: Option<Arc<Tracking>>,
}

/// The event reply of a recipient's last reply, its text whole (up to 4 KiB).
pub fn event_reply(reply: &LastReply) -> EventReply {
    let (code, status, text) = crate::queue::recent::reply_parts(reply);
    EventReply {
        code,
        status: status.map(|s| s.to_string()),
        text: super::event::cut(&text, MAX_REPLY),
    }
}

impl OutcomeSink for Tee {
    fn wants_detail(&self) -> bool {
        self.tracking.is_some() || self.recorder.wants_detail()
    }

    fn report(&self, o: &Reported<'_>) {
        self.recorder.report(o);
        let Some(t) = &self.tracking else {
            return;
        };
        let mut e = Event::new(o.time_ms, Kind::from(o.outcome), o.queue_id.as_str());
        e.sender = o.sender.map(|a| a.to_string()).or(Some(String::new()));
        e.rcpt = Some(o.rcpt.to_string());
        e.sent_as = o.sent_as.map(|a| a.to_string());
        e.route = o.route.map(|r| r.as_str().to_string());
        e.next_hop = o.next_hop.map(|h| h.to_string());
        e.tls = o.tls.map(|t| if t { "tls" } else { "none" }.to_string());
        e.reply = o.reply.map(event_reply);
        e.origin = (!o.origin.is_empty()).then(|| o.origin.to_string());
        t.log(e);
    }

    fn note(&self, n: &Noted<'_>) {
        let Some(t) = &self.tracking else {
            return;
        };
        let kind = match n.kind {
            NotedKind::Held => Kind::Held,
            NotedKind::Released => Kind::Released,
            NotedKind::Dsn => Kind::Dsn,
        };
        let mut e = Event::new(n.time_ms, kind, n.queue_id.as_str());
        e.related = n.related.map(|q| q.to_string());
        e.sender = n.sender.map(|a| a.to_string());
        t.log(e);
    }
}
