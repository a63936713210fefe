//! Two nodes in namespaces ([`TwoNodes`]) with the real `lb` agent on node A: a client's
//! NodePort traffic to backends on node B (source NAT to node A's address, replies back
//! through node A), and externalTrafficPolicy Local (the client's address kept, only node
//! A's pods used, and node A's own pods and processes short-circuited to every endpoint);
//! over IPv4 and over IPv6 (IPv6-only Services on the same topology). And direct server
//! return, with lb on node B too: the client's address kept, the replies leaving node B
//! straight to the client.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use lb_testbed::agent::{metric, ops};
use lb_testbed::{
    Agent, CLIENT_IP, CLIENT_IP6, Cgroup, ConnPool, Folder, HTTP_PORT, NODE_A_NAME, NODE_B_IP,
    NODE_B_IP6, NODE_B_NAME, NODE_IF, NODE_IP, NODE_IP6, Pod, TwoNodes, UDP_PORT,
    ensure_all_served, http_request, lb_bin, udp_tally,
};

use crate::eastwest::{flows_and_packets, has_every_sock_link, probe, wait_for_links};

const HTTP_NODE_PORT: u16 = 30090;
const UDP_NODE_PORT: u16 = 30091;

/// A NodePort Service `name` (ports http 80/TCP and dns 53/UDP on node ports `node_port` and
/// `node_port + 1`) over `pods`, each with its node's name, with externalTrafficPolicy
/// `policy`; of the family of `cluster_ip` (an IPv6 one: an IPv6-only Service over the pods'
/// IPv6 addresses).
fn nodeport_service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    policy: &str,
    pods: &[(&Pod, &str)],
) -> String {
    let node_ports = [
        format!(", nodePort: {node_port}"),
        format!(", nodePort: {}", node_port + 1),
    ];
    service(name, cluster_ip, "type: NodePort", node_ports, policy, pods)
}

/// A Service `name` as [`nodeport_service`] describes it, with `spec` (e.g. its type) and
/// the `extra` fields of its two ports (e.g. their node ports).
fn service(
    name: &str,
    cluster_ip: &str,
    spec: &str,
    extra: [String; 2],
    policy: &str,
    pods: &[(&Pod, &str)],
) -> String {
    let v6 = cluster_ip.parse::<std::net::Ipv6Addr>().is_ok();
    let family = if v6 { "IPv6" } else { "IPv4" };
    let [http, dns] = extra;
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  {spec}\n  ipFamilies: [{family}]\n  clusterIP: '{cluster_ip}'\n  externalTrafficPolicy: {policy}\n  \
         ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: {HTTP_PORT}{http}}}\n  \
         - {{name: dns, protocol: UDP, port: 53, targetPort: {UDP_PORT}{dns}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {HTTP_PORT}}}\n\
         - {{name: dns, protocol: UDP, port: {UDP_PORT}}}\nendpoints:\n",
    );
    for (pod, node) in pods {
        let addr = match (v6, pod.ip6) {
            (true, Some(ip6)) => format!("'{ip6}'"),
            _ => pod.ip.to_string(),
        };
        yaml +=
            &format!("- {{addresses: [{addr}], nodeName: {node}, conditions: {{ready: true}}}}\n");
    }
    yaml
}

/// The agent on node A, serving `yaml`, once `frontends` have `backends` backends each.
fn agent_on_a(
    topology: &TwoNodes,
    folder: &Folder,
    yaml: &str,
    frontends: &[&str],
    backends: u32,
) -> Agent {
    folder.write("svc.yaml", yaml).unwrap();
    let agent = start_on_a(topology, folder);
    agent.wait_for(frontends, backends).unwrap();
    agent
}

/// The agent on node A, serving `folder`.
fn start_on_a(topology: &TwoNodes, folder: &Folder) -> Agent {
    Agent::start_on_node(
        &lb_bin(),
        &topology.node_a,
        folder.path(),
        NODE_IF,
        NODE_A_NAME,
        &[],
    )
    .unwrap()
}

