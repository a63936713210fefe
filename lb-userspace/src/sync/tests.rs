//! The syncer's tests, against the in-memory maps: every intermediate state consistent, the
//! fewest writes, adoption of pinned state.

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
                let state = state.unwrap_or_else(|| panic!("{frontend:?}: backend {id} missing"));
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
        if svc.flags & SERVICE_F_SHORT_CIRCUIT != 0 {
            assert!(
                maps.short_circuit.contains_key(&svc.id),
                "{frontend:?}: short-circuited to nothing"
            );
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
        reject: false,
        affinity_timeout_secs: None,
        source_ranges: Vec::new(),
        selection: None,
        forwarding: None,
        topology: None,
        short_circuit: None,
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
    let table =
        |f: Frontend| m.maglev[&table_key(m.services[&f.key4()].id, m.services[&f.key4()].flags)];
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
fn forwarding_comes_from_the_service_or_the_agent_default() {
    let mut plans = desired(&[
        (fe(1, 80), &[1][..]),
        (fe(2, 80), &[1][..]),
        (fe(3, 80), &[1][..]),
    ]);
    plans.frontends.get_mut(&fe(1, 80)).unwrap().forwarding = Some(Forwarding::Dsr);
    plans.frontends.get_mut(&fe(2, 80)).unwrap().forwarding = Some(Forwarding::Snat);
    let dsr = |s: &Syncer<InMemoryMaps>, f: Frontend| {
        s.maps().services[&f.key4()].flags & SERVICE_F_DSR != 0
    };
    let mut s = syncer(1000);
    s.apply(&plans);
    assert!(dsr(&s, fe(1, 80)) && !dsr(&s, fe(2, 80)) && !dsr(&s, fe(3, 80)));
    let mut s = Syncer::adopt_with(
        maps(1000),
        SyncConfig {
            forwarding: Forwarding::Dsr,
            ..config()
        },
    )
    .unwrap();
    s.apply(&plans);
    assert!(dsr(&s, fe(1, 80)) && !dsr(&s, fe(2, 80)) && dsr(&s, fe(3, 80)));
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

/// kube-proxy's "short-circuit" of local traffic: an externalTrafficPolicy Local node port
/// names its Service's cluster frontend (short-circuit entry, then the flag in its service
/// entry); the entry goes after the flag when the plan drops it and with the frontend;
/// a restarted agent adopts it, and removes one of no frontend.
#[test]
fn short_circuit_entries_follow_the_plan() {
    let cluster = fe(1, 80);
    let node_port = Frontend {
        addr: Ipv4Addr::new(192, 168, 0, 10).into(),
        port: 30080,
        proto: Protocol::Tcp,
    };
    // The node port's only endpoint is on another node: none here, all at the cluster IP.
    let local_policy = |short_circuit: Option<Frontend>| {
        let mut state = desired(&[(cluster, &[1][..]), (node_port, &[][..])]);
        let plan = state.frontends.get_mut(&node_port).unwrap();
        plan.kind = FrontendKind::NodePort;
        plan.short_circuit = short_circuit;
        state
    };
    let mut s = syncer(64);
    let wanted = local_policy(Some(cluster));
    assert!(s.apply(&wanted).errors.is_empty());
    let service = |m: &InMemoryMaps, f: Frontend| m.services[&f.key4()];
    let (m, ids) = (s.maps(), |m: &InMemoryMaps| {
        (service(m, cluster).id, service(m, node_port).id)
    });
    let (cluster_id, node_port_id) = ids(m);
    assert_eq!(
        m.short_circuit,
        BTreeMap::from([(node_port_id, cluster_id)])
    );
    assert_ne!(service(m, node_port).flags & SERVICE_F_SHORT_CIRCUIT, 0);
    assert_eq!(service(m, cluster).flags & SERVICE_F_SHORT_CIRCUIT, 0);
    // Outside traffic still has no backend here.
    assert_eq!(service(m, node_port).backend_count, 0);
    let position = |m: &InMemoryMaps, op: &str| {
        m.journal
            .iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("no {op} in {:?}", m.journal))
    };
    assert!(
        position(m, &format!("put_short_circuit {node_port_id} {cluster_id}"))
            < position(m, &format!("put_service {node_port_id}")),
        "the entry before the flag: {:?}",
        m.journal
    );
    // Nothing changed, nothing written; a restarted agent adopts it and writes nothing.
    assert_eq!(s.apply(&wanted).map_ops, 0);
    let mut restarted = Syncer::adopt_with(s.maps().clone(), config()).unwrap();
    assert_eq!(restarted.apply(&wanted).map_ops, 0);

    // The plan drops it (the policy became Cluster): the flag goes, then the entry.
    s.maps.journal.clear();
    assert!(s.apply(&local_policy(None)).errors.is_empty());
    let m = s.maps();
    assert!(m.short_circuit.is_empty(), "{:?}", m.short_circuit);
    assert_eq!(service(m, node_port).flags & SERVICE_F_SHORT_CIRCUIT, 0);
    assert!(
        position(m, &format!("put_service {node_port_id}"))
            < position(m, &format!("delete_short_circuit {node_port_id}")),
        "the flag off before the entry goes: {:?}",
        m.journal
    );

    // Back, then the Service goes: the entry goes with its frontend.
    assert!(s.apply(&wanted).errors.is_empty());
    assert_eq!(s.maps().short_circuit.len(), 1);
    assert!(s.apply(&DesiredState::default()).errors.is_empty());
    assert!(s.maps().services.is_empty() && s.maps().short_circuit.is_empty());

    // A leftover entry of no frontend (an interrupted update) goes at adoption.
    let mut leftover = maps(64);
    leftover.short_circuit.insert(7, 3);
    let adopted = Syncer::adopt_with(leftover, config()).unwrap();
    assert!(adopted.maps().short_circuit.is_empty());

    // A cluster frontend the same apply writes (a new Service): its new id is named.
    let mut fresh = syncer(64);
    assert!(fresh.apply(&wanted).errors.is_empty());
    let (cluster_id, node_port_id) = ids(fresh.maps());
    assert_eq!(fresh.maps().short_circuit[&node_port_id], cluster_id);
}
