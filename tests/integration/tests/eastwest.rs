//! East-west: pods and host processes on the node reach ClusterIPs, through the socket hooks
//! (for processes in the hooked cgroup) and through the TC program on the pods' host-side
//! interfaces (for everything else), with the real `lb` agent. The socket hooks of IPv6
//! sockets are tested on the IPv6 topology (`Topology::add_ipv6`) with the dual-stack fixture,
//! and with IPv4 ClusterIPs addressed by their IPv4-mapped IPv6 addresses.
//!
//! The socket hooks go on a cgroup of the test's own (`lbt-<pid>-<n>-cgroup` under the cgroup2
//! root), never on the root: other tests use the same ClusterIPs at the same time. The
//! clients that must be hooked are processes (`lb-probe`) started in that cgroup.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_common::{ProgramSpec, program_names, schema::ProgramKind};
use lb_testbed::manifests::Condition;
use lb_testbed::{
    Agent, Cgroup, ClusterIpService, Folder, HttpServer, NODE_IF, Netns, Topology, UDP_PORT,
    UdpEchoServer, ensure_all_served, examples_dir, http_get, http_tally, lb_bin, udp_tally,
};

/// The HTTP ClusterIP of `examples/httpd-svc.yaml`.
const HTTP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HTTP_SERVICE_PORT: u16 = 8080;
/// The UDP ClusterIP of `examples/echo-udp.yaml`.
const UDP_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

/// One answer `lb-probe` printed: the peer or source address the application saw, and the
/// body or reply.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) peer: SocketAddr,
    pub(crate) body: String,
}

/// Runs `lb-probe MODE TARGET N` in `ns` and `cgroup`; panics with its error output unless
/// every request succeeded.
pub(crate) fn probe(
    cgroup: &Cgroup,
    ns: &Netns,
    mode: &str,
    target: SocketAddr,
    n: usize,
) -> Vec<Answer> {
    probe_result(cgroup, ns, mode, target, n).unwrap_or_else(|e| panic!("{e}"))
}

fn probe_result(
    cgroup: &Cgroup,
    ns: &Netns,
    mode: &str,
    target: SocketAddr,
    n: usize,
) -> Result<Vec<Answer>, String> {
    let out = cgroup
        .command(ns, env!("CARGO_BIN_EXE_lb-probe"))
        .map_err(|e| format!("{e:#}"))?
        .args([mode, &target.to_string(), &n.to_string()])
        .output()
        .expect("spawn lb-probe");
    if !out.status.success() {
        return Err(format!(
            "lb-probe {mode} {target} {n} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let (peer, body) = line.split_once(' ').expect("`<peer> <body>`");
            Answer {
                peer: peer.parse().expect("a socket address"),
                body: body.to_owned(),
            }
        })
        .collect())
}

