//! The history of a run: what the load generators were told, what the next hops received,
//! what the directory's truth was and when, which faults were injected, and what each node
//! said about itself. The run writes it as files in its output folder (one JSON document
//! per line, the sinks' own record format for deliveries), so a run can be checked again
//! later (`coexist-weekend check DIR`) and read by hand.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// The two estates, as the routes that lead to them are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Estate {
    /// On-premises Exchange (route `onprem`).
    Onprem,
    /// Exchange Online (route `cloud`).
    Cloud,
}

impl Estate {
    /// The route's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Estate::Onprem => "onprem",
            Estate::Cloud => "cloud",
        }
    }
}

/// One transaction of a load generator: where it went, what the relay answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    /// When the final reply came (Unix ms).
    pub at_ms: i64,
    /// The node it was sent to (`mx1`…).
    pub node: String,
    /// The queue id of the final `250` (`… queued as ID`); none when the message was not
    /// accepted.
    pub qid: Option<String>,
    /// Recipients the relay accepted (their RCPT got 2xx and so did the end of data).
    pub accepted: Vec<String>,
    /// Recipients the relay did not accept, with its reply.
    pub refused: Vec<Refusal>,
    /// The session failed before a final reply (connection refused, reset, timeout): the
    /// message was not acknowledged; none of its recipients count as accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A recipient the relay refused or deferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The recipient.
    pub rcpt: String,
    /// The reply code (`451`, `550`…).
    pub code: u16,
    /// The whole reply text (`451 4.4.3 Directory temporarily unavailable`).
    pub reply: String,
}

/// One message a next hop (sink) accepted: a line of its record file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Which sink: the estate it stands for.
    pub estate: Estate,
    /// The queue id of the node that first accepted it (from the first `Received:`, the
    /// relay's; a survivor that took the message over keeps the bytes and so this id).
    pub qid: String,
    /// The envelope recipients of this delivery.
    pub rcpts: Vec<String>,
    /// CRC32 of the bytes received.
    pub crc: u32,
    /// When the sink accepted it (Unix ms).
    pub at_ms: i64,
}

impl Delivery {
    /// Parses a record line: `QUEUE-ID COUNT RCPT,RCPT… CRC32 UNIX_MS` (the sink's
    /// `--record` format).
    pub fn parse(estate: Estate, line: &str) -> Result<Delivery, String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!("expected 5 fields, found {}", f.len()));
        }
        let count: usize = f[1].parse().map_err(|_| format!("bad count {:?}", f[1]))?;
        let rcpts: Vec<String> = f[2].split(',').map(str::to_string).collect();
        if rcpts.len() != count {
            return Err(format!("count {count} but {} recipients", rcpts.len()));
        }
        Ok(Delivery {
            estate,
            qid: f[0].to_string(),
            rcpts,
            crc: u32::from_str_radix(f[3], 16).map_err(|_| format!("bad CRC {:?}", f[3]))?,
            at_ms: f[4].parse().map_err(|_| format!("bad time {:?}", f[4]))?,
        })
    }
}

/// A change of the directory's truth: mailboxes moved to `state`, in force somewhere
/// between `from_ms` (the change was asked for) and `to_ms` (it was committed and visible
/// to the fleet: the batch call returned, or the LDAP sync interval passed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// When the change was asked for (Unix ms).
    pub from_ms: i64,
    /// When it was certainly in force in the fleet's log (Unix ms).
    pub to_ms: i64,
    /// Where the mailboxes' mail goes from then on.
    pub state: Estate,
    /// What made it: `batch 3 (evening 1, 22000 mailboxes)`, `ldap modify (40 mailboxes)`.
    pub source: String,
    /// The mailboxes' addresses.
    pub addresses: Vec<String>,
}

/// The kinds of fault the run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The PostgreSQL primary killed (`kill -9`) and the standby promoted.
    PgFailover,
    /// The same, with the standby cut off from the primary first and a batch committed on
    /// the primary alone: the promoted standby's log moved back. Ends with the admin's
    /// repair, `directory import` of the source's states through a node that has the batch.
    PgFailoverLost,
    /// The LDAP server stopped, then started again.
    LdapDown,
    /// An MX node killed with `kill -9` and its disk (spool, store) wiped; started again
    /// with an empty disk at the end of the fault.
    NodeKill,
    /// An MX node cut off from PostgreSQL (blackhole routes to both database hosts).
    NodePartition,
    /// A next hop answering MAIL with Exchange Online's throttling reply.
    HopThrottle,
    /// A next hop refusing connections (its listener closed).
    HopRefuse,
    /// One NATS JetStream server killed, then started again.
    NatsDown,
    /// A node's links slowed (a token bucket on its interface).
    SlowLink,
    /// A node's disk slowed (its writes held to a few per second by the blkio throttle).
    SlowDisk,
}

