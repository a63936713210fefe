//! Adoption: a syncer that starts on pinned maps takes over what they hold (see the module
//! documentation of [`super`]).

use super::*;

impl<M: DatapathMaps> Syncer<M> {
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
        let short_circuits: HashMap<u32, u32> = contents.short_circuits.iter().copied().collect();
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
                short_circuit: short_circuits.get(&service.id).copied(),
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
        for id in short_circuits.keys() {
            if !syncer.used_service_ids.contains(id) {
                syncer.maps.delete_short_circuit(*id)?;
            }
        }
        Ok(syncer)
    }
}
