//! The immutable view of the directory that is swapped in whole by each change, and the
//! lookups on it: [`Directory::resolve`] (the RCPT check: cached, never waits for a writer,
//! never allocates beyond the route name), [`Directory::resolve_routed`] (the same lookup
//! with the mailbox's routing address, for delivery) and [`Directory::lookup`] (state,
//! mailbox, routing address and provenance).

use super::routing::RoutingAddresses;
use super::store::{Fingerprint, Stored};
use super::table::{Parsed, Table};
use super::Directory;
use crate::types::{Address, RouteName};
use serde::Serialize;
use std::sync::Arc;

/// How an address resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Listed in the directory with this state.
    Listed(RouteName),
    /// Not listed; `directory.unknown` sends it to this route.
    Unlisted(RouteName),
    /// Not listed and `directory.unknown = "reject"`.
    Reject,
}

impl Resolution {
    /// The route, unless rejected.
    pub fn route(&self) -> Option<&RouteName> {
        match self {
            Resolution::Listed(r) | Resolution::Unlisted(r) => Some(r),
            Resolution::Reject => None,
        }
    }
}

/// How an address resolves now, with its mailbox's routing address: what delivery needs
/// (see `crate::route::plan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The route, as [`Directory::resolve`] gives it.
    pub resolution: Resolution,
    /// The routing address of the address's mailbox, when it is listed and has one.
    pub routing_address: Option<Address>,
}

impl From<Resolution> for Resolved {
    /// A resolution without a routing address.
    fn from(resolution: Resolution) -> Resolved {
        Resolved {
            resolution,
            routing_address: None,
        }
    }
}

/// One immutable version of the directory.
pub(super) struct View {
    pub(super) generation: u64,
    pub(super) table: Arc<Table>,
    pub(super) file_states: Arc<Vec<u8>>,
    /// Each mailbox's routing address, from the file (batches do not change it).
    pub(super) routing: Arc<RoutingAddresses>,
    pub(super) states: Vec<u8>,
    pub(super) origin: Vec<u32>,
    pub(super) last_change: u32,
    pub(super) fingerprint: Fingerprint,
}

impl View {
    /// The view a snapshot holds (first generation).
    pub(super) fn from_stored(s: Stored) -> View {
        View {
            generation: 1,
            table: Arc::new(s.table),
            file_states: Arc::new(s.file_states),
            routing: Arc::new(s.routing),
            states: s.states,
            origin: s.origin,
            last_change: s.last_change,
            fingerprint: s.fingerprint,
        }
    }

    /// A view of the whole of `parsed`: every mailbox in its file state, origin 0.
    pub(super) fn of_parsed(parsed: Parsed) -> View {
        let n = parsed.states.len();
        View {
            generation: 1,
            table: Arc::new(parsed.table),
            file_states: Arc::new(parsed.states.clone()),
            routing: Arc::new(parsed.routing),
            states: parsed.states,
            origin: vec![0; n],
            last_change: 0,
            fingerprint: Fingerprint::default(),
        }
    }

