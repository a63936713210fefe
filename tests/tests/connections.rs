//! Flows never break: long-lived TCP connections through a ClusterIP while its backends
//! scale and terminate, and sessionAffinity ClientIP, with the real `lb` agent following a
//! manifests folder that the tests rewrite. Needs root and the `lb` binary (`LB_BIN`).

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use lb_tests::{
    Agent, CLIENT_IP, ClusterIpService, Condition, ConnPool, ConnRecord, Folder, NODE_IF, Pod,
    ServiceInfo, Topology,
    conns::{failures, first_backends},
};

/// The agent on a topology's node, following a manifests folder that holds one Service.
struct Control {
    agent: Agent,
    folder: Folder,
    svc: ClusterIpService,
}

impl Control {
    /// Writes `svc` with `endpoints` (see [`Control::set_endpoints`]), starts the agent and
    /// waits until it has programmed them.
    fn start(topology: &Topology, svc: ClusterIpService, endpoints: &[(usize, Condition)]) -> Self {
        let folder = Folder::new().expect("manifests folder");
        let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("start lb agent");
        let mut control = Control { agent, folder, svc };
        control.set_endpoints(topology, endpoints);
        control
    }

    /// Rewrites the EndpointSlice to `endpoints` (pod index from 0, condition) and waits until
    /// the agent has programmed the Service with the ready ones as its selection.
    fn set_endpoints(&mut self, topology: &Topology, endpoints: &[(usize, Condition)]) {
        let listed: Vec<(&Pod, Condition)> = endpoints
            .iter()
            .map(|&(i, c)| (&topology.pods[i], c))
            .collect();
        self.svc
            .write(&self.folder, &listed)
            .expect("write manifests");
        let ready: BTreeSet<String> = listed
            .iter()
            .filter(|(_, c)| *c == Condition::Ready)
            .map(|(p, _)| self.svc.backend(p))
            .collect();
        let frontend = self.svc.frontend();
        let start = Instant::now();
        self.agent
            .wait_until(&format!("{frontend} selecting {ready:?}"), |services| {
                ServiceInfo::find(services, &frontend).is_some_and(|s| s.selectable() == ready)
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!(
            "{frontend}: the agent programmed {ready:?} in {:?}",
            start.elapsed()
        );
    }

    fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.svc.cluster_ip, self.svc.port)
    }
}

/// The names of the pods with indices (from 0) `pods`.
fn names(topology: &Topology, pods: &[usize]) -> BTreeSet<String> {
    pods.iter()
        .map(|&i| topology.pods[i].name.clone())
        .collect()
}

/// The index of the pod named `name`.
fn index_of(topology: &Topology, name: &str) -> usize {
    topology
        .pods
        .iter()
        .position(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name}"))
}

/// Panics unless every one of `records` is alive and its first answer came from `allowed`.
fn assert_new_flows_went_to(records: &[ConnRecord], allowed: &BTreeSet<String>, step: &str) {
    for r in records {
        assert!(
            r.failure.is_none(),
            "{step}: new connection from port {} failed: {r:?}",
            r.sport
        );
        let first = r
            .first()
            .unwrap_or_else(|| panic!("{step}: no answer: {r:?}"));
        assert!(
            allowed.contains(first),
            "{step}: new connection from port {} went to {first}, not one of {allowed:?}; \
             spread {:?}",
            r.sport,
            first_backends(records)
        );
    }
}

