//! The relay's SMTP session handler: the adapter between a session and the rest of the relay.
//! At each stage it asks [`crate::policy`], logs and counts what policy decides, and spools
//! and queues what it accepts.

use super::*;

/// The relay's session handler: an adapter that asks [`crate::policy`] at each stage,
/// logs and counts what it decides, and spools and queues what it accepts.
pub struct RelayHandler {
    pub(super) rules: ArcSwap<SessionRules>,
    pub(super) directory: Arc<Directory>,
    pub(super) spool: Arc<Spool>,
    pub(super) queue: Queue,
    /// The loop guard's memory of which routes send from which address.
    pub(super) hop_routes: Arc<HopRoutes>,
    /// The tracking log, when on: a `received` event and a `routed` one per recipient for
    /// each message accepted.
    pub(super) tracking: Option<Arc<Tracking>>,
}

impl RelayHandler {
    /// Logs the reception of `env` (just spooled) and each recipient's route as the
    /// directory gives it now, with where its state came from.
    fn track(&self, t: &Tracking, env: &Envelope, tls: Option<&str>, body: &[u8]) {
        use crate::tracking::{event, Event, Kind};
        let now = crate::clock::now_ms();
        let sender = env.from.as_ref().map(|a| a.to_string()).unwrap_or_default();
        let mut e = Event::new(now, Kind::Received, env.id.as_str());
        e.client = Some(env.client.clone());
        e.tls = Some(tls.unwrap_or("none").to_string());
        e.size = Some(env.size);
        e.message_id = event::message_id(body);
        e.sender = Some(sender.clone());
        e.recipients = env.rcpts.iter().map(|a| a.to_string()).collect();
        t.log(e);
        for r in &env.rcpts {
            let l = self.directory.routed(r);
            let mut e = Event::new(now, Kind::Routed, env.id.as_str());
            e.sender = Some(sender.clone());
            e.rcpt = Some(r.to_string());
            e.state = l.state;
            e.origin = Some(l.origin);
            e.route = l.route;
            t.log(e);
        }
    }

    /// The directory's answer for `a`, timed.
    fn resolve(&self, a: &Address) -> Resolution {
        let t0 = Instant::now();
        let r = self.directory.resolve(a);
        metrics::histogram!(m::LOOKUP_LATENCY).record(t0.elapsed().as_secs_f64());
        r
    }
}

/// The reply to a message refused because no redundant copy of it could be stored.
const NO_COPY: Reply = Reply::new(
    451,
    "4.3.0",
    "Message not accepted: its redundant copy cannot be stored now, try again later",
);

impl Handler for RelayHandler {
    type Context = Arc<SessionRules>;

    fn context(&self) -> Arc<SessionRules> {
        self.rules.load_full()
    }

    fn check_mail(
        &self,
        rules: &Arc<SessionRules>,
        peer: &Peer,
        _from: Option<&Address>,
        params: &MailParams,
    ) -> Result<(), Reply> {
        let free = self.spool.available_space().map_err(|e| {
            error!(error = %e, "cannot read the spool's free space");
            canned::LOCAL_ERROR
        })?;
        message::check_space(rules, params.size, free).map_err(|s| {
            warn!(client = %peer.addr, free = s.free, need = s.need, "spool disk short of space: refusing mail with 452 4.3.1");
            message::NO_SPACE
        })
    }

