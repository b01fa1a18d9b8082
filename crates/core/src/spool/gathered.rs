//! What a replay gathers from the log's records: the parts of each record it needs
//! ([`Item`]), and the queued messages so far, each in 72 bytes keyed by its [`QueueKey`]
//! ([`Gathered`]), handed to the queue as a [`QueuedSet`]. Read by [`super::recover`] from
//! the records themselves and by [`super::segindex`] from a sealed segment's index.

use super::recover::Queued;
use super::segment::{Header, Kind};
use super::Loc;
use crate::chunks::ChunkMap;
use crate::types::{QueueId, QueueKey};
use std::collections::HashMap;

/// The parts of an envelope the scan needs.
#[derive(serde::Deserialize)]
struct EnvHead {
    id: QueueId,
    received_at: u64,
}

/// The parts of a state record the scan needs.
#[derive(serde::Deserialize)]
struct StateHead {
    id: QueueId,
    state: StateSummary,
}

#[derive(serde::Deserialize)]
struct StateSummary {
    attempts: u32,
    #[serde(default)]
    held: bool,
    #[serde(default)]
    next_attempt_ms: Option<u64>,
    #[serde(default)]
    unreachable: Option<String>,
}

/// What a record says about the queue (the parts of its metadata a replay needs).
#[derive(Debug, Clone)]
pub(super) enum Item {
    /// A message record (first written, or copied forward by compaction).
    Message {
        /// Its queue id.
        id: ItemId,
        /// Unix time of acceptance.
        received_at: u64,
    },
    /// A state record.
    State {
        /// Its queue id.
        id: ItemId,
        /// Attempts made.
        attempts: u32,
        /// Held by an admin.
        held: bool,
        /// Next attempt (Unix ms).
        next_attempt_ms: Option<u64>,
        /// The route found unreachable, as a number of the replay's [`Routes`].
        route: Option<u16>,
    },
    /// An end record.
    Done {
        /// Its queue id.
        id: ItemId,
    },
}

/// A queue id: as a number when it has the generated form (always, for ids this relay
/// makes), else as text.
#[derive(Debug, Clone)]
pub(super) enum ItemId {
    /// The id as a number.
    Key(QueueKey),
    /// An id of another form.
    Text(QueueId),
}

impl ItemId {
    pub(super) fn of(id: QueueId) -> ItemId {
        match id.key() {
            Some(k) => ItemId::Key(k),
            None => ItemId::Text(id),
        }
    }
}

/// Route names met in a replay, by number (the queue's messages name few routes).
#[derive(Debug, Default)]
pub(super) struct Routes {
    names: Vec<String>,
    ids: HashMap<String, u16>,
}

impl Routes {
    /// The number of route `name` (`u16::MAX - 1` names at most; beyond, the last number).
    pub(super) fn id(&mut self, name: &str) -> u16 {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let Ok(i) = u16::try_from(self.names.len()) else {
            return u16::MAX - 1;
        };
        if i >= u16::MAX - 1 {
            return u16::MAX - 1;
        }
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), i);
        i
    }

    /// The names, by number.
    pub(super) fn names(&self) -> &[String] {
        &self.names
    }
}

/// The item a record's header and metadata stand for (none for turn markers and fillers).
pub(super) fn item_of(
    h: &Header,
    meta: &[u8],
    routes: &mut Routes,
) -> Result<Option<Item>, serde_json::Error> {
    Ok(Some(match h.kind {
        Kind::Message => {
            let e: EnvHead = serde_json::from_slice(meta)?;
            Item::Message {
                id: ItemId::of(e.id),
                received_at: e.received_at,
            }
        }
        Kind::State => {
            let s: StateHead = serde_json::from_slice(meta)?;
            Item::State {
                id: ItemId::of(s.id),
                attempts: s.state.attempts,
                held: s.state.held,
                next_attempt_ms: s.state.next_attempt_ms,
                route: s.state.unreachable.as_deref().map(|r| routes.id(r)),
            }
        }
        Kind::Done => Item::Done {
            id: ItemId::of(serde_json::from_slice(meta)?),
        },
        Kind::Commit | Kind::Skip => return Ok(None),
    }))
}