/// Polls until `check` holds for the agent's pinned link names, for up to 10 s.
pub(crate) fn wait_for_links(agent: &Agent, what: &str, check: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        agent.ensure_running().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(agent.pin_path().join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if check(&names) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; links: {names:?}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The socket hooks of both families: connect, sendmsg, recvmsg and getpeername.
pub(crate) fn has_every_sock_link(names: &[String]) -> bool {
    let hooks = ["connect", "sendmsg", "recvmsg", "getpeername"];
    let want: Vec<String> = hooks
        .iter()
        .flat_map(|h| [format!("sock_{h}4@"), format!("sock_{h}6@")])
        .collect();
    names.iter().filter(|n| n.starts_with("sock_")).count() == want.len()
        && want.iter().all(|w| names.iter().any(|n| n.starts_with(w)))
}

/// The `new_flows` and `packets` counters `lb services` shows for `frontend`.
pub(crate) fn flows_and_packets(
    agent: &Agent,
    frontend: &str,
) -> (serde_json::Value, serde_json::Value) {
    let out = Command::new(lb_bin())
        .args(["services", "--output", "json", "--pin-path"])
        .arg(agent.pin_path())
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .iter()
        .find(|r| r["frontend"] == frontend)
        .unwrap_or_else(|| panic!("{frontend} not in {rows:?}"));
    (row["new_flows"].clone(), row["packets"].clone())
}

fn has_pod_link(names: &[String], interface: &str) -> bool {
    let prefix = format!("pod_ingress@{interface}#");
    names.iter().any(|n| n.starts_with(&prefix))
}

fn start_with_hooks(topology: &Topology, cgroup: &Cgroup, manifests: &Path) -> Agent {
    Agent::start_with_args(
        &lb_bin(),
        &topology.node,
        manifests,
        NODE_IF,
        &["--cgroup", cgroup.path()],
    )
    .unwrap()
}

#[test]
fn pods_and_host_processes_reach_a_cluster_ip_through_the_socket_hooks() {
    let topology = Topology::new(2).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, &examples_dir());
    agent.wait_for(&["10.96.0.10:8080/TCP"], 2).unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);

    let frontend = SocketAddr::from((HTTP_CLUSTER_IP, HTTP_SERVICE_PORT));
    let pods = topology.pod_names();
    // A pod, and a host-network process (in the node's namespace).
    for ns in [&topology.pods[0].ns, &topology.node] {
        let answers = probe(&cgroup, ns, "tcp", frontend, 20);
        assert_eq!(answers.len(), 20);
        for answer in &answers {
            // getpeername() shows the frontend, not the backend the socket connected to.
            assert_eq!(answer.peer, frontend, "{answers:?}");
            assert!(pods.contains(&answer.body), "{answers:?}");
        }
        // Each socket is a flow of its own: 20 sockets reach both pods.
        for pod in &pods {
            assert!(
                answers.iter().any(|a| &a.body == pod),
                "{pod} never answered from {}: {answers:?}",
                ns.name()
            );
        }
    }

    // The same pod, from a process outside the cgroup: nothing translates its connection
    // (the agent has no pod interfaces), so the ClusterIP is unreachable.
    let outside = http_get(&topology.pods[0].ns, HTTP_CLUSTER_IP, HTTP_SERVICE_PORT);
    assert!(outside.is_err(), "{outside:?}");

    // The socket path counts its flows (one per socket), and translates no packets.
    assert_eq!(
        flows_and_packets(&agent, "10.96.0.10:8080/TCP"),
        (40.into(), 0.into())
    );
}

/// kube-proxy serves the node's own processes and its pods on the NodePorts of the node's
/// addresses: the socket hooks translate those frontends too (a host process's packets to
/// the node's own address never reach XDP).
#[test]
fn pods_and_host_processes_reach_a_node_port_on_the_node_address_through_the_socket_hooks() {
    let topology = Topology::new(2).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, &examples_dir());
    let node_port = "10.200.0.1:30080/TCP";
    agent.wait_for(&[node_port], 2).unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);

    let frontend: SocketAddr = "10.200.0.1:30080".parse().unwrap();
    let pods = topology.pod_names();
    for ns in [&topology.pods[0].ns, &topology.node] {
        let answers = probe(&cgroup, ns, "tcp", frontend, 20);
        for answer in &answers {
            assert_eq!(answer.peer, frontend, "{answers:?}");
        }
        for pod in &pods {
            assert!(
                answers.iter().any(|a| &a.body == pod),
                "{pod} never answered through {frontend} from {}: {answers:?}",
                ns.name()
            );
        }
    }
    // Through the socket path: 40 flows, no packet translated.
    assert_eq!(flows_and_packets(&agent, node_port), (40.into(), 0.into()));
}