/// A folder for the agent on node A, with the frames node A's XDP sends back out
/// (XDP_TX: replies of backends on node B) received on the LAN (see
/// [`TwoNodes::xdp_on_lan_port`]).
fn folder_with_xdp_tx(topology: &TwoNodes) -> Folder {
    let folder = Folder::new().unwrap();
    let noop = folder.path().join("noop.o");
    std::fs::write(&noop, lb_userspace::NOOP_OBJECT).unwrap();
    topology.xdp_on_lan_port(&noop).unwrap();
    folder
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// `GET /peer` through `frontend`: who answered and the client address it saw.
fn peer(topology: &TwoNodes, frontend: SocketAddr) -> (String, SocketAddr) {
    let (status, body, seen) = http_request(&topology.client, frontend, "/peer").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen, frontend, "the client talks to the frontend");
    let (pod, addr) = body.split_once(' ').unwrap();
    (pod.to_owned(), addr.parse().unwrap())
}

fn nat_counter(topology: &TwoNodes, name: &str) -> f64 {
    node_counter(&topology.node_a, name)
}

/// The datapath event counter `name` of the agent in `node`.
fn node_counter(node: &lb_testbed::Netns, name: &str) -> f64 {
    let (_, text) = ops(node, "/metrics").unwrap();
    metric(
        &text,
        &format!("lb_datapath_events_total{{event=\"{name}\"}}"),
    )
    .unwrap_or(0.0)
}

/// The family a test runs in: node A's address (the NodePort address), the client's, and
/// the Service's ClusterIP.
struct Family {
    node: IpAddr,
    client: IpAddr,
    cluster_ip: &'static str,
}

const V4: Family = Family {
    node: IpAddr::V4(NODE_IP),
    client: IpAddr::V4(CLIENT_IP),
    cluster_ip: "10.96.1.1",
};

const V6: Family = Family {
    node: IpAddr::V6(NODE_IP6),
    client: IpAddr::V6(CLIENT_IP6),
    cluster_ip: "fd00:96::1:1",
};

/// The frontend string of `addr:port/proto`, as `lb services` and the agent name it.
fn frontend_name(addr: IpAddr, port: u16, proto: &str) -> String {
    format!("{}/{proto}", SocketAddr::new(addr, port))
}

/// A NodePort Service over node B's pods: the backend sees node A's address and a NAT
/// port, the client the frontend; UDP replies come from the frontend. Returns the
/// topology and the agent for more checks.
fn remote_backends_are_source_natted(family: &Family) -> (TwoNodes, Folder, Agent) {
    let topology = TwoNodes::new(0, 2).unwrap();
    let folder = folder_with_xdp_tx(&topology);
    let remote: Vec<(&Pod, &str)> = topology.pods_b.iter().map(|p| (p, "node-b")).collect();
    let yaml = nodeport_service(
        "remote",
        family.cluster_ip,
        HTTP_NODE_PORT,
        "Cluster",
        &remote,
    );
    let http = frontend_name(family.node, HTTP_NODE_PORT, "TCP");
    let udp = frontend_name(family.node, UDP_NODE_PORT, "UDP");
    let agent = agent_on_a(&topology, &folder, &yaml, &[&http, &udp], 2);
    let services = agent.services().unwrap();
    let row = lb_testbed::ServiceInfo::find(&services, &http).unwrap();
    assert!(
        row.backends.iter().all(|b| b.ends_with("(remote)")),
        "{row:?}"
    );

    let frontend = SocketAddr::new(family.node, HTTP_NODE_PORT);
    for _ in 0..8 {
        let (pod, seen) = peer(&topology, frontend);
        assert!(names(&topology.pods_b).contains(&pod), "{pod}");
        assert_eq!(seen.ip(), family.node, "source NAT to node A's address");
        assert!(
            (lb_common::nat::PORT_MIN..=lb_common::nat::PORT_MAX).contains(&seen.port()),
            "{seen}"
        );
    }
    // UDP: every reply comes from the frontend (udp_request checks it), from both pods.
    let tally = udp_tally(&topology.client, family.node, UDP_NODE_PORT, 40).unwrap();
    ensure_all_served(&tally, &names(&topology.pods_b)).unwrap();
    (topology, folder, agent)
}