impl FaultKind {
    /// Whether a message in flight when this fault hit may be delivered twice (a kill or a
    /// cut between a next hop's 250 and the relay recording it).
    pub fn may_duplicate(self) -> bool {
        matches!(
            self,
            FaultKind::NodeKill
                | FaultKind::NodePartition
                | FaultKind::HopRefuse
                | FaultKind::PgFailover
                | FaultKind::PgFailoverLost
        )
    }
}

/// A fault as it was injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// When it began (Unix ms).
    pub start_ms: i64,
    /// When it was repaired (Unix ms).
    pub end_ms: i64,
    /// What it was.
    pub kind: FaultKind,
    /// What it hit (`mx2`, `pg1`, `cloud`…).
    pub target: String,
    /// Details for the report.
    pub detail: String,
}

/// What one node said about itself at one moment (the run asks every node each second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When (Unix ms).
    pub at_ms: i64,
    /// The node.
    pub node: String,
    /// It answered at all (its admin API).
    pub up: bool,
    /// It said it takes mail (`/v1/ready`).
    pub ready: bool,
    /// The last directory change applied there.
    pub applied: Option<u32>,
    /// Its view of PostgreSQL: connected.
    pub postgres_up: Option<bool>,
    /// Messages in its queue.
    pub queue: Option<u64>,
}

/// What a node's directory says about a mailbox once the run is over (the queues empty,
/// every fault repaired): the state it routes the mailbox's mail to, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    /// The node.
    pub node: String,
    /// The mailbox's address.
    pub address: String,
    /// The state in force there (`onprem`, `cloud`; none: not in its directory).
    pub state: Option<String>,
    /// The change that set it (`batch 7`, `ldap … (base 5)`).
    pub origin: String,
}

/// The rules the checker applies, from the run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// The nodes' `fleet.max_lag` (ms): a node may route on a directory this far behind.
    pub max_lag_ms: i64,
    /// The longest a delivery attempt takes from its routing decision to the next hop's
    /// reply (the nodes' `delivery.timeout`, ms).
    pub attempt_ms: i64,
    /// Slack for the sampling itself (the poll interval and the node's lag timer, ms).
    pub slack_ms: i64,
}

/// The whole history of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Every mailbox address and its estate at the start.
    pub initial: HashMap<String, Estate>,
    /// The directory's changes, in the order they were asked for.
    pub moves: Vec<Move>,
    /// What the load generators were told.
    pub sent: Vec<Sent>,
    /// What the sinks received.
    pub deliveries: Vec<Delivery>,
    /// The faults injected.
    pub faults: Vec<Fault>,
    /// What the nodes said about themselves.
    pub samples: Vec<Sample>,
    /// Each node's state of a sample of mailboxes after the run.
    pub finals: Vec<Final>,
    /// The checker's rules.
    pub rules: Option<Rules>,
    /// When the run started and ended (Unix ms).
    pub span_ms: (i64, i64),
}

/// The files of a history, in the run's output folder.
pub struct Files {
    dir: PathBuf,
}

/// File names, relative to the output folder.
pub const INITIAL: &str = "initial.tsv";
/// The directory's changes.
pub const MOVES: &str = "moves.jsonl";
/// The load generators' transactions.
pub const SENT: &str = "sent.jsonl";
/// The faults.
pub const FAULTS: &str = "faults.jsonl";
/// The nodes' samples.
pub const SAMPLES: &str = "samples.jsonl";
/// The rules and the run's span.
pub const RULES: &str = "rules.json";
/// The nodes' states of a sample of mailboxes after the run.
pub const FINAL: &str = "final.jsonl";
/// The sinks' record files, one per estate.
pub fn record_file(e: Estate) -> String {
    format!("sink-{}.rec", e.as_str())
}

/// A history file that cannot be read: which file, which line, why.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct HistoryError {
    /// The file.
    pub path: PathBuf,
    /// The line (0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct RulesFile {
    rules: Rules,
    started_ms: i64,
    ended_ms: i64,
}