/// The DaemonSet mounts the host's /sys/fs/cgroup as it is and hooks it: on hybrid hosts
/// (these machines) that is cgroup v1's tmpfs with cgroup2 at `unified`, where the agent
/// finds the hierarchy itself.
#[test]
fn on_the_hybrid_cgroup_layout_the_socket_hooks_go_on_its_cgroup2_hierarchy() {
    let topology = Topology::new(2).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let hybrid = lb_testbed::cgroup::HybridLayout::new(&cgroup).unwrap();
    let agent = Agent::start_manifests_configured(
        &topology.node,
        &examples_dir(),
        NODE_IF,
        &["--cgroup", hybrid.path()],
        |cmd| hybrid.configure(cmd),
    )
    .unwrap();
    agent.wait_for(&["10.96.0.10:8080/TCP"], 2).unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);
    let log = agent.log();
    assert!(
        log.contains(&format!("{}/unified", hybrid.path())),
        "the log names the hierarchy hooked:\n{log}"
    );
    let frontend = SocketAddr::from((HTTP_CLUSTER_IP, HTTP_SERVICE_PORT));
    let answers = probe(&cgroup, &topology.node, "tcp", frontend, 10);
    for answer in &answers {
        assert_eq!(answer.peer, frontend, "{answers:?}");
        assert!(topology.pod_names().contains(&answer.body), "{answers:?}");
    }
}

/// The IPv6 ClusterIPs of `tests/fixtures/dual-stack` (HTTP, UDP echo), and one of a
/// Service without endpoints the tests add.
const HTTP_CLUSTER_IP6: &str = "fd00:96::20";
const UDP_CLUSTER_IP6: &str = "fd00:96::21";
const EMPTY_CLUSTER_IP6: &str = "fd00:96::30";
const STICKY_CLUSTER_IP6: &str = "fd00:96::31";

/// An IPv6-only ClusterIP Service of HTTP on port 80 (sessionAffinity ClientIP if
/// `sticky`) with its EndpointSlice of `endpoints` (ready, port 80, on this node).
fn v6_service(name: &str, cluster_ip: &str, sticky: bool, endpoints: &[&str]) -> String {
    let affinity = if sticky {
        "\n  sessionAffinity: ClientIP"
    } else {
        ""
    };
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  \
         ipFamilies: [IPv6]\n  clusterIPs: ['{cluster_ip}']{affinity}\n  ports:\n  \
         - {{name: http, port: 80, targetPort: 80, protocol: TCP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv6\nports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:"
    );
    if endpoints.is_empty() {
        yaml.push_str(" []");
    }
    for addr in endpoints {
        yaml.push_str(&format!(
            "\n- addresses: ['{addr}']\n  conditions: {{ready: true}}\n  nodeName: node"
        ));
    }
    yaml.push('\n');
    yaml
}

/// The dual-stack fixture, an IPv6 ClusterIP Service without endpoints and one with
/// sessionAffinity ClientIP over both pods.
fn dual_stack_folder() -> Folder {
    let folder = Folder::new().unwrap();
    let fixture =
        lb_testbed::agent::workspace_dir().join("tests/fixtures/dual-stack/dual-stack.yaml");
    folder
        .write(
            "dual-stack.yaml",
            &std::fs::read_to_string(fixture).unwrap(),
        )
        .unwrap();
    folder
        .write(
            "empty-v6.yaml",
            &v6_service("empty-v6", EMPTY_CLUSTER_IP6, false, &[]),
        )
        .unwrap();
    let pods = ["fd00:244:1::2", "fd00:244:2::2"];
    folder
        .write(
            "sticky-v6.yaml",
            &v6_service("sticky-v6", STICKY_CLUSTER_IP6, true, &pods),
        )
        .unwrap();
    folder
}

/// The topology with IPv6 (`Topology::add_ipv6`) and an agent on [`dual_stack_folder`]
/// hooking a cgroup of its own; dropped agent first, topology last.
struct DualStack {
    agent: Agent,
    cgroup: Cgroup,
    _folder: Folder,
    _servers: Vec<(HttpServer, UdpEchoServer)>,
    topology: Topology,
}

/// [`DualStack`], once the agent has programmed `frontend` with `backends` backends and
/// attached the eight socket hooks.
fn dual_stack_with_hooks(frontend: &str, backends: u32) -> DualStack {
    let topology = Topology::new(2).unwrap();
    let servers = topology.add_ipv6().unwrap();
    let folder = dual_stack_folder();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, folder.path());
    agent.wait_for(&[frontend], backends).unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);
    DualStack {
        agent,
        cgroup,
        _folder: folder,
        _servers: servers,
        topology,
    }
}

