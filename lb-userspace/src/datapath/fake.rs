//! The maps in memory, for the syncer's tests: no kernel needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use lb_common::{
    Backend4, Backend6, Frontend4, Frontend6, RevNat4, RevNat6, Service, maglev::table_key,
    map_names, prefilter,
};

use super::maps::{
    BackendEntry, BatchError, DatapathMaps, MapContents, MapOpError, RevNatEntry, TableId,
    TableRef, table_info,
};
use crate::{
    model::{IpCidr, IpFamily, Ipv4Cidr, Ipv6Cidr},
    plan::desired::FrontendKey,
};

/// The maps in memory: for tests of the control plane without a kernel. Each map has a
/// capacity like a BPF hash map, and every operation can be observed.
#[derive(Debug, Clone)]
pub struct InMemoryMaps {
    /// Services map.
    pub services: BTreeMap<Frontend4, Service>,
    /// IPv6 services map.
    pub services6: BTreeMap<Frontend6, Service>,
    /// Backends map.
    pub backends: BTreeMap<u32, Backend4>,
    /// IPv6 backends map.
    pub backends6: BTreeMap<u32, Backend6>,
    /// Reverse-NAT map.
    pub rev_nat: BTreeMap<u32, RevNat4>,
    /// IPv6 reverse-NAT map.
    pub rev_nat6: BTreeMap<u32, RevNat6>,
    /// Maglev map: service id -> table.
    pub maglev: BTreeMap<u32, TableId>,
    /// The tables the Maglev map points at (a table nothing points at is gone, as the
    /// kernel frees an inner map).
    pub tables: BTreeMap<TableId, Arc<[u32]>>,
    /// Source-range map.
    pub source_ranges: BTreeSet<(u32, Ipv4Cidr)>,
    /// IPv6 source-range map.
    pub source_ranges6: BTreeSet<(u32, Ipv6Cidr)>,
    /// The pre-filter bitmap's non-zero words, by index.
    pub prefilter: BTreeMap<u32, u64>,
    /// Short-circuit map: service id -> its cluster frontend's service id.
    pub short_circuit: BTreeMap<u32, u32>,
    /// Capacity of each map, in entries.
    pub capacity: usize,
    /// [`DatapathMaps::backend_stats_slots`] (a power of two).
    pub backend_stats_slots: u32,
    /// Called after every successful operation with the maps as they are then.
    pub observer: Option<fn(&InMemoryMaps)>,
    /// Every successful operation, in order (`put_service 3`, `put_new_table 3`, ...).
    pub journal: Vec<String>,
    /// The start of the latest grace period that has ended ([`DatapathMaps::grace_since`]):
    /// the test says when one has.
    pub grace: Option<Instant>,
    /// How many grace periods were asked for.
    pub grace_requests: usize,
    /// When a service entry last selected each table (after the operation that ended
    /// before it stopped): a rewrite in place needs a grace period since.
    last_selected: BTreeMap<TableId, Instant>,
    next_table: TableId,
}

impl InMemoryMaps {
    /// Empty maps with room for `capacity` entries each.
    pub fn new(capacity: usize) -> Self {
        Self {
            services: BTreeMap::new(),
            services6: BTreeMap::new(),
            backends: BTreeMap::new(),
            backends6: BTreeMap::new(),
            rev_nat: BTreeMap::new(),
            rev_nat6: BTreeMap::new(),
            maglev: BTreeMap::new(),
            tables: BTreeMap::new(),
            source_ranges: BTreeSet::new(),
            source_ranges6: BTreeSet::new(),
            prefilter: BTreeMap::new(),
            short_circuit: BTreeMap::new(),
            capacity,
            backend_stats_slots: lb_common::backend_stats_slots(lb_common::capacity::BACKENDS),
            observer: None,
            journal: Vec::new(),
            grace: None,
            grace_requests: 0,
            last_selected: BTreeMap::new(),
            next_table: 1,
        }
    }

