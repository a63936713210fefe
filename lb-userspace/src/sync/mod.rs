//! Applies a [`DesiredState`] to the maps with the fewest writes, in an order that never lets
//! a packet in flight see a half-updated service:
//!
//! 1. backends a frontend needs are written first (new ones, and state changes);
//! 2. then its Maglev table, written whole into the frontend's table that new flows do not
//!    use (each service id has two keys in the Maglev map, see
//!    `lb_common::maglev::table_key`); the service entry switches to it in step 4. That
//!    table is, fastest first: the one already there when it holds exactly the new
//!    backends (a flap back); the one already there rewritten in place, when it is the
//!    frontend's own, of the right size, and every program that could still read it since
//!    the service entry last used it has finished (a grace period has passed since,
//!    [`DatapathMaps::grace_since`]); else a new inner map (or one another frontend has
//!    with the same backends and size: shared) put under the key with one write of the
//!    Maglev map. Those writes of all frontends go in one batch: the kernel waits for
//!    running programs after every map-of-maps write system call (about 7.5 ms here), once
//!    per batch instead of once per table; a rewrite in place waits for nothing;
//! 3. then its new source ranges (loadBalancerSourceRanges);
//! 4. then its reverse-NAT entry, its bit in the destination pre-filter (a new frontend's
//!    bucket: `lb_common::prefilter`) and its service entry (flags, affinity, backend
//!    count, and which of its two tables new flows use);
//! 5. then the source ranges it no longer has, and its tables when it has no backend left;
//! 6. frontends no longer wanted are removed service entry first; a pre-filter bit is
//!    cleared after the last frontend of its bucket is removed;
//! 7. backends that no frontend lists any more are marked REMOVED, and deleted once they
//!    have been REMOVED for the drain period (`SyncConfig::drain`).
//!
//! Both IP families go through the same steps: an IPv6 frontend's service entry, reverse NAT
//! and source ranges are in the v6 maps (`lb_common::map_names::SERVICES6`, `REV_NAT6`,
//! `SOURCE_RANGES6`), its backends in `BACKENDS6`; service ids, backend ids (an id is in one
//! of the two backends maps), the Maglev tables and the pre-filter
//! (`lb_common::prefilter::bucket6`) are shared. A frontend's backends are of its family
//! ([`SyncError::MixedFamilies`] otherwise).
//!
//! The Maglev table (what new flows choose from) holds a frontend's active backends; its
//! terminating backends only when it has no active one (kube-proxy's fallback). A
//! terminating backend keeps its backend entry while it is listed, so the flows conntrack
//! pinned to it go on until they end: it drains. A backend that left the EndpointSlices
//! keeps its entry, REMOVED, for the drain period, so that established TCP connections to a
//! pod that is still shutting down are not broken (the datapath's rules for each state are
//! on `lb_common::Event`).
//!
//! The bookkeeping mirrors exactly what is in the maps, write by write, so a failed write (a
//! full map) leaves both consistent: the frontend keeps what it had, the error is reported,
//! and the next apply tries again. On start the bookkeeping is rebuilt from the pinned maps
//! ([`Syncer::adopt`]), so a restarted agent rewrites nothing that is already right. The time
//! a backend was removed is not in the maps: an adopted REMOVED backend drains for a whole
//! period from the restart on (at most twice the period in all). Adopted frontends that the
//! first complete view lacks (orphans: a Service deleted while the agent was down, or one the
//! source has not delivered yet) keep working for a grace period (`SyncConfig::orphan_grace`)
//! from that view on, and are removed after it unless a view lists them again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_REMOTE, BACKEND_REMOVED, BACKEND_TERMINATING, Backend4, Backend6,
    SERVICE_F_EXTERNAL, SERVICE_F_RANDOM, SERVICE_F_SOURCE_RANGES, SERVICE_F_TABLE_B, Service,
    backend_stats_slot,
    maglev::{KEY_TABLE_B, table_key},
    map_names, prefilter,
};
use thiserror::Error;

use crate::{
    datapath::maps::{
        BackendEntry, DatapathMaps, MapOpError, RevNatEntry, TableId, TableInfo, TableRef,
    },
    model::{IpCidr, IpFamily, Selection},
    plan::{
        desired::{DesiredState, Frontend, FrontendKey, FrontendPlan},
        maglev::{self, BackendIdentity, MaglevError},
    },
};

/// A failure to program one frontend (the others are unaffected).
#[derive(Debug, Error)]
pub enum SyncError {
    /// A map operation failed.
    #[error("frontend {frontend} ({service}): {source}")]
    Map {
        /// The frontend.
        frontend: Frontend,
        /// The Service port it belongs to.
        service: String,
        /// The map operation.
        #[source]
        source: MapOpError,
    },
    /// Its Maglev table cannot be built (more backends than table entries).
    #[error("frontend {frontend} ({service}): {source}")]
    Maglev {
        /// The frontend.
        frontend: Frontend,
        /// The Service port it belongs to.
        service: String,
        /// Why.
        #[source]
        source: MaglevError,
    },
    /// A backend of another family than its frontend's (a frontend's Maglev table names
    /// backends of its own family only).
    #[error("frontend {frontend} ({service}): backend {backend} is not of the frontend's family")]
    MixedFamilies {
        /// The frontend.
        frontend: Frontend,
        /// The Service port it belongs to.
        service: String,
        /// The backend's address.
        backend: IpAddr,
    },
    /// No service id is free: there is one per frontend, as many as the services map holds.
    #[error(
        "frontend {frontend}: all {max} service ids are in use (one per frontend){}",
        crate::datapath::maps::raise_hint(map_names::SERVICES)
    )]
    OutOfServiceIds {
        /// The frontend.
        frontend: Frontend,
        /// The number of ids.
        max: u32,
    },
    /// Removing something that is no longer wanted failed; it stays, and is retried.
    #[error("removing stale state: {0}")]
    Cleanup(MapOpError),
}

impl SyncError {
    /// The map whose operation failed (a full services map for [`SyncError::OutOfServiceIds`]);
    /// `None` when no map operation failed.
    pub fn map(&self) -> Option<&'static str> {
        match self {
            SyncError::Map { source, .. } | SyncError::Cleanup(source) => Some(source.map()),
            SyncError::OutOfServiceIds { .. } => Some(map_names::SERVICES),
            SyncError::Maglev { .. } | SyncError::MixedFamilies { .. } => None,
        }
    }
}

/// How the syncer programs selection and drains backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// The largest Maglev table: a prime (see [`maglev::DEFAULT_TABLE_SIZE`]); each table
    /// is sized for its backends up to it ([`maglev::table_size_for`]).
    pub table_size: u32,
    /// How long a backend that left the EndpointSlices keeps its entry (REMOVED) so that
    /// established TCP connections to it continue.
    pub drain: Duration,
    /// The selection of frontends whose Service does not choose one.
    pub selection: Selection,
    /// How long frontends adopted from the pinned maps that the first complete view lacks
    /// (orphans) keep working before they are removed, counted from that first view.
    pub orphan_grace: Duration,
}

/// At most this many tables are built and not yet put in the Maglev map (each is an open
/// file until then): a larger sync puts them in batches of this many.
const MAX_UNPUT_TABLES: usize = 4096;

/// The default drain period of removed backends.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(60);

/// The default grace period of orphaned frontends.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(60);

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            table_size: maglev::DEFAULT_TABLE_SIZE,
            drain: DEFAULT_DRAIN,
            selection: Selection::Maglev,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
        }
    }
}

/// What a Maglev table holds: the same key gives the same table, so frontends with equal
/// keys share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TableKey {
    size: u32,
    /// Backend ids, sorted.
    backends: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProgrammedTable {
    key: TableKey,
    id: TableId,
}

/// A table that frontends point at, and how many do.
#[derive(Debug)]
struct SharedTable {
    id: TableId,
    users: usize,
}

/// One of a frontend's two tables.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    table: ProgrammedTable,
    /// When the service entry stopped selecting it (after that write returned); `None`
    /// when it has not selected it since it was put there.
    retired: Option<Instant>,
}

/// One frontend, exactly as it is in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    /// Its service id (allocated before anything is written under it).
    id: u32,
    /// Its service entry; `None` until the first write of it succeeds (until then no packet
    /// reaches what is written under the id).
    service: Option<Service>,
    /// Its tables in the Maglev map: under key `id` and key `id | KEY_TABLE_B`.
    slots: [Option<Slot>; 2],
    /// Its source ranges in the source-range map of its family.
    ranges: BTreeSet<IpCidr>,
    rev_nat: bool,
    /// Counted in its pre-filter bucket (whose bit is then set): from before its service
    /// entry is first written until after that entry is deleted.
    prefiltered: bool,
    /// Every backend the frontend lists, draining ones included: kept in the backends map.
    members: Vec<u32>,
}

impl Programmed {
    fn new(id: u32) -> Self {
        Self {
            id,
            service: None,
            slots: [None, None],
            ranges: BTreeSet::new(),
            rev_nat: false,
            prefiltered: false,
            members: Vec::new(),
        }
    }
}

impl Programmed {
    /// The slot the service entry selects (0 before it is written).
    fn live(&self) -> usize {
        self.service
            .map_or(0, |s| usize::from(s.flags & SERVICE_F_TABLE_B != 0))
    }

    /// The table new flows use.
    fn table(&self) -> Option<&ProgrammedTable> {
        self.slots[self.live()].as_ref().map(|s| &s.table)
    }

    /// The Maglev map key of a slot.
    fn key(&self, slot: usize) -> u32 {
        table_key(self.id, if slot == 1 { SERVICE_F_TABLE_B } else { 0 })
    }

    /// The tables in both slots.
    fn tables(&self) -> impl Iterator<Item = &ProgrammedTable> {
        self.slots.iter().flatten().map(|s| &s.table)
    }
}

/// Address, port and protocol: one backend entry each.
type BackendKey = (SocketAddr, u8);

fn backend_key(backend: &BackendEntry) -> BackendKey {
    (backend.addr(), backend.proto())
}

/// What one [`Syncer::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Map writes and deletes issued.
    pub map_ops: usize,
    /// Frontends programmed after the apply.
    pub frontends: usize,
    /// Backends programmed after the apply (REMOVED ones that drain included).
    pub backends: usize,
    /// Wanted frontends that are not programmed as wanted after the apply (their last
    /// write failed): missing, or still as they were before.
    pub unprogrammed: usize,
    /// Orphans (adopted frontends no view has listed) kept for their grace period after
    /// the apply.
    pub orphans: usize,
    /// Orphans this apply removed because their grace period ended.
    pub orphans_pruned: usize,
    /// What failed (the rest was applied).
    pub errors: Vec<SyncError>,
}

/// A wanted frontend during an apply: what it is to become, taken out of the bookkeeping
/// until its writes are done.
struct Pending {
    key: FrontendKey,
    frontend: Frontend,
    service_name: String,
    programmed: Programmed,
    /// The table it needs; `None` when it has no backend.
    table: Option<TableKey>,
    ranges: BTreeSet<IpCidr>,
    service: Service,
    /// The slot its table is in, which its service entry is to select.
    slot: usize,
    /// Its table could not be written: its entries stay as they are.
    failed: bool,
}

impl Pending {
    fn map_error(&self, source: MapOpError) -> SyncError {
        SyncError::Map {
            frontend: self.frontend,
            service: self.service_name.clone(),
            source,
        }
    }

    fn build_error(&self, error: BuildError) -> SyncError {
        match error {
            BuildError::Map(source) => self.map_error(source),
            BuildError::Maglev(source) => SyncError::Maglev {
                frontend: self.frontend,
                service: self.service_name.clone(),
                source,
            },
        }
    }
}

/// Why a table could not be built.
enum BuildError {
    Map(MapOpError),
    Maglev(MaglevError),
}

/// Counts one more user of `table`; it becomes the shared table of its key if that key has
/// none.
fn share(tables: &mut HashMap<TableKey, SharedTable>, table: &ProgrammedTable) {
    let shared = tables.entry(table.key.clone()).or_insert(SharedTable {
        id: table.id,
        users: 0,
    });
    if shared.id == table.id {
        shared.users += 1;
    }
}

