//! What the agent needs and what it exposes: it works with CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN only; no port a Service does not declare is reachable through the datapath;
//! the operations endpoint is on localhost unless told otherwise.
//!
//! Needs root, network namespaces and bpffs (mounted if missing).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lb_testbed::agent::{CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, OPS_ADDR, metric, ops};
use lb_testbed::{
    Agent, Cgroup, ClusterIpService, Condition, Folder, HttpServer, NODE_IF, NODE_IP, Topology,
    ensure_all_served, http_get, http_request, http_tally, lb_bin, udp_request,
};

/// The capability sets of a process, from /proc/PID/status: (name, mask).
fn capabilities(pid: u32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(":\t")?;
            name.starts_with("Cap")
                .then(|| (name.to_owned(), u64::from_str_radix(value, 16).unwrap()))
        })
        .collect()
}

/// The whole agent, as deploy/daemonset.yaml runs it: XDP and TC on the node's interface, the
/// socket hooks on a cgroup (the DaemonSet's is the host's root), TC on the pods'
/// interfaces.
#[test]
fn the_agent_works_with_cap_bpf_cap_perfmon_and_cap_net_admin_only() {
    let topology = Topology::new(2).expect("topology");
    let folder = Folder::new().unwrap();
    let svc = ClusterIpService::http("web", [10, 96, 0, 10], 8080);
    let pods: Vec<_> = topology
        .pods
        .iter()
        .map(|p| (p, Condition::Ready))
        .collect();
    svc.write(&folder, &pods).unwrap();
    let cgroup = Cgroup::new().unwrap();
    let keep = [CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN];
    let agent = Agent::start_with_capabilities(
        &topology.node,
        folder.path(),
        NODE_IF,
        &["--cgroup", cgroup.path(), "--pod-interfaces", "veth-pod*"],
        &keep,
    )
    .unwrap();
    let mask = keep.iter().fold(0u64, |m, cap| m | 1 << cap);
    let caps = capabilities(agent.pid());
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert!(
            caps.contains(&(set.to_owned(), mask)),
            "{set} is exactly the three: {caps:x?}"
        );
    }
    assert!(caps.contains(&("CapAmb".to_owned(), 0)), "{caps:x?}");

    agent.wait_for(&[&svc.frontend()], 2).unwrap();
    // North-south, through XDP.
    let tally = http_tally(&topology.client, svc.cluster_ip, svc.port, 20).unwrap();
    ensure_all_served(&tally, &topology.pod_names()).unwrap();
    // A process in the hooked cgroup, through connect4 and getpeername4.
    let frontend = SocketAddr::from((svc.cluster_ip, svc.port));
    let out = cgroup
        .command(&topology.pods[0].ns, env!("CARGO_BIN_EXE_lb-probe"))
        .unwrap()
        .args(["tcp", &frontend.to_string(), "4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().count() == 4,
        "lb-probe: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(
        stdout
            .lines()
            .all(|l| l.starts_with(&format!("{frontend} pod"))),
        "{stdout}"
    );
    // A thread of this test in a pod (no hooked cgroup), through TC on the pod's interface
    // (the agent attaches it once it has seen the interface).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (body, peer) = loop {
        match http_get(&topology.pods[1].ns, svc.cluster_ip, svc.port) {
            Ok(answer) => break answer,
            Err(e) => assert!(
                Instant::now() < deadline,
                "pod2 -> {frontend}: {e:#}\n{}",
                agent.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(peer, frontend);
    assert!(topology.pod_names().contains(&body), "{body}");
    let (status, _) = ops(&topology.node, "/readyz").unwrap();
    assert_eq!(status, 200, "{}", agent.log());
    agent.ensure_running().unwrap();
}

const NODE_PORT: u16 = 30080;

/// web: ClusterIP 10.96.0.10 port 8080 and NodePort 30080 over the pods' port 80.
fn node_port_service(pods: &[Ipv4Addr]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|ip| format!("  - addresses: [{ip}]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {{name: http, protocol: TCP, \
         port: 8080, targetPort: 80, nodePort: {NODE_PORT}}}\n---\napiVersion: \
         discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: \
         default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- \
         {{name: http, protocol: TCP, port: 80}}\nendpoints:\n{endpoints}"
    )
}

#[test]
fn no_port_a_service_does_not_declare_reaches_its_backends() {
    let topology = Topology::new(2).expect("topology");
    let folder = Folder::new().unwrap();
    let ips: Vec<Ipv4Addr> = topology.pods.iter().map(|p| p.ip).collect();
    folder.write("web.yaml", &node_port_service(&ips)).unwrap();
    // Besides their HTTP server on 80 and UDP echo on 5353, the pods answer on every port
    // tried below: a packet the datapath sent to a pod would be answered.
    let tried = [8080, 8081, 30080, 30081];
    let _servers: Vec<HttpServer> = topology
        .pods
        .iter()
        .flat_map(|p| tried.map(|port| HttpServer::start(&p.ns, port, &p.name).unwrap()))
        .collect();
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).unwrap();
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    agent
        .wait_for(
            &["10.96.0.10:8080/TCP", &format!("{NODE_IP}:{NODE_PORT}/TCP")],
            2,
        )
        .unwrap();
    // The declared ones are served.
    for (addr, port) in [(cluster_ip, 8080), (NODE_IP, NODE_PORT)] {
        // 40 requests: with 10, both pods answer only 998 times in 1,000.
        let tally = http_tally(&topology.client, addr, port, 40).unwrap();
        ensure_all_served(&tally, &topology.pod_names()).unwrap();
    }
    let passed_before = not_frontend(&topology);

    // The pods' own port, other ports, the NodePort on the ClusterIP, the Service port and
    // other ports on the node address: not frontends, passed untouched, answered by no pod.
    let undeclared = [
        (cluster_ip, 80),
        (cluster_ip, 8081),
        (cluster_ip, NODE_PORT),
        (cluster_ip, 30081),
        (NODE_IP, 80),
        (NODE_IP, 8080),
        (NODE_IP, 8081),
        (NODE_IP, 30081),
    ];
    for (addr, port) in undeclared {
        let result = http_get(&topology.client, addr, port);
        assert!(result.is_err(), "{addr}:{port} answered: {result:?}");
    }
    for addr in [cluster_ip, NODE_IP] {
        let result = udp_request(&topology.client, addr, 5353, "hello");
        assert!(result.is_err(), "UDP {addr}:5353 answered: {result:?}");
    }
    let passed = not_frontend(&topology) - passed_before;
    assert!(
        passed >= undeclared.len() as f64,
        "every attempt counted as not a frontend: {passed}"
    );
    // No frontend was used by them.
    let services = agent.services().unwrap();
    assert_eq!(services.len(), 2, "{services:#?}");
}

/// Packets the datapath passed because they were for no frontend.
fn not_frontend(topology: &Topology) -> f64 {
    let (_, m) = ops(&topology.node, "/metrics").unwrap();
    metric(&m, "lb_datapath_events_total{event=\"not_frontend\"}").unwrap_or(0.0)
}

#[test]
fn the_operations_endpoint_listens_on_localhost_unless_told_otherwise() {
    let topology = Topology::new(1).expect("topology");
    let folder = Folder::new().unwrap();
    let svc = ClusterIpService::http("web", [10, 96, 0, 10], 8080);
    svc.write(&folder, &[(&topology.pods[0], Condition::Ready)])
        .unwrap();
    let port: u16 = OPS_ADDR.parse::<SocketAddr>().unwrap().port();
    let node = SocketAddr::from((NODE_IP, port));
    {
        let agent = Agent::start(&topology.node, folder.path(), NODE_IF).unwrap();
        agent.wait_for(&[&svc.frontend()], 1).unwrap();
        let (status, _) = ops(&topology.node, "/healthz").unwrap();
        assert_eq!(status, 200);
        // Not on the node's address: neither from the client nor from the node itself.
        for ns in [&topology.client, &topology.node] {
            let result = http_request(ns, node, "/metrics");
            assert!(result.is_err(), "{node} answered in {}", ns.name());
        }
    }
    // Told otherwise: on every address.
    let agent = Agent::start_with_args(
        &lb_bin(),
        &topology.node,
        folder.path(),
        NODE_IF,
        &["--metrics-addr", &format!("0.0.0.0:{port}")],
    )
    .unwrap();
    agent.wait_for(&[&svc.frontend()], 1).unwrap();
    let (status, body, _) = http_request(&topology.client, node, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}
