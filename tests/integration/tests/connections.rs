//! Flows never break: long-lived TCP connections through a ClusterIP while its backends
//! scale and terminate, and sessionAffinity ClientIP, with the real `lb` agent following a
//! manifests folder that the tests rewrite. Needs root and the `lb` binary (`LB_BIN`).

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use lb_testbed::{
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

/// What `lb explain --syn` says the pool's next `n` connections will get: (decision, pod).
fn predict(
    control: &Control,
    topology: &Topology,
    pool: &ConnPool,
    n: usize,
) -> Vec<(String, String)> {
    pool.next_sources(n)
        .into_iter()
        .map(|src| {
            let e = control
                .agent
                .explain(src, pool.target(), true)
                .unwrap_or_else(|e| panic!("{e:#}"));
            let backend = e
                .backend
                .as_deref()
                .unwrap_or_else(|| panic!("lb explain of {src} names no backend: {e:?}"));
            let pod = topology
                .pods
                .iter()
                .find(|p| control.svc.backend(p) == backend)
                .unwrap_or_else(|| panic!("lb explain of {src}: {backend} is no pod: {e:?}"));
            (e.decision, pod.name.clone())
        })
        .collect()
}

/// Asks `lb explain` which backend each of `n` new connections will get, opens them
/// (labelled `step`), and panics unless each got that backend, by `decision`, and it is one
/// of `allowed` (pod indices). Returns their records.
fn open_as_explained(
    control: &Control,
    topology: &Topology,
    pool: &mut ConnPool,
    n: usize,
    step: &str,
    decision: &str,
    allowed: &[usize],
) -> Vec<ConnRecord> {
    let predicted = predict(control, topology, pool, n);
    let opened = pool.open(n, step).unwrap();
    let records = pool.records()[opened].to_vec();
    assert_new_flows_went_to(&records, &names(topology, allowed), step);
    for (r, (how, pod)) in records.iter().zip(&predicted) {
        assert_eq!(
            (how.as_str(), r.first()),
            (decision, Some(pod.as_str())),
            "{step}: connection from port {} against lb explain before it opened",
            r.sport
        );
    }
    records
}

/// 200 connections opened to 2 backends stay open and busy while the Service scales to 5
/// backends, one of them turns terminating, and it scales down to 1 (the other four leave
/// the EndpointSlice). No connection fails or changes backend; connections opened after each
/// step reach the backend `lb explain` names for their flow (the Maglev entry of its hash),
/// always one that the step selects.
#[test]
fn long_lived_connections_keep_their_backends_while_the_service_scales() {
    use Condition::{Ready, Terminating};
    const LONG_LIVED: usize = 200;
    const NEW_PER_STEP: usize = 50;
    // Every connection sends at least this many requests after each step is programmed.
    const ROUNDS_PER_STEP: u64 = 3;

    let svc = ClusterIpService::http("scale", [10, 96, 0, 20], 8080);
    let topology = Topology::new(5).expect("topology");
    let mut control = Control::start(&topology, svc, &[(0, Ready), (1, Ready)]);
    let mut pool = ConnPool::new(&topology.client, CLIENT_IP, control.target(), 20000);
    let open = |control: &Control, pool: &mut ConnPool, n, step: &str, allowed: &[usize]| {
        open_as_explained(control, &topology, pool, n, step, "maglev", allowed)
    };

    open(&control, &mut pool, LONG_LIVED, "2 backends", &[0, 1]);
    pool.start_traffic();

    // Scale up to 5.
    let all: Vec<(usize, Condition)> = (0..5).map(|i| (i, Ready)).collect();
    control.set_endpoints(&topology, &all);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    let opened = open(
        &control,
        &mut pool,
        NEW_PER_STEP,
        "5 backends",
        &[0, 1, 2, 3, 4],
    );

    // The new backend with the most new connections turns terminating: its connections
    // continue, new ones go elsewhere.
    let spread = first_backends(&opened);
    let (terminating, _) = spread
        .iter()
        .filter(|(pod, _)| !names(&topology, &[0, 1]).contains(*pod))
        .max_by_key(|(_, n)| **n)
        .unwrap_or_else(|| panic!("no new connection reached pods 3 to 5: {spread:?}"));
    let t = index_of(&topology, terminating);
    let mut endpoints = all.clone();
    endpoints[t].1 = Terminating;
    control.set_endpoints(&topology, &endpoints);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    let step = format!("{terminating} terminating");
    let others: Vec<usize> = (0..5).filter(|&i| i != t).collect();
    open(&control, &mut pool, NEW_PER_STEP, &step, &others);

    // Scale down to pod1: the other four leave the EndpointSlice; their established
    // connections drain.
    control.set_endpoints(&topology, &[(0, Ready)]);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    open(&control, &mut pool, NEW_PER_STEP, "1 backend", &[0]);
    pool.wait_rounds(ROUNDS_PER_STEP).unwrap();
    pool.stop_traffic();

    let records = pool.records();
    for step in ["2 backends", "5 backends", step.as_str(), "1 backend"] {
        let opened: Vec<ConnRecord> = records
            .iter()
            .filter(|r| r.opened == step)
            .cloned()
            .collect();
        let answered: usize = opened.iter().map(ConnRecord::answered).sum();
        eprintln!(
            "opened with {step}: {} connections, first backends {:?}, {answered} answers",
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
    // What the test claims was exercised: connections on the terminating backend and on
    // each removed one were answered by it after the change, and lb explain shows their
    // conntrack entries keeping them.
    let removed: BTreeSet<String> = names(&topology, &[1, 2, 3, 4]);
    for pod in &removed {
        let r = records
            .iter()
            .find(|r| r.first() == Some(pod) && r.answered() > 2 * ROUNDS_PER_STEP as usize)
            .unwrap_or_else(|| panic!("no long-lived connection on {pod}: {records:#?}"));
        let src = SocketAddrV4::new(pool.source(), r.sport);
        let e = control.agent.explain(src, pool.target(), false).unwrap();
        let backend = control
            .svc
            .backend(&topology.pods[index_of(&topology, pod)]);
        assert_eq!(
            (e.decision.as_str(), e.backend.as_deref()),
            ("conntrack", Some(backend.as_str())),
            "lb explain of the established {src} on {pod}: {e:?}"
        );
    }
    assert!(
        removed.contains(terminating),
        "{terminating} was removed too"
    );
}

/// sessionAffinity ClientIP: the client's first connection chooses by the Maglev entry of
/// its hash, and its next ones (other source ports) follow it; once the timeout has passed
/// without traffic, lb explain shows the choice made afresh and the next connection takes
/// it; a terminating affinity backend takes no new connection of the client while its
/// established ones continue.
#[test]
fn session_affinity_keeps_a_client_on_its_backend_for_the_timeout() {
    use Condition::{Ready, Terminating};
    const TIMEOUT: Duration = Duration::from_secs(3);
    let svc = ClusterIpService {
        affinity_timeout_secs: Some(TIMEOUT.as_secs() as u32),
        ..ClusterIpService::http("sticky", [10, 96, 0, 21], 8080)
    };
    let all = [(0, Ready), (1, Ready), (2, Ready)];
    let topology = Topology::new(3).expect("topology");
    let mut control = Control::start(&topology, svc, &all);
    let mut pool = ConnPool::new(&topology.client, CLIENT_IP, control.target(), 21000);
    let one_client = |control: &Control, pool: &mut ConnPool, step: &str, allowed: &[usize]| {
        // The first by the Maglev table, the next ones by affinity.
        let first = open_as_explained(control, &topology, pool, 1, step, "maglev", allowed);
        let pod = first[0].first().unwrap().to_owned();
        let i = index_of(&topology, &pod);
        open_as_explained(control, &topology, pool, 19, step, "affinity", &[i]);
        pod
    };

    let opened_at = Instant::now();
    let first = one_client(&control, &mut pool, "within the timeout", &[0, 1, 2]);

    // No traffic until lb explain no longer finds a fresh affinity entry; that takes the
    // timeout, counted from before the last connection opened.
    let deadline = opened_at + TIMEOUT + Duration::from_secs(10);
    let next = pool.next_sources(1)[0];
    loop {
        let e = control.agent.explain(next, pool.target(), true).unwrap();
        if e.decision != "affinity" {
            break;
        }
        assert!(Instant::now() < deadline, "affinity never expired: {e:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let expired_after = opened_at.elapsed();
    assert!(
        expired_after >= TIMEOUT,
        "the affinity entry expired after {expired_after:?}, before the timeout {TIMEOUT:?}"
    );
    let sticky = one_client(&control, &mut pool, "after the timeout", &[0, 1, 2]);
    eprintln!("affinity backend {first}, then {sticky} after {expired_after:?}");

    // The affinity backend turns terminating: the client's next connections choose afresh
    // among the others; its established ones stay.
    let s = index_of(&topology, &sticky);
    let mut endpoints = all.to_vec();
    endpoints[s].1 = Terminating;
    control.set_endpoints(&topology, &endpoints);
    let others: Vec<usize> = (0..3).filter(|&i| i != s).collect();
    let moved = one_client(&control, &mut pool, "affinity backend terminating", &others);
    assert_ne!(moved, sticky);

    pool.round();
    let records = pool.records();
    let failed: Vec<&ConnRecord> = records.iter().filter(|r| r.failure.is_some()).collect();
    assert!(failed.is_empty(), "failed connections: {failed:#?}");
    for r in &records {
        assert!(r.kept_its_backend(), "connection changed backend: {r:?}");
        assert_eq!(r.answered(), 2, "every connection answered twice: {r:?}");
    }
}