fn unshare(tables: &mut HashMap<TableKey, SharedTable>, table: &ProgrammedTable) {
    if let Some(shared) = tables.get_mut(&table.key)
        && shared.id == table.id
    {
        shared.users -= 1;
        if shared.users == 0 {
            tables.remove(&table.key);
        }
    }
}

/// The pre-filter bitmap as the map holds it, and how many frontends each bucket counts.
#[derive(Debug, Default)]
struct Prefilter {
    /// Bucket -> frontends counted in it (never 0).
    users: HashMap<u32, u32>,
    /// The non-zero words of the bitmap, by index.
    words: HashMap<u32, u64>,
}

impl Prefilter {
    /// The words that `users` calls for.
    fn wanted_words(&self) -> HashMap<u32, u64> {
        let mut words: HashMap<u32, u64> = HashMap::new();
        for bucket in self.users.keys() {
            let (index, bit) = prefilter::position(*bucket);
            *words.entry(index).or_default() |= bit;
        }
        words
    }
}

/// Keeps the maps equal to the desired state.
pub struct Syncer<M> {
    maps: M,
    config: SyncConfig,
    frontends: BTreeMap<FrontendKey, Programmed>,
    /// Backends of both families (one id space).
    backends: HashMap<u32, BackendEntry>,
    backend_ids: HashMap<BackendKey, u32>,
    /// How many of `backends` hold each counters' slot: one, except after adopting the maps
    /// of an agent that did not keep the slots apart.
    backend_slots: HashMap<u32, u32>,
    /// REMOVED backends and when they were marked so.
    removed: HashMap<u32, Instant>,
    tables: HashMap<TableKey, SharedTable>,
    /// How many keys of the Maglev map point at each table (the frontends' slots).
    table_refs: HashMap<TableId, u32>,
    /// [`MAX_UNPUT_TABLES`] (smaller in tests).
    max_unput_tables: usize,
    prefilter: Prefilter,
    used_service_ids: BTreeSet<u32>,
    next_service_id: u32,
    next_backend_id: u32,
    ops: usize,
    /// Wanted frontends whose last apply failed.
    unprogrammed: BTreeSet<FrontendKey>,
    /// Frontends adopted from the pinned maps that no apply has wanted yet.
    adopted: BTreeSet<FrontendKey>,
    /// When the first complete view was applied: the orphans' grace period starts then.
    first_view: Option<Instant>,
}

impl<M: DatapathMaps> Syncer<M> {
    /// [`Syncer::adopt_with`] the default configuration.
    pub fn adopt(maps: M) -> Result<Self, MapOpError> {
        Self::adopt_with(maps, SyncConfig::default())
    }

