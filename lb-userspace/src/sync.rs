//! Applies a [`DesiredState`] to the maps with the fewest writes, in an order that never lets
//! a packet in flight see a half-updated service:
//!
//! 1. backends a frontend needs are written first;
//! 2. then its slots (new and changed ones);
//! 3. then its reverse-NAT entry and its service entry (which makes the new slot count
//!    visible);
//! 4. then slots beyond the new count are deleted;
//! 5. frontends no longer wanted are removed service entry first;
//! 6. backends that no frontend lists any more are deleted last.
//!
//! Slots (what new flows choose from) hold a frontend's active backends; its terminating
//! backends only when it has no active one (kube-proxy's fallback). A terminating backend
//! keeps its backend entry while it is listed, so the flows conntrack pinned to it go on
//! until they end: it drains.
//!
//! The bookkeeping mirrors exactly what is in the maps, write by write, so a failed write (a
//! full map) leaves both consistent: the frontend keeps what it had, the error is reported,
//! and the next apply tries again. On start the bookkeeping is rebuilt from the pinned maps
//! ([`Syncer::adopt`]), so a restarted agent rewrites nothing that is already right.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4, Frontend4, MAX_SERVICES, RevNat4,
    SERVICE_F_EXTERNAL, Service, SlotKey, map_names,
};
use thiserror::Error;

use crate::desired::{DesiredState, Frontend, FrontendPlan};

/// Why one map operation failed.
#[derive(Debug, Error)]
pub enum MapOpError {
    /// The map has no room for another entry.
    #[error("map {map} is full")]
    Full {
        /// The map.
        map: &'static str,
    },
    /// Any other failure of the bpf syscall (or of the in-memory stand-in).
    #[error("map {map}: {source}")]
    Os {
        /// The map.
        map: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

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
    /// No service id is free.
    #[error("frontend {frontend}: all {max} service ids are in use")]
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

/// Everything in the control-plane maps, as read back for adoption.
#[derive(Debug, Default, Clone)]
pub struct MapContents {
    /// Services map entries.
    pub services: Vec<(Frontend4, Service)>,
    /// Slot map entries.
    pub slots: Vec<(SlotKey, u32)>,
    /// Backends map entries.
    pub backends: Vec<(u32, Backend4)>,
    /// Reverse-NAT map entries.
    pub rev_nat: Vec<(u32, RevNat4)>,
}

/// The map operations sync needs: implemented on the pinned BPF maps and in memory.
pub trait DatapathMaps {
    /// Writes (creates or replaces) a backend.
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), MapOpError>;
    /// Deletes a backend.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError>;
    /// Writes a slot.
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError>;
    /// Deletes a slot.
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError>;
    /// Writes a reverse-NAT entry.
    fn put_rev_nat(&mut self, id: u32, value: &RevNat4) -> Result<(), MapOpError>;
    /// Deletes a reverse-NAT entry.
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), MapOpError>;
    /// Writes a service entry.
    fn put_service(&mut self, key: &Frontend4, value: &Service) -> Result<(), MapOpError>;
    /// Deletes a service entry.
    fn delete_service(&mut self, key: &Frontend4) -> Result<(), MapOpError>;
    /// Reads everything back.
    fn read_all(&self) -> Result<MapContents, MapOpError>;
    /// Service ids are `1..service_id_limit()` (they index the per-service stats).
    fn service_id_limit(&self) -> u32 {
        MAX_SERVICES
    }
}

/// One programmed frontend, exactly as it is in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    service: Service,
    /// Backend id of slot `i + 1`; 0 where the slot is missing in the maps.
    slots: Vec<u32>,
    /// Every backend the frontend lists, draining ones included: kept in the backends map.
    members: Vec<u32>,
    rev_nat: bool,
}

type BackendKey = (u32, u16, u8);

fn backend_key(b: &Backend4) -> BackendKey {
    (b.addr, b.port, b.proto)
}

/// What one [`Syncer::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Map writes and deletes issued.
    pub map_ops: usize,
    /// Frontends programmed after the apply.
    pub frontends: usize,
    /// Backends programmed after the apply.
    pub backends: usize,
    /// What failed (the rest was applied).
    pub errors: Vec<SyncError>,
}