    pub(super) fn stored(&self, names: &[RouteName]) -> Stored {
        Stored {
            fingerprint: self.fingerprint,
            last_change: self.last_change,
            state_names: names.iter().map(|r| r.as_str().to_string()).collect(),
            table: (*self.table).clone(),
            file_states: (*self.file_states).clone(),
            routing: (*self.routing).clone(),
            states: self.states.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// Everything known about one address, for `directory lookup` and `route explain`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Lookup {
    /// The address asked about.
    pub address: String,
    /// Primary address of its mailbox, when listed.
    pub mailbox: Option<String>,
    /// Current state, when listed.
    pub state: Option<String>,
    /// Where the state comes from: `file PATH`, `batch N`, `base N` (a fleet's base
    /// import), the LDAP sync that set it (`ldap usn 123456`), or `unlisted`.
    pub origin: String,
    /// The route a message would take now (`None` = rejected).
    pub route: Option<String>,
    /// The routing address of its mailbox, when listed and it has one (a route with
    /// `rewrite_domain` sends to it).
    #[serde(default)]
    pub routing_address: Option<String>,
}

/// Cached lookups: key to (view generation, state and mailbox number when listed). An
/// entry from an older generation is ignored, so a lookup racing with a batch can never pin
/// a stale state in the cache. The state is cached with the mailbox so that a hit in
/// [`Directory::resolve`] reads nothing else.
pub(super) type LookupCache = moka::sync::Cache<Box<str>, (u64, Option<(u8, u32)>)>;

impl Directory {
    /// The current state of an address (case-insensitive). Never blocks on writers.
    pub fn resolve(&self, addr: &Address) -> Resolution {
        let view = self.view.load();
        self.resolution(self.listed(&view, addr).map(|(state, _)| state))
    }

    /// The current state of an address and its mailbox's routing address, from one lookup
    /// (what delivery plans with). Never blocks on writers.
    pub fn resolve_routed(&self, addr: &Address) -> Resolved {
        let view = self.view.load();
        let listed = self.listed(&view, addr);
        Resolved {
            resolution: self.resolution(listed.map(|(state, _)| state)),
            // Checked when the file was parsed; an address that no longer parses is none.
            routing_address: listed
                .and_then(|(_, m)| view.routing.get(m as usize))
                .and_then(|ra| Address::parse(ra, false).ok()),
        }
    }

    /// The state and mailbox number of a listed address in `view`, through the cache when
    /// there is one.
    #[inline]
    fn listed(&self, view: &View, addr: &Address) -> Option<(u8, u32)> {
        let find = |key: &[u8]| view.table.mailbox(key).map(|m| (view.states[m], m as u32));
        match &self.cache {
            Some(cache) => {
                let key = addr.key();
                match cache.get(key.as_str()) {
                    Some((generation, listed)) if generation == view.generation => listed,
                    _ => {
                        let listed = find(key.as_bytes());
                        cache.insert(key.into_boxed_str(), (view.generation, listed));
                        listed
                    }
                }
            }
            None => addr.with_key(find),
        }
    }

    pub(super) fn resolution(&self, state: Option<u8>) -> Resolution {
        match state.and_then(|s| self.states.get(s as usize)) {
            Some(route) => Resolution::Listed(route.clone()),
            None => match &*self.unknown.load() {
                Some(r) => Resolution::Unlisted((**r).clone()),
                None => Resolution::Reject,
            },
        }
    }

    /// State, mailbox, the mailbox's routing address and provenance of an address.
    pub fn lookup(&self, addr: &Address) -> Lookup {
        let view = self.view.load();
        let m = view.table.mailbox(addr.key().as_bytes());
        let state = m.map(|m| view.states[m]);
        Lookup {
            address: addr.to_string(),
            mailbox: m.map(|m| view.table.primary_address(m).to_string()),
            state: state
                .and_then(|s| self.states.get(s as usize))
                .map(|r| r.as_str().to_string()),
            origin: self.origin_of(m.map(|m| view.origin[m])),
            route: self
                .resolution(state)
                .route()
                .map(|r| r.as_str().to_string()),
            routing_address: m.and_then(|m| view.routing.get(m)).map(str::to_string),
        }
    }
}

/// A recipient's state, where it came from and its route now: what the tracking log's
/// `routed` event holds ([`Directory::routed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Current state, when listed.
    pub state: Option<String>,
    /// Where the state comes from, as [`Lookup::origin`] names it.
    pub origin: String,
    /// The route a message takes now (`None` = rejected).
    pub route: Option<String>,
}

impl Directory {
    /// State, its origin and the route of `addr`: [`Directory::lookup`] without the
    /// mailbox's addresses (it runs for every recipient accepted when the tracking log is
    /// on).
    pub fn routed(&self, addr: &Address) -> Routed {
        let view = self.view.load();
        let listed = self.listed(&view, addr);
        let origin = self.origin_of(listed.map(|(_, m)| view.origin[m as usize]));
        let state = listed.map(|(s, _)| s);
        Routed {
            state: state
                .and_then(|s| self.states.get(s as usize))
                .map(|r| r.as_str().to_string()),
            origin,
            route: self
                .resolution(state)
                .route()
                .map(|r| r.as_str().to_string()),
        }
    }
}

/// When and by what a mailbox's state was last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The change, as [`Lookup::origin`] names it (`batch 12`).
    pub origin: String,
    /// Its time, Unix seconds.
    pub at: u64,
}

impl Directory {
    /// When the state of `addr`'s mailbox was last changed by a batch, rollback, reload or
    /// sync (`None`: unlisted, or in the state the directory was first loaded with).
    pub fn moved(&self, addr: &Address) -> Option<Moved> {
        let view = self.view.load();
        let m = view.table.mailbox(addr.key().as_bytes())?;
        let id = view.origin[m];
        if id == 0 {
            return None;
        }
        let time = {
            let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let i = h.binary_search_by_key(&id, |c| c.id).ok()?;
            h[i].time.clone()
        };
        let at = chrono::DateTime::parse_from_rfc3339(&time)
            .ok()?
            .timestamp();
        Some(Moved {
            origin: self.origin_name(id),
            at: u64::try_from(at).ok()?,
        })
    }

    /// How [`Lookup::origin`] names the change a mailbox's state came from (`None`:
    /// unlisted; 0: the directory file).
    fn origin_of(&self, change: Option<u32>) -> String {
        match change {
            None => "unlisted".into(),
            Some(0) => format!("file {}", self.source.name()),
            Some(id) => self.origin_name(id),
        }
    }

    /// `batch N`; `base N` when change `id` was a fleet's base import; the source's mark
    /// (`ldap usn 123456`) when it was a load of a source that marks origins.
    fn origin_name(&self, id: u32) -> String {
        use super::store::ChangeKind;
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        match h.binary_search_by_key(&id, |c| c.id).ok().map(|i| &h[i]) {
            Some(c) if c.kind == ChangeKind::Base && c.source.starts_with("ldap ") => {
                format!("{} (base {id})", c.source)
            }
            Some(c) if c.kind == ChangeKind::Base => format!("base {id}"),
            Some(c) if matches!(c.kind, ChangeKind::Reload | ChangeKind::Delta) => c.source.clone(),
            _ => format!("batch {id}"),
        }
    }
}
