//! The pinned maps the control plane writes ([`BpfMaps`], the BPF implementation of
//! [`DatapathMaps`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, Condvar, Mutex},
    time::Instant,
};

use aya::maps::{
    Array, HashMap, HashOfMaps, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
    PerCpuValues, lpm_trie,
};
use lb_common::{
    BACKEND_ACTIVE, Backend4, Backend6, Frontend4, Frontend6, MaglevCell, RevNat4, RevNat6,
    SOURCE_RANGE_ID_BITS, Service, ServiceStats, SourceRange4, SourceRange6, addr6,
    backend_stats_slot, maglev, map_names, octets6,
};
use tracing::warn;

use super::maps::{
    BackendEntry, BatchError, DatapathMaps, MapContents, MapOpError, RevNatEntry, TableId,
    TableInfo, TableRef,
};
use super::{DatapathError, Pins, sys};
use crate::{
    model::{IpCidr, IpFamily, Ipv4Cidr, Ipv6Cidr},
    plan::desired::FrontendKey,
};

/// The maps the control plane writes: services, backends, reverse NAT, Maglev tables,
/// source ranges, and the backends' counters (created and deleted with the backends).
pub struct BpfMaps {
    /// [`map_names::SERVICES`].
    pub services: HashMap<MapData, Frontend4, Service>,
    /// [`map_names::BACKENDS`].
    pub backends: HashMap<MapData, u32, Backend4>,
    /// [`map_names::REV_NAT`].
    pub rev_nat: HashMap<MapData, u32, RevNat4>,
    /// [`map_names::MAGLEV`].
    pub maglev: HashOfMaps<MapData, u32, MapData>,
    /// The same map, for the batch writes aya does not offer.
    maglev_fd: std::os::fd::OwnedFd,
    /// The tables this agent put in the Maglev map, open ([`OpenTables`]).
    tables: OpenTables,
    /// [`map_names::SOURCE_RANGES`].
    pub source_ranges: LpmTrie<MapData, SourceRange4, u8>,
    /// [`map_names::SERVICES6`].
    pub services6: HashMap<MapData, Frontend6, Service>,
    /// [`map_names::BACKENDS6`].
    pub backends6: HashMap<MapData, u32, Backend6>,
    /// [`map_names::REV_NAT6`].
    pub rev_nat6: HashMap<MapData, u32, RevNat6>,
    /// [`map_names::SOURCE_RANGES6`].
    pub source_ranges6: LpmTrie<MapData, SourceRange6, u8>,
    /// [`map_names::SHORT_CIRCUIT`].
    pub short_circuit: HashMap<MapData, u32, u32>,
    /// [`map_names::BACKEND_STATS`], of `backend_stats_mask + 1` slots.
    pub backend_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats_mask: u32,
    /// [`map_names::BACKEND_GEN`]: bumped after a backend leaves ACTIVE or a frontend goes.
    pub backend_gen: Array<MapData, u32>,
    /// [`map_names::PREFILTER`].
    pub prefilter: Array<MapData, u64>,
    /// The same map, to read it whole through a mapping.
    prefilter_fd: std::os::fd::OwnedFd,
    /// Service ids are below this: the size of [`map_names::SERVICE_STATS`].
    pub service_id_limit: u32,
    /// The size of each map written, for the error that says a map is full.
    sizes: [(&'static str, u32); 11],
    grace: GraceClock,
}

/// Grace periods on request, each on a thread of its own ([`sys::GracePeriods::wait`]
/// blocks for one, about 7.5 ms here): the syncer asks for one after a service entry stops
/// using a table, and rewrites that table in place only once one that started later has
/// ended. Only one runs at a time; requests during one are served by the next.
#[derive(Default)]
struct GraceClock {
    shared: Arc<(Mutex<GraceState>, Condvar)>,
}

#[derive(Default)]
struct GraceState {
    /// A grace period is asked for.
    wanted: bool,
    /// The thread runs.
    running: bool,
    /// The clock is dropped: the thread ends.
    stop: bool,
    /// The start of the latest grace period that has ended.
    since: Option<Instant>,
}

impl GraceClock {
    fn lock(shared: &(Mutex<GraceState>, Condvar)) -> std::sync::MutexGuard<'_, GraceState> {
        shared
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn since(&self) -> Option<Instant> {
        Self::lock(&self.shared).since
    }

    fn request(&self) {
        let mut state = Self::lock(&self.shared);
        state.wanted = true;
        if state.running {
            self.shared.1.notify_one();
            return;
        }
        let periods = match sys::GracePeriods::new() {
            Ok(periods) => periods,
            Err(e) => {
                // Tables are then never rewritten in place: each change puts a new one.
                warn!("cannot wait for grace periods: {e}");
                return;
            }
        };
        state.running = true;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("grace".into())
            .spawn(move || {
                loop {
                    let mut state = Self::lock(&shared);
                    while !state.wanted && !state.stop {
                        state = shared
                            .1
                            .wait(state)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    if state.stop {
                        return;
                    }
                    state.wanted = false;
                    drop(state);
                    let start = Instant::now();
                    match periods.wait() {
                        Ok(()) => Self::lock(&shared).since = Some(start),
                        Err(e) => warn!("waiting for a grace period: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the grace period thread: {e}");
            state.running = false;
        }
    }
}

impl Drop for GraceClock {
    fn drop(&mut self) {
        Self::lock(&self.shared).stop = true;
        self.shared.1.notify_one();
    }
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

impl BpfMaps {
    pub(super) fn from_maps(
        [
            services,
            backends,
            rev_nat,
            maglev,
            source_ranges,
            backend_stats,
            backend_gen,
            prefilter,
            services6,
            backends6,
            rev_nat6,
            source_ranges6,
            short_circuit,
        ]: [Map; 13],
        pins: &Pins,
    ) -> Result<Self, DatapathError> {
        let mut sizes = [
            (map_names::SERVICES, 0),
            (map_names::BACKENDS, 0),
            (map_names::REV_NAT, 0),
            (map_names::MAGLEV, 0),
            (map_names::SOURCE_RANGES, 0),
            (map_names::BACKEND_STATS, 0),
            (map_names::SERVICES6, 0),
            (map_names::BACKENDS6, 0),
            (map_names::REV_NAT6, 0),
            (map_names::SOURCE_RANGES6, 0),
            (map_names::SHORT_CIRCUIT, 0),
        ];
        for (name, size) in &mut sizes {
            *size = pins.max_entries(name)?;
        }
        let dup = |name: &'static str, data: Option<&MapData>| {
            data.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                .and_then(|data| data.fd().as_fd().try_clone_to_owned())
                .map_err(|io_error| {
                    map_err(name)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    }))
                })
        };
        let maglev_fd = dup(
            map_names::MAGLEV,
            match &maglev {
                Map::HashOfMaps(data) => Some(data),
                _ => None,
            },
        )?;
        let prefilter_fd = dup(
            map_names::PREFILTER,
            match &prefilter {
                Map::Array(data) => Some(data),
                _ => None,
            },
        )?;
        Ok(Self {
            service_id_limit: pins.max_entries(map_names::SERVICE_STATS)?,
            sizes,
            grace: GraceClock::default(),
            tables: OpenTables::default(),
            maglev_fd,
            prefilter_fd,
            services: HashMap::try_from(services).map_err(map_err(map_names::SERVICES))?,
            backends: HashMap::try_from(backends).map_err(map_err(map_names::BACKENDS))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(map_err(map_names::REV_NAT))?,
            maglev: HashOfMaps::try_from(maglev).map_err(map_err(map_names::MAGLEV))?,
            source_ranges: LpmTrie::try_from(source_ranges)
                .map_err(map_err(map_names::SOURCE_RANGES))?,
            backend_stats: PerCpuArray::try_from(backend_stats)
                .map_err(map_err(map_names::BACKEND_STATS))?,
            backend_stats_mask: pins.max_entries(map_names::BACKEND_STATS)?.wrapping_sub(1),
            backend_gen: Array::try_from(backend_gen).map_err(map_err(map_names::BACKEND_GEN))?,
            prefilter: Array::try_from(prefilter).map_err(map_err(map_names::PREFILTER))?,
            services6: HashMap::try_from(services6).map_err(map_err(map_names::SERVICES6))?,
            backends6: HashMap::try_from(backends6).map_err(map_err(map_names::BACKENDS6))?,
            rev_nat6: HashMap::try_from(rev_nat6).map_err(map_err(map_names::REV_NAT6))?,
            source_ranges6: LpmTrie::try_from(source_ranges6)
                .map_err(map_err(map_names::SOURCE_RANGES6))?,
            short_circuit: HashMap::try_from(short_circuit)
                .map_err(map_err(map_names::SHORT_CIRCUIT))?,
        })
    }

    /// Opens the pinned maps (for the CLI, and for an agent that did not load
    /// the object itself).
    pub fn open_pinned(pins: &Pins) -> Result<Self, DatapathError> {
        let open = |name: &'static str, kind| pins.open_map(name, kind);
        Self::from_maps(
            [
                open(map_names::SERVICES, Map::HashMap)?,
                open(map_names::BACKENDS, Map::HashMap)?,
                open(map_names::REV_NAT, Map::HashMap)?,
                open(map_names::MAGLEV, Map::HashOfMaps)?,
                open(map_names::SOURCE_RANGES, Map::LpmTrie)?,
                open(map_names::BACKEND_STATS, Map::PerCpuArray)?,
                open(map_names::BACKEND_GEN, Map::Array)?,
                open(map_names::PREFILTER, Map::Array)?,
                open(map_names::SERVICES6, Map::HashMap)?,
                open(map_names::BACKENDS6, Map::HashMap)?,
                open(map_names::REV_NAT6, Map::HashMap)?,
                open(map_names::SOURCE_RANGES6, Map::LpmTrie)?,
                open(map_names::SHORT_CIRCUIT, Map::HashMap)?,
            ],
            pins,
        )
    }

    /// One entry of the table under `key` (`lb_common::maglev::table_key` of a service
    /// entry): what the datapath reads for a flow hash (`lb explain`). `None` when there is
    /// no table.
    pub fn table_entry(&self, key: u32, hash: u32) -> Result<Option<TableSlot>, MapOpError> {
        let table = match self.maglev.get(&key, 0) {
            Ok(table) => table,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(op_err(map_names::MAGLEV)(e)),
        };
        let cells: Array<MapData, MaglevCell> =
            Array::try_from(Map::Array(table)).map_err(op_err(map_names::MAGLEV))?;
        let [size, _] = cells.get(&0, 0).map_err(op_err(map_names::MAGLEV))?;
        if size == 0 {
            return Ok(None);
        }
        let index = hash % size;
        let (element, half) = maglev::position(index);
        let cell = cells.get(&element, 0).map_err(op_err(map_names::MAGLEV))?;
        Ok(Some(TableSlot {
            size,
            index,
            backend_id: cell[half],
        }))
    }
}

/// A Maglev table entry, as `lb explain` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSlot {
    /// The table size.
    pub size: u32,
    /// The entry: the flow hash modulo the size.
    pub index: u32,
    /// The backend id in it.
    pub backend_id: u32,
}

fn op_err(map: &'static str) -> impl Fn(MapError) -> MapOpError {
    move |error| match error {
        MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => MapOpError::Os {
            map,
            source: io_error,
        },
        other => MapOpError::Os {
            map,
            source: std::io::Error::other(other),
        },
    }
}

/// Deleting a key that is not there succeeds: the caller wanted it gone.
fn delete_result(map: &'static str, result: Result<(), MapError>) -> Result<(), MapOpError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other.map_err(op_err(map)),
    }
}

fn read<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapOpError> {
    map.iter().collect::<Result<_, _>>().map_err(op_err(name))
}

fn source_range_key(service_id: u32, range: Ipv4Cidr) -> lpm_trie::Key<SourceRange4> {
    lpm_trie::Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.prefix_len),
        SourceRange4 {
            service_id,
            addr: u32::from_ne_bytes(range.addr.octets()),
        },
    )
}