/// Keeps the maps equal to the desired state.
pub struct Syncer<M> {
    maps: M,
    frontends: BTreeMap<Frontend4, Programmed>,
    backends: HashMap<u32, Backend4>,
    backend_ids: HashMap<BackendKey, u32>,
    used_service_ids: BTreeSet<u32>,
    next_service_id: u32,
    next_backend_id: u32,
    ops: usize,
}

impl<M: DatapathMaps> Syncer<M> {
    /// Takes over whatever the maps hold (empty maps on a first start; an earlier agent's
    /// state on a restart), removing entries that no service can reach.
    pub fn adopt(maps: M) -> Result<Self, MapOpError> {
        let contents = maps.read_all()?;
        let mut syncer = Syncer {
            maps,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            used_service_ids: BTreeSet::new(),
            next_service_id: 1,
            next_backend_id: 1,
            ops: 0,
        };
        let slots: HashMap<SlotKey, u32> = contents.slots.iter().copied().collect();
        for (key, service) in &contents.services {
            let programmed = Programmed {
                service: *service,
                slots: (1..=service.backend_count)
                    .map(|slot| {
                        let key = SlotKey {
                            service_id: service.id,
                            slot,
                        };
                        slots.get(&key).copied().unwrap_or(0)
                    })
                    .collect(),
                members: Vec::new(),
                rev_nat: contents.rev_nat.iter().any(|(id, _)| *id == service.id),
            };
            syncer.used_service_ids.insert(service.id);
            syncer.frontends.insert(*key, programmed);
        }
        for (id, backend) in &contents.backends {
            syncer.backends.insert(*id, *backend);
            syncer
                .backend_ids
                .entry(backend_key(backend))
                .or_insert(*id);
        }
        syncer.next_service_id = syncer.used_service_ids.last().map_or(1, |id| id + 1);
        syncer.next_backend_id = syncer.backends.keys().max().map_or(1, |id| id + 1);

        // Slots and reverse-NAT entries of no service, or beyond a service's count, are
        // leftovers of an interrupted update: nothing reads them, so they go now.
        let live: HashMap<u32, u32> = contents
            .services
            .iter()
            .map(|(_, s)| (s.id, s.backend_count))
            .collect();
        for (key, _) in &contents.slots {
            if live.get(&key.service_id).is_none_or(|n| key.slot > *n) {
                syncer.maps.delete_slot(*key)?;
            }
        }
        for (id, _) in &contents.rev_nat {
            if !live.contains_key(id) {
                syncer.maps.delete_rev_nat(*id)?;
            }
        }
        Ok(syncer)
    }