    /// Whether the pre-filter lets packets for `key` on to the lookups.
    pub fn prefilter_passes(&self, key: &FrontendKey) -> bool {
        let (index, bit) = prefilter::position(key.prefilter_bucket());
        self.prefilter.get(&index).is_some_and(|w| w & bit != 0)
    }

    /// The table a service entry selects.
    pub fn table_of(&self, service: &Service) -> Option<&[u32]> {
        Some(&self.tables[self.maglev.get(&table_key(service.id, service.flags))?])
    }

    fn observed(&mut self, op: &str, id: impl std::fmt::Display) -> Result<(), MapOpError> {
        self.journal.push(format!("{op} {id}"));
        let used: BTreeSet<TableId> = self.maglev.values().copied().collect();
        self.tables.retain(|id, _| used.contains(id));
        let now = Instant::now();
        for service in self.services.values().chain(self.services6.values()) {
            if let Some(table) = self.maglev.get(&table_key(service.id, service.flags)) {
                self.last_selected.insert(*table, now);
            }
        }
        if let Some(observe) = self.observer {
            observe(self);
        }
        Ok(())
    }
}

fn put<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    capacity: usize,
    name: &'static str,
    key: K,
    value: V,
) -> Result<(), MapOpError> {
    if map.len() >= capacity && !map.contains_key(&key) {
        return Err(MapOpError::Full {
            map: name,
            max_entries: capacity as u32,
        });
    }
    map.insert(key, value);
    Ok(())
}

/// Inserts into a set with room for `capacity` elements.
fn insert<T: Ord>(
    set: &mut BTreeSet<T>,
    capacity: usize,
    name: &'static str,
    element: T,
) -> Result<(), MapOpError> {
    if set.len() >= capacity && !set.contains(&element) {
        return Err(MapOpError::Full {
            map: name,
            max_entries: capacity as u32,
        });
    }
    set.insert(element);
    Ok(())
}

/// Deleting what is not there succeeds, as with the BPF maps here.
fn delete<K: Ord, V>(map: &mut BTreeMap<K, V>, key: &K) -> Result<(), MapOpError> {
    map.remove(key);
    Ok(())
}