fn source_range6_key(service_id: u32, range: Ipv6Cidr) -> lpm_trie::Key<SourceRange6> {
    lpm_trie::Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.prefix_len),
        SourceRange6 {
            service_id,
            addr: addr6(range.addr.octets()),
        },
    )
}

impl BpfMaps {
    /// Zeroes the counters in backend `id`'s slot.
    fn zero_backend_stats(&mut self, id: u32) -> Result<(), MapOpError> {
        let zero = aya::util::nr_cpus()
            .map_err(|(_, source)| MapOpError::Os {
                map: map_names::BACKEND_STATS,
                source,
            })
            .and_then(|cpus| {
                PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|source| {
                    MapOpError::Os {
                        map: map_names::BACKEND_STATS,
                        source,
                    }
                })
            })?;
        let slot = backend_stats_slot(id, self.backend_stats_mask);
        (self.backend_stats.set(slot, zero, 0)).map_err(self.write_err(map_names::BACKEND_STATS))
    }

    /// The error of a failed write of `map`: [`MapOpError::Full`] with its size for E2BIG.
    fn os_err(&self, map: &'static str, source: io::Error) -> MapOpError {
        if source.raw_os_error() == Some(libc::E2BIG) {
            let max_entries = self
                .sizes
                .iter()
                .find(|(n, _)| *n == map)
                .map_or(0, |s| s.1);
            MapOpError::Full { map, max_entries }
        } else {
            MapOpError::Os { map, source }
        }
    }

    /// [`BpfMaps::os_err`] for aya's errors.
    fn write_err(&self, map: &'static str) -> impl Fn(MapError) -> MapOpError + '_ {
        move |error| match error {
            MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) => {
                self.os_err(map, io_error)
            }
            other => op_err(map)(other),
        }
    }

    /// Adds one to [`map_names::BACKEND_GEN`], after a write that takes a backend out of
    /// ACTIVE or deletes a frontend: conntrack entries stop vouching for their backend, so
    /// the next packet of each flow reads its backend and frontend again.
    fn bump_backend_gen(&mut self) -> Result<(), MapOpError> {
        let err = op_err(map_names::BACKEND_GEN);
        let generation = self.backend_gen.get(&0, 0).map_err(&err)?;
        self.backend_gen
            .set(0, generation.wrapping_add(1), 0)
            .map_err(&err)
    }
}

