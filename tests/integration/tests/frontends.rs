//! Real traffic from the client namespace through each kind of frontend, served by the real
//! `lb` agent on the node (from `examples/`). Needs root and the `lb` binary (`LB_BIN`).

use std::net::Ipv4Addr;

use anyhow::Result;
use lb_testbed::{
    NODE_IP, Netns, Tally, Testbed, ensure_all_served, http_get, http_tally, udp_tally,
};

/// Requests per test; every one must succeed.
const REQUESTS: usize = 20;

/// Starts the test bed, waits for `frontend` (`address:port/PROTOCOL`), runs `send` from the
/// client, and checks that both pods served.
fn through(frontend: &str, send: impl FnOnce(&Netns) -> Result<Tally>) {
    let bed = Testbed::start(&[frontend]).expect("start the test bed");
    let tally =
        send(&bed.topology.client).unwrap_or_else(|e| panic!("traffic through {frontend}: {e:#}"));
    ensure_all_served(&tally, &bed.topology.pod_names())
        .unwrap_or_else(|e| panic!("through {frontend}: {e:#}"));
}

/// New TCP connections to `addr:port`, each answered by a pod. A reply that did not come back
/// from the frontend address would be reset by the client, so a working connection is the
/// proof of the reverse translation.
fn tcp_frontend(addr: Ipv4Addr, port: u16) {
    through(&format!("{addr}:{port}/TCP"), |client| {
        http_tally(client, addr, port, REQUESTS)
    });
}

#[test]
fn cluster_ip_tcp() {
    tcp_frontend(Ipv4Addr::new(10, 96, 0, 10), 8080);
}

#[test]
fn node_port_tcp() {
    tcp_frontend(NODE_IP, 30080);
}

#[test]
fn external_ip_tcp() {
    tcp_frontend(Ipv4Addr::new(10, 97, 0, 1), 80);
}

#[test]
fn load_balancer_ingress_tcp() {
    tcp_frontend(Ipv4Addr::new(10, 98, 0, 1), 80);
}

#[test]
fn load_balancer_node_port_tcp() {
    tcp_frontend(NODE_IP, 30081);
}

/// New UDP flows (a new socket each): every reply must come from the frontend address
/// (`udp_request` checks the source), and both pods must answer.
#[test]
fn cluster_ip_udp() {
    let addr = Ipv4Addr::new(10, 96, 0, 12);
    through("10.96.0.12:5353/UDP", |client| {
        udp_tally(client, addr, 5353, REQUESTS)
    });
}

/// Traffic to addresses that are not frontends (the pods themselves) passes the node's
/// programs untouched.
#[test]
fn non_frontend_traffic_passes() {
    let bed = Testbed::start(&["10.96.0.10:8080/TCP"]).expect("start the test bed");
    for pod in &bed.topology.pods {
        let (body, _) = http_get(&bed.topology.client, pod.ip, 80)
            .unwrap_or_else(|e| panic!("HTTP to {} directly: {e:#}", pod.ip));
        assert_eq!(body, pod.name);
    }
}
