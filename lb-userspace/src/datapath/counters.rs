//! The datapath's per-CPU counters, read from the pins and summed, and the occupancy of the
//! LRU tables it fills.

use aya::maps::{
    HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, Ct4Key, Ct6Entry, Ct6Key, CtEntry, Event, PairKey,
    ServiceStats, SockAffinityKey, TableEvent, backend_stats_slot, map_names,
};

use super::{DatapathError, Pins, capacity_flag, map_err};

/// The per-CPU counters, read from the pins and summed over CPUs, and the conntrack
/// occupancy they are compared with.
pub struct Counters {
    services: PerCpuArray<MapData, ServiceStats>,
    reasons: PerCpuArray<MapData, u64>,
    events: PerCpuArray<MapData, u64>,
    nat_events: PerCpuArray<MapData, u64>,
    backends: PerCpuArray<MapData, ServiceStats>,
    /// The size of `backends` less one.
    backend_mask: u32,
    /// [`map_names::PAIR_STATS`]; `None` when pinned by an agent without it.
    pairs: Option<PerCpuHashMap<MapData, PairKey, u64>>,
    conntrack: HashMap<MapData, Ct4Key, CtEntry>,
    /// [`map_names::CONNTRACK6`]: its inserts are counted with IPv4's, so its entries are
    /// too. `None` when pinned by an agent without it.
    conntrack6: Option<HashMap<MapData, Ct6Key, Ct6Entry>>,
    /// The affinity tables with their insert counters; `None` when pinned by an agent
    /// older than the counters (until the current one starts).
    affinity: Option<AffinityTables>,
}

struct AffinityTables {
    inserts: PerCpuArray<MapData, u64>,
    datapath: HashMap<MapData, AffinityKey, AffinityEntry>,
    /// [`map_names::AFFINITY6`], counted with [`map_names::AFFINITY`] (one insert counter).
    datapath6: Option<HashMap<MapData, Affinity6Key, AffinityEntry>>,
    sockets: HashMap<MapData, SockAffinityKey, AffinityEntry>,
}

/// How full an LRU table of the datapath is. The datapath adds entries itself; when the
/// table is full the kernel evicts the least recently used ones to make room, silently:
/// the evictions follow from the datapath's insert counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableFill {
    /// The map.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// Its `max_entries`.
    pub capacity: u32,
    /// Entries evicted to make room: inserts - deletes - entries.
    pub evictions: u64,
}

impl TableFill {
    /// The `lb agent` flag that sizes the table.
    pub fn flag(&self) -> &'static str {
        capacity_flag(self.map).unwrap_or("--max-*")
    }
}

/// [`occupancy`] of a map that may not be pinned: none.
fn occupancy6<K: aya::Pod, V: aya::Pod>(
    map: Option<&HashMap<MapData, K, V>>,
    name: &'static str,
) -> Result<(u64, u32), DatapathError> {
    map.map_or(Ok((0, 0)), |map| occupancy(map, name))
}

