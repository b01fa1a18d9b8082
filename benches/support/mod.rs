//! What the benches share: a queued message's envelope as the relay writes it.

use coexist::spool::Envelope;
use coexist::types::{Address, QueueId};

/// The envelope of a `size`-byte message to one recipient, with a fresh queue id.
pub fn envelope(size: u64) -> Envelope {
    Envelope {
        id: QueueId::generate(),
        from: None,
        rcpts: vec![Address::parse("a@nhs.test", false).expect("address")],
        smtputf8: false,
        body: Default::default(),
        received_at: 0,
        size,
        client: "127.0.0.1:1".into(),
        ret: None,
        envid: None,
        rcpt_dsn: Vec::new(),
        bounce: false,
        returned_from: Vec::new(),
        taken_from: None,
    }
}