/// A queued message as the replay keeps it: 56 bytes, keyed by its [`QueueKey`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Live {
    msg: Loc,
    /// Its latest state record (segment `u32::MAX`: none).
    state: Loc,
    received_at: u64,
    /// `u64::MAX`: none.
    next_attempt_ms: u64,
    attempts: u32,
    /// A number of the replay's [`Routes`] (`u16::MAX`: none).
    route: u16,
    held: bool,
}

const NO_STATE: Loc = Loc {
    seg: u32::MAX,
    meta_len: 0,
    off: 0,
};

/// The queued messages a replay found, oldest first. Kept compact (about 72 bytes a
/// message); [`QueuedSet::into_iter`] hands them out one by one, freeing the set as it goes.
#[derive(Debug, Default)]
pub struct QueuedSet {
    live: ChunkMap<QueueKey, Live>,
    /// Messages whose ids are not of the generated form (none, for ids this relay makes).
    odd: Vec<Queued>,
    routes: Vec<String>,
}

impl QueuedSet {
    /// Messages queued.
    pub fn len(&self) -> usize {
        self.live.len() + self.odd.len()
    }

    /// True when none is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn queued(routes: &[String], id: QueueId, l: &Live) -> Queued {
        Queued {
            id,
            received_at: l.received_at,
            msg: l.msg,
            state: (l.state.seg != NO_STATE.seg).then_some(l.state),
            attempts: l.attempts,
            held: l.held,
            next_attempt_ms: (l.next_attempt_ms != u64::MAX).then_some(l.next_attempt_ms),
            unreachable: routes.get(l.route as usize).cloned(),
        }
    }

    /// Every queued message, oldest first (copies).
    pub fn list(&self) -> Vec<Queued> {
        let mut all = self.odd.clone();
        all.extend(
            self.live
                .range_from(std::ops::Bound::Unbounded)
                .map(|(k, l)| Self::queued(&self.routes, k.id(), l)),
        );
        all
    }

    /// The segments the queued messages' records are in (one per record).
    pub(super) fn segments(&self) -> impl Iterator<Item = u32> + '_ {
        let odd = self
            .odd
            .iter()
            .flat_map(|q| std::iter::once(q.msg.seg).chain(q.state.map(|s| s.seg)));
        let live = self
            .live
            .range_from(std::ops::Bound::Unbounded)
            .flat_map(|(_, l)| {
                std::iter::once(l.msg.seg)
                    .chain((l.state.seg != NO_STATE.seg).then_some(l.state.seg))
            });
        odd.chain(live)
    }
}

impl IntoIterator for QueuedSet {
    type Item = Queued;
    type IntoIter = Box<dyn Iterator<Item = Queued> + Send>;

    /// The queued messages, oldest first: those with ids of another form, then the rest.
    fn into_iter(self) -> Self::IntoIter {
        let routes = self.routes;
        Box::new(
            self.odd.into_iter().chain(
                self.live
                    .into_iter()
                    .map(move |(k, l)| QueuedSet::queued(&routes, k.id(), &l)),
            ),
        )
    }
}

/// The queued messages of a replay by id: by [`QueueKey`] in chunks, or (ids of another
/// form) by [`QueueId`].
trait Lives<K> {
    fn get_mut(&mut self, k: &K) -> Option<&mut Live>;
    fn insert(&mut self, k: K, l: Live);
    fn remove(&mut self, k: &K) -> Option<Live>;
}

