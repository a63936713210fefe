//! The real `lb agent` in the test topology, fed a folder that changes under it and holds bad
//! input next to good input.

use lb_testbed::{
    agent::{Agent, backends_of, metric, ops},
    client::http_get,
    manifests::Folder,
    topology::{NODE_IF, Topology},
};

const CLUSTER_IP: &str = "10.96.0.10:8080/TCP";

#[test]
fn bad_input_is_reported_by_file_and_object_and_everything_else_is_programmed() {
    let folder = Folder::copy_of_examples().unwrap();
    folder
        .write(
            "zz-bad.yaml",
            r#"apiVersion: v1
kind: Service
metadata: {name: port-out-of-range}
spec:
  clusterIP: 10.96.1.1
  ports: [{name: http, port: 70000, targetPort: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: not-an-ip, namespace: shop}
spec:
  clusterIP: 10.96.1.300
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpd}
---
this: is: not: yaml
"#,
        )
        .unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let all: Vec<&str> = lb_testbed::testbed::EXAMPLE_FRONTENDS.to_vec();
    agent
        .wait_for(&all, 2)
        .expect("the good manifests are programmed");

    let log = agent.log();
    for expected in [
        "zz-bad.yaml",
        "port-out-of-range",
        "70000",
        "shop/not-an-ip",
        "10.96.1.300",
        "Deployment",
    ] {
        assert!(log.contains(expected), "the log names {expected:?}:\n{log}");
    }
    let services = agent.services().unwrap();
    assert_eq!(
        services.len(),
        all.len(),
        "nothing from the bad file: {services:#?}"
    );
    let (body, _) = http_get(&topology.client, [10, 96, 0, 10], 8080).expect("ClusterIP works");
    assert!(body.starts_with("pod"), "{body}");
}