    fn check_rcpt(
        &self,
        rules: &Arc<SessionRules>,
        peer: &Peer,
        _from: Option<&Address>,
        params: &MailParams,
        to: &Address,
    ) -> Result<(), Reply> {
        let res = recipient::rcpt(
            rules,
            to,
            params.size,
            |a| self.resolve(a),
            || self.directory.source_down(),
        );
        match res {
            Ok(d) => {
                let route = d.route.as_str().to_string();
                debug!(to = %to, route, "recipient accepted");
                metrics::counter!(m::RCPT_ACCEPTED, "route" => route).increment(1);
                Ok(())
            }
            Err(RcptRefusal::SourceDown) => {
                info!(client = %peer.addr, to = %to, "recipient not in the directory while its source is down: deferred");
                Err(recipient::SOURCE_DOWN)
            }
            Err(RcptRefusal::Unknown) => {
                info!(client = %peer.addr, to = %to, "unknown recipient refused");
                Err(canned::UNKNOWN_USER)
            }
            Err(RcptRefusal::Relay(r)) => {
                info!(client = %peer.addr, to = %to, reply = %r, "recipient refused");
                Err(r)
            }
            Err(RcptRefusal::TooBig(t)) => {
                info!(client = %peer.addr, to = %to, route = t.route, size = params.size, "recipient refused: message too big for its route");
                metrics::counter!(m::ROUTE_TOO_BIG, "route" => t.route.clone()).increment(1);
                Err(t.reply())
            }
        }
    }

    async fn accept(&self, rules: &Arc<SessionRules>, mut msg: Incoming) -> Reply {
        let n = message::strip_untrusted(rules, msg.peer.addr.ip(), &mut msg.body);
        if n > 0 {
            info!(qid = %msg.id, client = %msg.peer.addr, removed = n, "removed internal headers from an untrusted client");
        }
        let size = msg.body.len() as u64;
        if let Err(refusals) =
            message::route_sizes(rules, &msg.rcpts, size, |a| self.directory.resolve(a))
        {
            info!(qid = %msg.id, client = %msg.peer.addr, size, "message refused: too big for every recipient's route");
            for r in &refusals {
                metrics::counter!(m::ROUTE_TOO_BIG, "route" => r.route.clone()).increment(1);
            }
            return refusals.first().map_or(canned::TOO_BIG, |r| r.reply());
        }
        let returned_from = message::returned_from(rules, &msg.body, || {
            self.hop_routes.routes_sending_from(msg.peer.addr.ip())
        });
        if !returned_from.is_empty() {
            warn!(qid = %msg.id, client = %msg.peer.addr, routes = ?returned_from, "message came back from a route's next hop after passing through us: it will not be sent to that route again");
        }
        let env = Envelope {
            id: msg.id.clone(),
            from: msg.from,
            rcpts: msg.rcpts,
            smtputf8: msg.params.smtputf8,
            body: msg.params.body,
            received_at: now_secs(),
            size,
            client: msg.peer.addr.to_string(),
            ret: msg.params.ret,
            envid: msg.params.envid,
            rcpt_dsn: msg.rcpt_dsn,
            bounce: false,
            returned_from,
            taken_from: None,
        };
        let body = Arc::new(msg.body);
        // Group commit: this waits for the sync that covers this message (and every other
        // one that arrived meanwhile); only then is the 250 sent.
        match self.spool.store(&env, body.clone()).await {
            Ok(loc) => {
                info!(
                    qid = %env.id,
                    from = %env.from.as_ref().map(|a| a.to_string()).unwrap_or_default(),
                    nrcpt = env.rcpts.len(),
                    size = env.size,
                    client = %env.client,
                    tls = msg.peer.tls.as_deref().unwrap_or("none"),
                    "queued"
                );
                if let Some(t) = &self.tracking {
                    self.track(t, &env, msg.peer.tls.as_deref(), &body);
                }
                let reply = Reply::owned(250, "2.0.0", format!("Ok: queued as {}", env.id));
                self.queue.submit(env, loc, Some(body));
                reply
            }
            Err(SpoolError::NoCopy(reason)) => {
                warn!(qid = %env.id, client = %env.client, reason, "message refused with 451 4.3.0: no redundant copy could be stored (shadow.on_failure = \"defer\")");
                metrics::counter!(m::SHADOW_REFUSED).increment(1);
                NO_COPY
            }
            Err(e) if e.is_no_space() => {
                error!(qid = %env.id, error = %e, "spool disk full");
                message::NO_SPACE
            }
            Err(e) => {
                error!(qid = %env.id, error = %e, "cannot spool message");
                canned::LOCAL_ERROR
            }
        }
    }
}
