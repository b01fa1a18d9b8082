//! How a shadow copy is laid out in the stream: subjects, parts and the state record. Pure
//! functions, so the layout is tested without a server.
//!
//! Every subject of a node's copies starts with `STREAM.NODE.`, so one filter
//! (`STREAM.NODE.>`) finds them all and one purge per message (`STREAM.NODE.QID.>`) removes
//! every part of it:
//! - `STREAM.NODE.QID.m`, the manifest: a 4-byte big-endian length, the envelope as the
//!   spool stores it (JSON), then the first part of the message bytes. Its headers say how
//!   many parts the message has (`Coexist-Parts`) and its size (`Coexist-Size`).
//! - `STREAM.NODE.QID.b.I` for I = 1.. : the further parts, each at most one part size
//!   (below the server's `max_payload`), so a message of any size is shadowed.
//! - `STREAM.NODE.QID.s`: the recipients with a final outcome (`{"done":[0,2]}`); the
//!   stream keeps one message per subject, so only the latest state stays.
//!
//! Each part is published with a `Nats-Msg-Id` (`NODE.QID.PART`), so a retried publish is
//! stored once (JetStream's de-duplication window).

use crate::spool::Envelope;

/// Header: how many parts the message bytes are in (the manifest's included).
pub const PARTS: &str = "Coexist-Parts";
/// Header: the message's size in bytes.
pub const SIZE: &str = "Coexist-Size";

/// The subject of a message's manifest.
pub fn manifest(stream: &str, node: &str, qid: &str) -> String {
    format!("{stream}.{node}.{qid}.m")
}

/// The subject of a message's part `i` (1 and up).
pub fn part(stream: &str, node: &str, qid: &str, i: usize) -> String {
    format!("{stream}.{node}.{qid}.b.{i}")
}

/// The subject of a message's state.
pub fn state(stream: &str, node: &str, qid: &str) -> String {
    format!("{stream}.{node}.{qid}.s")
}

/// The subject of a delivered message's record, while its copy is kept
/// (`shadow.keep_delivered`).
pub fn kept(stream: &str, node: &str, qid: &str) -> String {
    format!("{stream}.{node}.{qid}.d")
}

/// The filter of every delivered record of every node.
pub fn kept_of_all(stream: &str) -> String {
    format!("{stream}.*.*.d")
}

/// The node and queue id of a delivered record's subject.
pub fn kept_subject<'a>(stream: &str, subject: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = subject.strip_prefix(stream)?.strip_prefix('.')?;
    let mut it = rest.split('.');
    let (node, qid, kind) = (it.next()?, it.next()?, it.next()?);
    (kind == "d" && it.next().is_none()).then_some((node, qid))
}

/// The filter of every subject of one message.
pub fn message_filter(stream: &str, node: &str, qid: &str) -> String {
    format!("{stream}.{node}.{qid}.>")
}

/// The filter of every manifest of a node.
pub fn manifests_of(stream: &str, node: &str) -> String {
    format!("{stream}.{node}.*.m")
}

/// The queue id in a manifest's subject, if it is one of `node`'s.
pub fn qid_of<'a>(stream: &str, node: &str, subject: &'a str) -> Option<&'a str> {
    let rest = subject.strip_prefix(stream)?.strip_prefix('.')?;
    let rest = rest.strip_prefix(node)?.strip_prefix('.')?;
    let (qid, kind) = rest.split_once('.')?;
    (kind == "m" && !qid.is_empty()).then_some(qid)
}

/// A message cut into the payloads of its manifest and parts.
#[derive(Debug)]
pub struct Cut {
    /// The manifest's payload: envelope length, envelope, first part of the bytes.
    pub manifest: Vec<u8>,
    /// Where each further part lies in the message bytes.
    pub parts: Vec<std::ops::Range<usize>>,
}