    /// Takes over whatever the maps hold (empty maps on a first start; an earlier agent's
    /// state on a restart), removing entries that no service can reach.
    pub fn adopt_with(maps: M, config: SyncConfig) -> Result<Self, MapOpError> {
        let contents = maps.read_all()?;
        let now = Instant::now();
        let mut syncer = Syncer {
            maps,
            config,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            backend_slots: HashMap::new(),
            removed: HashMap::new(),
            tables: HashMap::new(),
            table_refs: HashMap::new(),
            max_unput_tables: MAX_UNPUT_TABLES,
            prefilter: Prefilter::default(),
            used_service_ids: BTreeSet::new(),
            next_service_id: 1,
            next_backend_id: 1,
            ops: 0,
            unprogrammed: BTreeSet::new(),
            adopted: BTreeSet::new(),
            first_view: None,
        };
        let services = &contents.services;
        syncer.adopted = services.iter().map(|(key, _)| *key).collect();
        let tables: HashMap<u32, &TableInfo> =
            contents.tables.iter().map(|(id, t)| (*id, t)).collect();
        // Source ranges and reverse-NAT entries by service id and family.
        let mut ranges: HashMap<(u32, IpFamily), BTreeSet<IpCidr>> = HashMap::new();
        for &(id, range) in &contents.source_ranges {
            ranges
                .entry((id, range.family()))
                .or_default()
                .insert(range);
        }
        let rev_nat: BTreeSet<(u32, IpFamily)> = (contents.rev_nat.iter())
            .map(|(id, entry)| (*id, entry.family()))
            .collect();
        let mut live_ids: BTreeSet<(u32, IpFamily)> = BTreeSet::new();
        for (key, service) in services {
            let family = key.family();
            live_ids.insert((service.id, family));
            let mut programmed = Programmed {
                id: service.id,
                service: Some(*service),
                slots: [None, None],
                ranges: ranges.remove(&(service.id, family)).unwrap_or_default(),
                rev_nat: rev_nat.contains(&(service.id, family)),
                prefiltered: true,
                members: Vec::new(),
            };
            *syncer
                .prefilter
                .users
                .entry(key.prefilter_bucket())
                .or_default() += 1;
            let live = programmed.live();
            for slot in 0..2 {
                let Some(t) = tables.get(&programmed.key(slot)) else {
                    continue;
                };
                let table = ProgrammedTable {
                    key: TableKey {
                        size: t.size,
                        backends: t.backends.clone(),
                    },
                    id: t.id,
                };
                // When the other table was last used is not in the maps: from now on.
                let retired = (slot != live).then_some(now);
                syncer.attach(&mut programmed, slot, table, retired);
            }
            syncer.used_service_ids.insert(service.id);
            syncer.frontends.insert(*key, programmed);
        }
        for &(id, backend) in &contents.backends {
            syncer.backends.insert(id, backend);
            syncer.take_slot(id);
            syncer
                .backend_ids
                .entry(backend_key(&backend))
                .or_insert(id);
            if backend.state() == BACKEND_REMOVED {
                syncer.removed.insert(id, now);
            }
        }
        syncer.next_service_id = syncer.used_service_ids.last().map_or(1, |id| id + 1);
        syncer.next_backend_id = syncer.backends.keys().max().map_or(1, |id| id + 1);

        // The pre-filter gets the bits of the service entries (all of them after an upgrade
        // that brings the map), and loses those of none (an interrupted update's).
        let wanted = syncer.prefilter.wanted_words();
        let found: HashMap<u32, u64> = contents.prefilter.iter().copied().collect();
        for index in wanted.keys().chain(found.keys()) {
            let word = wanted.get(index).copied().unwrap_or(0);
            if found.get(index).copied().unwrap_or(0) != word {
                syncer.maps.put_prefilter_word(*index, word)?;
            }
        }
        syncer.prefilter.words = wanted;

        // Tables, source ranges and reverse-NAT entries of no service are leftovers of an
        // interrupted update: nothing reads them, so they go now.
        let leftover: Vec<u32> = contents
            .tables
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| !syncer.used_service_ids.contains(&(key & !KEY_TABLE_B)))
            .collect();
        syncer.maps.delete_tables(&leftover).map_err(|e| e.error)?;
        // (Those of the other family than the service's are leftovers too.)
        for ((id, _), stale) in ranges {
            for range in stale {
                syncer.maps.delete_source_range(id, range)?;
            }
        }
        for &(id, family) in &rev_nat {
            if !live_ids.contains(&(id, family)) {
                syncer.maps.delete_rev_nat(id, family)?;
            }
        }
        Ok(syncer)
    }

    /// The maps, for reading.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The configuration.
    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// The service id of each programmed frontend.
    pub fn service_ids(&self) -> impl Iterator<Item = (FrontendKey, u32)> + '_ {
        self.frontends
            .iter()
            .filter(|(_, p)| p.service.is_some())
            .map(|(k, p)| (*k, p.id))
    }

    /// When the next REMOVED backend's drain ends: an apply after that deletes it.
    pub fn next_drain_deadline(&self) -> Option<Instant> {
        self.removed.values().min().map(|t| *t + self.config.drain)
    }

    /// When the orphans' grace period ends (while there are orphans): an apply after that
    /// removes them.
    pub fn next_orphan_deadline(&self) -> Option<Instant> {
        let first_view = self.first_view?;
        (!self.adopted.is_empty()).then(|| first_view + self.config.orphan_grace)
    }

    /// The earliest of [`Syncer::next_drain_deadline`] and [`Syncer::next_orphan_deadline`]:
    /// when an apply of no change has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.next_drain_deadline(), self.next_orphan_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Makes the maps hold `desired`, with the fewest writes, in the safe order.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        self.apply_at(desired, Instant::now())
    }

    /// [`Syncer::apply`] at the time `now` (which decides which drains have ended).
    ///
    /// The steps of the module documentation run for all frontends at once (each frontend
    /// still sees them in order), so that the tables of all frontends are swapped in with
    /// one system call, and the unused ones removed with another.
    pub fn apply_at(&mut self, desired: &DesiredState, now: Instant) -> ApplyReport {
        let wanted: BTreeMap<FrontendKey, (&Frontend, &FrontendPlan)> = desired
            .frontends
            .iter()
            .map(|(f, plan)| (f.key(), (f, plan)))
            .collect();
        // The first complete view: the orphans' grace period starts.
        self.first_view.get_or_insert(now);
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        self.unprogrammed.retain(|k| wanted.contains_key(k));
        self.apply_scoped(&wanted, stale, None, now)
    }

    /// Like [`Syncer::apply_at`], for the frontends in `changed` only: each is programmed as
    /// `desired` has it, or removed when `desired` does not list it; and the backends whose
    /// drain has ended are deleted. The cost follows the size of the change, not of the
    /// state (but for one scan of the programmed ids when a backend may have lost its last
    /// frontend).
    pub fn apply_changed<'a>(
        &mut self,
        desired: &DesiredState,
        changed: impl IntoIterator<Item = &'a Frontend>,
        now: Instant,
    ) -> ApplyReport {
        let mut wanted = BTreeMap::new();
        let mut stale = Vec::new();
        let mut released = BTreeSet::new();
        for frontend in changed {
            let key = frontend.key();
            if let Some(p) = self.frontends.get(&key) {
                released.extend(p.members.iter().copied());
                released.extend(
                    p.table()
                        .iter()
                        .flat_map(|t| t.key.backends.iter().copied()),
                );
            }
            match desired.frontends.get_key_value(frontend) {
                Some((f, plan)) => {
                    wanted.insert(key, (f, plan));
                }
                None => {
                    self.unprogrammed.remove(&key);
                    if self.frontends.contains_key(&key) {
                        stale.push(key);
                    }
                }
            }
        }
        let drained = self
            .removed
            .iter()
            .filter(|(_, since)| now >= **since + self.config.drain)
            .map(|(id, _)| *id);
        released.extend(drained);
        // Orphans whose grace has ended go too (`desired` is complete: what it lacks is not
        // wanted).
        if self.next_orphan_deadline().is_some_and(|end| now >= end) {
            let listed: BTreeSet<FrontendKey> = desired.frontends.keys().map(|f| f.key()).collect();
            for key in &self.adopted {
                if !listed.contains(key) && !stale.contains(key) {
                    stale.push(*key);
                }
                if let Some(p) = self.frontends.get(key) {
                    released.extend(
                        p.table()
                            .into_iter()
                            .flat_map(|t| t.key.backends.iter().copied()),
                    );
                }
            }
        }
        self.apply_scoped(&wanted, stale, Some(released), now)
    }

    /// The steps of the module documentation for the frontends `wanted` and `stale`; then
    /// the backends among `candidates` (all when `None`) that no frontend lists are
    /// collected.
    ///
    /// The steps run for all these frontends at once (each frontend still sees them in
    /// order), so that the tables of all frontends are swapped in with one system call, and
    /// the unused ones removed with another.
    fn apply_scoped(
        &mut self,
        wanted: &BTreeMap<FrontendKey, (&Frontend, &FrontendPlan)>,
        stale: Vec<FrontendKey>,
        candidates: Option<BTreeSet<u32>>,
        now: Instant,
    ) -> ApplyReport {
        let ops_before = self.ops;
        let mut errors = Vec::new();
        for key in wanted.keys() {
            self.adopted.remove(key);
        }
        // Orphans stay for their grace period (which starts with the first complete view).
        let grace_over = self.next_orphan_deadline().is_some_and(|end| now >= end);
        let stale: Vec<FrontendKey> = stale
            .into_iter()
            .filter(|key| grace_over || !self.adopted.contains(key))
            .collect();
        let mut orphans_pruned = 0;
        if grace_over {
            orphans_pruned = stale.iter().filter(|k| self.adopted.contains(k)).count();
            // From now on they are ordinary stale frontends (a failed removal is retried).
            self.adopted.clear();
        }

        // 1. Backends, and what each frontend is to become.
        let mut pending = Vec::with_capacity(wanted.len());
        for (key, (frontend, plan)) in wanted {
            match self.prepare(key, frontend, plan) {
                Ok(p) => pending.push(p),
                Err(error) => {
                    self.unprogrammed.insert(*key);
                    errors.push(error);
                }
            }
        }
        // 2. Tables.
        self.swap_tables(&mut pending, &mut errors);
        // 3, 4, 5. Source ranges, reverse NAT, service entries.
        let mut unused_tables = Vec::new();
        for mut p in pending {
            let written = !p.failed
                && match self.write_entries(&mut p) {
                    Ok(()) => {
                        if p.table.is_none() && p.programmed.tables().next().is_some() {
                            unused_tables.push(p.key);
                        }
                        true
                    }
                    Err(error) => {
                        errors.push(p.map_error(error));
                        false
                    }
                };
            if written {
                self.unprogrammed.remove(&p.key);
            } else {
                self.unprogrammed.insert(p.key);
            }
            self.frontends.insert(p.key, p.programmed);
        }
        // 6. Frontends no longer wanted, service entry first.
        for key in stale {
            if let Err(error) = self.remove_entries(&key) {
                errors.push(SyncError::Cleanup(error));
            } else if self.frontends[&key].tables().next().is_some() {
                unused_tables.push(key);
            } else {
                self.forget(&key);
            }
        }
        // Then the tables nothing reads any more.
        self.delete_tables(&unused_tables, wanted, &mut errors);
        // 7. Backends no frontend lists.
        let candidates = candidates.unwrap_or_else(|| self.backends.keys().copied().collect());
        if let Err(error) = self.collect_backends(candidates, now) {
            errors.push(SyncError::Cleanup(error));
        }
        ApplyReport {
            map_ops: self.ops - ops_before,
            frontends: self.service_ids().count(),
            backends: self.backends.len(),
            unprogrammed: self.unprogrammed.len(),
            orphans: self.adopted.len(),
            orphans_pruned,
            errors,
        }
    }

    /// Writes the backends of a wanted frontend and works out the rest of its state.
    fn prepare(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        plan: &FrontendPlan,
    ) -> Result<Pending, SyncError> {
        let map_err = |source| SyncError::Map {
            frontend: *frontend,
            service: plan.service.to_string(),
            source,
        };
        let mut ids = Vec::with_capacity(plan.backends.len());
        let mut active = Vec::with_capacity(plan.backends.len());
        for b in &plan.backends {
            let state = if b.terminating {
                BACKEND_TERMINATING
            } else {
                BACKEND_ACTIVE
            };
            let flags = if b.remote { BACKEND_F_REMOTE } else { 0 };
            let proto = frontend.proto.number();
            let backend = match (b.addr, key.family()) {
                (IpAddr::V4(a), IpFamily::V4) => BackendEntry::V4(
                    Backend4::new(a.octets(), b.port, proto, state).with_flags(flags),
                ),
                (IpAddr::V6(a), IpFamily::V6) => BackendEntry::V6(Backend6 {
                    flags,
                    ..Backend6::new(a.octets(), b.port, proto, state)
                }),
                (backend, _) => {
                    return Err(SyncError::MixedFamilies {
                        frontend: *frontend,
                        service: plan.service.to_string(),
                        backend,
                    });
                }
            };
            let id = self.ensure_backend(&backend).map_err(map_err)?;
            ids.push(id);
            if !b.terminating {
                active.push(id);
            }
        }
        let mut selected = if active.is_empty() {
            ids.clone()
        } else {
            active
        };
        selected.sort_unstable();
        selected.dedup();
        let mut flags = 0;
        if plan.kind.is_external() {
            flags |= SERVICE_F_EXTERNAL;
        }
        if plan.selection.unwrap_or(self.config.selection) == Selection::Random {
            flags |= SERVICE_F_RANDOM;
        }
        if !plan.source_ranges.is_empty() {
            flags |= SERVICE_F_SOURCE_RANGES;
        }
        let mut programmed = match self.frontends.remove(key) {
            Some(p) => p,
            None => Programmed::new(self.allocate_service_id(frontend)?),
        };
        programmed.members = ids;
        let table_size = maglev::table_size_for(
            selected.len(),
            programmed.table().map(|t| t.key.size),
            self.config.table_size,
        );
        let slot = programmed.live();
        let service = Service {
            id: programmed.id,
            backend_count: selected.len() as u32,
            flags,
            affinity_timeout_secs: plan.affinity_timeout_secs.unwrap_or(0),
        };
        Ok(Pending {
            key: *key,
            frontend: *frontend,
            service_name: plan.service.to_string(),
            programmed,
            table: (!selected.is_empty()).then_some(TableKey {
                size: table_size,
                backends: selected,
            }),
            ranges: plan.source_ranges.iter().copied().collect(),
            service,
            slot,
            failed: false,
        })
    }

    /// Step 2 (see the module documentation): the new table of every frontend whose table
    /// changes goes into the slot its service entry does not select (before the service
    /// entry exists: the first, which nothing reads yet). Tables that must be put in the
    /// Maglev map are built once per distinct key and put in one batch (retried past a
    /// failing write, which fails only its frontend).
    fn swap_tables(&mut self, pending: &mut [Pending], errors: &mut Vec<SyncError>) {
        let grace = self.maps.grace_since();
        let mut built: Vec<(TableId, M::Table)> = Vec::new();
        let mut built_for: HashMap<TableKey, usize> = HashMap::new();
        // (index into pending, table id, index into built)
        let mut swaps: Vec<(usize, TableId, Option<usize>)> = Vec::new();
        for i in 0..pending.len() {
            if built.len() >= self.max_unput_tables {
                // Each built table is an open file until it is put: put what there is.
                self.put_swaps(pending, &swaps, &built, errors);
                (built, swaps) = (Vec::new(), Vec::new());
                built_for.clear();
            }
            let p = &mut pending[i];
            let Some(want) = &p.table else { continue };
            if p.programmed.table().map(|t| &t.key) == Some(want) {
                continue;
            }
            let idle = if p.programmed.service.is_some() {
                1 - p.programmed.live()
            } else {
                0
            };
            p.slot = idle;
            let Some(there) = &p.programmed.slots[idle] else {
                self.find_or_build(i, p, &mut built, &mut built_for, &mut swaps, errors);
                continue;
            };
            if &there.table.key == want {
                // Back to the table it had before: it is there as it was.
                continue;
            }
            let free = there.retired.is_none_or(|r| grace.is_some_and(|g| g > r));
            let own = self.table_refs.get(&there.table.id) == Some(&1);
            if !(free && own && there.table.key.size == want.size) {
                self.find_or_build(i, p, &mut built, &mut built_for, &mut swaps, errors);
                continue;
            }
            // Rewritten in place: no program can be reading it.
            let id = there.table.id;
            let result = self
                .entries(want)
                .map_err(BuildError::Maglev)
                .and_then(|entries| {
                    let count = want.backends.len() as u32;
                    self.op(|m| m.fill_table(id, &entries, count))
                        .map_err(BuildError::Map)
                });
            match result {
                Ok(()) => {
                    let table = ProgrammedTable {
                        key: want.clone(),
                        id,
                    };
                    self.attach(&mut p.programmed, idle, table, None);
                }
                Err(error) => {
                    p.failed = true;
                    errors.push(p.build_error(error));
                }
            }
        }
        self.put_swaps(pending, &swaps, &built, errors);
    }

    /// Puts the tables of `swaps` (index into `pending`, table id, index into `built`) in
    /// the Maglev map, in one batch (retried past a failing write, which fails only its
    /// frontend).
    fn put_swaps(
        &mut self,
        pending: &mut [Pending],
        swaps: &[(usize, TableId, Option<usize>)],
        built: &[(TableId, M::Table)],
        errors: &mut Vec<SyncError>,
    ) {
        let writes: Vec<(u32, TableRef<'_, M::Table>)> = swaps
            .iter()
            .map(|&(i, id, b)| {
                let table = match b {
                    Some(b) => TableRef::Built(&built[b].1),
                    None => TableRef::Existing(id),
                };
                (pending[i].programmed.key(pending[i].slot), table)
            })
            .collect();
        let mut start = 0;
        while start < writes.len() {
            self.ops += writes.len() - start;
            let result = self.maps.put_tables(&writes[start..]);
            let done = match &result {
                Ok(()) => writes.len() - start,
                Err(e) => e.done,
            };
            for &(i, id, _) in &swaps[start..start + done] {
                let p = &mut pending[i];
                let table = ProgrammedTable {
                    key: p.table.clone().unwrap_or_else(|| unreachable!()),
                    id,
                };
                self.attach(&mut p.programmed, p.slot, table, None);
            }
            start += done;
            if let Err(e) = result {
                let p = &mut pending[swaps[start].0];
                p.failed = true;
                errors.push(p.map_error(e.error));
                start += 1;
            }
        }
    }

    /// The table of key `p.table` for the swap of `pending[i]`: a table some frontend has,
    /// one built in this apply, or a new one.
    fn find_or_build(
        &mut self,
        i: usize,
        p: &mut Pending,
        built: &mut Vec<(TableId, M::Table)>,
        built_for: &mut HashMap<TableKey, usize>,
        swaps: &mut Vec<(usize, TableId, Option<usize>)>,
        errors: &mut Vec<SyncError>,
    ) {
        let Some(want) = &p.table else { return };
        if let Some(shared) = self.tables.get(want) {
            swaps.push((i, shared.id, None));
        } else if let Some(&b) = built_for.get(want) {
            swaps.push((i, built[b].0, Some(b)));
        } else {
            match self.build(want) {
                Ok(table) => {
                    built_for.insert(want.clone(), built.len());
                    swaps.push((i, table.0, Some(built.len())));
                    built.push(table);
                }
                Err(error) => {
                    p.failed = true;
                    errors.push(p.build_error(error));
                }
            }
        }
    }

    /// Puts `table` in `slot` of `p` in the bookkeeping, in place of what was there.
    fn attach(
        &mut self,
        p: &mut Programmed,
        slot: usize,
        table: ProgrammedTable,
        retired: Option<Instant>,
    ) {
        self.detach(p, slot);
        share(&mut self.tables, &table);
        *self.table_refs.entry(table.id).or_default() += 1;
        p.slots[slot] = Some(Slot { table, retired });
    }

    /// Empties `slot` of `p` in the bookkeeping.
    fn detach(&mut self, p: &mut Programmed, slot: usize) {
        let Some(old) = p.slots[slot].take() else {
            return;
        };
        unshare(&mut self.tables, &old.table);
        if let Some(refs) = self.table_refs.get_mut(&old.table.id) {
            *refs -= 1;
            if *refs == 0 {
                self.table_refs.remove(&old.table.id);
            }
        }
    }

    /// The backend id of each entry of the Maglev table of `want`.
    fn entries(&self, want: &TableKey) -> Result<Vec<u32>, MaglevError> {
        let identities: Vec<BackendIdentity> = want
            .backends
            .iter()
            .map(|id| self.backends[id].identity())
            .collect();
        let table = maglev::build(&identities, want.size)?;
        Ok(table
            .entries()
            .iter()
            .map(|&i| want.backends[i as usize])
            .collect())
    }

    fn build(&mut self, want: &TableKey) -> Result<(TableId, M::Table), BuildError> {
        let entries = self.entries(want).map_err(BuildError::Maglev)?;
        let count = want.backends.len() as u32;
        self.op(|m| m.build_table(&entries, count))
            .map_err(BuildError::Map)
    }

    /// Steps 3 to 5 for one frontend whose table is in place.
    fn write_entries(&mut self, p: &mut Pending) -> Result<(), MapOpError> {
        let prog = &mut p.programmed;
        for range in p.ranges.difference(&prog.ranges.clone()) {
            self.op(|m| m.put_source_range(prog.id, *range))?;
            prog.ranges.insert(*range);
        }
        if !prog.rev_nat {
            self.op(|m| m.put_rev_nat(prog.id, &RevNatEntry::of(&p.key)))?;
            prog.rev_nat = true;
        }
        if !prog.prefiltered {
            self.prefilter_count(&p.key, true)?;
            prog.prefiltered = true;
        }
        let mut service = p.service;
        if p.slot == 1 {
            service.flags |= SERVICE_F_TABLE_B;
        }
        if prog.service != Some(service) {
            let was = prog.service.map(|_| prog.live());
            self.op(|m| m.put_service(&p.key, &service))?;
            prog.service = Some(service);
            if let Some(was) = was.filter(|&was| was != p.slot) {
                // Programs that read the entry before may still use that table.
                if let Some(old) = &mut prog.slots[was] {
                    old.retired = Some(Instant::now());
                }
                if let Some(new) = &mut prog.slots[p.slot] {
                    new.retired = None;
                }
                self.maps.request_grace();
            }
        }
        for range in prog.ranges.clone().difference(&p.ranges) {
            self.op(|m| m.delete_source_range(prog.id, *range))?;
            prog.ranges.remove(range);
        }
        Ok(())
    }

    /// Removes the tables of the frontends `keys` (both slots) in one batch; a frontend
    /// that is not wanted any more is then forgotten.
    fn delete_tables(
        &mut self,
        keys: &[FrontendKey],
        wanted: &BTreeMap<FrontendKey, (&Frontend, &FrontendPlan)>,
        errors: &mut Vec<SyncError>,
    ) {
        let targets: Vec<(FrontendKey, usize)> = keys
            .iter()
            .flat_map(|k| {
                let p = &self.frontends[k];
                (0..2).filter(|&s| p.slots[s].is_some()).map(|s| (*k, s))
            })
            .collect();
        let map_keys: Vec<u32> = targets
            .iter()
            .map(|(k, s)| self.frontends[k].key(*s))
            .collect();
        let mut start = 0;
        while start < map_keys.len() {
            self.ops += map_keys.len() - start;
            let result = self.maps.delete_tables(&map_keys[start..]);
            let done = match &result {
                Ok(()) => map_keys.len() - start,
                Err(e) => e.done,
            };
            for (key, slot) in &targets[start..start + done] {
                if let Some(mut p) = self.frontends.remove(key) {
                    self.detach(&mut p, *slot);
                    self.frontends.insert(*key, p);
                }
            }
            start += done;
            if let Err(e) = result {
                errors.push(SyncError::Cleanup(e.error));
                start += 1;
            }
        }
        for key in keys {
            if !wanted.contains_key(key) && self.frontends[key].tables().next().is_none() {
                self.forget(key);
            }
        }
    }

    /// Step 6 for a frontend no longer wanted, but its table.
    fn remove_entries(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
        let Some(mut p) = self.frontends.remove(key) else {
            return Ok(());
        };
        let result = self.remove_programmed(key, &mut p);
        self.frontends.insert(*key, p);
        result
    }

    fn remove_programmed(
        &mut self,
        key: &FrontendKey,
        p: &mut Programmed,
    ) -> Result<(), MapOpError> {
        if p.service.is_some() {
            let live = p.live();
            self.op(|m| m.delete_service(key))?;
            p.service = None;
            if let Some(slot) = &mut p.slots[live] {
                slot.retired = Some(Instant::now());
            }
        }
        if p.prefiltered {
            self.prefilter_count(key, false)?;
            p.prefiltered = false;
        }
        for range in p.ranges.clone() {
            self.op(|m| m.delete_source_range(p.id, range))?;
            p.ranges.remove(&range);
        }
        if p.rev_nat {
            self.op(|m| m.delete_rev_nat(p.id, key.family()))?;
            p.rev_nat = false;
        }
        Ok(())
    }

    /// Counts `key` in its pre-filter bucket (`add`) or stops counting it: the bucket's bit
    /// is set before its first frontend is counted, and cleared after its last one goes.
    fn prefilter_count(&mut self, key: &FrontendKey, add: bool) -> Result<(), MapOpError> {
        let bucket = key.prefilter_bucket();
        let users = self.prefilter.users.get(&bucket).copied().unwrap_or(0);
        let flips = if add { users == 0 } else { users == 1 };
        if flips {
            let (index, bit) = prefilter::position(bucket);
            let old = self.prefilter.words.get(&index).copied().unwrap_or(0);
            let word = if add { old | bit } else { old & !bit };
            self.op(|m| m.put_prefilter_word(index, word))?;
            if word == 0 {
                self.prefilter.words.remove(&index);
            } else {
                self.prefilter.words.insert(index, word);
            }
        }
        match (add, users) {
            (true, _) => {
                self.prefilter.users.insert(bucket, users + 1);
            }
            (false, 0 | 1) => {
                self.prefilter.users.remove(&bucket);
            }
            (false, _) => {
                self.prefilter.users.insert(bucket, users - 1);
            }
        }
        Ok(())
    }

    /// Drops a frontend that has nothing left in the maps, freeing its id.
    fn forget(&mut self, key: &FrontendKey) {
        if let Some(p) = self.frontends.remove(key) {
            self.used_service_ids.remove(&p.id);
        }
    }

    /// Backends among `candidates` that no frontend lists: marked REMOVED, then deleted
    /// after the drain.
    fn collect_backends(
        &mut self,
        mut candidates: BTreeSet<u32>,
        now: Instant,
    ) -> Result<(), MapOpError> {
        candidates.retain(|id| self.backends.contains_key(id));
        for p in self.frontends.values() {
            if candidates.is_empty() {
                break;
            }
            let table = p.table().into_iter().flat_map(|t| t.key.backends.iter());
            for id in table.chain(&p.members) {
                candidates.remove(id);
            }
        }
        let unreferenced = candidates;
        let drain = self.config.drain;
        for id in unreferenced {
            let backend = self.backends[&id];
            if backend.state() != BACKEND_REMOVED && !drain.is_zero() {
                let removed = backend.with_state(BACKEND_REMOVED);
                self.op(|m| m.put_backend(id, &removed))?;
                self.backends.insert(id, removed);
                self.removed.insert(id, now);
                continue;
            }
            let since = self.removed.get(&id).copied().unwrap_or(now);
            if now < since + drain {
                continue;
            }
            self.op(|m| m.delete_backend(id, backend.family()))?;
            self.removed.remove(&id);
            if let Some(b) = self.backends.remove(&id) {
                self.free_slot(id);
                if self.backend_ids.get(&backend_key(&b)) == Some(&id) {
                    self.backend_ids.remove(&backend_key(&b));
                }
            }
        }
        Ok(())
    }

    /// The id of `backend`, writing it (new, or with a changed state) when needed.
    fn ensure_backend(&mut self, backend: &BackendEntry) -> Result<u32, MapOpError> {
        let id = match self.backend_ids.get(&backend_key(backend)) {
            Some(&id) if self.backends.get(&id) == Some(backend) => return Ok(id),
            Some(&id) => id,
            None => {
                let id = self.new_backend_id()?;
                // Before the backend: the datapath counts from its first packet on.
                self.op(|m| m.reset_backend_stats(id))?;
                id
            }
        };
        self.op(|m| m.put_backend(id, backend))?;
        if self.backends.insert(id, *backend).is_none() {
            self.take_slot(id);
        }
        self.backend_ids.insert(backend_key(backend), id);
        self.removed.remove(&id);
        Ok(id)
    }

    /// The next backend id whose counters' slot no live backend holds. Ids only grow (u32
    /// lasts), so a conntrack or affinity entry never meets a reused id.
    fn new_backend_id(&mut self) -> Result<u32, MapOpError> {
        let slots = self.maps.backend_stats_slots();
        let mask = slots.wrapping_sub(1);
        for _ in 0..slots {
            let id = self.next_backend_id;
            self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
            if !self
                .backend_slots
                .contains_key(&backend_stats_slot(id, mask))
            {
                return Ok(id);
            }
        }
        Err(MapOpError::Full {
            map: map_names::BACKEND_STATS,
            max_entries: slots,
        })
    }

    fn take_slot(&mut self, id: u32) {
        let mask = self.maps.backend_stats_slots().wrapping_sub(1);
        *self
            .backend_slots
            .entry(backend_stats_slot(id, mask))
            .or_default() += 1;
    }

    fn free_slot(&mut self, id: u32) {
        let slot = backend_stats_slot(id, self.maps.backend_stats_slots().wrapping_sub(1));
        if let Some(holders) = self.backend_slots.get_mut(&slot) {
            *holders -= 1;
            if *holders == 0 {
                self.backend_slots.remove(&slot);
            }
        }
    }

    /// The next free service id after the last one handed out, so that a removed
    /// service's id is reused as late as possible (its conntrack entries age out first).
    fn allocate_service_id(&mut self, frontend: &Frontend) -> Result<u32, SyncError> {
        let max = self.maps.service_id_limit().saturating_sub(1);
        for i in 0..max {
            let id = (self.next_service_id - 1 + i) % max + 1;
            if !self.used_service_ids.contains(&id) {
                self.used_service_ids.insert(id);
                self.next_service_id = id % max + 1;
                return Ok(id);
            }
        }
        Err(SyncError::OutOfServiceIds {
            frontend: *frontend,
            max,
        })
    }

    fn op<T>(&mut self, f: impl FnOnce(&mut M) -> Result<T, MapOpError>) -> Result<T, MapOpError> {
        self.ops += 1;
        f(&mut self.maps)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use lb_common::{Frontend4, RevNat4, RevNat6};

    use super::*;
    use crate::plan::desired::{Backend, FrontendKind, ServicePortRef};
    use crate::{
        datapath::fake::InMemoryMaps,
        model::{Ipv4Cidr, Ipv6Cidr, Protocol},
    };

    /// After every single map operation: each service entry with backends has a Maglev
    /// table whose entries all name backends that exist and are not REMOVED; its
    /// reverse-NAT entry exists; and a frontend restricted to source ranges has some. That
    /// is what a packet (or a reply) arriving at that moment needs. And the pre-filter lets
    /// every frontend's packets through to the lookups.
    ///
    /// For both families, each with its own maps: a v6 frontend's table names v6 backends
    /// only, and its reverse NAT and source ranges are in the v6 maps; no id is in both
    /// backends maps.
    fn consistent(maps: &InMemoryMaps) {
        for (frontend, svc) in all_services(maps) {
            assert!(
                maps.prefilter_passes(&frontend),
                "{frontend:?}: pre-filter bit clear"
            );
            if svc.backend_count > 0 {
                let table = maps
                    .table_of(&svc)
                    .unwrap_or_else(|| panic!("{frontend:?}: no table: {maps:#?}"));
                for id in BTreeSet::from_iter(table.iter()) {
                    let state = match frontend {
                        FrontendKey::V4(_) => maps.backends.get(id).map(|b| b.state),
                        FrontendKey::V6(_) => maps.backends6.get(id).map(|b| b.state),
                    };
                    let state =
                        state.unwrap_or_else(|| panic!("{frontend:?}: backend {id} missing"));
                    assert_ne!(state, BACKEND_REMOVED, "{frontend:?}: {id}");
                }
            }
            let (rev_nat, ranges) = match frontend {
                FrontendKey::V4(_) => (
                    maps.rev_nat.contains_key(&svc.id),
                    maps.source_ranges.iter().any(|(id, _)| *id == svc.id),
                ),
                FrontendKey::V6(_) => (
                    maps.rev_nat6.contains_key(&svc.id),
                    maps.source_ranges6.iter().any(|(id, _)| *id == svc.id),
                ),
            };
            assert!(rev_nat, "{frontend:?}: no reverse NAT");
            if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
                assert!(ranges, "{frontend:?}: restricted to no source at all");
            }
        }
        for id in maps.backends.keys() {
            assert!(
                !maps.backends6.contains_key(id),
                "backend id {id} in both maps"
            );
        }
    }

    /// The service entries of both families.
    fn all_services(maps: &InMemoryMaps) -> Vec<(FrontendKey, Service)> {
        (maps.services.iter().map(|(k, s)| (FrontendKey::V4(*k), *s)))
            .chain(
                maps.services6
                    .iter()
                    .map(|(k, s)| (FrontendKey::V6(*k), *s)),
            )
            .collect()
    }

    /// The services-map key of an IPv4 frontend.
    trait Key4 {
        fn key4(&self) -> Frontend4;
    }

    impl Key4 for Frontend {
        fn key4(&self) -> Frontend4 {
            match self.key() {
                FrontendKey::V4(key) => key,
                FrontendKey::V6(_) => panic!("{self} is IPv6"),
            }
        }
    }

    fn maps(capacity: usize) -> InMemoryMaps {
        let mut m = InMemoryMaps::new(capacity);
        m.observer = Some(consistent);
        m
    }

    /// Small tables keep the tests fast; 251 >= 100 x 2.
    fn config() -> SyncConfig {
        SyncConfig {
            table_size: 251,
            ..SyncConfig::default()
        }
    }

    fn syncer(capacity: usize) -> Syncer<InMemoryMaps> {
        Syncer::adopt_with(maps(capacity), config()).unwrap()
    }

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last).into(),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn plan(backends: &[u8]) -> FrontendPlan {
        FrontendPlan {
            service: ServicePortRef {
                namespace: "default".into(),
                name: "svc".into(),
                port_name: String::new(),
            },
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|&last| Backend {
                    addr: Ipv4Addr::new(10, 244, 0, last).into(),
                    port: 80,
                    terminating: false,
                    remote: false,
                })
                .collect(),
            affinity_timeout_secs: None,
            source_ranges: Vec::new(),
            selection: None,
        }
    }

    /// Frontends with backends of their family: `10.244.0.<last>` for IPv4 ones,
    /// `fd00:244::<last>` for IPv6 ones.
    fn desired(frontends: &[(Frontend, &[u8])]) -> DesiredState {
        DesiredState {
            frontends: frontends
                .iter()
                .map(|(f, b)| (*f, if f.addr.is_ipv6() { plan6(b) } else { plan(b) }))
                .collect(),
        }
    }

    /// An IPv6 frontend `fd00:96::<last>`.
    fn fe6(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last.into()).into(),
            port,
            proto: Protocol::Tcp,
        }
    }

    /// [`plan`] with IPv6 backends `fd00:244::<last>`.
    fn plan6(backends: &[u8]) -> FrontendPlan {
        let mut p = plan(backends);
        for b in &mut p.backends {
            let last = match b.addr {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(a) => a.octets()[15],
            };
            b.addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, last.into()).into();
        }
        p
    }

    /// The backends (last octets, sorted) new flows of each frontend choose from, read from
    /// the maps the way the datapath reads them.
    fn programmed(maps: &InMemoryMaps) -> BTreeMap<Frontend, Vec<u8>> {
        consistent(maps);
        all_services(maps)
            .into_iter()
            .map(|(key, svc)| {
                let ids: BTreeSet<u32> = maps
                    .table_of(&svc)
                    .map(|t| t.iter().copied().collect())
                    .unwrap_or_default();
                let mut backends: Vec<u8> = ids
                    .iter()
                    .map(|id| match key {
                        FrontendKey::V4(_) => maps.backends[id].octets()[3],
                        FrontendKey::V6(_) => maps.backends6[id].octets()[15],
                    })
                    .collect();
                backends.sort_unstable();
                assert_eq!(backends.len(), svc.backend_count as usize);
                (Frontend::from_key(&key).unwrap(), backends)
            })
            .collect()
    }

    /// The pre-filter holds the bits of the service entries and no other.
    fn prefilter_exact(maps: &InMemoryMaps) {
        let mut want = BTreeMap::new();
        for (key, _) in all_services(maps) {
            let (index, bit) = prefilter::position(key.prefilter_bucket());
            *want.entry(index).or_insert(0u64) |= bit;
        }
        assert_eq!(maps.prefilter, want);
    }

    /// Two frontends in one pre-filter bucket.
    fn same_bucket() -> (Frontend, Frontend) {
        let mut seen = HashMap::new();
        for port in 1..=u16::MAX {
            for last in 1..=254 {
                let f = fe(last, port);
                if let Some(other) = seen.insert(f.key().prefilter_bucket(), f) {
                    return (other, f);
                }
            }
        }
        unreachable!("2^20 buckets, 16 million frontends")
    }

    fn expect(want: &[(Frontend, &[u8])]) -> BTreeMap<Frontend, Vec<u8>> {
        want.iter().map(|(f, b)| (*f, b.to_vec())).collect()
    }

    fn state_of(maps: &InMemoryMaps, last: u8) -> Option<u8> {
        maps.backends
            .values()
            .find(|b| b.octets()[3] == last)
            .map(|b| b.state)
    }

    #[test]
    fn programs_exactly_the_desired_state_and_nothing_when_nothing_changed() {
        let mut s = syncer(1000);
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 53), &[2, 3, 4][..])];
        let report = s.apply(&desired(&want));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(programmed(s.maps()), expect(&want));
        assert_eq!(
            (report.frontends, report.backends),
            (2, 4),
            "backend .2 is one entry"
        );
        // Each map holds only what is needed: one table per distinct backend set.
        assert_eq!(s.maps().tables.len(), 2);
        assert_eq!(s.maps().rev_nat.len(), 2);
        assert_eq!(s.apply(&desired(&want)).map_ops, 0);
    }

    #[test]
    fn the_table_is_maglev_over_the_backends_by_identity_whatever_their_order_or_ids() {
        // Two agents see the same backends, in different orders, after different histories
        // (so with different backend ids): the same backend in every table entry.
        let mut a = syncer(1000);
        let mut b = syncer(1000);
        b.apply(&desired(&[(fe(9, 80), &[7, 5][..])]));
        a.apply(&desired(&[(fe(1, 80), &[1, 2, 3, 5, 7][..])]));
        let mut reordered = desired(&[(fe(1, 80), &[1, 2, 3, 5, 7][..])]);
        reordered
            .frontends
            .get_mut(&fe(1, 80))
            .unwrap()
            .backends
            .reverse();
        b.apply(&reordered);
        let entries = |s: &Syncer<InMemoryMaps>| -> Vec<[u8; 4]> {
            let svc = s.maps().services[&fe(1, 80).key4()];
            let table = s.maps().table_of(&svc).unwrap();
            table
                .iter()
                .map(|id| s.maps().backends[id].octets())
                .collect()
        };
        assert_eq!(entries(&a), entries(&b));
        // And it is exactly the Maglev table of those identities.
        let backends: Vec<Backend4> = [1, 2, 3, 5, 7]
            .map(|last| Backend4::new([10, 244, 0, last], 80, 6, BACKEND_ACTIVE))
            .to_vec();
        let identities: Vec<BackendIdentity> = backends
            .iter()
            .map(|b| BackendEntry::V4(*b).identity())
            .collect();
        let table = maglev::build(&identities, 251).unwrap();
        let want: Vec<[u8; 4]> = table
            .entries()
            .iter()
            .map(|&i| backends[i as usize].octets())
            .collect();
        assert_eq!(entries(&a), want);
    }

    #[test]
    fn a_new_table_is_put_beside_the_one_in_use_then_the_service_entry_switches() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        let id = s.maps().services[&fe(1, 80).key4()].id;
        let b = id | KEY_TABLE_B;
        s.maps.journal.clear();
        // A third backend: written, then the new table is built whole and put under the
        // service's second key (one write of the Maglev map), then the service entry gets
        // the new count and switches to it.
        s.apply(&desired(&[(fe(1, 80), &[1, 2, 3][..])]));
        assert_eq!(
            s.maps().journal,
            [
                "put_backend 3".to_owned(),
                "build_table".to_owned(),
                format!("put_new_table {b}"),
                format!("put_service {id}"),
            ]
        );
        assert_ne!(
            s.maps().services[&fe(1, 80).key4()].flags & SERVICE_F_TABLE_B,
            0
        );
        assert_eq!(
            s.maps.grace_requests, 1,
            "the first table may be in use still"
        );
        s.maps.journal.clear();
        // One removed: no grace period has passed, so the first table may still be read:
        // a new one replaces it. Then the count, and only then the backend is marked
        // REMOVED (it stays for the drain).
        s.apply(&desired(&[(fe(1, 80), &[1, 3][..])]));
        assert_eq!(
            s.maps().journal,
            [
                "build_table".to_owned(),
                format!("put_new_table {id}"),
                format!("put_service {id}"),
                "put_backend 2".to_owned(),
            ]
        );
        assert_eq!(state_of(s.maps(), 2), Some(BACKEND_REMOVED));
        // The table in use and the one before are left.
        assert_eq!(s.maps().tables.len(), 2);
    }

    #[test]
    fn a_table_is_rewritten_in_place_once_no_program_can_read_it() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        s.apply(&desired(&[(fe(1, 80), &[1, 2, 3][..])]));
        let id = s.maps().services[&fe(1, 80).key4()].id;
        let first = s.maps().maglev[&id];
        // A grace period has passed since the first table was last used: it is rewritten
        // in place, no write of the Maglev map.
        s.maps.grace = Some(Instant::now());
        s.maps.journal.clear();
        s.apply(&desired(&[(fe(1, 80), &[1, 2, 4][..])]));
        assert_eq!(
            s.maps().journal,
            [
                "put_backend 4".to_owned(),
                format!("fill_table {first}"),
                format!("put_service {id}"),
                "put_backend 3".to_owned(),
            ]
        );
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [1, 2, 4]);
        // At once again: the other table was used until just now, so not in place.
        s.maps.journal.clear();
        s.apply(&desired(&[(fe(1, 80), &[1, 4][..])]));
        assert!(s.maps().journal.contains(&"build_table".to_owned()));
        // Back to the backends it had two changes ago, still there as they were: only the
        // service entry switches.
        s.maps.journal.clear();
        s.apply(&desired(&[(fe(1, 80), &[1, 2, 4][..])]));
        assert_eq!(
            s.maps().journal,
            ["put_backend 2".to_owned(), format!("put_service {id}"),]
        );
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [1, 2, 4]);
        // A table another frontend uses too is never rewritten in place.
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1][..]), (fe(2, 80), &[1][..])]));
        s.apply(&desired(&[(fe(1, 80), &[2][..]), (fe(2, 80), &[1][..])]));
        s.maps.grace = Some(Instant::now());
        s.maps.journal.clear();
        s.apply(&desired(&[(fe(1, 80), &[3][..]), (fe(2, 80), &[1][..])]));
        assert!(
            !s.maps()
                .journal
                .iter()
                .any(|op| op.starts_with("fill_table"))
        );
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [3]);
    }

    #[test]
    fn frontends_with_the_same_backends_share_one_table() {
        let mut s = syncer(1000);
        let nodeport = Frontend {
            addr: Ipv4Addr::new(192, 168, 0, 10).into(),
            port: 30080,
            proto: Protocol::Tcp,
        };
        let want = [(fe(1, 80), &[1, 2, 3][..]), (nodeport, &[1, 2, 3][..])];
        assert!(s.apply(&desired(&want)).errors.is_empty());
        assert_eq!(s.maps().tables.len(), 1);
        assert_eq!(s.maps().maglev.len(), 2);
        // A change moves both to a new (shared) table: built once, both pointed at it.
        s.maps.journal.clear();
        let changed = [(fe(1, 80), &[1, 2, 4][..]), (nodeport, &[1, 2, 4][..])];
        assert!(s.apply(&desired(&changed)).errors.is_empty());
        let journal = &s.maps().journal;
        let count = |op: &str| journal.iter().filter(|o| o.starts_with(op)).count();
        assert_eq!(
            (count("build_table"), count("put_new_table")),
            (1, 2),
            "{journal:?}"
        );
        // The new one, and the one before (kept by both).
        assert_eq!(s.maps().tables.len(), 2);
        assert_eq!(programmed(s.maps()), expect(&changed));
        // Diverging: each gets its own.
        let diverged = [(fe(1, 80), &[1, 2, 4][..]), (nodeport, &[4][..])];
        assert!(s.apply(&desired(&diverged)).errors.is_empty());
        assert_eq!(s.maps().tables.len(), 3);
        assert_eq!(programmed(s.maps()), expect(&diverged));
        // A restarted agent adopts the shared tables and rewrites nothing.
        let mut restarted = Syncer::adopt_with(s.maps().clone(), config()).unwrap();
        assert_eq!(restarted.apply(&desired(&diverged)).map_ops, 0);
        // ... and shares them again on the next change: nothing built.
        restarted.maps.journal.clear();
        restarted.apply(&desired(&[(fe(1, 80), &[4][..]), (nodeport, &[4][..])]));
        let m = restarted.maps();
        assert!(
            !m.journal.contains(&"build_table".to_owned()),
            "{:?}",
            m.journal
        );
        let table = |f: Frontend| {
            m.maglev[&table_key(m.services[&f.key4()].id, m.services[&f.key4()].flags)]
        };
        assert_eq!(table(fe(1, 80)), table(nodeport));
    }

    #[test]
    fn live_backends_never_share_a_counters_slot_and_ids_only_grow() {
        let mut maps = maps(1000);
        maps.backend_stats_slots = 4;
        let drain = Duration::ZERO;
        let mut s = Syncer::adopt_with(maps, SyncConfig { drain, ..config() }).unwrap();
        let mut last = 0;
        for round in 0..10u8 {
            // Two backends stay; the third is replaced every round (and deleted at once).
            let report = s.apply(&desired(&[(fe(1, 80), &[1, 2, 10 + round][..])]));
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let ids: Vec<u32> = s.maps().backends.keys().copied().collect();
            let slots: BTreeSet<u32> = ids.iter().map(|&id| backend_stats_slot(id, 3)).collect();
            assert_eq!(
                (ids.len(), slots.len()),
                (3, 3),
                "round {round}: ids {ids:?}"
            );
            let newest = *ids.iter().max().unwrap();
            assert!(newest > last, "round {round}: ids {ids:?} after {last}");
            last = newest;
        }
        // Four slots, five backends: the fifth has no slot, and the error says so.
        let report = s.apply(&desired(&[(fe(1, 80), &[1, 2, 3, 4, 5][..])]));
        let full = report.errors.iter().any(|e| {
            e.to_string()
                .contains("map LB_BESTAT_V2 is full (4 entries): raise --max-backends")
        });
        assert!(full, "{:?}", report.errors);
    }

    #[test]
    fn one_changed_endpoint_is_a_few_writes() {
        let mut s = syncer(1000);
        let many: Vec<u8> = (1..=50).collect();
        s.apply(&desired(&[(fe(1, 80), &many[..]), (fe(2, 80), &[7][..])]));
        // The endpoint .50 is replaced by .60.
        let mut changed = many.clone();
        changed[49] = 60;
        let report = s.apply(&desired(&[
            (fe(1, 80), &changed[..]),
            (fe(2, 80), &[7][..]),
        ]));
        // New backend (its counters zeroed, then its entry), the new table built and put
        // in, the service entry switched to it, the old backend marked REMOVED.
        assert_eq!(report.map_ops, 6);
        assert_eq!(programmed(s.maps())[&fe(1, 80)], changed);
        // One endpoint removed: the table (built, swapped), the service entry (its count),
        // .60 REMOVED.
        let report = s.apply(&desired(&[
            (fe(1, 80), &changed[..49]),
            (fe(2, 80), &[7][..]),
        ]));
        assert_eq!(report.map_ops, 4);
    }

    #[test]
    fn every_intermediate_state_is_consistent_through_grow_shrink_and_removal() {
        // `consistent` runs after each single map operation and panics on a violation.
        let mut s = syncer(1000);
        let start = Instant::now();
        let steps: [&[(Frontend, &[u8])]; 6] = [
            &[(fe(1, 80), &[1, 2])],
            &[(fe(1, 80), &[1, 2, 3, 4, 5]), (fe(2, 80), &[5])],
            &[(fe(1, 80), &[3]), (fe(2, 80), &[1, 5, 9])],
            &[(fe(1, 80), &[]), (fe(2, 80), &[9])],
            &[(fe(2, 80), &[2, 4])],
            &[],
        ];
        for step in steps {
            let report = s.apply_at(&desired(step), start);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(programmed(s.maps()), expect(step));
        }
        let m = s.maps();
        assert!(m.services.is_empty() && m.maglev.is_empty() && m.tables.is_empty());
        assert!(m.rev_nat.is_empty() && m.source_ranges.is_empty());
        assert!(m.prefilter.is_empty(), "{:?}", m.prefilter);
        assert!(m.backends.values().all(|b| b.state == BACKEND_REMOVED));
        // After the drain, nothing is left.
        s.apply_at(&desired(&[]), start + DEFAULT_DRAIN);
        assert!(s.maps().backends.is_empty());
    }

    #[test]
    fn removed_backends_drain_for_the_configured_period() {
        let mut s = syncer(1000);
        let t0 = Instant::now();
        s.apply_at(&desired(&[(fe(1, 80), &[1, 2, 3][..])]), t0);
        assert_eq!(s.next_drain_deadline(), None);
        s.apply_at(&desired(&[(fe(1, 80), &[1, 3][..])]), t0);
        assert_eq!(state_of(s.maps(), 2), Some(BACKEND_REMOVED));
        assert_eq!(s.next_drain_deadline(), Some(t0 + DEFAULT_DRAIN));
        // Still there just before the end of the drain; resyncs do not extend it.
        let almost = t0 + DEFAULT_DRAIN - Duration::from_millis(1);
        assert_eq!(
            s.apply_at(&desired(&[(fe(1, 80), &[1, 3][..])]), almost)
                .map_ops,
            0
        );
        assert_eq!(state_of(s.maps(), 2), Some(BACKEND_REMOVED));
        let report = s.apply_at(&desired(&[(fe(1, 80), &[1, 3][..])]), t0 + DEFAULT_DRAIN);
        assert_eq!(report.map_ops, 1);
        assert_eq!(state_of(s.maps(), 2), None);
        assert_eq!(s.next_drain_deadline(), None);

        // A backend that comes back during its drain is ACTIVE again, under the same id (its
        // flows' conntrack entries stay valid), and is not deleted when the drain would end.
        let id3 = s.backend_ids[&(SocketAddr::new(Ipv4Addr::new(10, 244, 0, 3).into(), 80), 6)];
        let t1 = t0 + Duration::from_secs(100);
        s.apply_at(&desired(&[(fe(1, 80), &[1][..])]), t1);
        assert_eq!(state_of(s.maps(), 3), Some(BACKEND_REMOVED));
        s.apply_at(
            &desired(&[(fe(1, 80), &[1, 3][..])]),
            t1 + DEFAULT_DRAIN / 2,
        );
        assert_eq!(state_of(s.maps(), 3), Some(BACKEND_ACTIVE));
        assert_eq!(s.maps().backends[&id3].octets(), [10, 244, 0, 3]);
        s.apply_at(
            &desired(&[(fe(1, 80), &[1, 3][..])]),
            t1 + DEFAULT_DRAIN * 2,
        );
        assert_eq!(state_of(s.maps(), 3), Some(BACKEND_ACTIVE));
    }

    #[test]
    fn a_zero_drain_deletes_at_once() {
        let mut s = Syncer::adopt_with(
            maps(1000),
            SyncConfig {
                drain: Duration::ZERO,
                ..config()
            },
        )
        .unwrap();
        s.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        s.apply(&desired(&[(fe(1, 80), &[1][..])]));
        assert_eq!(state_of(s.maps(), 2), None);
    }

    #[test]
    fn a_restarted_agent_keeps_draining_removed_backends() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        s.apply(&desired(&[(fe(1, 80), &[1][..])]));
        let before_restart = Instant::now();
        let mut restarted = Syncer::adopt_with(s.maps().clone(), config()).unwrap();
        // The time of removal is not in the maps: the drain runs from the restart on.
        let deadline = restarted.next_drain_deadline().unwrap();
        assert!(deadline >= before_restart + DEFAULT_DRAIN);
        assert_eq!(
            restarted
                .apply_at(
                    &desired(&[(fe(1, 80), &[1][..])]),
                    deadline - Duration::from_secs(1)
                )
                .map_ops,
            0
        );
        assert_eq!(state_of(restarted.maps(), 2), Some(BACKEND_REMOVED));
        restarted.apply_at(&desired(&[(fe(1, 80), &[1][..])]), deadline);
        assert_eq!(state_of(restarted.maps(), 2), None);
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_rewrites_nothing() {
        let mut s = syncer(1000);
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 53), &[2, 3][..])];
        s.apply(&desired(&want));
        let mut maps = s.maps().clone();
        // Leftovers of an interrupted update: a table, a source range and a reverse-NAT
        // entry of a service id that has no service entry.
        let table = *maps.maglev.values().next().unwrap();
        maps.maglev.insert(999, table);
        let range = Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap();
        maps.source_ranges.insert((999, range));
        maps.rev_nat.insert(999, RevNat4::of(&fe(9, 9).key4()));
        // And a pre-filter bit of a frontend whose service entry was never written.
        let (index, bit) = prefilter::position(fe(9, 9).key().prefilter_bucket());
        *maps.prefilter.entry(index).or_default() |= bit;
        let mut upgraded = maps.clone();

        let mut restarted = Syncer::adopt_with(maps, config()).unwrap();
        prefilter_exact(restarted.maps());
        assert_eq!(restarted.maps().maglev.len(), 2, "leftover table removed");
        assert!(restarted.maps().source_ranges.is_empty());
        assert_eq!(
            restarted.maps().rev_nat.len(),
            2,
            "leftover reverse NAT removed"
        );
        assert_eq!(restarted.apply(&desired(&want)).map_ops, 0);
        // An upgrade brings an empty pre-filter: adoption sets the bits of the services.
        // (The agent adopts before it attaches the new programs, which read the pre-filter:
        // the states in between are not seen by packets.)
        upgraded.prefilter.clear();
        upgraded.observer = None;
        let upgraded = Syncer::adopt_with(upgraded, config()).unwrap();
        prefilter_exact(upgraded.maps());
        // And it continues from there: ids are not handed out twice.
        restarted.apply(&desired(&[(fe(1, 80), &[1, 2][..]), (fe(3, 80), &[4][..])]));
        let ids: BTreeSet<u32> = restarted.maps().services.values().map(|s| s.id).collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(
            programmed(restarted.maps()),
            expect(&[(fe(1, 80), &[1, 2]), (fe(3, 80), &[4])])
        );
    }

    #[test]
    fn a_restarted_agent_adopts_both_tables_of_a_service_and_writes_nothing() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        let changed = desired(&[(fe(1, 80), &[1, 2, 3][..])]);
        s.apply(&changed);
        let id = s.maps().services[&fe(1, 80).key4()].id;
        assert_ne!(
            s.maps().services[&fe(1, 80).key4()].flags & SERVICE_F_TABLE_B,
            0
        );
        let mut maps = s.maps().clone();
        maps.journal.clear();
        let mut restarted = Syncer::adopt_with(maps, config()).unwrap();
        assert_eq!(restarted.maps().maglev.len(), 2, "both tables kept");
        assert_eq!(restarted.apply(&changed).map_ops, 0);
        assert!(restarted.maps().journal.is_empty());
        // The first table was adopted too: going back to it is one service entry write.
        restarted.apply(&desired(&[(fe(1, 80), &[1, 2][..])]));
        assert_eq!(
            restarted.maps().journal,
            [format!("put_service {id}"), "put_backend 3".to_owned()]
        );
        assert_eq!(
            restarted.maps().services[&fe(1, 80).key4()].flags & SERVICE_F_TABLE_B,
            0
        );
    }

    #[test]
    fn a_prefilter_bit_is_set_before_the_first_frontend_of_its_bucket_and_cleared_after_the_last() {
        let (a, b) = same_bucket();
        let mut s = syncer(1000);
        s.apply(&desired(&[(a, &[1][..]), (b, &[2][..])]));
        prefilter_exact(s.maps());
        let journal = &s.maps().journal;
        let words: Vec<_> = journal
            .iter()
            .enumerate()
            .filter(|(_, op)| op.starts_with("put_prefilter_word"))
            .collect();
        assert_eq!(
            words.len(),
            1,
            "one write for the shared bucket: {journal:?}"
        );
        let first_service = journal.iter().position(|op| op.starts_with("put_service"));
        assert!(Some(words[0].0) < first_service, "{journal:?}");

        // The counts survive a restart: removing one frontend keeps the bucket's bit. (No
        // orphan grace, so that the first view's removal is written at once.)
        let no_grace = SyncConfig {
            orphan_grace: Duration::ZERO,
            ..config()
        };
        let mut s = Syncer::adopt_with(s.maps().clone(), no_grace).unwrap();
        let before = s.maps().journal.len();
        s.apply(&desired(&[(b, &[2][..])]));
        prefilter_exact(s.maps());
        assert!(s.maps().prefilter_passes(&b.key()));
        let ops = &s.maps().journal[before..];
        assert!(ops.iter().any(|op| op.starts_with("delete_service")));
        assert!(
            !ops.iter().any(|op| op.starts_with("put_prefilter_word")),
            "{ops:?}"
        );
        // The last one goes: its service entry first, then the bit.
        s.apply(&desired(&[]));
        assert!(s.maps().prefilter.is_empty());
        let journal = &s.maps().journal;
        let deleted = journal
            .iter()
            .rposition(|op| op.starts_with("delete_service"));
        let cleared = journal
            .iter()
            .rposition(|op| op.starts_with("put_prefilter_word"));
        assert!(deleted < cleared, "{journal:?}");
    }

    #[test]
    fn orphans_keep_working_for_the_grace_period_then_go() {
        let mut s = syncer(1000);
        let t0 = Instant::now();
        let all = [(fe(1, 80), &[1, 2][..]), (fe(2, 80), &[2, 3][..])];
        s.apply_at(&desired(&all), t0);
        let before = s.maps().clone();

        // Restarted while fe2's Service was deleted: the first view lacks it.
        let mut restarted = Syncer::adopt_with(before.clone(), config()).unwrap();
        let t1 = t0 + Duration::from_secs(5);
        let first = restarted.apply_at(&desired(&all[..1]), t1);
        assert_eq!(
            (first.map_ops, first.orphans, first.orphans_pruned),
            (0, 1, 0)
        );
        assert_eq!(programmed(restarted.maps()), programmed(&before));
        let deadline = t1 + DEFAULT_ORPHAN_GRACE;
        assert_eq!(restarted.next_orphan_deadline(), Some(deadline));
        assert_eq!(restarted.next_deadline(), Some(deadline));

        // Neither a resync nor an incremental apply within the grace removes it.
        let almost = deadline - Duration::from_millis(1);
        let resync = restarted.apply_at(&desired(&all[..1]), almost);
        assert_eq!((resync.map_ops, resync.orphans), (0, 1));
        let none: [&Frontend; 0] = [];
        let changed = restarted.apply_changed(&desired(&all[..1]), none, almost);
        assert_eq!((changed.map_ops, changed.orphans), (0, 1));
        assert_eq!(programmed(restarted.maps()), programmed(&before));

        // At the deadline an apply of no change (the agent's timer) removes it and collects
        // its backend .3 (REMOVED, drained later); .2 stays for fe1.
        let pruned = restarted.apply_changed(&desired(&all[..1]), none, deadline);
        assert_eq!((pruned.orphans, pruned.orphans_pruned), (0, 1));
        assert!(pruned.errors.is_empty(), "{:?}", pruned.errors);
        assert_eq!(
            programmed(restarted.maps()),
            expect(&[(fe(1, 80), &[1, 2])])
        );
        assert_eq!(state_of(restarted.maps(), 3), Some(BACKEND_REMOVED));
        assert_eq!(state_of(restarted.maps(), 2), Some(BACKEND_ACTIVE));
        assert_eq!(restarted.next_orphan_deadline(), None);
    }

    #[test]
    fn an_orphan_that_a_later_view_lists_is_kept_and_stale_frontends_go_at_once() {
        let mut s = syncer(1000);
        let t0 = Instant::now();
        let all = [(fe(1, 80), &[1][..]), (fe(2, 80), &[2][..])];
        s.apply_at(&desired(&all), t0);
        let mut restarted = Syncer::adopt_with(s.maps().clone(), config()).unwrap();
        // The first view lacks fe2 (an EndpointSlice not read yet); the next lists it again:
        // it is adopted as it is, under its id, without a write.
        let id2 = restarted.maps().services[&fe(2, 80).key4()].id;
        assert_eq!(restarted.apply_at(&desired(&all[..1]), t0).orphans, 1);
        let report = restarted.apply_at(&desired(&all), t0 + Duration::from_secs(1));
        assert_eq!((report.map_ops, report.orphans), (0, 0));
        assert_eq!(restarted.next_orphan_deadline(), None);
        assert_eq!(restarted.maps().services[&fe(2, 80).key4()].id, id2);
        // From then on it is an ordinary frontend: removed as soon as a view drops it.
        let gone = restarted.apply_at(&desired(&all[..1]), t0 + Duration::from_secs(2));
        assert_eq!((gone.orphans, gone.orphans_pruned), (0, 0));
        assert_eq!(programmed(restarted.maps()), expect(&[(fe(1, 80), &[1])]));
    }

    #[test]
    fn a_zero_grace_prunes_orphans_with_the_first_view() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1][..]), (fe(2, 80), &[2][..])]));
        let no_grace = SyncConfig {
            orphan_grace: Duration::ZERO,
            ..config()
        };
        let mut restarted = Syncer::adopt_with(s.maps().clone(), no_grace).unwrap();
        let report = restarted.apply(&desired(&[(fe(1, 80), &[1][..])]));
        assert_eq!((report.orphans, report.orphans_pruned), (0, 1));
        assert_eq!(programmed(restarted.maps()), expect(&[(fe(1, 80), &[1])]));
    }

    #[test]
    fn a_full_map_fails_one_frontend_and_keeps_the_others() {
        // Room for 4 backends: the second frontend needs 3 more than the first's 2.
        let mut s = syncer(4);
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 80), &[3, 4, 5][..])];
        let report = s.apply(&desired(&want));
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let message = report.errors[0].to_string();
        assert!(message.contains("LB_BACKEND4_V2 is full"), "{message}");
        assert!(message.contains("10.96.0.2:80/TCP"), "{message}");
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1, 2])]));
        // With room again, the next apply converges.
        s.maps.capacity = 100;
        let report = s.apply(&desired(&want));
        assert!(report.errors.is_empty());
        assert_eq!(programmed(s.maps()), expect(&want));
    }

    #[test]
    fn a_table_write_that_fails_fails_its_frontend_only_and_the_batch_goes_on() {
        // Room for 4 entries per map: fe1 and fe3 exist with both their tables; fe2 is new,
        // and its table write fails in the middle of the batch that also moves fe1 and fe3
        // to a new table (in place of their tables not in use).
        let mut s = syncer(4);
        s.apply(&desired(&[(fe(1, 80), &[1][..]), (fe(3, 80), &[1][..])]));
        s.apply(&desired(&[(fe(1, 80), &[2][..]), (fe(3, 80), &[2][..])]));
        assert_eq!(s.maps().maglev.len(), 4);
        let report = s.apply(&desired(&[
            (fe(1, 80), &[3][..]),
            (fe(2, 80), &[3][..]),
            (fe(3, 80), &[3][..]),
        ]));
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let message = report.errors[0].to_string();
        assert!(message.contains("10.96.0.2:80/TCP"), "{message}");
        assert!(message.contains("LB_MAGLEV_V2 is full"), "{message}");
        assert_eq!(
            programmed(s.maps()),
            expect(&[(fe(1, 80), &[3]), (fe(3, 80), &[3])])
        );
    }

    #[test]
    fn a_large_sync_puts_its_tables_in_batches_of_bounded_size() {
        let mut s = syncer(1000);
        s.max_unput_tables = 4;
        let frontends: Vec<Frontend> = (0..10).map(|i| fe(1, 1000 + i)).collect();
        let mut want = DesiredState::default();
        for (i, f) in frontends.iter().enumerate() {
            let mut p = plan(&[1]);
            p.backends[0].port = 1000 + i as u16;
            want.frontends.insert(*f, p);
        }
        assert!(s.apply(&want).errors.is_empty());
        let journal = &s.maps().journal;
        let first_put = journal
            .iter()
            .position(|o| o.starts_with("put_new_table"))
            .unwrap();
        let builds_before = journal[..first_put]
            .iter()
            .filter(|o| *o == "build_table")
            .count();
        assert_eq!(builds_before, 4);
        assert_eq!(programmed(s.maps()).len(), frontends.len());
    }

    #[test]
    fn a_table_too_small_for_the_backends_fails_that_frontend_only() {
        let mut s = Syncer::adopt_with(
            maps(1000),
            SyncConfig {
                table_size: 3,
                ..config()
            },
        )
        .unwrap();
        let report = s.apply(&desired(&[
            (fe(1, 80), &[1, 2][..]),
            (fe(2, 80), &[1, 2, 3, 4][..]),
        ]));
        assert_eq!(report.errors.len(), 1);
        let message = report.errors[0].to_string();
        assert!(message.contains("10.96.0.2:80/TCP"), "{message}");
        assert!(message.contains("smaller than the 4 backends"), "{message}");
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1, 2])]));
    }

    #[test]
    fn terminating_backends_keep_their_entry_but_get_no_new_flows_unless_alone() {
        let mut s = syncer(1000);
        let start = Instant::now();
        let mut draining = desired(&[(fe(1, 80), &[1, 2, 3])]);
        let p = draining.frontends.get_mut(&fe(1, 80)).unwrap();
        p.backends[1].terminating = true;
        assert!(s.apply_at(&draining, start).errors.is_empty());
        // New flows: .1 and .3 only; .2 stays in the backends map for its flows.
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [1, 3]);
        assert_eq!(state_of(s.maps(), 2), Some(BACKEND_TERMINATING));
        // Only terminating backends left: they take new flows (kube-proxy's fallback).
        let mut all = desired(&[(fe(1, 80), &[2, 3])]);
        for b in &mut all.frontends.get_mut(&fe(1, 80)).unwrap().backends {
            b.terminating = true;
        }
        assert!(s.apply_at(&all, start).errors.is_empty());
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [2, 3]);
        assert_eq!(state_of(s.maps(), 1), Some(BACKEND_REMOVED), ".1 left");
        // Once the endpoint is gone from the slice, its entry drains, then goes too.
        assert!(
            s.apply_at(&desired(&[(fe(1, 80), &[3])]), start)
                .errors
                .is_empty()
        );
        assert_eq!(state_of(s.maps(), 2), Some(BACKEND_REMOVED));
        s.apply_at(&desired(&[(fe(1, 80), &[3])]), start + DEFAULT_DRAIN);
        assert_eq!(s.maps().backends.len(), 1);
    }

    #[test]
    fn a_full_backend_map_while_growing_keeps_the_old_backend_set() {
        let mut s = syncer(6);
        s.apply(&desired(&[(fe(1, 80), &[1, 2])]));
        // Growing to 7 backends fails at the 7th: the table and the service entry are not
        // touched, so packets see exactly the old set.
        let report = s.apply(&desired(&[(fe(1, 80), &[1, 2, 3, 4, 5, 6, 7])]));
        assert_eq!(report.errors.len(), 1);
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1, 2])]));
    }

    #[test]
    fn selection_comes_from_the_service_or_the_agent_default() {
        let mut plans = desired(&[
            (fe(1, 80), &[1][..]),
            (fe(2, 80), &[1][..]),
            (fe(3, 80), &[1][..]),
        ]);
        plans.frontends.get_mut(&fe(1, 80)).unwrap().selection = Some(Selection::Random);
        plans.frontends.get_mut(&fe(2, 80)).unwrap().selection = Some(Selection::Maglev);
        let random = |s: &Syncer<InMemoryMaps>, f: Frontend| {
            s.maps().services[&f.key4()].flags & SERVICE_F_RANDOM != 0
        };
        let mut s = syncer(1000);
        s.apply(&plans);
        assert!(random(&s, fe(1, 80)) && !random(&s, fe(2, 80)) && !random(&s, fe(3, 80)));
        let mut s = Syncer::adopt_with(
            maps(1000),
            SyncConfig {
                selection: Selection::Random,
                ..config()
            },
        )
        .unwrap();
        s.apply(&plans);
        assert!(random(&s, fe(1, 80)) && !random(&s, fe(2, 80)) && random(&s, fe(3, 80)));
    }

    #[test]
    fn source_ranges_are_in_place_before_the_service_entry_restricts() {
        let cidr = |a: [u8; 4], len| Ipv4Cidr::new(Ipv4Addr::from(a), len).unwrap();
        let with_ranges = |ranges: &[Ipv4Cidr]| {
            let mut d = desired(&[(fe(1, 80), &[1][..])]);
            d.frontends.get_mut(&fe(1, 80)).unwrap().source_ranges =
                ranges.iter().map(|&r| r.into()).collect();
            d
        };
        let mut s = syncer(1000);
        s.apply(&with_ranges(&[]));
        let id = s.maps().services[&fe(1, 80).key4()].id;
        s.maps.journal.clear();
        // Restricting: the ranges, then the flag (`consistent` checks that no moment has
        // the flag without ranges).
        s.apply(&with_ranges(&[
            cidr([10, 0, 0, 0], 8),
            cidr([192, 0, 2, 7], 32),
        ]));
        assert_eq!(
            s.maps().journal,
            [
                format!("put_source_range {id} 10.0.0.0/8"),
                format!("put_source_range {id} 192.0.2.7/32"),
                format!("put_service {id}"),
            ]
        );
        assert_ne!(
            s.maps().services[&fe(1, 80).key4()].flags & SERVICE_F_SOURCE_RANGES,
            0
        );
        // Changing them: the new one is added before the old one goes.
        s.maps.journal.clear();
        s.apply(&with_ranges(&[
            cidr([10, 0, 0, 0], 8),
            cidr([198, 51, 100, 0], 24),
        ]));
        assert_eq!(
            s.maps().journal,
            [
                format!("put_source_range {id} 198.51.100.0/24"),
                format!("delete_source_range {id} 192.0.2.7/32"),
            ]
        );
        // Lifting them: the flag first, then the ranges.
        s.maps.journal.clear();
        s.apply(&with_ranges(&[]));
        assert_eq!(s.maps().journal[0], format!("put_service {id}"));
        assert!(s.maps().source_ranges.is_empty());
        assert_eq!(
            s.maps().services[&fe(1, 80).key4()].flags & SERVICE_F_SOURCE_RANGES,
            0
        );
    }

    #[test]
    fn ipv6_and_dual_stack_frontends_are_consistent_after_every_write() {
        // `consistent` runs after each single map operation, for both families.
        let mut s = syncer(1000);
        let start = Instant::now();
        let steps: [&[(Frontend, &[u8])]; 6] = [
            &[(fe6(1, 80), &[1, 2])],
            &[
                (fe(1, 80), &[1, 2]),
                (fe6(1, 80), &[1, 2, 3]),
                (fe6(2, 53), &[3]),
            ],
            &[
                (fe(1, 80), &[3]),
                (fe6(1, 80), &[]),
                (fe6(2, 53), &[1, 5, 9]),
            ],
            &[(fe6(2, 53), &[9]), (fe(2, 53), &[9])],
            &[(fe(2, 53), &[2, 4])],
            &[],
        ];
        for step in steps {
            let report = s.apply_at(&desired(step), start);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(programmed(s.maps()), expect(step));
            prefilter_exact(s.maps());
        }
        let m = s.maps();
        assert!(m.services.is_empty() && m.services6.is_empty() && m.maglev.is_empty());
        assert!(m.rev_nat.is_empty() && m.rev_nat6.is_empty() && m.prefilter.is_empty());
        assert!(m.backends6.values().all(|b| b.state == BACKEND_REMOVED));
        assert!(!m.backends6.is_empty());
        s.apply_at(&desired(&[]), start + DEFAULT_DRAIN);
        assert!(s.maps().backends.is_empty() && s.maps().backends6.is_empty());
    }

    #[test]
    fn a_new_ipv6_frontend_is_written_in_the_v4_order_into_the_v6_maps() {
        let mut s = syncer(1000);
        s.apply(&desired(&[(fe(1, 80), &[1][..])]));
        s.maps.journal.clear();
        s.apply(&desired(&[
            (fe(1, 80), &[1][..]),
            (fe6(1, 80), &[1, 2][..]),
        ]));
        let id = s.maps().services6[&match fe6(1, 80).key() {
            FrontendKey::V6(k) => k,
            FrontendKey::V4(_) => unreachable!(),
        }]
            .id;
        let v6: Vec<&String> = s.maps().journal.iter().collect();
        let ids: Vec<u32> = s.maps().backends6.keys().copied().collect();
        assert_eq!(ids.len(), 2);
        // Backend ids are shared with the IPv4 backend's: none is reused.
        assert!(ids.iter().all(|id| !s.maps().backends.contains_key(id)));
        let prefilter_word = prefilter::position(fe6(1, 80).key().prefilter_bucket()).0;
        assert_eq!(
            v6,
            [
                &format!("put_backend6 {}", ids[0]),
                &format!("put_backend6 {}", ids[1]),
                &"build_table".to_owned(),
                &format!("put_new_table {id}"),
                &format!("put_rev_nat6 {id}"),
                &format!("put_prefilter_word {prefilter_word}"),
                &format!("put_service6 {id}"),
            ]
        );
        assert_eq!(
            s.maps().rev_nat6[&id],
            RevNat6 {
                addr: lb_common::addr6("fd00:96::1".parse::<Ipv6Addr>().unwrap().octets()),
                port: 80u16.to_be(),
                _pad: 0
            }
        );
        // Nothing changed: nothing written.
        let again = desired(&[(fe(1, 80), &[1][..]), (fe6(1, 80), &[1, 2][..])]);
        assert_eq!(s.apply(&again).map_ops, 0);
        // Removed: service entry first, backends REMOVED last.
        s.maps.journal.clear();
        s.apply(&desired(&[(fe(1, 80), &[1][..])]));
        let journal = &s.maps().journal;
        assert_eq!(journal[0], format!("delete_service6 {id}"));
        assert_eq!(
            journal
                .iter()
                .filter(|o| o.starts_with("put_backend6"))
                .count(),
            2,
            "{journal:?}"
        );
        assert!(s.maps().services6.is_empty() && s.maps().rev_nat6.is_empty());
    }

    #[test]
    fn ipv6_source_ranges_are_in_place_before_the_service_entry_restricts() {
        let cidr = |a: &str, len| IpCidr::V6(Ipv6Cidr::new(a.parse().unwrap(), len).unwrap());
        let with_ranges = |ranges: &[IpCidr]| {
            let mut d = desired(&[(fe6(1, 80), &[1][..])]);
            d.frontends.get_mut(&fe6(1, 80)).unwrap().source_ranges = ranges.to_vec();
            d
        };
        let mut s = syncer(1000);
        s.apply(&with_ranges(&[]));
        let id = s.maps().services6.values().next().unwrap().id;
        s.maps.journal.clear();
        s.apply(&with_ranges(&[cidr("2001:db8::", 32)]));
        assert_eq!(
            s.maps().journal,
            [
                format!("put_source_range6 {id} 2001:db8::/32"),
                format!("put_service6 {id}"),
            ]
        );
        assert!(s.maps().source_ranges.is_empty());
        s.maps.journal.clear();
        s.apply(&with_ranges(&[]));
        assert_eq!(
            s.maps().journal,
            [
                format!("put_service6 {id}"),
                format!("delete_source_range6 {id} 2001:db8::/32"),
            ]
        );
    }

    #[test]
    fn a_restarted_agent_adopts_dual_stack_maps_exactly_and_writes_nothing() {
        let mut s = syncer(1000);
        let mut want = desired(&[
            (fe(1, 80), &[1, 2][..]),
            (fe6(1, 80), &[1, 2][..]),
            (fe6(2, 53), &[3][..]),
        ]);
        want.frontends.get_mut(&fe6(2, 53)).unwrap().source_ranges = vec![IpCidr::V6(
            Ipv6Cidr::new("2001:db8::".parse().unwrap(), 32).unwrap(),
        )];
        assert!(s.apply(&want).errors.is_empty());
        let maps = s.maps().clone();
        let ops = maps.journal.len();

        let mut restarted = Syncer::adopt_with(maps.clone(), config()).unwrap();
        assert_eq!(
            restarted.maps().journal.len(),
            ops,
            "adoption wrote nothing"
        );
        assert_eq!(restarted.apply(&want).map_ops, 0);
        assert_eq!(programmed(restarted.maps()), programmed(&maps));
        // It continues from there: a new backend of either family gets a new id.
        restarted.apply(&desired(&[
            (fe(1, 80), &[1, 2, 7][..]),
            (fe6(1, 80), &[1, 2, 7][..]),
        ]));
        let m = restarted.maps();
        let v4: BTreeSet<u32> = m.backends.keys().copied().collect();
        let v6: BTreeSet<u32> = m.backends6.keys().copied().collect();
        assert_eq!((v4.len(), v6.len()), (3, 4), "{m:#?}");
        assert!(v4.is_disjoint(&v6));

        // Leftovers of an interrupted update are removed, of each family: a v6 reverse NAT
        // and a v6 range of no service, and a v4 range under a v6 service's id.
        let mut leftovers = maps.clone();
        let v6_id = leftovers.services6.values().next().unwrap().id;
        leftovers.rev_nat6.insert(
            999,
            RevNat6 {
                addr: [0; 4],
                port: 0,
                _pad: 0,
            },
        );
        let range6 = Ipv6Cidr::new("fd00::".parse().unwrap(), 8).unwrap();
        leftovers.source_ranges6.insert((999, range6));
        let range4 = Ipv4Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap();
        leftovers.source_ranges.insert((v6_id, range4));
        let restarted = Syncer::adopt_with(leftovers, config()).unwrap();
        let m = restarted.maps();
        assert_eq!(m.rev_nat6.len(), 2);
        assert_eq!(m.source_ranges6, maps.source_ranges6);
        assert!(m.source_ranges.is_empty());
    }

    #[test]
    fn a_backend_of_the_other_family_fails_its_frontend_only() {
        let mut s = syncer(1000);
        let mut want = desired(&[(fe(1, 80), &[1][..]), (fe6(1, 80), &[2][..])]);
        want.frontends.get_mut(&fe6(1, 80)).unwrap().backends = plan(&[2]).backends;
        let report = s.apply(&want);
        assert!(
            matches!(
                report.errors.as_slice(),
                [SyncError::MixedFamilies { frontend, .. }] if *frontend == fe6(1, 80)
            ),
            "{:?}",
            report.errors
        );
        assert_eq!(report.unprogrammed, 1);
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1])]));
        assert!(s.maps().backends6.is_empty());
    }

    #[test]
    fn applying_only_the_changed_frontends_equals_a_full_apply() {
        // A fixed pseudo-random walk over frontend plans sharing backends.
        let mut next = crate::testutil::walk(0x2545_f491);
        let mut incremental = syncer(1000);
        let mut current: BTreeMap<Frontend, Vec<u8>> = BTreeMap::new();
        let now = Instant::now();
        for step in 0..300 {
            let frontend = fe(next(12) as u8 + 1, 80);
            let backends: Vec<u8> = (1..=6).filter(|_| next(3) == 0).collect();
            if next(5) == 0 {
                current.remove(&frontend);
            } else {
                current.insert(frontend, backends);
            }
            let want: Vec<(Frontend, &[u8])> = current.iter().map(|(f, b)| (*f, &b[..])).collect();
            if next(3) == 0 {
                // A grace period has passed: tables unused since can be rewritten in place.
                incremental.maps.grace = Some(Instant::now());
            }
            let report = incremental.apply_changed(&desired(&want), [&frontend], now);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let shown: BTreeMap<Frontend, Vec<u8>> = expect(&want)
                .into_iter()
                .filter(|(_, b)| !b.is_empty())
                .collect();
            let programmed: BTreeMap<Frontend, Vec<u8>> = programmed(incremental.maps())
                .into_iter()
                .filter(|(_, b)| !b.is_empty())
                .collect();
            assert_eq!(programmed, shown, "step {step}");
            // Nothing left for a full apply to do: no stale backend, no missing write.
            assert_eq!(
                incremental.apply_at(&desired(&want), now).map_ops,
                0,
                "step {step}"
            );
        }
        let journal = &incremental.maps().journal;
        assert!(journal.iter().any(|op| op.starts_with("fill_table")));
        assert!(journal.iter().any(|op| op.starts_with("put_new_table")));
        // After the drain, an apply of no change deletes the REMOVED backends.
        let want: Vec<(Frontend, &[u8])> = current.iter().map(|(f, b)| (*f, &b[..])).collect();
        let later = now + config().drain;
        let report = incremental.apply_changed(&desired(&want), [], later);
        let listed: BTreeSet<&u8> = current.values().flatten().collect();
        assert_eq!(report.backends, listed.len(), "{report:?}");
        assert_eq!(incremental.apply_at(&desired(&want), later).map_ops, 0);
    }
}