/// The inner maps (tables) this agent put in the Maglev map, each kept open while some key
/// of the map holds it. An inner map is otherwise reached only by its id, and the kernel
/// opens a map by id only for CAP_SYS_ADMIN, which the agent does not have in its pod
/// (deploy/README.md): sharing a table between frontends and rewriting one in place need
/// its fd. Tables an earlier agent put are opened by id when the capability allows (else
/// adoption leaves them out and they are built anew).
#[derive(Default)]
struct OpenTables {
    /// By table id: the table and the number of keys that hold it.
    open: std::collections::HashMap<TableId, (MapData, usize)>,
    /// By key of the Maglev map: the table this agent put there.
    keys: std::collections::HashMap<u32, TableId>,
}

impl OpenTables {
    /// Table `id`, when this agent holds it open.
    fn get(&self, id: TableId) -> Option<&MapData> {
        self.open.get(&id).map(|(table, _)| table)
    }

    /// One more key holds table `id` (whose fd is `fd`): see [`OpenTables::assign`].
    fn hold(&mut self, id: TableId, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), MapError> {
        let entry = match self.open.entry(id) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let owned = fd.try_clone_to_owned().map_err(|io_error| {
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "dup",
                        io_error,
                    })
                })?;
                slot.insert((MapData::from_fd(owned)?, 0))
            }
        };
        entry.1 += 1;
        Ok(())
    }

    /// `key` now holds table `id` ([`OpenTables::hold`] first), in place of what it held.
    fn assign(&mut self, key: u32, id: TableId) {
        if let Some(old) = self.keys.insert(key, id) {
            self.release(old);
        }
    }

    /// `key` holds no table any more.
    fn remove(&mut self, key: u32) {
        if let Some(old) = self.keys.remove(&key) {
            self.release(old);
        }
    }

    fn release(&mut self, id: TableId) {
        if let Some(entry) = self.open.get_mut(&id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.open.remove(&id);
            }
        }
    }
}