fn v6(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::from((addr.parse::<Ipv6Addr>().unwrap(), port))
}

#[test]
fn pods_and_host_processes_reach_an_ipv6_cluster_ip_through_the_socket_hooks() {
    let http = format!("[{HTTP_CLUSTER_IP6}]:{HTTP_SERVICE_PORT}/TCP");
    let bed = dual_stack_with_hooks(&http, 2);
    let (topology, cgroup, agent) = (&bed.topology, &bed.cgroup, &bed.agent);
    agent
        .wait_for(&[&format!("[{EMPTY_CLUSTER_IP6}]:80/TCP")], 0)
        .unwrap();

    let frontend = v6(HTTP_CLUSTER_IP6, HTTP_SERVICE_PORT);
    let pods = topology.pod_names();
    // A pod, and a host-network process: connect6 hands the socket a backend, getpeername6
    // shows the frontend.
    for ns in [&topology.pods[0].ns, &topology.node] {
        let answers = probe(cgroup, ns, "tcp", frontend, 20);
        assert_eq!(answers.len(), 20);
        for answer in &answers {
            assert_eq!(answer.peer, frontend, "{answers:?}");
            assert!(pods.contains(&answer.body), "{answers:?}");
        }
        for pod in &pods {
            assert!(
                answers.iter().any(|a| &a.body == pod),
                "{pod} never answered from {}: {answers:?}",
                ns.name()
            );
        }
    }
    // Outside the cgroup nothing translates (the agent has no pod interfaces).
    let outside = http_get(&topology.pods[0].ns, frontend.ip(), HTTP_SERVICE_PORT);
    assert!(outside.is_err(), "{outside:?}");
    // One flow per socket, no packets translated; the IPv4 frontend of the same Service
    // saw none of it.
    assert_eq!(flows_and_packets(agent, &http), (40.into(), 0.into()));
    assert_eq!(
        flows_and_packets(agent, "10.96.0.20:8080/TCP"),
        (0.into(), 0.into())
    );

    // No endpoints: connect() fails at once with ECONNREFUSED.
    let target = v6(EMPTY_CLUSTER_IP6, 80);
    let started = Instant::now();
    let error = probe_result(cgroup, &topology.pods[0].ns, "tcp", target, 1).unwrap_err();
    assert!(error.contains("Connection refused"), "{error}");
    assert!(started.elapsed() < lb_testbed::client::TIMEOUT, "{error}");
}

#[test]
fn an_ipv6_cluster_ip_with_session_affinity_keeps_each_namespace_on_one_backend() {
    let bed = dual_stack_with_hooks(&format!("[{STICKY_CLUSTER_IP6}]:80/TCP"), 2);
    let (topology, cgroup) = (&bed.topology, &bed.cgroup);
    let frontend = v6(STICKY_CLUSTER_IP6, 80);
    // The client is the socket's network namespace: every socket of a pod (or of the host)
    // gets the backend its first one got.
    for ns in [&topology.pods[0].ns, &topology.pods[1].ns, &topology.node] {
        let answers = probe(cgroup, ns, "tcp", frontend, 20);
        let served: std::collections::BTreeSet<&str> =
            answers.iter().map(|a| a.body.as_str()).collect();
        assert_eq!(served.len(), 1, "from {}: {answers:?}", ns.name());
        assert!(answers.iter().all(|a| a.peer == frontend), "{answers:?}");
    }
}

