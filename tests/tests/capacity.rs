//! Map sizes chosen at load time (`Capacity`, the agent's `--max-*` flags): the maps are
//! created with them, and service ids run up to the size of the stats array.
//!
//! Needs root and bpffs (mounted if missing).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::MapData;
use lb_common::map_names;
use lb_tests::PinDir;
use lb_userspace::datapath::{BpfMaps, Capacity, Datapath};
use lb_userspace::desired::{
    Backend, DesiredState, Frontend, FrontendKind, FrontendPlan, Protocol, ServicePortRef,
};
use lb_userspace::sync::{DatapathMaps as _, SyncError, Syncer};

/// `n` ClusterIP frontends 10.96.0.i:80, each with one backend.
fn desired(n: u32) -> DesiredState {
    let frontends: BTreeMap<Frontend, FrontendPlan> = (1..=n)
        .map(|i| {
            let frontend = Frontend {
                addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i),
                port: 80,
                proto: Protocol::Tcp,
            };
            let plan = FrontendPlan {
                service: ServicePortRef {
                    namespace: "default".into(),
                    name: format!("svc-{i}"),
                    port_name: String::new(),
                },
                kind: FrontendKind::ClusterIp,
                backends: vec![Backend {
                    addr: Ipv4Addr::new(10, 244, 0, 2),
                    port: 8080,
                    terminating: false,
                }],
                affinity_timeout_secs: None,
                source_ranges: Vec::new(),
                selection: None,
            };
            (frontend, plan)
        })
        .collect();
    DesiredState { frontends }
}

#[test]
fn maps_are_created_with_the_capacity_asked_for() {
    let pins = PinDir::new().unwrap();
    let capacity = Capacity {
        services: 100,
        backends: 300,
        conntrack: 700,
        affinity: 500,
    };
    let mut dp = Datapath::load_with(pins.path(), &capacity).unwrap();
    let size = |name: &str| {
        MapData::from_pin(pins.path().join(name))
            .unwrap()
            .info()
            .unwrap()
            .max_entries()
    };
    assert_eq!(size(map_names::SERVICES), 100);
    assert_eq!(size(map_names::REV_NAT), 100);
    assert_eq!(size(map_names::SERVICE_STATS), 101);
    assert_eq!(size(map_names::MAGLEV), 200, "two tables per frontend");
    assert_eq!(size(map_names::BACKENDS), 300);
    assert_eq!(size(map_names::BACKEND_STATS), 300);
    assert_eq!(size(map_names::CONNTRACK), 700);
    assert_eq!(size(map_names::AFFINITY), 500);
    let maps = dp.take_maps().unwrap();
    assert_eq!(maps.service_id_limit(), 101);
    assert_eq!(
        BpfMaps::open_pinned(pins.path())
            .unwrap()
            .service_id_limit(),
        101
    );
    drop(dp);
}

#[test]
fn service_ids_reach_the_capacity_and_no_further() {
    let pins = PinDir::new().unwrap();
    let capacity = Capacity {
        services: 100,
        ..Capacity::default()
    };
    let mut dp = Datapath::load_with(pins.path(), &capacity).unwrap();
    let mut syncer = Syncer::adopt(dp.take_maps().unwrap()).unwrap();
    let report = syncer.apply(&desired(100));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.frontends, 100);
    let ids: Vec<u32> = syncer.service_ids().map(|(_, id)| id).collect();
    assert_eq!(ids.iter().max(), Some(&100));

    let report = syncer.apply(&desired(101));
    assert_eq!(report.frontends, 100);
    assert!(
        matches!(
            report.errors.as_slice(),
            [SyncError::OutOfServiceIds { max: 100, .. }]
        ),
        "{:?}",
        report.errors
    );
}
