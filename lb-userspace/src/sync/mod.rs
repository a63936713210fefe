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
//!    bucket: `lb_common::prefilter`), its short-circuit entry (an external frontend under
//!    externalTrafficPolicy Local: the service id of its Service's cluster frontend, whose
//!    backends this node's own clients get) and its service entry (flags, affinity, backend
//!    count, and which of its two tables new flows use; `SERVICE_F_SHORT_CIRCUIT` once the
//!    short-circuit entry is there); a short-circuit entry no longer wanted goes after the
//!    service entry stops naming it;
//! 5. then the source ranges it no longer has, and its tables when it has no backend left;
//! 6. frontends no longer wanted are removed service entry first; a pre-filter bit is
//!    cleared after the last frontend of its bucket is removed;
//!
//! The datapath checks that a short-circuit entry's id is its cluster frontend's (that
//! frontend's service entry, found by its reverse NAT entry, holds the id) and otherwise
//! uses the frontend's own backends: a cluster frontend written after the external one, or
//! removed before it, leaves the external frontend as it was without the short-circuit.
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

mod adopt;
mod backends;
mod bitmap;
mod tables;

use self::bitmap::Prefilter;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_REMOTE, BACKEND_REMOVED, BACKEND_TERMINATING, Backend4, Backend6,
    SERVICE_F_DSR, SERVICE_F_EXTERNAL, SERVICE_F_RANDOM, SERVICE_F_REJECT, SERVICE_F_SHORT_CIRCUIT,
    SERVICE_F_SOURCE_RANGES, SERVICE_F_TABLE_B, Service, backend_stats_slot,
    maglev::{KEY_TABLE_B, table_key},
    map_names, prefilter,
};
use thiserror::Error;

use crate::{
    datapath::maps::{
        BackendEntry, DatapathMaps, MapOpError, RevNatEntry, TableId, TableInfo, TableRef,
    },
    model::{Forwarding, IpCidr, IpFamily, Selection},
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
    /// How flows from outside reach other nodes' backends, for frontends whose Service
    /// does not choose.
    pub forwarding: Forwarding,
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
            forwarding: Forwarding::Snat,
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
    /// The service id its short-circuit entry names (`lb_common::map_names::SHORT_CIRCUIT`).
    short_circuit: Option<u32>,
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
            short_circuit: None,
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
    /// The cluster frontend its short-circuit entry is to name ([`FrontendPlan::short_circuit`]).
    cluster: Option<FrontendKey>,
    /// That frontend's service id, once known (before the entries are written).
    short_circuit: Option<u32>,
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

    /// Whether the frontend `key` is programmed.
    pub fn is_programmed(&self, key: &FrontendKey) -> bool {
        self.frontends.get(key).is_some_and(|p| p.service.is_some())
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
        // The service ids of the cluster frontends the short-circuit entries name: wanted
        // ones' (being written), else programmed ones'.
        let ids: HashMap<FrontendKey, u32> =
            pending.iter().map(|p| (p.key, p.programmed.id)).collect();
        for p in &mut pending {
            p.short_circuit = p.cluster.and_then(|cluster| {
                (ids.get(&cluster).copied()).or_else(|| self.frontends.get(&cluster).map(|c| c.id))
            });
        }
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
        if plan.forwarding.unwrap_or(self.config.forwarding) == Forwarding::Dsr {
            flags |= SERVICE_F_DSR;
        }
        if !plan.source_ranges.is_empty() {
            flags |= SERVICE_F_SOURCE_RANGES;
        }
        if plan.reject && selected.is_empty() {
            flags |= SERVICE_F_REJECT;
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
            cluster: plan.short_circuit.map(|f| f.key()),
            short_circuit: None,
            slot,
            failed: false,
        })
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
        if p.short_circuit.is_some() {
            self.op(|m| m.delete_short_circuit(p.id))?;
            p.short_circuit = None;
        }
        Ok(())
    }

    /// Drops a frontend that has nothing left in the maps, freeing its id.
    fn forget(&mut self, key: &FrontendKey) {
        if let Some(p) = self.frontends.remove(key) {
            self.used_service_ids.remove(&p.id);
        }
    }

    fn op<T>(&mut self, f: impl FnOnce(&mut M) -> Result<T, MapOpError>) -> Result<T, MapOpError> {
        self.ops += 1;
        f(&mut self.maps)
    }
}

#[cfg(test)]
mod tests;