impl DatapathMaps for BpfMaps {
    /// The inner map (closed on drop: the kernel frees it unless a service points at it).
    type Table = Array<MapData, MaglevCell>;
    fn put_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), MapOpError> {
        match backend {
            BackendEntry::V4(b) => {
                let result = self.backends.insert(id, b, 0);
                result.map_err(self.write_err(map_names::BACKENDS))?;
            }
            BackendEntry::V6(b) => {
                let result = self.backends6.insert(id, b, 0);
                result.map_err(self.write_err(map_names::BACKENDS6))?;
            }
        }
        if backend.state() != BACKEND_ACTIVE {
            self.bump_backend_gen()?;
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => delete_result(map_names::BACKENDS, self.backends.remove(&id))?,
            IpFamily::V6 => delete_result(map_names::BACKENDS6, self.backends6.remove(&id))?,
        }
        self.bump_backend_gen()
    }
    fn build_table(
        &mut self,
        entries: &[u32],
        backends: u32,
    ) -> Result<(TableId, Self::Table), MapOpError> {
        let err = op_err(map_names::MAGLEV);
        let cells = table_cells(entries, backends);
        let table: Array<MapData, MaglevCell> =
            Array::create(cells.len() as u32, maglev::INNER_MAP_FLAGS).map_err(&err)?;
        let inner = table.map();
        sys::mmap_write(inner.fd().as_fd(), &cells).map_err(|source| MapOpError::Os {
            map: map_names::MAGLEV,
            source,
        })?;
        let id = inner.info().map_err(&err)?.id();
        Ok((id, table))
    }
    fn put_tables(
        &mut self,
        writes: &[(u32, TableRef<'_, Self::Table>)],
    ) -> Result<(), BatchError> {
        // An existing table is the one this agent holds open, else opened by its id for its
        // fd; the batch stops before the first one that cannot be (it is gone: nothing
        // pointed at it any more).
        let mut opened = Vec::new();
        let mut fds = Vec::with_capacity(writes.len());
        let mut ids = Vec::with_capacity(writes.len());
        let mut open_error = None;
        for (_, table) in writes {
            let (fd, id) = match table {
                TableRef::Built(table) => {
                    let inner = table.map();
                    match inner.info() {
                        Ok(info) => (inner.fd().as_fd().as_raw_fd(), info.id()),
                        Err(e) => {
                            open_error = Some(op_err(map_names::MAGLEV)(e));
                            break;
                        }
                    }
                }
                TableRef::Existing(id) => match self.tables.get(*id) {
                    Some(table) => (table.fd().as_fd().as_raw_fd(), *id),
                    None => match MapData::from_id(*id) {
                        Ok(data) => {
                            let fd = data.fd().as_fd().as_raw_fd();
                            opened.push(data);
                            (fd, *id)
                        }
                        Err(e) => {
                            open_error = Some(op_err(map_names::MAGLEV)(e));
                            break;
                        }
                    },
                },
            };
            fds.push(fd as u32);
            ids.push(id);
        }
        let keys: Vec<u32> = writes[..fds.len()].iter().map(|(id, _)| *id).collect();
        // The swaps: one write each, one wait for running programs for all.
        let result = sys::map_update_batch(self.maglev_fd.as_fd(), &keys, &fds);
        let done = match &result {
            Ok(()) => keys.len(),
            Err((done, _)) => *done,
        };
        // Every table written is held before any is released: a table a key leaves may be
        // the one another key of the batch takes.
        let (mut held, mut unheld) = (Vec::with_capacity(done), Vec::new());
        for i in 0..done {
            // SAFETY: fds[i] is open: a built table's, one held, or one of `opened`, all
            // alive until the end of this function (nothing is released before this loop
            // ends).
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fds[i] as i32) };
            match self.tables.hold(ids[i], fd) {
                Ok(()) => held.push(i),
                Err(e) => {
                    warn!("keeping table {} open: {e}", ids[i]);
                    unheld.push(i);
                }
            }
        }
        for i in held {
            self.tables.assign(keys[i], ids[i]);
        }
        for i in unheld {
            self.tables.remove(keys[i]);
        }
        result.map_err(|(done, e)| BatchError {
            done,
            error: self.os_err(map_names::MAGLEV, e),
        })?;
        match open_error {
            None => Ok(()),
            Some(error) => Err(BatchError {
                done: fds.len(),
                error,
            }),
        }
    }
    fn fill_table(
        &mut self,
        id: TableId,
        entries: &[u32],
        backends: u32,
    ) -> Result<(), MapOpError> {
        let opened;
        let table = match self.tables.get(id) {
            Some(table) => table,
            None => {
                opened = MapData::from_id(id).map_err(op_err(map_names::MAGLEV))?;
                &opened
            }
        };
        let fd = table.fd().as_fd();
        let info = table.info().map_err(op_err(map_names::MAGLEV))?;
        let cells = table_cells(entries, backends);
        if info.max_entries() as usize != cells.len() {
            return Err(MapOpError::Os {
                map: map_names::MAGLEV,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        sys::mmap_write(fd, &cells).map_err(|source| MapOpError::Os {
            map: map_names::MAGLEV,
            source,
        })
    }
    fn grace_since(&self) -> Option<Instant> {
        self.grace.since()
    }
    fn request_grace(&mut self) {
        self.grace.request();
    }
    fn delete_tables(&mut self, keys: &[u32]) -> Result<(), BatchError> {
        let mut start = 0;
        let mut failed = None;
        while start < keys.len() {
            match sys::map_delete_batch(self.maglev_fd.as_fd(), &keys[start..]) {
                Ok(()) => start = keys.len(),
                // Deleting what is not there succeeds: go on after it.
                Err((done, e)) if e.raw_os_error() == Some(libc::ENOENT) => start += done + 1,
                Err((done, e)) => {
                    start += done;
                    failed = Some(e);
                    break;
                }
            }
        }
        for key in &keys[..start.min(keys.len())] {
            self.tables.remove(*key);
        }
        match failed {
            None => Ok(()),
            Some(e) => Err(BatchError {
                done: start,
                error: self.os_err(map_names::MAGLEV, e),
            }),
        }
    }
    fn put_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        match range {
            IpCidr::V4(range) => {
                let key = source_range_key(service_id, range);
                let result = self.source_ranges.insert(&key, 1, 0);
                result.map_err(self.write_err(map_names::SOURCE_RANGES))
            }
            IpCidr::V6(range) => {
                let key = source_range6_key(service_id, range);
                let result = self.source_ranges6.insert(&key, 1, 0);
                result.map_err(self.write_err(map_names::SOURCE_RANGES6))
            }
        }
    }
    fn delete_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        match range {
            IpCidr::V4(range) => {
                let key = source_range_key(service_id, range);
                delete_result(map_names::SOURCE_RANGES, self.source_ranges.remove(&key))
            }
            IpCidr::V6(range) => {
                let key = source_range6_key(service_id, range);
                delete_result(map_names::SOURCE_RANGES6, self.source_ranges6.remove(&key))
            }
        }
    }
    fn put_rev_nat(&mut self, id: u32, entry: &RevNatEntry) -> Result<(), MapOpError> {
        match entry {
            RevNatEntry::V4(r) => {
                let result = self.rev_nat.insert(id, r, 0);
                result.map_err(self.write_err(map_names::REV_NAT))
            }
            RevNatEntry::V6(r) => {
                let result = self.rev_nat6.insert(id, r, 0);
                result.map_err(self.write_err(map_names::REV_NAT6))
            }
        }
    }
    fn delete_rev_nat(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => delete_result(map_names::REV_NAT, self.rev_nat.remove(&id)),
            IpFamily::V6 => delete_result(map_names::REV_NAT6, self.rev_nat6.remove(&id)),
        }
    }
    fn put_short_circuit(&mut self, id: u32, cluster_id: u32) -> Result<(), MapOpError> {
        let result = self.short_circuit.insert(id, cluster_id, 0);
        result.map_err(self.write_err(map_names::SHORT_CIRCUIT))
    }
    fn delete_short_circuit(&mut self, id: u32) -> Result<(), MapOpError> {
        delete_result(map_names::SHORT_CIRCUIT, self.short_circuit.remove(&id))
    }
    fn put_service(&mut self, key: &FrontendKey, value: &Service) -> Result<(), MapOpError> {
        match key {
            FrontendKey::V4(k) => {
                let result = self.services.insert(k, value, 0);
                result.map_err(self.write_err(map_names::SERVICES))
            }
            FrontendKey::V6(k) => {
                let result = self.services6.insert(k, value, 0);
                result.map_err(self.write_err(map_names::SERVICES6))
            }
        }
    }
    /// Bumps the backend generation (`lb_common::map_names::BACKEND_GEN`): conntrack
    /// entries of the frontend's flows no longer vouch for their backend.
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
        match key {
            FrontendKey::V4(k) => delete_result(map_names::SERVICES, self.services.remove(k))?,
            FrontendKey::V6(k) => delete_result(map_names::SERVICES6, self.services6.remove(k))?,
        }
        self.bump_backend_gen()
    }
    fn put_prefilter_word(&mut self, index: u32, word: u64) -> Result<(), MapOpError> {
        (self.prefilter.set(index, word, 0)).map_err(op_err(map_names::PREFILTER))
    }
    fn service_id_limit(&self) -> u32 {
        self.service_id_limit
    }
    fn backend_stats_slots(&self) -> u32 {
        self.backend_stats_mask.wrapping_add(1)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapOpError> {
        self.zero_backend_stats(id)
    }
    fn read_all(&self) -> Result<MapContents, MapOpError> {
        let err = op_err(map_names::MAGLEV);
        let mut tables = Vec::new();
        // Each distinct table is read once (frontends with the same backends share one).
        let mut read_tables: BTreeMap<TableId, TableInfo> = BTreeMap::new();
        for service_id in self.maglev.keys() {
            let service_id = service_id.map_err(&err)?;
            let inner = match self.maglev.get(&service_id, 0) {
                Ok(inner) => inner,
                // Removed since the keys were listed.
                Err(MapError::KeyNotFound) => continue,
                // An inner map is opened by its id, which the kernel allows only with
                // CAP_SYS_ADMIN, which the DaemonSet does not give: the table is left out,
                // and the first sync builds the frontend a new one, swapped in with one
                // write (Maglev over the same backends gives the same entries).
                Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::EPERM) =>
                {
                    continue;
                }
                Err(e) => return Err(err(e)),
            };
            let info = inner.info().map_err(&err)?;
            let table = match read_tables.entry(info.id()) {
                std::collections::btree_map::Entry::Occupied(table) => table.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let cells: Vec<MaglevCell> =
                        sys::mmap_read(inner.fd().as_fd(), info.max_entries() as usize).map_err(
                            |source| MapOpError::Os {
                                map: map_names::MAGLEV,
                                source,
                            },
                        )?;
                    slot.insert(table_info_of_cells(info.id(), &cells))
                }
            };
            tables.push((service_id, table.clone()));
        }
        let mut source_ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(op_err(map_names::SOURCE_RANGES))?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
            let range = u8::try_from(prefix_len)
                .ok()
                .and_then(|len| Ipv4Cidr::new(Ipv4Addr::from(data.addr.to_ne_bytes()), len));
            if let Some(range) = range {
                source_ranges.push((data.service_id, IpCidr::V4(range)));
            }
        }
        for key in self.source_ranges6.keys() {
            let key = key.map_err(op_err(map_names::SOURCE_RANGES6))?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
            let range = u8::try_from(prefix_len)
                .ok()
                .and_then(|len| Ipv6Cidr::new(Ipv6Addr::from(octets6(data.addr)), len));
            if let Some(range) = range {
                source_ranges.push((data.service_id, IpCidr::V6(range)));
            }
        }
        let services4 = read(&self.services, map_names::SERVICES)?;
        let services6 = read(&self.services6, map_names::SERVICES6)?;
        let backends4 = read(&self.backends, map_names::BACKENDS)?;
        let backends6 = read(&self.backends6, map_names::BACKENDS6)?;
        let rev_nat4 = read(&self.rev_nat, map_names::REV_NAT)?;
        let rev_nat6 = read(&self.rev_nat6, map_names::REV_NAT6)?;
        let services4 = services4.into_iter().map(|(k, v)| (FrontendKey::V4(k), v));
        let services6 = services6.into_iter().map(|(k, v)| (FrontendKey::V6(k), v));
        let backends4 = backends4.into_iter().map(|(k, v)| (k, BackendEntry::V4(v)));
        let backends6 = backends6.into_iter().map(|(k, v)| (k, BackendEntry::V6(v)));
        let rev_nat4 = rev_nat4.into_iter().map(|(k, v)| (k, RevNatEntry::V4(v)));
        let rev_nat6 = rev_nat6.into_iter().map(|(k, v)| (k, RevNatEntry::V6(v)));
        Ok(MapContents {
            services: services4.chain(services6).collect(),
            backends: backends4.chain(backends6).collect(),
            rev_nat: rev_nat4.chain(rev_nat6).collect(),
            tables,
            source_ranges,
            prefilter: prefilter_words(&self.prefilter_fd, self.prefilter.len())?,
            short_circuits: read(&self.short_circuit, map_names::SHORT_CIRCUIT)?,
        })
    }
}