/// The entries of an LRU hash map (one pass over the keys) and its `max_entries`.
fn occupancy<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(u64, u32), DatapathError> {
    let mut entries = 0u64;
    for key in map.keys() {
        match key {
            Ok(_) => entries += 1,
            // An entry evicted while the keys are walked.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    let capacity = map.map().info().map_err(map_err(name))?.max_entries();
    Ok((entries, capacity))
}

/// Conntrack figures: entries now, and what came and went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackStats {
    /// Entries in the map now (two per flow).
    pub entries: u64,
    /// Entries the datapath created.
    pub inserts: u64,
    /// Entries the datapath deleted.
    pub deletes: u64,
    /// Entries the kernel evicted to make room (LRU): `inserts - deletes - entries`.
    pub evictions: u64,
}

fn sum_stats(values: &PerCpuValues<ServiceStats>) -> ServiceStats {
    values
        .iter()
        .fold(ServiceStats::default(), |a, v| ServiceStats {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_flows: a.new_flows + v.new_flows,
        })
}

impl Counters {
    /// Opens the pinned counters.
    pub fn open_pinned(pins: &Pins) -> Result<Self, DatapathError> {
        let open = |name: &'static str, kind| pins.open_map(name, kind);
        let services = open(map_names::SERVICE_STATS, Map::PerCpuArray)?;
        let reasons = open(map_names::REASON_STATS, Map::PerCpuArray)?;
        let events = open(map_names::EVENTS, Map::PerCpuArray)?;
        let nat_events = open(map_names::NAT_EVENTS, Map::PerCpuArray)?;
        let backends = open(map_names::BACKEND_STATS, Map::PerCpuArray)?;
        let backend_mask = pins.max_entries(map_names::BACKEND_STATS)?.wrapping_sub(1);
        let conntrack = open(map_names::CONNTRACK, Map::LruHashMap)?;
        let pairs = if pins.has_map(map_names::PAIR_STATS) {
            let map = open(map_names::PAIR_STATS, Map::PerCpuLruHashMap)?;
            Some(PerCpuHashMap::try_from(map).map_err(map_err(map_names::PAIR_STATS))?)
        } else {
            None
        };
        // The IPv6 twins, when pinned.
        let lru6 = |name: &'static str| -> Result<Option<Map>, DatapathError> {
            if pins.has_map(name) {
                Ok(Some(open(name, Map::LruHashMap)?))
            } else {
                Ok(None)
            }
        };
        let conntrack6 = lru6(map_names::CONNTRACK6)?
            .map(|m| HashMap::try_from(m).map_err(map_err(map_names::CONNTRACK6)))
            .transpose()?;
        let affinity = if pins.has_map(map_names::TABLE_EVENTS) {
            let inserts = open(map_names::TABLE_EVENTS, Map::PerCpuArray)?;
            let datapath = open(map_names::AFFINITY, Map::LruHashMap)?;
            let sockets = open(map_names::SOCK_AFFINITY, Map::LruHashMap)?;
            Some(AffinityTables {
                inserts: PerCpuArray::try_from(inserts)
                    .map_err(map_err(map_names::TABLE_EVENTS))?,
                datapath: HashMap::try_from(datapath).map_err(map_err(map_names::AFFINITY))?,
                datapath6: lru6(map_names::AFFINITY6)?
                    .map(|m| HashMap::try_from(m).map_err(map_err(map_names::AFFINITY6)))
                    .transpose()?,
                sockets: HashMap::try_from(sockets).map_err(map_err(map_names::SOCK_AFFINITY))?,
            })
        } else {
            None
        };
        Ok(Self {
            affinity,
            services: PerCpuArray::try_from(services).map_err(map_err(map_names::SERVICE_STATS))?,
            reasons: PerCpuArray::try_from(reasons).map_err(map_err(map_names::REASON_STATS))?,
            events: PerCpuArray::try_from(events).map_err(map_err(map_names::EVENTS))?,
            nat_events: PerCpuArray::try_from(nat_events)
                .map_err(map_err(map_names::NAT_EVENTS))?,
            backends: PerCpuArray::try_from(backends).map_err(map_err(map_names::BACKEND_STATS))?,
            backend_mask,
            pairs,
            conntrack: HashMap::try_from(conntrack).map_err(map_err(map_names::CONNTRACK))?,
            conntrack6,
        })
    }

    /// The counters of one service id, summed over CPUs.
    pub fn service(&self, id: u32) -> Result<ServiceStats, DatapathError> {
        let values = self
            .services
            .get(&id, 0)
            .map_err(map_err(map_names::SERVICE_STATS))?;
        Ok(sum_stats(&values))
    }

    /// The counters of one (programmed) backend id, summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<ServiceStats, DatapathError> {
        let slot = backend_stats_slot(id, self.backend_mask);
        let values = (self.backends.get(&slot, 0)).map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(sum_stats(&values))
    }

    /// The flows the frontend of service id `service_id` gave backend `backend_id`, summed
    /// over CPUs: zero before its first flow there (or after the pair gave way in the full
    /// LRU map). `None` when the pinned maps have no per-pair counters (an older agent's).
    pub fn pair_flows(
        &self,
        service_id: u32,
        backend_id: u32,
    ) -> Result<Option<u64>, DatapathError> {
        let Some(pairs) = &self.pairs else {
            return Ok(None);
        };
        let key = PairKey {
            service_id,
            backend_id,
        };
        match pairs.get(&key, 0) {
            Ok(values) => Ok(Some(values.iter().sum())),
            Err(MapError::KeyNotFound) => Ok(Some(0)),
            Err(e) => Err(map_err(map_names::PAIR_STATS)(e)),
        }
    }

    fn sums(
        array: &PerCpuArray<MapData, u64>,
        name: &'static str,
        count: u32,
    ) -> Result<Vec<u64>, DatapathError> {
        (0..count)
            .map(|i| {
                let values = array.get(&i, 0).map_err(map_err(name))?;
                Ok(values.iter().sum())
            })
            .collect()
    }

    /// Every reason counter (index = `lb_common::Reason`), summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(
            &self.reasons,
            map_names::REASON_STATS,
            lb_common::Reason::COUNT,
        )
    }

    /// Every event counter (index = `lb_common::Event`), summed over CPUs.
    pub fn events(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(&self.events, map_names::EVENTS, Event::COUNT)
    }

    /// Every source NAT, forwarding and ICMP counter (index = `lb_common::NatEvent`), summed
    /// over CPUs.
    pub fn nat_events(&self) -> Result<Vec<u64>, DatapathError> {
        Self::sums(
            &self.nat_events,
            map_names::NAT_EVENTS,
            lb_common::NatEvent::COUNT,
        )
    }

    /// Conntrack occupancy (one pass over the keys), both families (they share the insert
    /// and delete counters), and the evictions derived from it.
    pub fn conntrack(&self) -> Result<ConntrackStats, DatapathError> {
        let (entries, _) = occupancy(&self.conntrack, map_names::CONNTRACK)?;
        let (entries6, _) = occupancy6(self.conntrack6.as_ref(), map_names::CONNTRACK6)?;
        let entries = entries + entries6;
        let events = self.events()?;
        let inserts = events[Event::CtInserts as usize];
        let deletes = events[Event::CtDeletes as usize];
        Ok(ConntrackStats {
            entries,
            inserts,
            deletes,
            evictions: inserts.saturating_sub(deletes).saturating_sub(entries),
        })
    }
}