    /// The maps, for reading.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The service id of each programmed frontend.
    pub fn service_ids(&self) -> impl Iterator<Item = (Frontend4, u32)> + '_ {
        self.frontends.iter().map(|(k, p)| (*k, p.service.id))
    }

    /// Makes the maps hold `desired`, with the fewest writes, in the safe order.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let ops_before = self.ops;
        let mut errors = Vec::new();
        let wanted: BTreeMap<Frontend4, (&Frontend, &FrontendPlan)> = desired
            .frontends
            .iter()
            .map(|(f, plan)| (f.key(), (f, plan)))
            .collect();

        for (key, (frontend, plan)) in &wanted {
            if let Err(error) = self.apply_frontend(key, frontend, plan) {
                errors.push(error);
            }
        }
        let stale: Vec<Frontend4> = self
            .frontends
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            if let Err(error) = self.remove_frontend(&key) {
                errors.push(SyncError::Cleanup(error));
            }
        }
        if let Err(error) = self.collect_backends() {
            errors.push(SyncError::Cleanup(error));
        }
        ApplyReport {
            map_ops: self.ops - ops_before,
            frontends: self.frontends.len(),
            backends: self.backends.len(),
            errors,
        }
    }

    fn apply_frontend(
        &mut self,
        key: &Frontend4,
        frontend: &Frontend,
        plan: &FrontendPlan,
    ) -> Result<(), SyncError> {
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
            let backend = Backend4::new(b.addr.octets(), b.port, frontend.proto.number(), state);
            let id = self.ensure_backend(&backend).map_err(map_err)?;
            ids.push(id);
            if !b.terminating {
                active.push(id);
            }
        }
        let slots = if active.is_empty() { &ids } else { &active };
        let flags = if plan.kind.is_external() {
            SERVICE_F_EXTERNAL
        } else {
            0
        };
        let affinity = plan.affinity_timeout_secs.unwrap_or(0);

        let existing = self.frontends.get(key).map(|p| p.service.id);
        let id = match existing {
            Some(id) => id,
            None => self.allocate_service_id(frontend)?,
        };
        let result = self.write_frontend(key, id, slots, flags, affinity);
        if let Some(p) = self.frontends.get_mut(key) {
            p.members = ids.clone();
        }
        if existing.is_none() && !self.frontends.contains_key(key) {
            // The service entry was never written, so no packet can reach what was written
            // for it: undo it. Best effort: leftovers are unreachable, and adoption removes
            // them.
            self.used_service_ids.remove(&id);
            for slot in 1..=slots.len() as u32 {
                let _ = self.delete_slot(SlotKey {
                    service_id: id,
                    slot,
                });
            }
            let _ = self.op(|m| m.delete_rev_nat(id));
        }
        result.map_err(map_err)
    }

    fn write_frontend(
        &mut self,
        key: &Frontend4,
        id: u32,
        ids: &[u32],
        flags: u32,
        affinity: u32,
    ) -> Result<(), MapOpError> {
        let old_slots = self
            .frontends
            .get(key)
            .map(|p| p.slots.clone())
            .unwrap_or_default();
        // 2. New and changed slots.
        for (i, &backend_id) in ids.iter().enumerate() {
            if old_slots.get(i) != Some(&backend_id) {
                let slot = SlotKey {
                    service_id: id,
                    slot: i as u32 + 1,
                };
                self.op(|m| m.put_slot(slot, backend_id))?;
                if let Some(p) = self.frontends.get_mut(key)
                    && i < p.slots.len()
                {
                    p.slots[i] = backend_id;
                }
            }
        }
        // 3. Reverse NAT, then the service entry.
        let has_rev_nat = self.frontends.get(key).is_some_and(|p| p.rev_nat);
        if !has_rev_nat {
            self.op(|m| m.put_rev_nat(id, &RevNat4::of(key)))?;
            if let Some(p) = self.frontends.get_mut(key) {
                p.rev_nat = true;
            }
        }
        let service = Service {
            id,
            backend_count: ids.len() as u32,
            flags,
            affinity_timeout_secs: affinity,
        };
        if self.frontends.get(key).map(|p| p.service) != Some(service) {
            self.op(|m| m.put_service(key, &service))?;
            // The maps now hold slots 1..=n with `ids` and, beyond n, the old slots.
            let mut slots = ids.to_vec();
            slots.extend(old_slots.iter().skip(ids.len()));
            self.frontends.insert(
                *key,
                Programmed {
                    service,
                    slots,
                    members: Vec::new(),
                    rev_nat: true,
                },
            );
        }
        // 4. Slots beyond the new count.
        while let Some(p) = self.frontends.get(key) {
            if p.slots.len() <= ids.len() {
                break;
            }
            let slot = p.slots.len() as u32;
            self.delete_slot(SlotKey {
                service_id: id,
                slot,
            })?;
            if let Some(p) = self.frontends.get_mut(key) {
                p.slots.pop();
            }
        }
        Ok(())
    }

    fn remove_frontend(&mut self, key: &Frontend4) -> Result<(), MapOpError> {
        let Some(p) = self.frontends.get(key).cloned() else {
            return Ok(());
        };
        self.op(|m| m.delete_service(key))?;
        self.frontends.remove(key);
        for slot in 1..=p.slots.len() as u32 {
            self.delete_slot(SlotKey {
                service_id: p.service.id,
                slot,
            })?;
        }
        if p.rev_nat {
            self.op(|m| m.delete_rev_nat(p.service.id))?;
        }
        self.used_service_ids.remove(&p.service.id);
        Ok(())
    }

    fn collect_backends(&mut self) -> Result<(), MapOpError> {
        let referenced: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|p| p.slots.iter().chain(&p.members).copied())
            .collect();
        let mut unreferenced: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        unreferenced.sort_unstable();
        for id in unreferenced {
            self.op(|m| m.delete_backend(id))?;
            if let Some(b) = self.backends.remove(&id)
                && self.backend_ids.get(&backend_key(&b)) == Some(&id)
            {
                self.backend_ids.remove(&backend_key(&b));
            }
        }
        Ok(())
    }

    /// The id of `backend`, writing it (new, or with a changed state) when needed.
    fn ensure_backend(&mut self, backend: &Backend4) -> Result<u32, MapOpError> {
        let id = match self.backend_ids.get(&backend_key(backend)) {
            Some(&id) if self.backends.get(&id) == Some(backend) => return Ok(id),
            Some(&id) => id,
            None => {
                let id = self.next_backend_id;
                // Ids only grow (u32 lasts), so a conntrack entry never meets a reused id.
                self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                id
            }
        };
        self.op(|m| m.put_backend(id, backend))?;
        self.backends.insert(id, *backend);
        self.backend_ids.insert(backend_key(backend), id);
        Ok(id)
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

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        self.op(|m| m.delete_slot(key))
    }

    fn op(&mut self, f: impl FnOnce(&mut M) -> Result<(), MapOpError>) -> Result<(), MapOpError> {
        self.ops += 1;
        f(&mut self.maps)
    }
}