#[test]
fn udp_replies_read_as_coming_from_the_ipv6_cluster_ip() {
    let bed = dual_stack_with_hooks(&format!("[{UDP_CLUSTER_IP6}]:{UDP_PORT}/UDP"), 2);
    let (topology, cgroup) = (&bed.topology, &bed.cgroup);

    // sendmsg6 hands each datagram a backend, recvmsg6 shows the frontend as the source.
    let frontend = v6(UDP_CLUSTER_IP6, UDP_PORT);
    let answers = probe(cgroup, &topology.pods[1].ns, "udp", frontend, 20);
    assert_eq!(answers.len(), 20);
    let mut served = std::collections::BTreeSet::new();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.peer, frontend, "{answers:?}");
        let (pod, payload) = answer.body.split_once(':').expect("<pod>:<payload>");
        assert_eq!(payload, format!("probe-{i}"));
        served.insert(pod.to_owned());
    }
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        topology.pod_names(),
        "{answers:?}"
    );
}

#[test]
fn ipv6_sockets_reach_an_ipv4_cluster_ip_by_its_ipv4_mapped_address() {
    let topology = Topology::new(2).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, &examples_dir());
    agent
        .wait_for(&["10.96.0.10:8080/TCP", "10.96.0.12:5353/UDP"], 2)
        .unwrap();
    wait_for_links(&agent, "the eight socket hooks", has_every_sock_link);
    let mapped = |ip: Ipv4Addr, port| SocketAddr::from((ip.to_ipv6_mapped(), port));
    let pods = topology.pod_names();

    // TCP: connect6 translates through the IPv4 maps, getpeername6 shows the mapped
    // frontend.
    let frontend = mapped(HTTP_CLUSTER_IP, HTTP_SERVICE_PORT);
    let answers = probe(&cgroup, &topology.pods[0].ns, "tcp", frontend, 20);
    for pod in &pods {
        assert!(answers.iter().any(|a| &a.body == pod), "{answers:?}");
    }
    assert!(answers.iter().all(|a| a.peer == frontend), "{answers:?}");
    // UDP: the kernel sends the datagram on the IPv4 path (sendmsg4), recvmsg6 shows the
    // mapped frontend as the reply's source.
    let frontend = mapped(UDP_CLUSTER_IP, UDP_PORT);
    let answers = probe(&cgroup, &topology.pods[1].ns, "udp", frontend, 20);
    assert!(answers.iter().all(|a| a.peer == frontend), "{answers:?}");
    for pod in &pods {
        assert!(
            answers
                .iter()
                .any(|a| a.body.starts_with(&format!("{pod}:"))),
            "{answers:?}"
        );
    }
}

#[test]
fn udp_replies_read_as_coming_from_the_cluster_ip() {
    let topology = Topology::new(2).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, &examples_dir());
    agent.wait_for(&["10.96.0.12:5353/UDP"], 2).unwrap();

    let frontend = SocketAddr::from((UDP_CLUSTER_IP, UDP_PORT));
    let answers = probe(&cgroup, &topology.pods[1].ns, "udp", frontend, 20);
    assert_eq!(answers.len(), 20);
    let mut served = std::collections::BTreeSet::new();
    for (i, answer) in answers.iter().enumerate() {
        // recvfrom() shows the frontend as the reply's source.
        assert_eq!(answer.peer, frontend, "{answers:?}");
        let (pod, payload) = answer.body.split_once(':').expect("<pod>:<payload>");
        assert_eq!(payload, format!("probe-{i}"));
        served.insert(pod.to_owned());
    }
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        topology.pod_names(),
        "{answers:?}"
    );
}