/// 200 connections opened to 2 backends stay open and busy while the Service scales to 5
/// backends, one of them turns terminating, and it scales down to 1. Connections opened after
/// each step must only reach the backends that step selects.
#[test]
fn long_lived_connections_keep_their_backends_while_the_service_scales() {
    use Condition::{Ready, Terminating};
    const LONG_LIVED: usize = 200;
    const NEW_PER_STEP: usize = 50;
    // Every connection sends this many requests after each step has been programmed.
    const ROUNDS_PER_STEP: u64 = 3;

    let svc = ClusterIpService::http("scale", [10, 96, 0, 20], 8080);
    let topology = Topology::new(5).expect("topology");
    let mut control = Control::start(&topology, svc, &[(0, Ready), (1, Ready)]);
    let mut pool = ConnPool::new(&topology.client, CLIENT_IP, control.target(), 20000);

    let opened = pool.open(LONG_LIVED, "2 backends").unwrap();
    let records = pool.records();
    assert_new_flows_went_to(&records[opened], &names(&topology, &[0, 1]), "2 backends");
    pool.start_traffic();

    // Scale up to 5.
    control.set_endpoints(
        &topology,
        &[(0, Ready), (1, Ready), (2, Ready), (3, Ready), (4, Ready)],
    );
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    let opened = pool.open(NEW_PER_STEP, "5 backends").unwrap();
    let records = pool.records();
    assert_new_flows_went_to(
        &records[opened.clone()],
        &names(&topology, &[0, 1, 2, 3, 4]),
        "5 backends",
    );

    // The new backend with the most connections turns terminating: its connections continue,
    // new ones go elsewhere.
    let spread = first_backends(&records[opened]);
    let (terminating, _) = spread
        .iter()
        .filter(|(pod, _)| !names(&topology, &[0, 1]).contains(*pod))
        .max_by_key(|(_, n)| **n)
        .unwrap_or_else(|| panic!("no new connection reached pods 3 to 5: {spread:?}"));
    let t = index_of(&topology, terminating);
    let mut endpoints: Vec<(usize, Condition)> = (0..5).map(|i| (i, Ready)).collect();
    endpoints[t].1 = Terminating;
    control.set_endpoints(&topology, &endpoints);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    let label = format!("{terminating} terminating");
    let opened = pool.open(NEW_PER_STEP, &label).unwrap();
    let others: Vec<usize> = (0..5).filter(|&i| i != t).collect();
    assert_new_flows_went_to(&pool.records()[opened], &names(&topology, &others), &label);

    // Scale down to pod1: the other four leave the EndpointSlice, and their established
    // connections drain.
    control.set_endpoints(&topology, &[(0, Ready)]);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    let opened = pool.open(NEW_PER_STEP, "1 backend").unwrap();
    assert_new_flows_went_to(
        &pool.records()[opened],
        &names(&topology, &[0]),
        "1 backend",
    );
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    pool.stop_traffic();

    let records = pool.records();
    for label in ["2 backends", "5 backends", label.as_str(), "1 backend"] {
        let opened: Vec<ConnRecord> = records
            .iter()
            .filter(|r| r.opened == label)
            .cloned()
            .collect();
        let answered: usize = opened.iter().map(ConnRecord::answered).sum();
        eprintln!(
            "opened with {label}: {} connections, first backends {:?}, {answered} answers",
            opened.len(),
            first_backends(&opened)
        );
    }
    let failed: Vec<&ConnRecord> = records.iter().filter(|r| r.failure.is_some()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed ({:?}), e.g. {:#?}",
        failed.len(),
        records.len(),
        failures(&records),
        &failed[..failed.len().min(5)]
    );
    let moved: Vec<&ConnRecord> = records.iter().filter(|r| !r.kept_its_backend()).collect();
    assert!(
        moved.is_empty(),
        "{} of {} connections changed backend, e.g. {:#?}",
        moved.len(),
        records.len(),
        &moved[..moved.len().min(5)]
    );
    // What the test claims was exercised: connections on the terminating and on the removed
    // backends kept being answered by them after the change.
    for pod in [terminating.as_str(), "pod2"] {
        let on_pod = records
            .iter()
            .filter(|r| r.first() == Some(pod) && r.answered() > 2 * ROUNDS_PER_STEP as usize)
            .count();
        assert!(
            on_pod > 0,
            "no long-lived connection on {pod}: {records:#?}"
        );
    }
}

/// sessionAffinity ClientIP: one client's new connections (other source ports) all reach
/// the same backend within the timeout; after the timeout without traffic the backend is
/// chosen afresh and kept again; a terminating affinity backend takes no new connections of
/// the client while the client's established connection to it continues.
#[test]
fn session_affinity_keeps_a_client_on_its_backend_for_the_timeout() {
    use Condition::{Ready, Terminating};
    const TIMEOUT_SECS: u32 = 3;
    let svc = ClusterIpService {
        affinity_timeout_secs: Some(TIMEOUT_SECS),
        ..ClusterIpService::http("sticky", [10, 96, 0, 21], 8080)
    };
    let all = [(0, Ready), (1, Ready), (2, Ready)];
    let topology = Topology::new(3).expect("topology");
    let mut control = Control::start(&topology, svc, &all);
    let mut pool = ConnPool::new(&topology.client, CLIENT_IP, control.target(), 21000);

    // Within the timeout: 30 new connections (new source ports), one backend.
    let all_pods = names(&topology, &[0, 1, 2]);
    open_one_client(&mut pool, 30, "within the timeout", &all_pods);

    // The timeout passes with no traffic; the next connection chooses afresh and the
    // client's connections after it stay with that choice.
    std::thread::sleep(Duration::from_secs(TIMEOUT_SECS.into()) + Duration::from_secs(1));
    let sticky = open_one_client(&mut pool, 20, "after the timeout", &all_pods);

    // The affinity backend turns terminating: the client's new connections go to one other
    // backend, its established ones stay.
    let s = index_of(&topology, &sticky);
    let mut endpoints = all.to_vec();
    endpoints[s].1 = Terminating;
    control.set_endpoints(&topology, &endpoints);
    let others: BTreeSet<String> = all_pods.into_iter().filter(|p| *p != sticky).collect();
    open_one_client(&mut pool, 20, "affinity backend terminating", &others);

    pool.round();
    let records = pool.records();
    let failed: Vec<&ConnRecord> = records.iter().filter(|r| r.failure.is_some()).collect();
    assert!(failed.is_empty(), "failed connections: {failed:#?}");
    let on_sticky = records
        .iter()
        .filter(|r| r.first() == Some(&sticky))
        .count();
    assert!(on_sticky >= 20, "{on_sticky} connections on {sticky}");
    for r in &records {
        assert!(r.kept_its_backend(), "connection changed backend: {r:?}");
        assert_eq!(r.answered(), 2, "every connection answered twice: {r:?}");
    }
}

/// Opens `n` connections from the pool's client, and panics unless they all reached the same
/// one of `allowed`; returns it.
fn open_one_client(
    pool: &mut ConnPool,
    n: usize,
    step: &str,
    allowed: &BTreeSet<String>,
) -> String {
    let opened = pool.open(n, step).unwrap();
    let records = &pool.records()[opened];
    assert_new_flows_went_to(records, allowed, step);
    let spread = first_backends(records);
    assert_eq!(
        spread.len(),
        1,
        "{step}: one client, one backend: {spread:?}"
    );
    spread.into_keys().next().unwrap()
}