#[test]
fn nodeport_traffic_to_backends_on_the_other_node_is_source_natted_and_returns() {
    let (topology, _folder, _agent) = remote_backends_are_source_natted(&V4);

    // Many long-lived connections at once: each its own port, every answer right.
    let mut pool = ConnPool::new(
        &topology.client,
        CLIENT_IP,
        SocketAddrV4::new(NODE_IP, HTTP_NODE_PORT),
        42000,
    );
    pool.open(150, "many").unwrap();
    for _ in 0..3 {
        pool.round();
    }
    let records = pool.records();
    for r in &records {
        assert!(r.failure.is_none(), "{r:?}");
        assert_eq!(r.answered(), 4, "{r:?}");
        assert!(r.kept_its_backend(), "{r:?}");
    }
    let answering = lb_testbed::conns::answering(&records);
    assert_eq!(
        answering.into_iter().collect::<Vec<_>>(),
        names(&topology.pods_b)
    );

    // The datapath did it: ports allocated, replies translated, and (once node B's address
    // was resolved) sent by XDP itself.
    let (allocated, replies) = (
        nat_counter(&topology, "nat_allocated"),
        nat_counter(&topology, "nat_replies"),
    );
    // At least one port per pooled connection (a /peer connection may have had a pooled
    // one's source port before: that flow keeps its port); every request had replies.
    assert!(
        allocated >= 150.0 && replies >= 198.0,
        "{allocated} {replies}"
    );
    assert!(nat_counter(&topology, "fwd_tx") > 0.0);
    assert_eq!(nat_counter(&topology, "nat_exhausted"), 0.0);
}

#[test]
fn ipv6_nodeport_traffic_to_backends_on_the_other_node_is_source_natted_and_returns() {
    let (topology, _folder, _agent) = remote_backends_are_source_natted(&V6);
    // By the IPv6 NAT (the counters are shared with IPv4's): a port for each of the 8
    // connections and 40 datagrams (each from its own socket), replies to all of them. The
    // kernel may give two of those sockets the same ephemeral port: the second flow is then
    // the first one's tuple again and keeps its NAT port, so a few fewer allocations.
    let (allocated, replies) = (
        nat_counter(&topology, "nat_allocated"),
        nat_counter(&topology, "nat_replies"),
    );
    assert!(
        allocated >= 44.0 && replies >= 48.0,
        "{allocated} {replies}"
    );
    assert!(nat_counter(&topology, "fwd_tx") > 0.0);
    assert_eq!(nat_counter(&topology, "nat_exhausted"), 0.0);
}

/// Every pod of both nodes, with its node's name.
fn all_pods(topology: &TwoNodes) -> Vec<(&Pod, &'static str)> {
    let a = topology.pods_a.iter().map(|p| (p, "node-a"));
    a.chain(topology.pods_b.iter().map(|p| (p, "node-b")))
        .collect()
}

/// externalTrafficPolicy Local: only node A's pods, and the client's address kept.
fn local_policy_keeps_the_client_address(family: &Family) {
    let topology = TwoNodes::new(2, 2).unwrap();
    let folder = Folder::new().unwrap();
    let pods = all_pods(&topology);
    let yaml = nodeport_service("local", family.cluster_ip, HTTP_NODE_PORT, "Local", &pods);
    let http = frontend_name(family.node, HTTP_NODE_PORT, "TCP");
    let agent = agent_on_a(&topology, &folder, &yaml, &[&http], 2);
    // The ClusterIP (internalTrafficPolicy Cluster) has all four.
    let cluster_ip: IpAddr = family.cluster_ip.parse().unwrap();
    agent
        .wait_for(&[&frontend_name(cluster_ip, 80, "TCP")], 4)
        .unwrap();

    only_local_pods(
        &topology,
        SocketAddr::new(family.node, HTTP_NODE_PORT),
        SocketAddr::new(family.node, UDP_NODE_PORT),
        family.client,
    );
    assert_eq!(nat_counter(&topology, "nat_allocated"), 0.0);
}

/// HTTP through `http` and UDP through `udp` reach node A's pods only, all of them, and
/// they see the client's address `client`.
fn only_local_pods(topology: &TwoNodes, http: SocketAddr, udp: SocketAddr, client: IpAddr) {
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (pod, seen) = peer(topology, http);
        assert!(names(&topology.pods_a).contains(&pod), "{pod} is not local");
        assert_eq!(seen.ip(), client, "the client's address is kept");
        served.insert(pod);
    }
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        names(&topology.pods_a)
    );
    let tally = udp_tally(&topology.client, udp.ip(), udp.port(), 24).unwrap();
    ensure_all_served(&tally, &names(&topology.pods_a)).unwrap();
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_uses_only_local_pods() {
    local_policy_keeps_the_client_address(&V4);
}