#[test]
fn the_agent_follows_edits_to_the_folder() {
    let folder = Folder::copy_of_examples().unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    agent.wait_for(&[CLUSTER_IP], 2).expect("programmed");

    // pod2 leaves httpd-svc's EndpointSlice: new connections only reach pod1.
    let text = folder.read("httpd-svc.yaml").unwrap();
    let pod2 = topology.pods[1].ip.to_string();
    assert!(text.contains(&pod2), "examples/httpd-svc.yaml lists {pod2}");
    let without_pod2: String = remove_endpoint(&text, &pod2);
    folder.write("httpd-svc.yaml", &without_pod2).unwrap();
    agent
        .wait_until("pod2 to leave the ClusterIP", |s| {
            backends_of(s, CLUSTER_IP).is_some_and(|b| b.len() == 1)
        })
        .unwrap();
    for _ in 0..10 {
        let (body, _) = http_get(&topology.client, [10, 96, 0, 10], 8080).unwrap();
        assert_eq!(body.trim(), topology.pods[0].name, "only pod1 serves now");
    }

    // A whole file removed: its frontend goes; restored: it comes back.
    let udp = folder.read("echo-udp.yaml").unwrap();
    folder.remove("echo-udp.yaml").unwrap();
    agent
        .wait_until("the UDP frontend to go", |s| {
            backends_of(s, "10.96.0.12:5353/UDP").is_none()
        })
        .unwrap();
    folder.write("echo-udp.yaml", &udp).unwrap();
    agent
        .wait_until("the UDP frontend to return", |s| {
            backends_of(s, "10.96.0.12:5353/UDP").is_some_and(|b| b.len() == 2)
        })
        .unwrap();
    // The ClusterIP kept its state throughout.
    assert_eq!(
        backends_of(&agent.services().unwrap(), CLUSTER_IP)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn the_deprecated_annotation_prefix_still_works_and_is_logged_once_per_service() {
    let folder = Folder::copy_of_examples().unwrap();
    let annotate = |text: &str, annotation: &str| {
        text.replacen(
            "  name: httpd-svc\n",
            &format!("  name: httpd-svc\n  annotations: {{{annotation}}}\n"),
            1,
        )
    };
    let original = folder.read("httpd-svc.yaml").unwrap();
    let old = annotate(&original, "lb.example.io/selection: random");
    assert_ne!(old, original, "examples/httpd-svc.yaml names httpd-svc");
    folder.write("httpd-svc.yaml", &old).unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let random = |s: &[lb_testbed::ServiceInfo]| {
        lb_testbed::ServiceInfo::find(s, CLUSTER_IP).is_some_and(|r| r.selection == "random")
    };
    agent
        .wait_until("the old annotation's selection", random)
        .unwrap();
    // Translated again and again (its EndpointSlice changes): still one warning.
    let pod2 = topology.pods[1].ip.to_string();
    for i in 0..3 {
        let text = if i % 2 == 0 {
            remove_endpoint(&old, &pod2)
        } else {
            old.clone()
        };
        folder.write("httpd-svc.yaml", &text).unwrap();
        let want = if i % 2 == 0 { 1 } else { 2 };
        agent
            .wait_until("the slice change", |s| {
                backends_of(s, CLUSTER_IP).is_some_and(|b| b.len() == want)
            })
            .unwrap();
    }
    let warning = "default/httpd-svc: annotation lb.example.io/selection is deprecated: rename it \
                   to lb.kube-lb.io/selection";
    let log = agent.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    // The new prefix: no warning, same effect.
    folder
        .write(
            "httpd-svc.yaml",
            &annotate(&original, "lb.kube-lb.io/selection: random"),
        )
        .unwrap();
    agent
        .wait_until("the new annotation's selection", random)
        .unwrap();
    assert_eq!(agent.log().matches("deprecated").count(), 1);
}

/// The documentation's application folder as it is (a Deployment, a Service without
/// clusterIP and nodePort, its EndpointSlice): the agent skips the Deployment, allocates what
/// an API server would, and serves the Service on both; a restarted agent allocates the same.
#[test]
fn an_application_folder_works_as_it_is() {
    let dir = lb_testbed::agent::workspace_dir().join("tests/fixtures/httpd-app");
    let folder = Folder::copy_of(&dir).unwrap();
    let topology = Topology::new(2).expect("topology");
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let log_has = |agent: &Agent, what: &str| agent.log().contains(what);
    let services = agent
        .wait_until("the Service's two frontends", |s| s.len() == 2)
        .unwrap();
    let frontends: Vec<String> = services.iter().map(|s| s.frontend.clone()).collect();
    for s in &services {
        assert_eq!(s.selectable().len(), 2, "{s:?}");
        let (addr, port) = s
            .frontend
            .strip_suffix("/TCP")
            .unwrap()
            .rsplit_once(':')
            .unwrap();
        let addr: std::net::Ipv4Addr = addr.parse().unwrap();
        let port: u16 = port.parse().unwrap();
        let note = if addr == lb_testbed::NODE_IP {
            format!("spec.ports[0].nodePort {port} allocated from 30000-32767")
        } else {
            format!("spec.clusterIPs[0] {addr} allocated from 10.96.0.0/12")
        };
        assert!(log_has(&agent, &note), "{note}: {}", agent.log());
        let tally = lb_testbed::http_tally(&topology.client, addr, port, 20).unwrap();
        lb_testbed::ensure_all_served(&tally, &topology.pod_names()).unwrap();
    }
    assert!(log_has(&agent, "Deployment default/httpd: skipped"));
    assert!(!agent.log().contains("ERROR"), "{}", agent.log());

    agent.stop().unwrap();
    agent
        .restart(&topology.node, &lb_testbed::lb_bin(), &[])
        .unwrap();
    let again = agent
        .wait_until("the same frontends after a restart", |s| {
            s.iter().map(|s| s.frontend.clone()).collect::<Vec<_>>() == frontends
        })
        .unwrap();
    assert_eq!(again.len(), 2);
}

/// `lb services` and `lb stats` name each frontend by its Service port and kind, as the
/// examples define them.
#[test]
fn lb_services_and_lb_stats_name_every_frontend() {
    let folder = Folder::copy_of_examples().unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let all = lb_testbed::testbed::EXAMPLE_FRONTENDS;
    agent.wait_for(all, 2).expect("programmed");
    let want = |frontend: &str| match frontend {
        "10.96.0.10:8080/TCP" => ("default/httpd-svc:http", "ClusterIp"),
        "10.96.0.11:8080/TCP" => ("default/httpd-nodeport:http", "ClusterIp"),
        "10.200.0.1:30080/TCP" => ("default/httpd-nodeport:http", "NodePort"),
        "10.96.0.12:5353/UDP" => ("default/echo-udp:echo", "ClusterIp"),
        "10.96.0.13:80/TCP" => ("default/httpd-lb:http", "ClusterIp"),
        "10.200.0.1:30081/TCP" => ("default/httpd-lb:http", "NodePort"),
        "10.97.0.1:80/TCP" => ("default/httpd-lb:http", "ExternalIp"),
        "10.98.0.1:80/TCP" => ("default/httpd-lb:http", "LoadBalancer"),
        other => panic!("unexpected frontend {other}"),
    };
    let services = agent.services().unwrap();
    assert_eq!(services.len(), all.len());
    for s in &services {
        let (service, kind) = want(&s.frontend);
        assert_eq!(
            (s.service.as_deref(), s.kind.as_deref()),
            (Some(service), Some(kind)),
            "{s:?}"
        );
    }
    // The tables say it too.
    let run = |command: &str| {
        let out = lb_testbed::netns::run(
            std::process::Command::new(agent.lb())
                .args([command, "--pin-path"])
                .arg(agent.pin_path()),
        )
        .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run("services");
    let row = table
        .lines()
        .find(|l| l.starts_with("10.98.0.1:80/TCP"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("default/httpd-lb:http") && row.contains("LoadBalancer"),
        "{table}"
    );
    let stats = run("stats");
    let row = stats
        .lines()
        .find(|l| l.trim_start().starts_with("10.200.0.1:30080/TCP"))
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(
        row.ends_with("default/httpd-nodeport:http (NodePort)"),
        "{stats}"
    );
}

/// `lb stats` counts each backend's connections per frontend, as ipvsadm does per virtual
/// and real server: the ClusterIP and the NodePort of one Service share their backends, and
/// connections to the ClusterIP do not show under the NodePort.
#[test]
fn lb_stats_counts_a_shared_backend_apart_under_each_frontend() {
    let folder = Folder::copy_of_examples().unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    agent
        .wait_for(lb_testbed::testbed::EXAMPLE_FRONTENDS, 2)
        .expect("programmed");
    let (cluster_ip, node_port) = ("10.96.0.11:8080/TCP", "10.200.0.1:30080/TCP");
    let services = agent.services().unwrap();
    assert_eq!(
        backends_of(&services, cluster_ip),
        backends_of(&services, node_port),
        "the two frontends share their backends"
    );
    // (the flows it gave its backends, its own packets)
    let conns = |frontend: &str| -> (u64, u64) {
        let report = agent.stats().unwrap();
        let row = (report["frontends"].as_array().unwrap().iter())
            .find(|f| f["frontend"] == frontend)
            .unwrap_or_else(|| panic!("{frontend} in {report:#}"));
        let backends = row["backends"].as_array().unwrap();
        assert_eq!(backends.len(), 2, "{row:#}");
        let flows = (backends.iter())
            .map(|b| b["new_flows"].as_u64().unwrap())
            .sum();
        (flows, row["packets"].as_u64().unwrap())
    };
    for _ in 0..6 {
        http_get(&topology.client, [10, 96, 0, 11], 8080).expect("ClusterIP");
    }
    let (flows, packets) = conns(cluster_ip);
    assert_eq!(flows, 6, "the ClusterIP's connections under the ClusterIP");
    assert!(packets >= 6 * 3, "{packets} packets");
    assert_eq!(
        conns(node_port),
        (0, 0),
        "nothing under the NodePort, which had no traffic"
    );
    // The backends' totals hold the ClusterIP's packets, each backend once.
    let report = agent.stats().unwrap();
    let totals: u64 = (report["backends"].as_array().unwrap().iter())
        .map(|b| b["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(totals, packets, "{report:#}");
    for _ in 0..3 {
        http_get(&topology.client, [10, 200, 0, 1], 30080).expect("NodePort");
    }
    assert_eq!(conns(node_port).0, 3, "the NodePort's own connections");
    assert_eq!(conns(cluster_ip).0, 6, "the ClusterIP's unchanged");
}

#[test]
fn the_manifests_agent_serves_metrics_and_readiness() {
    let folder = Folder::copy_of_examples().unwrap();
    let topology = Topology::new(2).expect("topology");
    let agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let all = lb_testbed::testbed::EXAMPLE_FRONTENDS;
    agent.wait_for(all, 2).expect("programmed");
    let ready = || ops(&topology.node, "/readyz").unwrap();
    assert_eq!(ready(), (200, "ok\n".to_owned()));
    assert_eq!(ops(&topology.node, "/healthz").unwrap().0, 200);
    let (_, m) = ops(&topology.node, "/metrics").unwrap();
    assert_eq!(metric(&m, "lb_frontends"), Some(all.len() as f64), "{m}");
    assert_eq!(
        metric(&m, "lb_backends"),
        Some(4.0),
        "two pods, HTTP and UDP: {m}"
    );
    assert_eq!(metric(&m, "lb_source_up"), Some(1.0), "{m}");
    // The datapath's counters, read from the pinned maps at the scrape.
    let (served, _) = http_get(
        &topology.client,
        std::net::Ipv4Addr::new(10, 96, 0, 10),
        8080,
    )
    .expect("request through the ClusterIP");
    assert!(served.starts_with("pod"), "{served}");
    let (_, m) = ops(&topology.node, "/metrics").unwrap();
    let packets = metric(
        &m,
        &format!("lb_frontend_packets_total{{frontend=\"{CLUSTER_IP}\"}}"),
    );
    assert!(packets.is_some_and(|p| p >= 1.0), "{m}");
    assert!(
        metric(&m, "lb_conntrack_entries").is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert!(
        m.contains("lb_backend_new_flows_total{backend=\"10.244."),
        "{m}"
    );
    let pair_flows: f64 = (m.lines())
        .filter(|l| {
            l.starts_with(&format!(
                "lb_frontend_backend_new_flows_total{{frontend=\"{CLUSTER_IP}\""
            ))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        pair_flows, 1.0,
        "the request's flow under its frontend: {m}"
    );

    // The folder gone: not ready, the maps kept; back: ready.
    let moved = folder.path().with_extension("moved");
    std::fs::rename(folder.path(), &moved).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(70);
    while ready().0 != 503 {
        // Without file events for the removed folder, the periodic resync notices.
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(ready().1.contains("disconnected"), "{:?}", ready());
    assert_eq!(agent.services().unwrap().len(), all.len());
    std::fs::rename(&moved, folder.path()).unwrap();
}

/// `text` without the EndpointSlice endpoint whose address is `ip` (the example files list
/// each endpoint as a `- addresses: [<ip>]` item followed by more deeply indented fields).
fn remove_endpoint(text: &str, ip: &str) -> String {
    let mut out = Vec::new();
    let mut skipping: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(item_indent) = skipping {
            if indent > item_indent && !line.trim_start().starts_with("- ") {
                continue;
            }
            skipping = None;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("- addresses") && trimmed.contains(ip) {
            skipping = Some(indent);
            continue;
        }
        out.push(line);
    }
    let result = out.join("\n");
    assert!(!result.contains(ip), "removed {ip} from:\n{result}");
    result
}

/// `ip netns exec` gives the agent a fresh /sys in a mount namespace of its own: a bpffs it
/// mounted at /sys/fs/bpf would die with it, and every pin and link in it. It refuses, saying
/// why and what to do, and pins nothing.
#[test]
fn under_ip_netns_exec_the_agent_refuses_a_bpffs_that_would_die_with_it() {
    let topology = Topology::new(1).expect("topology");
    let pins = lb_testbed::PinDir::new().expect("pin directory");
    std::fs::remove_dir(pins.path()).expect("the agent's pin directory starts missing");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", topology.node.name()])
        .arg(lb_testbed::lb_bin())
        .args([
            "agent",
            "--no-cgroup",
            "--interface",
            NODE_IF,
            "--manifests",
        ])
        .arg(lb_testbed::examples_dir())
        .arg("--pin-path")
        .arg(pins.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip netns exec lb agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the agent ran on a bpffs of its own mount namespace:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    for said in [
        "would die with it",
        "mount namespace (mnt:[",
        "ip netns exec",
        "nsenter --net=/run/netns/NAME",
        "mount -t bpf bpf /sys/fs/bpf",
    ] {
        assert!(stderr.contains(said), "the error says {said:?}:\n{stderr}");
    }
    assert!(!pins.path().exists(), "nothing pinned on the host");
}

/// The interfaces of the agent's pinned links of external interfaces (`xdp_ingress@IF`,
/// `tc_egress@IF`); `None` while some has one without the other.
fn external_links(agent: &Agent) -> Option<Vec<String>> {
    let names: std::collections::BTreeSet<String> =
        std::fs::read_dir(agent.pin_path().join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    let with = |prefix: &str| -> std::collections::BTreeSet<String> {
        names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix).map(str::to_owned))
            .collect()
    };
    let (xdp, tc) = (with("xdp_ingress@"), with("tc_egress@"));
    (xdp == tc).then(|| xdp.into_iter().collect())
}

/// Polls until the agent's external interfaces are `want`, for up to 10 s.
fn wait_for_externals(agent: &Agent, want: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        agent.ensure_running().unwrap();
        let found = external_links(agent);
        if found.as_ref().is_some_and(|f| f == want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "external interfaces {found:?}, not {want:?}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A client namespace behind a new external interface `dev` of the node, on 10.`net`.0.0/24:
/// the node 10.`net`.0.1, the client 10.`net`.0.2 (default route via the node).
fn external_client(topology: &Topology, dev: &str, net: u8) -> lb_testbed::Netns {
    let client = lb_testbed::Netns::new("client").unwrap();
    topology.node.veth(dev, &client, "eth0").unwrap();
    topology
        .node
        .addr(dev, &format!("10.{net}.0.1/24"))
        .unwrap();
    client.addr("eth0", &format!("10.{net}.0.2/24")).unwrap();
    client.default_route(&format!("10.{net}.0.1")).unwrap();
    client.tx_checksum_off("eth0").unwrap();
    client
}

/// The NodePort of `examples/httpd-svc.yaml` on `node_ip`, from `client`: served by a pod.
fn node_port_served(client: &lb_testbed::Netns, node_ip: [u8; 4]) {
    let (body, _) = http_get(client, node_ip, 30080)
        .unwrap_or_else(|e| panic!("NodePort {node_ip:?}:30080: {e:#}"));
    assert!(body.starts_with("pod"), "{body}");
}

/// Without --interface the agent finds the node's external interfaces: those that hold the
/// node's addresses (here --node-ip's), several at once, followed as they come and go.
#[test]
fn the_interfaces_holding_the_node_addresses_are_found_and_followed() {
    let topology = Topology::new(2).expect("topology");
    let client2 = external_client(&topology, "eth1", 201);
    let agent = Agent::start_configured(
        &topology.node,
        &[
            "--manifests",
            lb_testbed::examples_dir().to_str().unwrap(),
            "--node-name",
            lb_testbed::NODE_NAME,
            "--node-ip",
            "10.200.0.1",
            "--node-ip",
            "10.201.0.1",
            "--node-ip",
            "10.202.0.1",
        ],
        |_| {},
    )
    .expect("agent");
    wait_for_externals(&agent, &["eth0", "eth1"]);
    // The links are pinned before the first view is programmed.
    agent.wait_ops(&topology.node, "/readyz", "ready", |status, _| {
        status == 200
    });
    node_port_served(&topology.client, [10, 200, 0, 1]);
    node_port_served(&client2, [10, 201, 0, 1]);

    // An interface that comes with a node address is attached; gone, its links go.
    let client3 = external_client(&topology, "eth2", 202);
    wait_for_externals(&agent, &["eth0", "eth1", "eth2"]);
    node_port_served(&client3, [10, 202, 0, 1]);
    topology.node.ip(&["link", "del", "eth2"]).unwrap();
    wait_for_externals(&agent, &["eth0", "eth1"]);
    // The address leaving an interface takes the interface out too.
    topology
        .node
        .ip(&["addr", "del", "10.201.0.1/24", "dev", "eth1"])
        .unwrap();
    wait_for_externals(&agent, &["eth0"]);
    node_port_served(&topology.client, [10, 200, 0, 1]);
}

/// With no node address named, the interface of the default route; `--interface`,
/// repeatable, overrides.
#[test]
fn the_default_route_interface_else_those_named() {
    let topology = Topology::new(2).expect("topology");
    let client2 = external_client(&topology, "eth1", 201);
    topology.node.default_route("10.201.0.2").unwrap();
    let examples = lb_testbed::examples_dir();
    let examples = examples.to_str().unwrap();
    let base = [
        "--manifests",
        examples,
        "--node-name",
        lb_testbed::NODE_NAME,
    ];
    let agent = Agent::start_configured(&topology.node, &base, |_| {}).expect("agent");
    wait_for_externals(&agent, &["eth1"]);
    // NodePorts on its address.
    agent
        .wait_for(&["10.201.0.1:30080/TCP"], 2)
        .expect("a NodePort on the default route's interface's address");
    node_port_served(&client2, [10, 201, 0, 1]);
    drop(agent);

    let mut named = base.to_vec();
    named.extend(["--interface", "eth1", "--interface", NODE_IF]);
    let agent = Agent::start_configured(&topology.node, &named, |_| {}).expect("agent");
    wait_for_externals(&agent, &[NODE_IF, "eth1"]);
    agent
        .wait_for(&["10.200.0.1:30080/TCP", "10.201.0.1:30080/TCP"], 2)
        .expect("NodePorts on both interfaces' addresses");
    node_port_served(&topology.client, [10, 200, 0, 1]);
    node_port_served(&client2, [10, 201, 0, 1]);
}

/// Container runtimes mount /proc/sys read-only: the agent reads `accept_local` first and
/// writes it only when it must; when it cannot, it runs without it and names the sysctl and
/// the host setting that gives it.
#[test]
fn a_read_only_proc_sys_stops_nothing_and_the_sysctl_is_named() {
    let topology = Topology::new(2).expect("topology");
    let sysctl = format!("net/ipv4/conf/{NODE_IF}/accept_local");
    let host_setting = format!("sysctl -w net.ipv4.conf.{NODE_IF}.accept_local=1");
    let examples = lb_testbed::examples_dir();
    for set_on_host in ["0", "1"] {
        topology.node.sysctl(&sysctl, set_on_host).unwrap();
        let agent = Agent::start_manifests_configured(
            &topology.node,
            &examples,
            NODE_IF,
            &[],
            lb_testbed::agent::read_only_proc_sys,
        )
        .expect("agent");
        agent.wait_for(&[CLUSTER_IP], 2).expect("programmed");
        node_port_served(&topology.client, [10, 200, 0, 1]);
        agent.ensure_running().unwrap();
        let log = agent.log();
        // Unset, it cannot be written: a warning names it. Set, it is only read.
        assert_eq!(
            log.contains(&host_setting),
            set_on_host == "0",
            "accept_local {set_on_host} on the host; agent log:\n{log}"
        );
        if set_on_host == "0" {
            assert!(log.contains("Read-only file system"), "{log}");
        }
    }
}