#[allow(clippy::disallowed_methods)] // A test tool's history files: written by it, read back by its checker.
impl Files {
    /// The history files under `dir`.
    pub fn new(dir: &Path) -> Files {
        Files {
            dir: dir.to_path_buf(),
        }
    }

    /// The path of a file of the history.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the initial estates.
    pub fn write_initial(&self, initial: &[(String, Estate)]) -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(self.path(INITIAL))?);
        for (a, e) in initial {
            writeln!(w, "{a}\t{}", e.as_str())?;
        }
        w.flush()
    }

    /// Appends one item as a JSON line to `name`.
    pub fn append<T: Serialize>(&self, name: &str, item: &T) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))?;
        let mut line = serde_json::to_vec(item).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)
    }

    /// Writes the rules and the run's span.
    pub fn write_rules(&self, rules: &Rules, span_ms: (i64, i64)) -> std::io::Result<()> {
        let doc = RulesFile {
            rules: rules.clone(),
            started_ms: span_ms.0,
            ended_ms: span_ms.1,
        };
        std::fs::write(
            self.path(RULES),
            serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?,
        )
    }

    /// Reads the whole history back.
    pub fn read(&self) -> Result<History, HistoryError> {
        let mut h = History::default();
        for (n, line) in self.lines(INITIAL)? {
            let (a, e) = line
                .split_once('\t')
                .ok_or_else(|| self.err(INITIAL, n, "no tab"))?;
            let e = match e {
                "onprem" => Estate::Onprem,
                "cloud" => Estate::Cloud,
                other => return Err(self.err(INITIAL, n, &format!("unknown estate {other:?}"))),
            };
            h.initial.insert(a.to_string(), e);
        }
        h.moves = self.jsonl(MOVES)?;
        h.sent = self.jsonl(SENT)?;
        h.faults = self.jsonl(FAULTS)?;
        h.samples = self.jsonl(SAMPLES)?;
        h.finals = self.jsonl(FINAL)?;
        for e in [Estate::Onprem, Estate::Cloud] {
            let name = record_file(e);
            for (n, line) in self.lines(&name)? {
                h.deliveries
                    .push(Delivery::parse(e, &line).map_err(|r| self.err(&name, n, &r))?);
            }
        }
        let bytes =
            std::fs::read(self.path(RULES)).map_err(|e| self.err(RULES, 0, &e.to_string()))?;
        let doc: RulesFile =
            serde_json::from_slice(&bytes).map_err(|e| self.err(RULES, 0, &e.to_string()))?;
        h.rules = Some(doc.rules);
        h.span_ms = (doc.started_ms, doc.ended_ms);
        Ok(h)
    }

    fn err(&self, name: &str, line: usize, reason: &str) -> HistoryError {
        HistoryError {
            path: self.path(name),
            line,
            reason: reason.to_string(),
        }
    }

    /// The non-empty lines of `name` with their numbers (a missing file has none).
    fn lines(&self, name: &str) -> Result<Vec<(usize, String)>, HistoryError> {
        let f = match std::fs::File::open(self.path(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(name, 0, &e.to_string())),
        };
        let mut out = Vec::new();
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| self.err(name, i + 1, &e.to_string()))?;
            if !line.trim().is_empty() {
                out.push((i + 1, line));
            }
        }
        Ok(out)
    }

    fn jsonl<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Vec<T>, HistoryError> {
        self.lines(name)?
            .into_iter()
            .map(|(n, l)| serde_json::from_str(&l).map_err(|e| self.err(name, n, &e.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_line_parses_and_a_bad_one_says_why() {
        let d = Delivery::parse(
            Estate::Cloud,
            "Q1 2 a@corp.test,b@corp.test 0000beef 1700000000123",
        )
        .unwrap();
        assert_eq!(d.rcpts, vec!["a@corp.test", "b@corp.test"]);
        assert_eq!((d.crc, d.at_ms), (0xbeef, 1_700_000_000_123));
        assert!(Delivery::parse(Estate::Cloud, "Q1 3 a@x 0 1")
            .unwrap_err()
            .contains("count 3"));
        assert!(Delivery::parse(Estate::Cloud, "Q1 1 a@x 0")
            .unwrap_err()
            .contains("5 fields"));
    }
}