#[test]
fn ipv6_external_traffic_policy_local_keeps_the_client_address_and_uses_only_local_pods() {
    local_policy_keeps_the_client_address(&V6);
}

/// externalTrafficPolicy Local on a ClusterIP Service with externalIPs (kube-proxy's
/// `ExternallyAccessible`): its external IP uses node A's pods only, keeping the client's
/// address; its cluster IP, reached from the same client, all four pods.
#[test]
fn external_traffic_policy_local_on_a_cluster_ip_service_with_external_ips() {
    let topology = TwoNodes::new(2, 2).unwrap();
    let folder = folder_with_xdp_tx(&topology);
    let pods = all_pods(&topology);
    let external: IpAddr = "10.97.1.1".parse().unwrap();
    let yaml = service(
        "ext",
        V4.cluster_ip,
        &format!("type: ClusterIP\n  externalIPs: ['{external}']"),
        [String::new(), String::new()],
        "Local",
        &pods,
    );
    let http = frontend_name(external, 80, "TCP");
    let cluster_ip: IpAddr = V4.cluster_ip.parse().unwrap();
    let agent = agent_on_a(&topology, &folder, &yaml, &[&http], 2);
    agent
        .wait_for(&[&frontend_name(cluster_ip, 80, "TCP")], 4)
        .unwrap();

    only_local_pods(
        &topology,
        SocketAddr::new(external, 80),
        SocketAddr::new(external, 53),
        V4.client,
    );

    let all: Vec<String> = names(&topology.pods_a)
        .into_iter()
        .chain(names(&topology.pods_b))
        .collect();
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..40 {
        served.insert(peer(&topology, SocketAddr::new(cluster_ip, 80)).0);
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), all);
}

/// kube-proxy's "short-circuit" of local traffic ("pod traffic for external destinations",
/// "route LOCAL traffic"): a Service with externalTrafficPolicy Local whose only endpoint
/// is on node B. Node A's pod and a process on node A itself (through the socket hooks)
/// reach it through its NodePort on node A's address and its external IP, TCP and UDP,
/// answered by node B's pod and reading as the address they used, counted under the
/// frontend they addressed; the client outside (XDP) gets nothing there: no local
/// endpoint, dropped (a timeout, not a refusal), as kube-proxy does.
fn short_circuit_of_local_traffic(family: &Family, external: &str) {
    let topology = TwoNodes::new(1, 1).unwrap();
    let folder = Folder::new().unwrap();
    let remote: Vec<(&Pod, &str)> = topology.pods_b.iter().map(|p| (p, "node-b")).collect();
    let node_ports = [
        format!(", nodePort: {HTTP_NODE_PORT}"),
        format!(", nodePort: {UDP_NODE_PORT}"),
    ];
    let spec = format!("type: NodePort\n  externalIPs: ['{external}']");
    let yaml = service(
        "elsewhere",
        family.cluster_ip,
        &spec,
        node_ports,
        "Local",
        &remote,
    );
    folder.write("svc.yaml", &yaml).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = Agent::start_on_node(
        &lb_bin(),
        &topology.node_a,
        folder.path(),
        NODE_IF,
        NODE_A_NAME,
        &["--cgroup", cgroup.path()],
    )
    .unwrap();
    let external: IpAddr = external.parse().unwrap();
    let cluster_ip: IpAddr = family.cluster_ip.parse().unwrap();
    let node_port = frontend_name(family.node, HTTP_NODE_PORT, "TCP");
    let node_port_udp = frontend_name(family.node, UDP_NODE_PORT, "UDP");
    let external_ip = frontend_name(external, 80, "TCP");
    // No local endpoint: the external frontends have no backend of their own.
    agent
        .wait_for(&[&node_port, &node_port_udp, &external_ip], 0)
        .unwrap();
    agent
        .wait_for(&[&frontend_name(cluster_ip, 80, "TCP")], 1)
        .unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);

    let pod_b = &topology.pods_b[0].name;
    let targets = [
        (
            SocketAddr::new(family.node, HTTP_NODE_PORT),
            SocketAddr::new(family.node, UDP_NODE_PORT),
        ),
        (SocketAddr::new(external, 80), SocketAddr::new(external, 53)),
    ];
    // Node A's pod, and a host-network process on node A.
    for ns in [&topology.pods_a[0].ns, &topology.node_a] {
        for (http, udp) in targets {
            for (mode, target) in [("tcp", http), ("udp", udp)] {
                let answers = probe(&cgroup, ns, mode, target, 3);
                assert_eq!(answers.len(), 3);
                for answer in &answers {
                    assert_eq!(
                        answer.peer,
                        target,
                        "{mode} from {}: {answers:?}",
                        ns.name()
                    );
                    assert!(
                        answer.body.starts_with(pod_b.as_str()),
                        "{mode} from {}: {answers:?}",
                        ns.name()
                    );
                }
            }
        }
    }
    // One flow per socket, under the frontend addressed (the cluster IP got none).
    assert_eq!(flows_and_packets(&agent, &node_port).0, 6);
    assert_eq!(flows_and_packets(&agent, &node_port_udp).0, 6);
    assert_eq!(flows_and_packets(&agent, &external_ip).0, 6);
    assert_eq!(
        flows_and_packets(&agent, &frontend_name(cluster_ip, 80, "TCP")).0,
        0
    );

    // From outside, through XDP: only local endpoints, and there are none.
    for (http, _) in targets {
        let error = http_request(&topology.client, http, "/").unwrap_err();
        assert!(
            format!("{error:#}").contains("timed out"),
            "{http} from the client: dropped, not refused: {error:#}"
        );
    }
}