#[test]
fn a_pod_reaches_a_service_backed_by_itself_and_an_empty_service_refuses() {
    let topology = Topology::new(2).unwrap();
    let folder = Folder::new().unwrap();
    let own = ClusterIpService::http("own", [10, 96, 5, 1], 80);
    own.write(&folder, &[(&topology.pods[0], Condition::Ready)])
        .unwrap();
    let empty = ClusterIpService::http("empty", [10, 96, 5, 2], 80);
    empty.write(&folder, &[]).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let agent = start_with_hooks(&topology, &cgroup, folder.path());
    agent.wait_for(&[&own.frontend()], 1).unwrap();
    agent.wait_for(&[&empty.frontend()], 0).unwrap();

    // Hairpin: pod1 to a Service whose only backend is pod1.
    let frontend = SocketAddr::from((own.cluster_ip, own.port));
    for answer in probe(&cgroup, &topology.pods[0].ns, "tcp", frontend, 5) {
        assert_eq!((answer.peer, answer.body.as_str()), (frontend, "pod1"));
    }

    // No endpoints: connect() fails at once with ECONNREFUSED, as kube-proxy's REJECT does.
    let target = SocketAddr::from((empty.cluster_ip, empty.port));
    let started = Instant::now();
    let error = probe_result(&cgroup, &topology.pods[0].ns, "tcp", target, 1).unwrap_err();
    assert!(error.contains("Connection refused"), "{error}");
    assert!(started.elapsed() < lb_testbed::client::TIMEOUT, "{error}");
}

#[test]
fn pod_interfaces_translate_what_the_socket_hooks_do_not_see() {
    let topology = Topology::new(2).unwrap();
    let folder = Folder::copy_of_examples().unwrap();
    let own = ClusterIpService::http("own", [10, 96, 5, 1], 80);
    own.write(&folder, &[(&topology.pods[0], Condition::Ready)])
        .unwrap();
    // No socket hooks at all: every client here is a thread of this test, in no hooked
    // cgroup.
    let agent = Agent::start_with_args(
        &lb_bin(),
        &topology.node,
        folder.path(),
        NODE_IF,
        &["--pod-interfaces", "veth-pod*"],
    )
    .unwrap();
    agent
        .wait_for(&["10.96.0.10:8080/TCP", "10.96.0.12:5353/UDP"], 2)
        .unwrap();
    agent.wait_for(&[&own.frontend()], 1).unwrap();
    wait_for_links(&agent, "veth-pod1 and veth-pod2", |names| {
        has_pod_link(names, "veth-pod1") && has_pod_link(names, "veth-pod2")
    });
    let pods = topology.pod_names();
    let client = &topology.pods[0].ns;

    // TCP: the DNAT on the client's interface, the reverse NAT of the replies on the
    // backend's.
    let (_, peer) = http_get(client, HTTP_CLUSTER_IP, HTTP_SERVICE_PORT).unwrap();
    assert_eq!(
        peer,
        SocketAddr::from((HTTP_CLUSTER_IP, HTTP_SERVICE_PORT)),
        "the client's socket sees the frontend"
    );
    let tally = http_tally(client, HTTP_CLUSTER_IP, HTTP_SERVICE_PORT, 20).unwrap();
    ensure_all_served(&tally, &pods).unwrap();
    // UDP: `udp_request` fails unless the reply comes from the frontend.
    let tally = udp_tally(client, UDP_CLUSTER_IP, UDP_PORT, 20).unwrap();
    ensure_all_served(&tally, &pods).unwrap();
    // Hairpin: pod1 to a Service whose only backend is pod1 (it sees the flow come from
    // lb_common::HAIRPIN_ADDR).
    for _ in 0..3 {
        let (body, peer) = http_get(client, own.cluster_ip, own.port).unwrap();
        assert_eq!(
            (body.as_str(), peer),
            ("pod1", (own.cluster_ip, own.port).into())
        );
    }

    // A pod that appears later gets the program (the agent follows netlink), and loses its
    // link when it goes.
    let pod3 = topology.add_pod(3).unwrap();
    wait_for_links(&agent, "veth-pod3's link", |names| {
        has_pod_link(names, "veth-pod3")
    });
    let (body, _) = http_get(&pod3.ns, HTTP_CLUSTER_IP, HTTP_SERVICE_PORT).unwrap();
    assert!(pods.contains(&body), "{body}");
    drop(pod3);
    wait_for_links(&agent, "veth-pod3's link to go", |names| {
        !has_pod_link(names, "veth-pod3") && has_pod_link(names, "veth-pod1")
    });
    // The others still work.
    let tally = http_tally(client, HTTP_CLUSTER_IP, HTTP_SERVICE_PORT, 4).unwrap();
    assert_eq!(tally.values().sum::<usize>(), 4);
}