impl Lives<QueueKey> for ChunkMap<QueueKey, Live> {
    fn get_mut(&mut self, k: &QueueKey) -> Option<&mut Live> {
        ChunkMap::get_mut(self, k)
    }
    fn insert(&mut self, k: QueueKey, l: Live) {
        ChunkMap::insert(self, k, l);
    }
    fn remove(&mut self, k: &QueueKey) -> Option<Live> {
        ChunkMap::remove(self, k)
    }
}

impl Lives<QueueId> for HashMap<QueueId, Live> {
    fn get_mut(&mut self, k: &QueueId) -> Option<&mut Live> {
        HashMap::get_mut(self, k)
    }
    fn insert(&mut self, k: QueueId, l: Live) {
        HashMap::insert(self, k, l);
    }
    fn remove(&mut self, k: &QueueId) -> Option<Live> {
        HashMap::remove(self, k)
    }
}

/// Applies `item` (a record at `loc`) to message `k` of `lives`.
fn apply_to<K>(
    lives: &mut impl Lives<K>,
    k: K,
    loc: Loc,
    item: &Item,
    dones: &mut Vec<(u32, u32)>,
) {
    match *item {
        Item::Message { received_at, .. } => {
            if let Some(old) = lives.get_mut(&k) {
                // Copied forward by compaction: the copy must outlive the original, and the
                // state so far stays (the state record written with the copy may be torn).
                dones.push((loc.seg, old.msg.seg));
                old.msg = loc;
                return;
            }
            lives.insert(
                k,
                Live {
                    msg: loc,
                    state: NO_STATE,
                    received_at,
                    next_attempt_ms: u64::MAX,
                    attempts: 0,
                    route: u16::MAX,
                    held: false,
                },
            );
        }
        Item::State {
            attempts,
            held,
            next_attempt_ms,
            route,
            ..
        } => {
            if let Some(l) = lives.get_mut(&k) {
                l.state = loc;
                l.attempts = attempts;
                l.held = held;
                l.next_attempt_ms = next_attempt_ms.unwrap_or(u64::MAX);
                l.route = route.unwrap_or(u16::MAX);
            }
        }
        Item::Done { .. } => {
            if let Some(l) = lives.remove(&k) {
                dones.push((loc.seg, l.msg.seg));
            }
        }
    }
}

/// What the segments under `dir` hold, as it is being gathered.
#[derive(Default)]
pub(super) struct Gathered {
    pub(super) live: ChunkMap<QueueKey, Live>,
    pub(super) odd: HashMap<QueueId, Live>,
    /// Segments that must outlive others: (segment of a Done or of a copied message record,
    /// segment of the message record it ends or supersedes).
    pub(super) dones: Vec<(u32, u32)>,
    pub(super) routes: Routes,
}

impl Gathered {
    /// Applies one record, in log order.
    pub(super) fn apply(&mut self, loc: Loc, item: Item) {
        let id = match &item {
            Item::Message { id, .. } | Item::State { id, .. } | Item::Done { id } => id.clone(),
        };
        match id {
            ItemId::Key(k) => apply_to(&mut self.live, k, loc, &item, &mut self.dones),
            ItemId::Text(t) => apply_to(&mut self.odd, t, loc, &item, &mut self.dones),
        }
    }

    /// Applies one record from its header and metadata.
    pub(super) fn apply_record(
        &mut self,
        loc: Loc,
        h: &Header,
        meta: &[u8],
    ) -> Result<(), serde_json::Error> {
        if let Some(item) = item_of(h, meta, &mut self.routes)? {
            self.apply(loc, item);
        }
        Ok(())
    }

    pub(super) fn into_set(self) -> QueuedSet {
        let names = &self.routes.names;
        let mut odd: Vec<Queued> = (self.odd.into_iter())
            .map(|(id, l)| QueuedSet::queued(names, id, &l))
            .collect();
        odd.sort_by(|a, b| a.id.cmp(&b.id));
        QueuedSet {
            live: self.live,
            odd,
            routes: self.routes.names,
        }
    }
}