#[test]
fn node_pods_and_processes_reach_a_local_policy_node_port_served_only_by_another_node() {
    short_circuit_of_local_traffic(&V4, "10.97.2.1");
}

#[test]
fn ipv6_node_pods_and_processes_reach_a_local_policy_node_port_served_only_by_another_node() {
    short_circuit_of_local_traffic(&V6, "fd00:97::2:1");
}

/// One endpoint of [`topology_keys_choose_the_nearest_endpoints_as_they_move`]: the pod, its
/// node, its zone and the region in its deprecatedTopology.
type Placed<'a> = (&'a Pod, &'a str, &'a str, Option<&'a str>);

/// `spec.topologyKeys` with real traffic: the documentation's fourth policy (hostname, zone,
/// region, `*`) on node A, whose Node is a manifest in the folder (zone za, region r1).
/// As the endpoints move away, the key that chooses moves down the list; the first policy
/// (hostname only) without endpoints on node A gets none.
#[test]
fn topology_keys_choose_the_nearest_endpoints_as_they_move() {
    let topology = TwoNodes::new(1, 3).unwrap();
    let folder = folder_with_xdp_tx(&topology);
    folder
        .write(
            "node.yaml",
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: \
             {topology.kubernetes.io/zone: za, topology.kubernetes.io/region: r1}\n",
        )
        .unwrap();
    let write = |endpoints: &[Placed<'_>]| {
        let mut yaml = String::new();
        for (name, ip, keys) in [
            (
                "near",
                "10.96.1.5",
                "[kubernetes.io/hostname, topology.kubernetes.io/zone, topology.kubernetes.io/region, '*']",
            ),
            ("here", "10.96.1.6", "[kubernetes.io/hostname]"),
        ] {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: \
                 {ip}, topologyKeys: {keys}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]}}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {HTTP_PORT}}}]\nendpoints:\n"
            );
            for (pod, node, zone, region) in endpoints {
                let region = region
                    .map(|r| {
                        format!(", deprecatedTopology: {{topology.kubernetes.io/region: {r}}}")
                    })
                    .unwrap_or_default();
                yaml += &format!(
                    "- {{addresses: [{}], nodeName: {node}, zone: {zone}{region}}}\n",
                    pod.ip
                );
            }
        }
        folder.write("services.yaml", &yaml).unwrap();
    };
    let (a1, b) = (&topology.pods_a[0], &topology.pods_b);
    // Everything on offer: node A's own pod.
    write(&[
        (a1, "node-a", "za", None),
        (&b[0], "node-b", "za", None),
        (&b[1], "node-b", "zb", Some("r1")),
    ]);
    let agent = start_on_a(&topology, &folder);
    let near = "10.96.1.5:80/TCP";
    let served_by = |want: &[&Pod]| {
        let backends: std::collections::BTreeSet<String> = want
            .iter()
            .map(|p| format!("{}:{HTTP_PORT}", p.ip))
            .collect();
        let want: Vec<String> = want.iter().map(|p| p.name.clone()).collect();
        agent
            .wait_until(&format!("{near} to select {want:?}"), |s| {
                lb_testbed::ServiceInfo::find(s, near).is_some_and(|r| r.selectable() == backends)
            })
            .unwrap();
        let mut served = std::collections::BTreeSet::new();
        for _ in 0..16 {
            served.insert(peer(&topology, "10.96.1.5:80".parse().unwrap()).0);
        }
        assert_eq!(served.into_iter().collect::<Vec<_>>(), want);
    };
    served_by(&[a1]);
    let here = lb_testbed::ServiceInfo::find(&agent.services().unwrap(), "10.96.1.6:80/TCP")
        .cloned()
        .unwrap();
    assert_eq!(here.backend_count, 1, "{here:?}");

    // None on node A: the zone (node B's pod in zone za).
    write(&[
        (&b[0], "node-b", "za", None),
        (&b[1], "node-b", "zb", Some("r1")),
    ]);
    served_by(&[&b[0]]);
    // None in zone za: the region (from deprecatedTopology).
    write(&[
        (&b[1], "node-b", "zb", Some("r1")),
        (&b[2], "node-b", "zc", Some("r2")),
    ]);
    served_by(&[&b[1]]);
    // None in region r1: any.
    write(&[
        (&b[1], "node-b", "zb", Some("r2")),
        (&b[2], "node-b", "zc", None),
    ]);
    served_by(&[&b[1], &b[2]]);
    // The hostname-only Service has no endpoint left for node A: none.
    let services = agent.services().unwrap();
    let here = lb_testbed::ServiceInfo::find(&services, "10.96.1.6:80/TCP").unwrap();
    assert_eq!(here.backend_count, 0, "{here:?}");

    // lb plan says which key chose, as the agent saw it.
    let out = std::process::Command::new(lb_bin())
        .args(["plan", "--node-name", NODE_A_NAME, "--manifests"])
        .arg(folder.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = |frontend: &str| {
        table
            .lines()
            .find(|l| l.starts_with(frontend))
            .unwrap_or_else(|| panic!("{frontend} in\n{table}"))
            .to_owned()
    };
    assert!(
        row("10.96.1.5:80/TCP").contains("Cluster topology=*"),
        "{table}"
    );
    assert!(
        row("10.96.1.6:80/TCP").contains("topology=(no key matched)"),
        "{table}"
    );

    // A combination the API server refuses: that Service is left out, named in the log;
    // the others stay programmed.
    folder
        .write(
            "refused.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: refused}\nspec: {type: NodePort, \
             clusterIP: 10.96.1.7, externalTrafficPolicy: Local, topologyKeys: ['*'], ports: \
             [{port: 80, nodePort: 30107}]}\n",
        )
        .unwrap();
    let error = "Service default/refused: spec.topologyKeys: Forbidden: may not be specified \
                 when `externalTrafficPolicy=Local`";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.log().contains(error) {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let services = agent.services().unwrap();
    assert!(lb_testbed::ServiceInfo::find(&services, "10.96.1.7:80/TCP").is_none());
    served_by(&[&b[1], &b[2]]);
}

/// Counts, on the LAN's bridge, the TCP and UDP frames from `from` to `to` that each node's
/// port forwards to the client's port: which node the replies leave from (neither node A's
/// neighbour discovery nor the frames the bridge floods before it knows a port are counted). Returns a reader of (from node A, from node B).
fn count_frames_to_client(
    topology: &TwoNodes,
    from: IpAddr,
    to: IpAddr,
) -> impl Fn() -> (u64, u64) + '_ {
    let ip = if from.is_ipv4() { "ip" } else { "ip6" };
    let matching = format!("{ip} saddr {from} {ip} daddr {to} meta l4proto {{ tcp, udp }}");
    let rules = format!(
        "table bridge lbtest {{\n  chain forward_c {{\n    type filter hook forward priority 0; policy accept;\n    \
         iifname \"to-a\" oifname \"to-client\" {matching} counter\n    \
         iifname \"to-b\" oifname \"to-client\" {matching} counter\n  }}\n}}\n"
    );
    let mut nft = topology
        .lan
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft");
    move || {
        let out = topology
            .lan
            .command("nft")
            .args(["list", "table", "bridge", "lbtest"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(counts.len(), 2, "{text}");
        (counts[0], counts[1])
    }
}

/// Direct server return of a NodePort Service over node B's pods (`how`: the annotation,
/// or the agent's flag), with lb on both nodes: node A carries the client's packets to
/// node B, the pods see the client's own address, and every reply leaves node B straight
/// to the client, from the frontend.
fn direct_server_return(family: &Family, by_annotation: bool) {
    let topology = TwoNodes::new(0, 2).unwrap();
    let folder = folder_with_xdp_tx(&topology);
    let remote: Vec<(&Pod, &str)> = topology.pods_b.iter().map(|p| (p, NODE_B_NAME)).collect();
    let mut yaml = nodeport_service("dsr", family.cluster_ip, HTTP_NODE_PORT, "Cluster", &remote);
    if by_annotation {
        yaml = yaml.replacen(
            "namespace: default}",
            "namespace: default, annotations: {lb.kube-lb.io/forwarding: dsr}}",
            1,
        );
    }
    folder.write("svc.yaml", &yaml).unwrap();
    let http = frontend_name(family.node, HTTP_NODE_PORT, "TCP");
    let udp = frontend_name(family.node, UDP_NODE_PORT, "UDP");
    let flag: &[&str] = if by_annotation {
        &[]
    } else {
        &["--forwarding", "dsr"]
    };
    let agent_a = Agent::start_on_node(
        &lb_bin(),
        &topology.node_a,
        folder.path(),
        NODE_IF,
        NODE_A_NAME,
        flag,
    )
    .unwrap();
    agent_a.wait_for(&[&http, &udp], 2).unwrap();
    // Node B's agent, as the DaemonSet's would be (no flag: every node unwraps carriers).
    let agent_b = Agent::start_on_node(
        &lb_bin(),
        &topology.node_b,
        folder.path(),
        "eth0",
        NODE_B_NAME,
        &[],
    )
    .unwrap();
    let node_b = if family.node.is_ipv4() {
        IpAddr::V4(NODE_B_IP)
    } else {
        IpAddr::V6(NODE_B_IP6)
    };
    agent_b
        .wait_for(&[&frontend_name(node_b, HTTP_NODE_PORT, "TCP")], 2)
        .unwrap();
    let services = agent_a.services().unwrap();
    let row = lb_testbed::ServiceInfo::find(&services, &http).unwrap();
    assert!(row.dsr, "{row:?}");
    if let (IpAddr::V4(client), IpAddr::V4(node)) = (family.client, family.node) {
        let explained = agent_a
            .explain(
                SocketAddrV4::new(client, 40_000),
                SocketAddrV4::new(node, HTTP_NODE_PORT),
                true,
            )
            .unwrap();
        assert!(
            explained
                .steps
                .iter()
                .any(|s| s.starts_with("forwarding dsr")),
            "{explained:?}"
        );
    }
    let replies = count_frames_to_client(&topology, family.node, family.client);

    let frontend = SocketAddr::new(family.node, HTTP_NODE_PORT);
    for _ in 0..16 {
        let (pod, seen) = peer(&topology, frontend);
        assert!(names(&topology.pods_b).contains(&pod), "{pod}");
        assert_eq!(
            seen.ip(),
            family.client,
            "no source NAT: the client's own address"
        );
    }
    // UDP: every reply comes from the frontend (udp_tally checks it), from both pods.
    let tally = udp_tally(&topology.client, family.node, UDP_NODE_PORT, 40).unwrap();
    ensure_all_served(&tally, &names(&topology.pods_b)).unwrap();

    // Where the replies left: node B's port, never node A's.
    let (from_a, from_b) = replies();
    assert_eq!(from_a, 0, "no reply through node A");
    assert!(from_b >= 16 * 2 + 40, "{from_b} replies from node B");
    // Node A carried (no NAT port, no reply to translate back); node B unwrapped.
    assert!(nat_counter(&topology, "dsr_sent") >= 16.0 * 3.0 + 40.0);
    assert_eq!(nat_counter(&topology, "nat_allocated"), 0.0);
    assert_eq!(nat_counter(&topology, "nat_replies"), 0.0);
    assert!(node_counter(&topology.node_b, "dsr_received") >= 16.0 * 3.0 + 40.0);
    assert_eq!(node_counter(&topology.node_b, "dsr_invalid"), 0.0);
}

#[test]
fn direct_server_return_replies_leave_the_backends_node_straight_to_the_client() {
    direct_server_return(&V4, true);
}

#[test]
fn ipv6_direct_server_return_replies_leave_the_backends_node_straight_to_the_client() {
    direct_server_return(&V6, false);
}
