//! Map sizes chosen at load time (`Capacity`, the agent's `--max-*` flags): the maps are
//! created with them, and service ids run up to the size of the stats array. When a map is
//! full, the agent says which, its size and the flag that sizes it (log, /metrics, /readyz),
//! serves the frontends that fit, keeps the maps consistent, and programs the rest once there
//! is room; a full conntrack map evicts its oldest entries and counts them.
//!
//! Needs root and bpffs (mounted if missing).

use lb_userspace::datapath::Pins;
use lb_userspace::model::Protocol;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aya::maps::MapData;
use lb_common::{maglev, map_names};
use lb_testbed::agent::{metric, ops};
use lb_testbed::cgroup::MemoryCgroup;
use lb_testbed::{
    Agent, ClusterIpService, Condition, Folder, NODE_IF, PinDir, Topology, ensure_all_served,
    http_get, http_tally, lb_bin,
};
use lb_userspace::datapath::maps::{DatapathMaps as _, MapContents};
use lb_userspace::datapath::{BpfMaps, Capacity, Datapath};
use lb_userspace::plan::desired::{
    Backend, DesiredState, Frontend, FrontendKind, FrontendPlan, ServicePortRef,
};
use lb_userspace::sync::{SyncError, Syncer};

/// `n` ClusterIP frontends 10.96.0.i:80, each with one backend.
fn desired(n: u32) -> DesiredState {
    let frontends: BTreeMap<Frontend, FrontendPlan> = (1..=n)
        .map(|i| {
            let frontend = Frontend {
                addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i).into(),
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
                    addr: Ipv4Addr::new(10, 244, 0, 2).into(),
                    port: 8080,
                    terminating: false,
                    remote: false,
                }],
                reject: false,
                affinity_timeout_secs: None,
                source_ranges: Vec::new(),
                selection: None,
                forwarding: None,
                topology: None,
                short_circuit: None,
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
    let mut dp = Datapath::load_with(&Pins::new(pins.path()), &capacity).unwrap();
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
    assert_eq!(size(map_names::BACKEND_STATS), 512, "a power of two");
    assert_eq!(size(map_names::CONNTRACK), 700);
    assert_eq!(size(map_names::AFFINITY), 500);
    // The socket hooks' maps: flows as conntrack's, clients as affinity's.
    assert_eq!(size(map_names::SOCKETS), 700);
    assert_eq!(size(map_names::SOCKETS6), 700);
    assert_eq!(size(map_names::SOCK_AFFINITY), 500);
    let maps = dp.take_maps().unwrap();
    assert_eq!(maps.service_id_limit(), 101);
    assert_eq!(
        BpfMaps::open_pinned(&Pins::new(pins.path()))
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
    let mut dp = Datapath::load_with(&Pins::new(pins.path()), &capacity).unwrap();
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

/// The maps hold one consistent state: every service has its reverse-NAT entry and its
/// table, every table names programmed backends, nothing is left of a service that is not
/// there, and every backend is in a table (with no drain period, removed ones are deleted).
fn assert_consistent(pins: &std::path::Path) -> MapContents {
    let contents = BpfMaps::open_pinned(&Pins::new(pins))
        .unwrap()
        .read_all()
        .unwrap();
    let ids: BTreeSet<u32> = contents.services.iter().map(|(_, s)| s.id).collect();
    let backends: BTreeSet<u32> = contents.backends.iter().map(|(id, _)| *id).collect();
    let rev_nat: BTreeSet<u32> = contents.rev_nat.iter().map(|(id, _)| *id).collect();
    // Each service's tables (two keys at most: `maglev::table_key`), and the one it uses.
    let tables: BTreeSet<u32> = contents
        .tables
        .iter()
        .map(|(key, _)| key & !maglev::KEY_TABLE_B)
        .collect();
    let live: BTreeSet<u32> = contents
        .services
        .iter()
        .map(|(_, s)| maglev::table_key(s.id, s.flags))
        .collect();
    assert_eq!(rev_nat, ids, "{contents:#?}");
    assert_eq!(tables, ids, "{contents:#?}");
    let in_tables: BTreeSet<u32> = contents
        .tables
        .iter()
        .filter(|(key, _)| live.contains(key))
        .flat_map(|(_, t)| t.backends.iter().copied())
        .collect();
    assert_eq!(in_tables, backends, "{contents:#?}");
    contents
}

/// The operations endpoint of the agent in the node namespace: status and body.
fn ops_until(topology: &Topology, path: &str, check: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = ops(&topology.node, path).unwrap_or((0, String::new()));
        if check(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answered {status}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The topology with two pods, a manifests folder with `services` (each over its first
/// `pods` pods), and the agent started with `args`. Dropped in field order.
struct Bed {
    agent: Agent,
    folder: Folder,
    topology: Topology,
}

impl Bed {
    fn start(services: &[(&ClusterIpService, usize)], args: &[&str]) -> Self {
        let topology = Topology::new(2).expect("topology");
        let folder = Folder::new().unwrap();
        let pods: Vec<_> = topology
            .pods
            .iter()
            .map(|p| (p, Condition::Ready))
            .collect();
        for (svc, n) in services {
            svc.write(&folder, &pods[..*n]).unwrap();
        }
        let agent = Agent::start_with_args(&lb_bin(), &topology.node, folder.path(), NODE_IF, args)
            .unwrap();
        Bed {
            agent,
            folder,
            topology,
        }
    }
}

#[test]
fn a_full_services_map_is_reported_and_the_frontends_that_fit_are_served() {
    let services: Vec<ClusterIpService> = (1..=3)
        .map(|i| ClusterIpService::http(&format!("svc{i}"), [10, 96, 0, i], 8080))
        .collect();
    let all: Vec<_> = services.iter().map(|svc| (svc, 2)).collect();
    let Bed {
        agent,
        folder,
        topology,
    } = &Bed::start(&all, &["--max-services", "2", "--drain-secs", "0"]);
    agent
        .wait_for(&[&services[0].frontend(), &services[1].frontend()], 2)
        .unwrap();
    let m = ops_until(topology, "/metrics", |_, m| {
        metric(m, "lb_frontends_unprogrammed") == Some(1.0)
    });
    assert!(
        metric(&m, "lb_map_write_errors_total{map=\"LB_SVC4_V1\"}").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "lb_frontends"), Some(2.0), "{m}");
    let ready = ops_until(topology, "/readyz", |status, _| status == 200);
    assert!(
        ready.contains("1 wanted frontends are not programmed"),
        "{ready}"
    );
    let log = agent.log();
    assert!(
        log.contains("10.96.0.3:8080/TCP")
            && log.contains("all 2 service ids are in use")
            && log.contains("raise --max-services"),
        "the log names the frontend, the limit and the flag:\n{log}"
    );
    // The two that fit are served; the third is no frontend: nothing answers it. (40
    // requests: with 10, both pods answer only 998 times in 1,000, and CI saw the other 2.)
    for svc in &services[..2] {
        let tally = http_tally(&topology.client, svc.cluster_ip, svc.port, 40).unwrap();
        ensure_all_served(&tally, &topology.pod_names()).unwrap();
    }
    assert!(http_get(&topology.client, services[2].cluster_ip, 8080).is_err());
    assert_eq!(assert_consistent(agent.pin_path()).services.len(), 2);

    // Room again: the frontend that did not fit is programmed, without a restart.
    folder.remove("svc1.yaml").unwrap();
    agent
        .wait_until("svc3 programmed once svc1 is gone", |s| {
            s.len() == 2
                && s.iter().any(|i| i.frontend == services[2].frontend())
                && s.iter().any(|i| i.frontend == services[1].frontend())
        })
        .unwrap();
    let tally = http_tally(&topology.client, services[2].cluster_ip, 8080, 40).unwrap();
    ensure_all_served(&tally, &topology.pod_names()).unwrap();
    ops_until(topology, "/metrics", |_, m| {
        metric(m, "lb_frontends_unprogrammed") == Some(0.0)
    });
    assert_eq!(
        ops_until(topology, "/readyz", |status, _| status == 200),
        "ok\n"
    );
    assert_eq!(assert_consistent(agent.pin_path()).services.len(), 2);
}

#[test]
fn a_full_backends_map_is_reported_and_the_frontends_that_fit_are_served() {
    // web: both pods' port 80, two backends. other: a third backend (pod1's port 5353, TCP).
    let web = ClusterIpService::http("web", [10, 96, 0, 1], 8080);
    let other = ClusterIpService {
        target_port: 5353,
        ..ClusterIpService::http("other", [10, 96, 0, 2], 8080)
    };
    let Bed {
        agent,
        folder,
        topology,
    } = &Bed::start(
        &[(&web, 2), (&other, 1)],
        &["--max-backends", "2", "--drain-secs", "0"],
    );
    agent.wait_for(&[&web.frontend()], 2).unwrap();
    let m = ops_until(topology, "/metrics", |_, m| {
        metric(m, "lb_frontends_unprogrammed") == Some(1.0)
    });
    // A new backend needs a slot of the counters first: they run out first.
    assert!(
        metric(&m, "lb_map_write_errors_total{map=\"LB_BESTAT_V2\"}").unwrap() >= 1.0,
        "{m}"
    );
    let log = agent.log();
    assert!(
        log.contains("map LB_BESTAT_V2 is full (2 entries): raise --max-backends"),
        "the log names the map, the limit and the flag:\n{log}"
    );
    let tally = http_tally(&topology.client, web.cluster_ip, web.port, 20).unwrap();
    ensure_all_served(&tally, &topology.pod_names()).unwrap();
    let contents = assert_consistent(agent.pin_path());
    assert_eq!((contents.services.len(), contents.backends.len()), (1, 2));

    // web gone: its backends are deleted (no drain), other fits.
    folder.remove("web.yaml").unwrap();
    let s = agent
        .wait_until("other programmed once web is gone", |s| {
            s.len() == 1 && s[0].frontend == other.frontend()
        })
        .unwrap();
    assert_eq!(s[0].backends, [other.backend(&topology.pods[0])]);
    let contents = assert_consistent(agent.pin_path());
    assert_eq!((contents.services.len(), contents.backends.len()), (1, 1));
    ops_until(topology, "/metrics", |_, m| {
        metric(m, "lb_frontends_unprogrammed") == Some(0.0)
    });
}

#[test]
fn a_full_conntrack_map_evicts_the_oldest_flows_and_counts_them() {
    let web = ClusterIpService::http("web", [10, 96, 0, 1], 8080);
    let Bed {
        agent, topology, ..
    } = &Bed::start(&[(&web, 2)], &["--max-conntrack", "256"]);
    agent.wait_for(&[&web.frontend()], 2).unwrap();
    // 300 connections one after the other: 600 entries through a map of 256.
    let tally = http_tally(&topology.client, web.cluster_ip, web.port, 300).unwrap();
    ensure_all_served(&tally, &topology.pod_names()).unwrap();
    let m = ops_until(topology, "/metrics", |_, m| {
        metric(m, "lb_conntrack_evictions_total").is_some()
    });
    let evictions = metric(&m, "lb_conntrack_evictions_total").unwrap();
    let entries = metric(&m, "lb_conntrack_entries").unwrap();
    assert!(entries <= 256.0, "{m}");
    assert!(evictions >= 600.0 - 256.0, "{m}");
    eprintln!("conntrack of 256 entries after 300 flows: {entries} entries, {evictions} evicted");
}

#[test]
fn a_full_affinity_table_evicts_the_oldest_clients_and_says_so() {
    // 40 Services with sessionAffinity ClientIP, one client: 40 entries through a table of
    // 16.
    let services: Vec<ClusterIpService> = (1..=40)
        .map(|i| ClusterIpService {
            affinity_timeout_secs: Some(600),
            ..ClusterIpService::http(&format!("sticky{i}"), [10, 96, 1, i], 8080)
        })
        .collect();
    let with_pods: Vec<_> = services.iter().map(|s| (s, 2)).collect();
    let Bed {
        agent, topology, ..
    } = &Bed::start(&with_pods, &["--max-affinity", "16"]);
    let frontends: Vec<String> = services.iter().map(ClusterIpService::frontend).collect();
    let frontends: Vec<&str> = frontends.iter().map(String::as_str).collect();
    agent.wait_for(&frontends, 2).unwrap();
    for svc in &services {
        http_get(&topology.client, svc.cluster_ip, svc.port).unwrap();
    }
    let table = |name: &str| format!("{name}{{map=\"{}\"}}", map_names::AFFINITY);
    let m = ops_until(topology, "/metrics", |_, m| {
        metric(m, &table("lb_table_evictions_total")).is_some_and(|e| e > 0.0)
    });
    let entries = metric(&m, &table("lb_table_entries")).unwrap();
    let evictions = metric(&m, &table("lb_table_evictions_total")).unwrap();
    // The row covers the IPv4 table and its IPv6 twin (one insert counter): 16 each.
    assert_eq!(metric(&m, &table("lb_table_capacity")), Some(32.0), "{m}");
    assert!(entries <= 16.0, "{m}");
    assert_eq!(
        entries + evictions,
        40.0,
        "every insert is there or evicted: {m}"
    );
    // The agent says which table is full and the flag that sizes it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = format!("map {} is full", map_names::AFFINITY);
    while !agent.log().contains(&said) {
        assert!(
            Instant::now() < deadline,
            "no {said:?} in:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log().contains("raise --max-affinity"),
        "{}",
        agent.log()
    );
    eprintln!("affinity table of 16 after 40 clients: {entries} entries, {evictions} evicted");
}

/// The memory limit of deploy/daemonset.yaml's agent, in bytes.
fn daemonset_memory_limit() -> u64 {
    let path = lb_testbed::agent::workspace_dir().join("deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_yaml_ng::from_str(&text).unwrap();
    let pod = ds.spec.template.spec.unwrap();
    let limits = pod.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref();
    let limit = &limits.unwrap()["memory"].0;
    let (digits, unit) = limit.split_at(
        limit
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(limit.len()),
    );
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => panic!("a memory limit in bytes, Ki, Mi or Gi: {limit}"),
    };
    digits.parse::<u64>().unwrap() * scale
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// BPF maps are charged to the memory cgroup of the process that creates them: a fresh agent
/// (nothing pinned: a new node, or one after `lb teardown`) creates every map with the
/// default sizes under the pod's limit. Its peak, with the example Services programmed, fits
/// the DaemonSet's limit with room to spare (for more Services, and the per-CPU counters of
/// nodes with more CPUs: deploy/README.md); so does a start after `lb teardown`.
#[test]
fn a_fresh_agent_fits_the_daemonset_memory_limit_and_again_after_lb_teardown() {
    let limit = daemonset_memory_limit();
    let topology = Topology::new(2).unwrap();
    let examples = lb_testbed::examples_dir();
    let frontends = lb_testbed::EXAMPLE_FRONTENDS;
    let first = MemoryCgroup::new(limit).unwrap();
    let mut agent =
        Agent::start_manifests_configured(&topology.node, &examples, NODE_IF, &[], |cmd| {
            first.configure(cmd).unwrap()
        })
        .unwrap();
    agent.wait_for(frontends, 2).unwrap();
    let fresh = first.peak().unwrap();

    agent.stop().unwrap();
    lb_testbed::netns::run(
        std::process::Command::new(lb_bin())
            .args(["teardown", "--pin-path"])
            .arg(agent.pin_path()),
    )
    .unwrap();
    let second = MemoryCgroup::new(limit).unwrap();
    agent
        .restart_configured(&topology.node, &lb_bin(), &[], |cmd| {
            second.configure(cmd).unwrap()
        })
        .unwrap();
    agent.wait_for(frontends, 2).unwrap();
    let after_teardown = second.peak().unwrap();
    eprintln!(
        "peak memory of the agent's cgroup: {} MiB on a fresh start, {} MiB after lb teardown; \
         the DaemonSet's limit: {} MiB",
        mib(fresh),
        mib(after_teardown),
        mib(limit)
    );
    for peak in [fresh, after_teardown] {
        assert!(
            peak <= limit / 2,
            "a peak of {} MiB leaves less than half of the limit of {} MiB\nagent log:\n{}",
            mib(peak),
            mib(limit),
            agent.log()
        );
    }
    // Stopped before its cgroups go.
    drop(agent);
}

/// A map the memory cgroup cannot hold: the agent says which map, its size, about how much
/// memory it takes and the flag that makes it smaller.
#[test]
fn a_map_the_memory_limit_cannot_hold_is_named_with_its_size_and_flag() {
    let topology = Topology::new(1).unwrap();
    let examples = lb_testbed::examples_dir();
    let cgroup = MemoryCgroup::new(64 << 20).unwrap();
    let agent = Agent::start_manifests_configured(&topology.node, &examples, NODE_IF, &[], |cmd| {
        cgroup.configure(cmd).unwrap()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.is_running() {
        assert!(
            Instant::now() < deadline,
            "the agent runs under 64 MiB:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot create map "))
        .unwrap_or_else(|| panic!("no map named in:\n{log}"));
    let name = line
        .split("cannot create map ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    let flag = lb_userspace::datapath::capacity_flag(name)
        .unwrap_or_else(|| panic!("{name} is sized by a flag: {line}"));
    for said in [
        " entries, about ",
        " MiB): ",
        "memory cgroup",
        "raise the agent's memory limit",
        &format!("make the map smaller with {flag}"),
    ] {
        assert!(line.contains(said), "{said:?} in: {line}");
    }
    eprintln!("{line}");
}