/// The maps in memory: for tests of the control plane without a kernel. Each map has a
/// capacity like a BPF hash map, and every operation can be observed.
#[derive(Debug, Clone)]
pub struct InMemoryMaps {
    /// Services map.
    pub services: BTreeMap<Frontend4, Service>,
    /// Slots map.
    pub slots: BTreeMap<SlotKey, u32>,
    /// Backends map.
    pub backends: BTreeMap<u32, Backend4>,
    /// Reverse-NAT map.
    pub rev_nat: BTreeMap<u32, RevNat4>,
    /// Capacity of each map, in entries.
    pub capacity: usize,
    /// Called after every successful operation with the maps as they are then.
    pub observer: Option<fn(&InMemoryMaps)>,
}

impl InMemoryMaps {
    /// Empty maps with room for `capacity` entries each.
    pub fn new(capacity: usize) -> Self {
        Self {
            services: BTreeMap::new(),
            slots: BTreeMap::new(),
            backends: BTreeMap::new(),
            rev_nat: BTreeMap::new(),
            capacity,
            observer: None,
        }
    }

    fn observed(&self) -> Result<(), MapOpError> {
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
        return Err(MapOpError::Full { map: name });
    }
    map.insert(key, value);
    Ok(())
}

/// Deleting what is not there succeeds, as with the BPF maps here.
fn delete<K: Ord, V>(map: &mut BTreeMap<K, V>, key: &K) -> Result<(), MapOpError> {
    map.remove(key);
    Ok(())
}