/// Why a copy read back is not a whole message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The manifest is shorter than its header says.
    #[error("the manifest is cut short")]
    Short,
    /// The envelope does not parse.
    #[error("the envelope does not parse: {0}")]
    Envelope(String),
    /// A header is missing or not a number.
    #[error("header {0} missing or not a number")]
    Header(&'static str),
    /// The bytes put together do not make the size the manifest says.
    #[error("the parts make {got} bytes where the manifest says {want}")]
    Size {
        /// Bytes found.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
}

/// Cuts a message so that no payload is above `part_size` bytes (the envelope goes whole in
/// the manifest, with as much of the bytes as fits beside it).
pub fn cut(env_json: &[u8], body: &[u8], part_size: usize) -> Cut {
    let room = part_size.saturating_sub(4 + env_json.len());
    let first = body.len().min(room);
    let mut manifest = Vec::with_capacity(4 + env_json.len() + first);
    manifest.extend_from_slice(&(env_json.len() as u32).to_be_bytes());
    manifest.extend_from_slice(env_json);
    manifest.extend_from_slice(&body[..first]);
    let step = part_size.max(1);
    let parts = (first..body.len())
        .step_by(step)
        .map(|s| s..(s + step).min(body.len()))
        .collect();
    Cut { manifest, parts }
}

/// A manifest's payload taken apart: the envelope and the first part of the bytes.
pub fn open_manifest(payload: &[u8]) -> Result<(Envelope, &[u8]), WireError> {
    let len = payload.get(..4).ok_or(WireError::Short)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let env = payload.get(4..4 + len).ok_or(WireError::Short)?;
    let env: Envelope =
        serde_json::from_slice(env).map_err(|e| WireError::Envelope(e.to_string()))?;
    Ok((env, &payload[4 + len..]))
}

/// The state record: indexes of the recipients with a final outcome.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Done {
    /// Recipient indexes (in the envelope's order) that need no delivery any more.
    pub done: Vec<usize>,
}

/// A delivered message's record: when it finished, and which recipients (indexes) each
/// route took.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivered {
    /// Unix time it finished.
    pub at: u64,
    /// Per route, the recipients delivered through it.
    pub routes: std::collections::BTreeMap<String, Vec<usize>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_cut_into_parts_no_larger_than_the_part_size_and_put_back_whole() {
        let env = br#"{"id":"X"}"#;
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let c = cut(env, &body, 1000);
        assert!(c.manifest.len() <= 1000);
        let mut back = c.manifest[4 + env.len()..].to_vec();
        for r in &c.parts {
            assert!(r.len() <= 1000);
            back.extend_from_slice(&body[r.clone()]);
        }
        assert_eq!(back, body);
        // A small message is one manifest.
        let c = cut(env, b"hello", 1000);
        assert!(c.parts.is_empty());
        assert_eq!(&c.manifest[4 + env.len()..], b"hello");
        // An envelope larger than a part still goes whole; the bytes follow in parts.
        let c = cut(env, b"abc", 8);
        assert_eq!(c.manifest.len(), 4 + env.len());
        assert_eq!(c.parts, vec![0..3]);
    }

    #[test]
    fn subjects_name_the_node_and_the_queue_id() {
        assert_eq!(manifest("s", "mx1", "AB"), "s.mx1.AB.m");
        assert_eq!(qid_of("s", "mx1", "s.mx1.AB.m"), Some("AB"));
        assert_eq!(qid_of("s", "mx1", "s.mx1.AB.s"), None);
        assert_eq!(qid_of("s", "mx1", "s.mx10.AB.m"), None);
        assert_eq!(part("s", "mx1", "AB", 2), "s.mx1.AB.b.2");
        assert_eq!(message_filter("s", "mx1", "AB"), "s.mx1.AB.>");
        assert_eq!(
            kept_subject("s", &kept("s", "mx1", "AB")),
            Some(("mx1", "AB"))
        );
        assert_eq!(kept_subject("s", "s.mx1.AB.m"), None);
    }

    #[test]
    fn a_short_or_garbled_manifest_is_an_error_not_a_panic() {
        assert!(open_manifest(b"").is_err());
        assert!(open_manifest(&[0, 0, 0, 9, b'{']).is_err());
        assert!(open_manifest(&[0, 0, 0, 2, b'{', b'}']).is_err());
    }
}
