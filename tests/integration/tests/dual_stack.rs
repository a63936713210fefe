//! The real `lb agent` with dual-stack and IPv6-only Services (`tests/fixtures/dual-stack`):
//! their IPv6 frontends, with IPv6 backends, are in the pinned v6 maps beside the IPv4 ones
//! (as `lb services` reads them back), NodePorts are on the interface's IPv6 address too, and
//! a restarted agent adopts all of it and writes nothing; and real IPv6 connections through
//! the frontends (XDP's IPv6 program, reached by its tail call, and TC egress's reverse
//! translation) reach the pods, their replies coming from the frontend.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use lb_testbed::{
    Agent, ServiceInfo,
    agent::{backends_of, metric, ops, workspace_dir},
    client::{http_get, udp_request},
    lb_bin,
    topology::{NODE_IF, Topology},
};

/// Every frontend of the fixture with the backends new flows choose from (the terminating
/// one of `httpd-ds-lb` is listed but not counted).
const FRONTENDS: &[(&str, u32)] = &[
    ("10.96.0.20:8080/TCP", 2),
    ("10.96.0.22:80/TCP", 1),
    ("10.98.0.2:80/TCP", 1),
    ("10.200.0.1:30090/TCP", 2),
    ("10.200.0.1:30091/TCP", 1),
    ("[fd00:96::20]:8080/TCP", 2),
    ("[fd00:96::21]:5353/UDP", 2),
    ("[fd00:96::22]:80/TCP", 1),
    ("[fd00:97::1]:5353/UDP", 2),
    ("[fd00:98::2]:80/TCP", 1),
    ("[fd00:200::1]:30090/TCP", 2),
    ("[fd00:200::1]:30091/TCP", 1),
];

fn programmed(services: &[ServiceInfo]) -> Vec<(String, u32)> {
    let mut all: Vec<(String, u32)> = services
        .iter()
        .map(|s| (s.frontend.clone(), s.backend_count))
        .collect();
    all.sort();
    all
}

fn expected() -> Vec<(String, u32)> {
    let mut all: Vec<(String, u32)> = FRONTENDS.iter().map(|(f, n)| (f.to_string(), *n)).collect();
    all.sort();
    all
}

fn wait_ops(topology: &Topology, agent: &Agent, path: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        agent.ensure_running().unwrap();
        if let Ok((200, body)) = ops(&topology.node, path) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never answered 200; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ipv6_frontends_are_programmed_in_the_pinned_v6_maps_and_adopted_on_restart() {
    let topology = Topology::new(2).expect("topology");
    // The node's IPv6 address: NodePorts of the IPv6 family listen on it.
    topology
        .node
        .ip(&["addr", "add", "fd00:200::1/64", "dev", NODE_IF, "nodad"])
        .expect("IPv6 node address");
    let dir = workspace_dir().join("tests/fixtures/dual-stack");
    let mut agent = Agent::start(&topology.node, &dir, NODE_IF).expect("agent");
    let services = agent
        .wait_until("every dual-stack frontend", |s| programmed(s) == expected())
        .expect("the fixture is programmed");
    // Each frontend's backends are of its own family, as the datapath reads them.
    assert_eq!(
        backends_of(&services, "[fd00:96::20]:8080/TCP").unwrap(),
        ["[fd00:244:1::2]:80", "[fd00:244:2::2]:80"]
    );
    assert_eq!(
        backends_of(&services, "10.96.0.20:8080/TCP").unwrap(),
        ["10.244.1.2:80", "10.244.2.2:80"]
    );
    assert_eq!(
        backends_of(&services, "[fd00:97::1]:5353/UDP").unwrap(),
        ["[fd00:244:1::2]:5353", "[fd00:244:2::2]:5353"]
    );
    // The service ids of both families are one id space.
    let mut ids: Vec<u32> = services.iter().map(|s| s.service_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), FRONTENDS.len());
    let metrics = wait_ops(&topology, &agent, "/metrics");
    assert_eq!(
        metric(&metrics, "lb_frontends"),
        Some(FRONTENDS.len() as f64),
        "{metrics}"
    );

    // A restart adopts the v6 maps exactly: nothing is written.
    agent.kill().unwrap();
    while agent.is_running() {
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.restart(&topology.node, &lb_bin(), &[]).unwrap();
    wait_ops(&topology, &agent, "/readyz");
    let metrics = wait_ops(&topology, &agent, "/metrics");
    assert_eq!(
        metric(&metrics, "lb_map_writes_total"),
        Some(0.0),
        "{metrics}\n{}",
        agent.log()
    );
    let after = agent.services().unwrap();
    assert_eq!(programmed(&after), expected());
    for s in &services {
        let again = ServiceInfo::find(&after, &s.frontend).unwrap();
        assert_eq!(
            (again.service_id, &again.backends),
            (s.service_id, &s.backends)
        );
    }
}

/// An address of the fixture.
fn v6(s: &str) -> IpAddr {
    s.parse::<Ipv6Addr>().unwrap().into()
}

#[test]
fn ipv6_connections_through_the_frontends_reach_the_pods_and_replies_come_from_the_frontend() {
    let topology = Topology::new(2).expect("topology");
    // IPv6 beside IPv4 (see `Topology::add_ipv6`).
    let servers = topology.add_ipv6().expect("IPv6 addresses and servers");
    let (node, client) = (&topology.node, &topology.client);
    let dir = workspace_dir().join("tests/fixtures/dual-stack");
    let agent = Agent::start(node, &dir, NODE_IF).expect("agent");
    agent
        .wait_until("every dual-stack frontend", |s| programmed(s) == expected())
        .expect("the fixture is programmed");

    // TCP: the ClusterIP and the NodePort of httpd-ds, both pods answering; the client's
    // connection is with the frontend it addressed.
    for (frontend, port) in [(v6("fd00:96::20"), 8080), (v6("fd00:200::1"), 30090)] {
        let mut answered = BTreeSet::new();
        for _ in 0..16 {
            let (body, peer) = http_get(client, frontend, port)
                .unwrap_or_else(|e| panic!("[{frontend}]:{port}: {e:#}\n{}", agent.log()));
            assert_eq!((peer.ip(), peer.port()), (frontend, port));
            answered.insert(body);
        }
        assert_eq!(
            answered,
            BTreeSet::from(["pod1".to_owned(), "pod2".to_owned()]),
            "[{frontend}]:{port}"
        );
    }
    // UDP: the reply comes from the frontend (udp_request checks its source).
    let reply = udp_request(client, v6("fd00:96::21"), 5353, "ping")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    assert!(reply == "pod1:ping" || reply == "pod2:ping", "{reply:?}");
    drop(servers);
}