impl DatapathMaps for InMemoryMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend4) -> Result<(), MapOpError> {
        put(
            &mut self.backends,
            self.capacity,
            map_names::BACKENDS,
            id,
            *backend,
        )?;
        self.observed()
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        delete(&mut self.backends, &id)?;
        self.observed()
    }
    fn put_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError> {
        put(
            &mut self.slots,
            self.capacity,
            map_names::SLOTS,
            key,
            backend_id,
        )?;
        self.observed()
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        delete(&mut self.slots, &key)?;
        self.observed()
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat4) -> Result<(), MapOpError> {
        put(
            &mut self.rev_nat,
            self.capacity,
            map_names::REV_NAT,
            id,
            *value,
        )?;
        self.observed()
    }
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), MapOpError> {
        delete(&mut self.rev_nat, &id)?;
        self.observed()
    }
    fn put_service(&mut self, key: &Frontend4, value: &Service) -> Result<(), MapOpError> {
        put(
            &mut self.services,
            self.capacity,
            map_names::SERVICES,
            *key,
            *value,
        )?;
        self.observed()
    }
    fn delete_service(&mut self, key: &Frontend4) -> Result<(), MapOpError> {
        delete(&mut self.services, key)?;
        self.observed()
    }
    fn read_all(&self) -> Result<MapContents, MapOpError> {
        Ok(MapContents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::desired::{Backend, FrontendKind, Protocol, ServicePortRef};

    /// After every single map operation: each service entry's slots `1..=count` exist and
    /// name existing backends, and its reverse-NAT entry exists. That is what a packet (or
    /// a reply) arriving at that moment needs.
    fn consistent(maps: &InMemoryMaps) {
        for (frontend, svc) in &maps.services {
            for slot in 1..=svc.backend_count {
                let key = SlotKey {
                    service_id: svc.id,
                    slot,
                };
                let id = maps
                    .slots
                    .get(&key)
                    .unwrap_or_else(|| panic!("{frontend:?}: slot {slot} missing: {maps:#?}"));
                assert!(
                    maps.backends.contains_key(id),
                    "{frontend:?}: backend {id} missing"
                );
            }
            assert!(
                maps.rev_nat.contains_key(&svc.id),
                "{frontend:?}: no reverse NAT"
            );
        }
    }

    fn maps(capacity: usize) -> InMemoryMaps {
        let mut m = InMemoryMaps::new(capacity);
        m.observer = Some(consistent);
        m
    }

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last),
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
                    addr: Ipv4Addr::new(10, 244, 0, last),
                    port: 80,
                    terminating: false,
                })
                .collect(),
            affinity_timeout_secs: None,
            source_ranges: Vec::new(),
        }
    }

    fn desired(frontends: &[(Frontend, &[u8])]) -> DesiredState {
        DesiredState {
            frontends: frontends.iter().map(|(f, b)| (*f, plan(b))).collect(),
        }
    }

    /// The backends (last octets) each frontend translates to, read from the maps the way
    /// the datapath reads them.
    fn programmed(maps: &InMemoryMaps) -> BTreeMap<Frontend, Vec<u8>> {
        consistent(maps);
        maps.services
            .iter()
            .map(|(key, svc)| {
                let backends = (1..=svc.backend_count)
                    .map(|slot| {
                        let id = maps.slots[&SlotKey {
                            service_id: svc.id,
                            slot,
                        }];
                        maps.backends[&id].octets()[3]
                    })
                    .collect();
                (Frontend::from_key(key).unwrap(), backends)
            })
            .collect()
    }

    fn expect(want: &[(Frontend, &[u8])]) -> BTreeMap<Frontend, Vec<u8>> {
        want.iter().map(|(f, b)| (*f, b.to_vec())).collect()
    }

    #[test]
    fn programs_exactly_the_desired_state_and_nothing_when_nothing_changed() {
        let mut s = Syncer::adopt(maps(1000)).unwrap();
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 53), &[2, 3, 4][..])];
        let report = s.apply(&desired(&want));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(programmed(s.maps()), expect(&want));
        assert_eq!(
            (report.frontends, report.backends),
            (2, 4),
            "backend .2 is one entry"
        );
        // Each map holds only what is needed.
        assert_eq!(s.maps().slots.len(), 5);
        assert_eq!(s.maps().rev_nat.len(), 2);
        assert_eq!(s.apply(&desired(&want)).map_ops, 0);
    }

    #[test]
    fn one_changed_endpoint_is_a_few_writes() {
        let mut s = Syncer::adopt(maps(1000)).unwrap();
        let many: Vec<u8> = (1..=50).collect();
        s.apply(&desired(&[(fe(1, 80), &many[..]), (fe(2, 80), &[7][..])]));
        // The endpoint .50 is replaced by .60 (it sorts last, so one slot changes).
        let mut changed = many.clone();
        changed[49] = 60;
        let report = s.apply(&desired(&[
            (fe(1, 80), &changed[..]),
            (fe(2, 80), &[7][..]),
        ]));
        // New backend, its slot, the old backend deleted.
        assert_eq!(report.map_ops, 3);
        assert_eq!(programmed(s.maps())[&fe(1, 80)], changed);
        // One endpoint removed: the slot count shrinks by one.
        let report = s.apply(&desired(&[
            (fe(1, 80), &changed[..49]),
            (fe(2, 80), &[7][..]),
        ]));
        assert_eq!(report.map_ops, 3, "service entry, last slot, backend");
    }

    #[test]
    fn every_intermediate_state_is_consistent_through_grow_shrink_and_removal() {
        // `consistent` runs after each single map operation and panics on a violation.
        let mut s = Syncer::adopt(maps(1000)).unwrap();
        let steps: [&[(Frontend, &[u8])]; 6] = [
            &[(fe(1, 80), &[1, 2])],
            &[(fe(1, 80), &[1, 2, 3, 4, 5]), (fe(2, 80), &[5])],
            &[(fe(1, 80), &[3]), (fe(2, 80), &[1, 5, 9])],
            &[(fe(1, 80), &[]), (fe(2, 80), &[9])],
            &[(fe(2, 80), &[2, 4])],
            &[],
        ];
        for step in steps {
            let report = s.apply(&desired(step));
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(programmed(s.maps()), expect(step));
        }
        let m = s.maps();
        assert!(m.services.is_empty() && m.slots.is_empty() && m.backends.is_empty());
        assert!(m.rev_nat.is_empty());
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_rewrites_nothing() {
        let mut s = Syncer::adopt(maps(1000)).unwrap();
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 53), &[2, 3][..])];
        s.apply(&desired(&want));
        let mut maps = s.maps().clone();
        // Leftovers of an interrupted update: a slot beyond a count, one of no service.
        let id = maps.services.values().next().unwrap().id;
        maps.slots.insert(
            SlotKey {
                service_id: id,
                slot: 9,
            },
            1,
        );
        maps.slots.insert(
            SlotKey {
                service_id: 999,
                slot: 1,
            },
            1,
        );
        maps.rev_nat.insert(999, RevNat4::of(&fe(9, 9).key()));

        let mut restarted = Syncer::adopt(maps).unwrap();
        assert_eq!(restarted.maps().slots.len(), 4, "leftover slots removed");
        assert_eq!(
            restarted.maps().rev_nat.len(),
            2,
            "leftover reverse NAT removed"
        );
        assert_eq!(restarted.apply(&desired(&want)).map_ops, 0);
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
    fn a_full_map_fails_one_frontend_and_keeps_the_others() {
        // Room for 4 backends: the second frontend needs 3 more than the first's 2.
        let mut s = Syncer::adopt(maps(4)).unwrap();
        let want = [(fe(1, 80), &[1, 2][..]), (fe(2, 80), &[3, 4, 5][..])];
        let report = s.apply(&desired(&want));
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let message = report.errors[0].to_string();
        assert!(message.contains("LB_BACKEND4_V1 is full"), "{message}");
        assert!(message.contains("10.96.0.2:80/TCP"), "{message}");
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1, 2])]));
        // With room again, the next apply converges.
        s.maps.capacity = 100;
        let report = s.apply(&desired(&want));
        assert!(report.errors.is_empty());
        assert_eq!(programmed(s.maps()), expect(&want));
    }

    #[test]
    fn terminating_backends_keep_their_entry_but_get_no_new_flows_unless_alone() {
        let mut s = Syncer::adopt(maps(1000)).unwrap();
        let mut draining = desired(&[(fe(1, 80), &[1, 2, 3])]);
        let p = draining.frontends.get_mut(&fe(1, 80)).unwrap();
        p.backends[1].terminating = true;
        assert!(s.apply(&draining).errors.is_empty());
        // New flows: .1 and .3 only; .2 stays in the backends map for its flows.
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [1, 3]);
        let terminating: Vec<_> = s
            .maps()
            .backends
            .values()
            .filter(|b| b.state == BACKEND_TERMINATING)
            .collect();
        assert_eq!(terminating.len(), 1);
        assert_eq!(terminating[0].octets(), [10, 244, 0, 2]);
        // Only terminating backends left: they take new flows (kube-proxy's fallback).
        let mut all = desired(&[(fe(1, 80), &[2, 3])]);
        for b in &mut all.frontends.get_mut(&fe(1, 80)).unwrap().backends {
            b.terminating = true;
        }
        assert!(s.apply(&all).errors.is_empty());
        assert_eq!(programmed(s.maps())[&fe(1, 80)], [2, 3]);
        assert_eq!(
            s.maps().backends.len(),
            2,
            ".1 is gone: no frontend lists it"
        );
        // Once the endpoint is gone from the slice, its entry goes too.
        assert!(s.apply(&desired(&[(fe(1, 80), &[3])])).errors.is_empty());
        assert_eq!(s.maps().backends.len(), 1);
    }

    #[test]
    fn a_full_slot_map_while_growing_keeps_the_old_backend_set() {
        let mut s = Syncer::adopt(maps(6)).unwrap();
        s.apply(&desired(&[(fe(1, 80), &[1, 2])]));
        // Growing to 5 backends needs 5 slots and 5 backends; slots fill at 6 only after
        // the backends are in, so the growth fails part-way: the service entry still
        // says 2 and packets see exactly the old set.
        let report = s.apply(&desired(&[(fe(1, 80), &[1, 2, 3, 4, 5, 6, 7])]));
        assert_eq!(report.errors.len(), 1);
        assert_eq!(programmed(s.maps()), expect(&[(fe(1, 80), &[1, 2])]));
    }
}
