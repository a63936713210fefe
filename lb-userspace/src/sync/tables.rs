//! The Maglev tables: built beside the one in use, shared between frontends with the same
//! backends and size, rewritten in place once no program can read them (steps 2 and 5).

use super::*;

impl<M: DatapathMaps> Syncer<M> {
    /// Step 2 (see the module documentation): the new table of every frontend whose table
    /// changes goes into the slot its service entry does not select (before the service
    /// entry exists: the first, which nothing reads yet). Tables that must be put in the
    /// Maglev map are built once per distinct key and put in one batch (retried past a
    /// failing write, which fails only its frontend).
    pub(super) fn swap_tables(&mut self, pending: &mut [Pending], errors: &mut Vec<SyncError>) {
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
    pub(super) fn put_swaps(
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
    pub(super) fn find_or_build(
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
    pub(super) fn attach(
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
    pub(super) fn detach(&mut self, p: &mut Programmed, slot: usize) {
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
    pub(super) fn entries(&self, want: &TableKey) -> Result<Vec<u32>, MaglevError> {
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

    pub(super) fn build(&mut self, want: &TableKey) -> Result<(TableId, M::Table), BuildError> {
        let entries = self.entries(want).map_err(BuildError::Maglev)?;
        let count = want.backends.len() as u32;
        self.op(|m| m.build_table(&entries, count))
            .map_err(BuildError::Map)
    }

    /// Steps 3 to 5 for one frontend whose table is in place.
    pub(super) fn write_entries(&mut self, p: &mut Pending) -> Result<(), MapOpError> {
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
        // The short-circuit entry before the flag that has the datapath read it.
        if let Some(cluster) = p.short_circuit
            && prog.short_circuit != Some(cluster)
        {
            self.op(|m| m.put_short_circuit(prog.id, cluster))?;
            prog.short_circuit = Some(cluster);
        }
        let mut service = p.service;
        if p.slot == 1 {
            service.flags |= SERVICE_F_TABLE_B;
        }
        if p.short_circuit.is_some() {
            service.flags |= SERVICE_F_SHORT_CIRCUIT;
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
        // The flag is off: the entry is not read any more.
        if p.short_circuit.is_none() && prog.short_circuit.is_some() {
            self.op(|m| m.delete_short_circuit(prog.id))?;
            prog.short_circuit = None;
        }
        Ok(())
    }

    /// Removes the tables of the frontends `keys` (both slots) in one batch; a frontend
    /// that is not wanted any more is then forgotten.
    pub(super) fn delete_tables(
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
}