impl DatapathMaps for InMemoryMaps {
    /// The table's id and entries.
    type Table = (TableId, Arc<[u32]>);
    fn backend_stats_slots(&self) -> u32 {
        self.backend_stats_slots
    }
    fn put_backend(&mut self, id: u32, backend: &BackendEntry) -> Result<(), MapOpError> {
        match *backend {
            BackendEntry::V4(b) => {
                put(
                    &mut self.backends,
                    self.capacity,
                    map_names::BACKENDS,
                    id,
                    b,
                )?;
                self.observed("put_backend", id)
            }
            BackendEntry::V6(b) => {
                put(
                    &mut self.backends6,
                    self.capacity,
                    map_names::BACKENDS6,
                    id,
                    b,
                )?;
                self.observed("put_backend6", id)
            }
        }
    }
    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => {
                delete(&mut self.backends, &id)?;
                self.observed("delete_backend", id)
            }
            IpFamily::V6 => {
                delete(&mut self.backends6, &id)?;
                self.observed("delete_backend6", id)
            }
        }
    }
    fn build_table(
        &mut self,
        entries: &[u32],
        _backends: u32,
    ) -> Result<(TableId, Self::Table), MapOpError> {
        let id = self.next_table;
        self.next_table += 1;
        self.journal.push("build_table".to_owned());
        Ok((id, (id, entries.into())))
    }
    fn put_tables(
        &mut self,
        writes: &[(u32, TableRef<'_, Self::Table>)],
    ) -> Result<(), BatchError> {
        for (done, (service_id, table)) in writes.iter().enumerate() {
            let fail = |error| Err(BatchError { done, error });
            let (id, op) = match table {
                TableRef::Built((id, entries)) => {
                    self.tables.insert(*id, entries.clone());
                    (*id, "put_new_table")
                }
                TableRef::Existing(id) if self.tables.contains_key(id) => (*id, "put_table"),
                TableRef::Existing(_) => {
                    return fail(MapOpError::Os {
                        map: map_names::MAGLEV,
                        source: std::io::Error::from_raw_os_error(libc::ENOENT),
                    });
                }
            };
            let capacity = self.capacity;
            if let Err(error) = put(
                &mut self.maglev,
                capacity,
                map_names::MAGLEV,
                *service_id,
                id,
            ) {
                self.tables
                    .retain(|t, _| self.maglev.values().any(|v| v == t));
                return fail(error);
            }
            self.observed(op, service_id)
                .map_err(|error| BatchError { done, error })?;
        }
        Ok(())
    }
    fn delete_tables(&mut self, keys: &[u32]) -> Result<(), BatchError> {
        for (done, key) in keys.iter().enumerate() {
            delete(&mut self.maglev, key).map_err(|error| BatchError { done, error })?;
            self.observed("delete_table", key)
                .map_err(|error| BatchError { done, error })?;
        }
        Ok(())
    }
    /// Fails (EBUSY) when a program could be reading the table: a service entry selects
    /// it, or no grace period has passed since one did.
    fn fill_table(
        &mut self,
        id: TableId,
        entries: &[u32],
        _backends: u32,
    ) -> Result<(), MapOpError> {
        let selected = (self.services.values().chain(self.services6.values()))
            .any(|s| self.maglev.get(&table_key(s.id, s.flags)) == Some(&id));
        let quiet = match self.last_selected.get(&id) {
            None => true,
            Some(last) => self.grace.is_some_and(|g| g > *last),
        };
        let size_kept = self
            .tables
            .get(&id)
            .is_some_and(|t| t.len() == entries.len());
        if selected || !quiet || !size_kept {
            return Err(MapOpError::Os {
                map: map_names::MAGLEV,
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        self.tables.insert(id, entries.into());
        self.observed("fill_table", id)
    }
    fn grace_since(&self) -> Option<Instant> {
        self.grace
    }
    fn request_grace(&mut self) {
        self.grace_requests += 1;
    }
    fn put_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        let capacity = self.capacity;
        match range {
            IpCidr::V4(r) => insert(
                &mut self.source_ranges,
                capacity,
                map_names::SOURCE_RANGES,
                (service_id, r),
            )?,
            IpCidr::V6(r) => insert(
                &mut self.source_ranges6,
                capacity,
                map_names::SOURCE_RANGES6,
                (service_id, r),
            )?,
        }
        let op = match range {
            IpCidr::V4(_) => "put_source_range",
            IpCidr::V6(_) => "put_source_range6",
        };
        self.observed(op, format_args!("{service_id} {range}"))
    }
    fn delete_source_range(&mut self, service_id: u32, range: IpCidr) -> Result<(), MapOpError> {
        let op = match range {
            IpCidr::V4(r) => {
                self.source_ranges.remove(&(service_id, r));
                "delete_source_range"
            }
            IpCidr::V6(r) => {
                self.source_ranges6.remove(&(service_id, r));
                "delete_source_range6"
            }
        };
        self.observed(op, format_args!("{service_id} {range}"))
    }
    fn put_rev_nat(&mut self, id: u32, entry: &RevNatEntry) -> Result<(), MapOpError> {
        match *entry {
            RevNatEntry::V4(r) => {
                put(&mut self.rev_nat, self.capacity, map_names::REV_NAT, id, r)?;
                self.observed("put_rev_nat", id)
            }
            RevNatEntry::V6(r) => {
                put(
                    &mut self.rev_nat6,
                    self.capacity,
                    map_names::REV_NAT6,
                    id,
                    r,
                )?;
                self.observed("put_rev_nat6", id)
            }
        }
    }
    fn delete_rev_nat(&mut self, id: u32, family: IpFamily) -> Result<(), MapOpError> {
        match family {
            IpFamily::V4 => {
                delete(&mut self.rev_nat, &id)?;
                self.observed("delete_rev_nat", id)
            }
            IpFamily::V6 => {
                delete(&mut self.rev_nat6, &id)?;
                self.observed("delete_rev_nat6", id)
            }
        }
    }
    fn put_short_circuit(&mut self, id: u32, cluster_id: u32) -> Result<(), MapOpError> {
        put(
            &mut self.short_circuit,
            self.capacity,
            map_names::SHORT_CIRCUIT,
            id,
            cluster_id,
        )?;
        self.observed("put_short_circuit", format_args!("{id} {cluster_id}"))
    }
    fn delete_short_circuit(&mut self, id: u32) -> Result<(), MapOpError> {
        delete(&mut self.short_circuit, &id)?;
        self.observed("delete_short_circuit", id)
    }
    fn put_service(&mut self, key: &FrontendKey, value: &Service) -> Result<(), MapOpError> {
        match *key {
            FrontendKey::V4(k) => {
                put(
                    &mut self.services,
                    self.capacity,
                    map_names::SERVICES,
                    k,
                    *value,
                )?;
                self.observed("put_service", value.id)
            }
            FrontendKey::V6(k) => {
                put(
                    &mut self.services6,
                    self.capacity,
                    map_names::SERVICES6,
                    k,
                    *value,
                )?;
                self.observed("put_service6", value.id)
            }
        }
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
        match key {
            FrontendKey::V4(k) => {
                let id = self.services.get(k).map_or(0, |s| s.id);
                delete(&mut self.services, k)?;
                self.observed("delete_service", id)
            }
            FrontendKey::V6(k) => {
                let id = self.services6.get(k).map_or(0, |s| s.id);
                delete(&mut self.services6, k)?;
                self.observed("delete_service6", id)
            }
        }
    }
    fn put_prefilter_word(&mut self, index: u32, word: u64) -> Result<(), MapOpError> {
        if index >= prefilter::WORDS {
            return Err(MapOpError::Os {
                map: map_names::PREFILTER,
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        if word == 0 {
            self.prefilter.remove(&index);
        } else {
            self.prefilter.insert(index, word);
        }
        self.observed("put_prefilter_word", index)
    }
    fn read_all(&self) -> Result<MapContents, MapOpError> {
        let services4 = self.services.iter().map(|(k, v)| (FrontendKey::V4(*k), *v));
        let services6 = self
            .services6
            .iter()
            .map(|(k, v)| (FrontendKey::V6(*k), *v));
        let backends4 = self
            .backends
            .iter()
            .map(|(k, v)| (*k, BackendEntry::V4(*v)));
        let backends6 = self
            .backends6
            .iter()
            .map(|(k, v)| (*k, BackendEntry::V6(*v)));
        let rev_nat4 = self.rev_nat.iter().map(|(k, v)| (*k, RevNatEntry::V4(*v)));
        let rev_nat6 = self.rev_nat6.iter().map(|(k, v)| (*k, RevNatEntry::V6(*v)));
        let ranges4 = self
            .source_ranges
            .iter()
            .map(|(id, r)| (*id, IpCidr::V4(*r)));
        let ranges6 = self
            .source_ranges6
            .iter()
            .map(|(id, r)| (*id, IpCidr::V6(*r)));
        Ok(MapContents {
            services: services4.chain(services6).collect(),
            backends: backends4.chain(backends6).collect(),
            rev_nat: rev_nat4.chain(rev_nat6).collect(),
            tables: self
                .maglev
                .iter()
                .map(|(service, id)| (*service, table_info(*id, &self.tables[id])))
                .collect(),
            source_ranges: ranges4.chain(ranges6).collect(),
            prefilter: self.prefilter.iter().map(|(k, v)| (*k, *v)).collect(),
            short_circuits: self.short_circuit.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}
