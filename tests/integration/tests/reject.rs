//! kube-proxy's REJECT and DROP with real traffic from the client namespace: every frontend
//! of a Service without endpoints answers a new TCP connection or UDP datagram with ICMP
//! (ICMPv6) port unreachable, so that the client's connect fails with "connection refused"
//! at once and its UDP socket gets ECONNREFUSED; a NodePort of an externalTrafficPolicy
//! Local Service whose endpoints are all on other nodes drops (the client times out).
//! Counted as `rejected_no_endpoints` and `no_backend`.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use lb_testbed::{
    Netns,
    agent::Agent,
    manifests::Folder,
    topology::{NODE_IF, Topology},
};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.5.1
  clusterIPs: [10.96.5.1, 'fd00:96::51']
  ports:
  - {name: http, port: 80, nodePort: 30100, protocol: TCP}
  - {name: dns, port: 5353, nodePort: 30101, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.5.2
  ports:
  - {name: http, port: 80, nodePort: 30102, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: elsewhere-1
  labels: {kubernetes.io/service-name: elsewhere}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: [10.244.9.2]
  conditions: {ready: true}
  nodeName: another-node
"#;

fn v6(s: &str) -> IpAddr {
    s.parse::<Ipv6Addr>().unwrap().into()
}

/// A TCP connect from `client` to `to`: its error kind and how long it took.
fn connect(client: &Netns, to: SocketAddr, timeout: Duration) -> (Option<ErrorKind>, Duration) {
    client
        .run(|| {
            let start = Instant::now();
            let result = TcpStream::connect_timeout(&to, timeout);
            (result.err().map(|e| e.kind()), start.elapsed())
        })
        .unwrap()
}

/// A datagram from a connected UDP socket in `client` to `to`, then a receive: its error.
fn udp(client: &Netns, to: SocketAddr) -> Option<ErrorKind> {
    client
        .run(|| {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let socket = UdpSocket::bind(any).unwrap();
            socket.connect(to).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            socket.send(b"ping").unwrap();
            let mut buf = [0u8; 64];
            socket.recv(&mut buf).err().map(|e| e.kind())
        })
        .unwrap()
}

/// The reason counters of `lb stats`.
fn reasons(agent: &Agent) -> Vec<(String, u64)> {
    let report = agent.stats().unwrap();
    serde_json::from_value(report["counters"].clone()).unwrap()
}

fn counted(agent: &Agent, name: &str) -> u64 {
    (reasons(agent).into_iter())
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| v)
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once_and_local_without_local_endpoints_drops()
{
    let topology = Topology::new(1).expect("topology");
    let servers = topology.add_ipv6().expect("IPv6");
    // The rejections leave by XDP_TX: a veth delivers those only to a peer running XDP.
    let folder = Folder::new().unwrap();
    let noop = folder.path().join("noop.o");
    std::fs::write(&noop, lb_userspace::NOOP_OBJECT).unwrap();
    let noop = noop.to_str().unwrap().to_owned();
    (topology.client)
        .ip(&[
            "link", "set", "dev", "eth0", "xdp", "obj", &noop, "sec", "xdp",
        ])
        .unwrap();
    std::fs::remove_file(&noop).unwrap();
    folder.write("services.yaml", SERVICES).unwrap();
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let want = [
        "10.96.5.1:80/TCP",
        "10.200.0.1:30100/TCP",
        "[fd00:96::51]:80/TCP",
        "[fd00:200::1]:30100/TCP",
        "10.96.5.1:5353/UDP",
        "[fd00:96::51]:5353/UDP",
        "10.200.0.1:30101/UDP",
        "10.200.0.1:30102/TCP",
    ];
    agent
        .wait_until("the frontends", |s| {
            want.iter().all(|w| s.iter().any(|f| f.frontend == *w))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    let services = agent.services().unwrap();
    // Only the cluster IP of `elsewhere` has a backend (the endpoint on the other node).
    assert!(
        (services.iter()).all(|s| (s.backend_count == 0) == (s.frontend != "10.96.5.2:80/TCP")),
        "{services:#?}"
    );

    // TCP, both families, cluster IP and node port: refused, not timed out.
    let client = &topology.client;
    let mut slowest = [Duration::ZERO; 2];
    for to in [
        SocketAddr::new([10, 96, 5, 1].into(), 80),
        SocketAddr::new([10, 200, 0, 1].into(), 30100),
        SocketAddr::new(v6("fd00:96::51"), 80),
        SocketAddr::new(v6("fd00:200::1"), 30100),
    ] {
        for _ in 0..5 {
            let (error, took) = connect(client, to, Duration::from_secs(3));
            assert_eq!(
                error,
                Some(ErrorKind::ConnectionRefused),
                "{to}\n{}",
                agent.log()
            );
            let family = usize::from(to.is_ipv6());
            slowest[family] = slowest[family].max(took);
        }
    }
    eprintln!(
        "the slowest refused connect of 10: IPv4 {:?}, IPv6 {:?}",
        slowest[0], slowest[1]
    );
    // IPv4: at once (the first SYN's ICMP). IPv6 in this bed: the veth delivers the
    // ICMPv6 error while connect() still holds the socket, so the client's kernel sets it
    // aside (TcpExtLockDroppedIcmps) and the retransmitted SYN's error ends the connect,
    // after about a second (still "connection refused", not a timeout).
    assert!(
        slowest[0] < Duration::from_millis(100),
        "IPv4 refused at once: {slowest:?}"
    );
    assert!(
        slowest[1] < Duration::from_millis(2500),
        "IPv6 refused: {slowest:?}"
    );
    // UDP: the next receive fails with ECONNREFUSED.
    for to in [
        SocketAddr::new([10, 96, 5, 1].into(), 5353),
        SocketAddr::new([10, 200, 0, 1].into(), 30101),
        SocketAddr::new(v6("fd00:96::51"), 5353),
    ] {
        assert_eq!(udp(client, to), Some(ErrorKind::ConnectionRefused), "{to}");
    }
    // Every SYN (IPv6's retransmitted ones too) and datagram: at least one each.
    let rejected = counted(&agent, "rejected_no_endpoints");
    assert!((20 + 3..=30 + 3).contains(&rejected), "{rejected}");

    // Endpoints only on another node, externalTrafficPolicy Local: the node port drops.
    let before = counted(&agent, "no_backend");
    let (error, took) = connect(
        client,
        SocketAddr::new([10, 200, 0, 1].into(), 30102),
        Duration::from_millis(800),
    );
    assert!(
        matches!(error, Some(ErrorKind::TimedOut | ErrorKind::WouldBlock)),
        "dropped, not refused: {error:?} after {took:?}"
    );
    assert!(
        counted(&agent, "no_backend") > before,
        "{:?}",
        reasons(&agent)
    );
    assert_eq!(counted(&agent, "rejected_no_endpoints"), rejected);
    drop(servers);
}
