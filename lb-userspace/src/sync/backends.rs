//! Backend and service ids, the backends' counter slots, and the backends no frontend lists
//! any more (marked REMOVED, deleted after the drain).

use super::*;

impl<M: DatapathMaps> Syncer<M> {
    /// Backends among `candidates` that no frontend lists: marked REMOVED, then deleted
    /// after the drain.
    pub(super) fn collect_backends(
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
    pub(super) fn ensure_backend(&mut self, backend: &BackendEntry) -> Result<u32, MapOpError> {
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
    pub(super) fn new_backend_id(&mut self) -> Result<u32, MapOpError> {
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

    pub(super) fn take_slot(&mut self, id: u32) {
        let mask = self.maps.backend_stats_slots().wrapping_sub(1);
        *self
            .backend_slots
            .entry(backend_stats_slot(id, mask))
            .or_default() += 1;
    }

    pub(super) fn free_slot(&mut self, id: u32) {
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
    pub(super) fn allocate_service_id(&mut self, frontend: &Frontend) -> Result<u32, SyncError> {
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
}