/// A table's inner array: the header `[size, backends]`, then the entries in pairs.
fn table_cells(entries: &[u32], backends: u32) -> Vec<MaglevCell> {
    let size = entries.len() as u32;
    let mut cells: Vec<MaglevCell> = vec![[0; 2]; maglev::elements(size) as usize];
    cells[0] = [size, backends];
    for (index, &backend_id) in entries.iter().enumerate() {
        let (element, half) = maglev::position(index as u32);
        cells[element as usize][half] = backend_id;
    }
    cells
}

/// The non-zero words of the pre-filter bitmap, by index, read through one mapping.
fn prefilter_words(fd: &std::os::fd::OwnedFd, len: u32) -> Result<Vec<(u32, u64)>, MapOpError> {
    let words: Vec<u64> =
        sys::mmap_read(fd.as_fd(), len as usize).map_err(|source| MapOpError::Os {
            map: map_names::PREFILTER,
            source,
        })?;
    Ok((0..len).zip(words).filter(|(_, w)| *w != 0).collect())
}

/// What a table's inner array holds: the header `[size, backends]`, then the entries in
/// pairs.
fn table_info_of_cells(id: TableId, cells: &[MaglevCell]) -> TableInfo {
    let size = cells.first().map_or(0, |h| h[0]);
    let backends: BTreeSet<u32> = (0..size)
        .filter_map(|index| {
            let (element, half) = maglev::position(index);
            cells.get(element as usize).map(|c| c[half])
        })
        .collect();
    TableInfo {
        id,
        size,
        backends: backends.into_iter().collect(),
    }
}