/// The socket-hook programs the agent's last start logged as attached, with how (`Replaced`
/// or `Created`), once it has logged all `n`.
fn attached_hooks(agent: &Agent, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        agent.ensure_running().unwrap();
        let log = agent.log();
        let last = log.rsplit("--- exited").next().unwrap_or_default();
        let mut found: Vec<(String, String)> = last
            .lines()
            .filter(|l| l.contains("attached"))
            .filter_map(|l| {
                let field = |name: &str| {
                    let rest = l.split(&format!("{name}=")).nth(1)?;
                    Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
                };
                Some((field("program")?, field("outcome")?))
            })
            .filter(|(program, _)| socket_hooks().any(|p| p.name == program))
            .collect();
        found.sort();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} socket hooks to be attached:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The socket-hook programs.
fn socket_hooks() -> impl Iterator<Item = &'static ProgramSpec> {
    (program_names::ALL.iter()).filter(|p| matches!(p.kind, ProgramKind::CgroupSockAddr(_)))
}

/// Every socket hook of `families` (`4`, `6`) with `outcome`.
fn hooks(families: &[char], outcome: &str) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = socket_hooks()
        .filter(|p| families.iter().any(|f| p.name.ends_with(*f)))
        .map(|p| (p.name.to_owned(), outcome.to_owned()))
        .collect();
    all.sort();
    all
}

#[test]
fn restarts_replace_the_socket_hooks_and_an_ipv4_only_set_gets_the_ipv6_ones() {
    let mut bed =
        dual_stack_with_hooks(&format!("[{HTTP_CLUSTER_IP6}]:{HTTP_SERVICE_PORT}/TCP"), 2);
    let (topology, cgroup, agent) = (&bed.topology, &bed.cgroup, &mut bed.agent);
    let v6_frontend = v6(HTTP_CLUSTER_IP6, HTTP_SERVICE_PORT);
    let v4_frontend = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 20), HTTP_SERVICE_PORT));
    let reachable = |agent: &Agent| {
        for frontend in [v4_frontend, v6_frontend] {
            let answers = probe_result(cgroup, &topology.pods[0].ns, "tcp", frontend, 4)
                .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
            assert!(answers.iter().all(|a| a.peer == frontend), "{answers:?}");
        }
    };
    reachable(agent);

    // What an agent with only the IPv4 hooks leaves pinned: the IPv4 links. The next agent
    // replaces their programs and creates the IPv6 ones.
    agent.kill().unwrap();
    let links = agent.pin_path().join("links");
    for entry in std::fs::read_dir(&links).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("sock_") && name.contains("6@") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    agent.restart(&topology.node, &lb_bin(), &[]).unwrap();
    let mut expected = hooks(&['4'], "Replaced");
    expected.extend(hooks(&['6'], "Created"));
    expected.sort();
    assert_eq!(attached_hooks(agent, 8), expected);
    wait_for_links(agent, "the eight socket hooks", has_every_sock_link);
    reachable(agent);

    // A plain restart replaces all eight in place.
    agent.kill().unwrap();
    agent.restart(&topology.node, &lb_bin(), &[]).unwrap();
    assert_eq!(attached_hooks(agent, 8), hooks(&['4', '6'], "Replaced"));
    reachable(agent);

    // `lb teardown` removes them all: the IPv6 ClusterIP is unreachable again.
    agent.kill().unwrap();
    let out = Command::new(lb_bin())
        .arg("teardown")
        .arg("--pin-path")
        .arg(agent.pin_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!links.exists(), "{}", links.display());
    let error = probe_result(cgroup, &topology.pods[0].ns, "tcp", v6_frontend, 1).unwrap_err();
    assert!(error.contains("connect"), "{error}");
}