impl Counters {
    /// How full the tables the datapath fills are: conntrack (from `conntrack`, read
    /// before) and the two sessionAffinity tables (one pass over each). A table of IPv4's
    /// and its IPv6 twin share their insert counter, so they make one row, named after the
    /// IPv4 table, with the entries and capacity of both.
    pub fn tables(&self, conntrack: &ConntrackStats) -> Result<Vec<TableFill>, DatapathError> {
        let capacity6 = match &self.conntrack6 {
            Some(map) => map
                .map()
                .info()
                .map_err(map_err(map_names::CONNTRACK6))?
                .max_entries(),
            None => 0,
        };
        let capacity = self
            .conntrack
            .map()
            .info()
            .map_err(map_err(map_names::CONNTRACK))?
            .max_entries()
            + capacity6;
        let mut tables = vec![TableFill {
            map: map_names::CONNTRACK,
            entries: conntrack.entries,
            capacity,
            evictions: conntrack.evictions,
        }];
        if let Some(affinity) = &self.affinity {
            let inserts = Self::sums(
                &affinity.inserts,
                map_names::TABLE_EVENTS,
                TableEvent::COUNT,
            )?;
            let datapath = occupancy(&affinity.datapath, map_names::AFFINITY)?;
            let datapath6 = occupancy6(affinity.datapath6.as_ref(), map_names::AFFINITY6)?;
            let datapath = (datapath.0 + datapath6.0, datapath.1 + datapath6.1);
            let sockets = occupancy(&affinity.sockets, map_names::SOCK_AFFINITY)?;
            for (map, (entries, capacity), inserted) in [
                (
                    map_names::AFFINITY,
                    datapath,
                    inserts[TableEvent::AffinityInserts as usize],
                ),
                (
                    map_names::SOCK_AFFINITY,
                    sockets,
                    inserts[TableEvent::SockAffinityInserts as usize],
                ),
            ] {
                tables.push(TableFill {
                    map,
                    entries,
                    capacity,
                    evictions: inserted.saturating_sub(entries),
                });
            }
        }
        Ok(tables)
    }
}