/// A ClusterIP Service of the IPv6 family whose only backend is pod1's IPv6 HTTP server.
const OWN6_YAML: &str = "\
apiVersion: v1
kind: Service
metadata: {name: own6}
spec:
  ipFamilies: [IPv6]
  clusterIPs: ['fd00:96::51']
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: own6
  labels: {kubernetes.io/service-name: own6}
addressType: IPv6
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: ['fd00:244:1::2']
  conditions: {ready: true}
  nodeName: node
";

#[test]
fn pod_interfaces_translate_ipv6_the_socket_hooks_do_not_see() {
    let topology = Topology::new(2).unwrap();
    let servers = topology.add_ipv6().unwrap();
    // The dual-stack fixture's Services (httpd-ds [fd00:96::20]:8080 and echo-v6
    // [fd00:96::21]:5353 over both pods), and own6 over pod1 alone.
    let folder = Folder::new().unwrap();
    let fixture =
        lb_testbed::agent::workspace_dir().join("tests/fixtures/dual-stack/dual-stack.yaml");
    folder
        .write(
            "dual-stack.yaml",
            &std::fs::read_to_string(fixture).unwrap(),
        )
        .unwrap();
    folder.write("own6.yaml", OWN6_YAML).unwrap();
    let agent = Agent::start_with_args(
        &lb_bin(),
        &topology.node,
        folder.path(),
        NODE_IF,
        &["--pod-interfaces", "veth-pod*", "--no-cgroup"],
    )
    .unwrap();
    agent
        .wait_for(&["[fd00:96::20]:8080/TCP", "[fd00:96::21]:5353/UDP"], 2)
        .unwrap();
    agent.wait_for(&["[fd00:96::51]:80/TCP"], 1).unwrap();
    wait_for_links(&agent, "veth-pod1 and veth-pod2", |names| {
        has_pod_link(names, "veth-pod1") && has_pod_link(names, "veth-pod2")
    });
    let pods = topology.pod_names();
    let client = &topology.pods[0].ns;
    let v6 = |s: &str| IpAddr::from(s.parse::<Ipv6Addr>().unwrap());

    // TCP: the DNAT on the client's interface (its packets are CHECKSUM_PARTIAL), the
    // reverse NAT of the replies on the backend's; the client's socket sees the frontend.
    let cluster_ip = v6("fd00:96::20");
    let (_, peer) =
        http_get(client, cluster_ip, 8080).unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    assert_eq!(peer, SocketAddr::from((cluster_ip, 8080)));
    let tally = http_tally(client, cluster_ip, 8080, 20).unwrap();
    ensure_all_served(&tally, &pods).unwrap();
    // UDP: `udp_request` fails unless the reply comes from the frontend.
    let tally = udp_tally(client, v6("fd00:96::21"), UDP_PORT, 20).unwrap();
    ensure_all_served(&tally, &pods).unwrap();
    // Hairpin: pod1 to a Service whose only backend is pod1 (it sees the flow come from
    // lb_common::HAIRPIN_ADDR6).
    let own = v6("fd00:96::51");
    for _ in 0..3 {
        let (body, peer) =
            http_get(client, own, 80).unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
        assert_eq!((body.as_str(), peer), ("pod1", (own, 80).into()));
    }
    drop(servers);
}
