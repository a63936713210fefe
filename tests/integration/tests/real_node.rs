//! lb replacing kube-proxy on a real node: kubelet + containerd + the bridge CNI, no
//! kube-proxy (`lb_testbed::k8s::node`), the agent's image built from the tested binary the way
//! `cargo xtask image` builds it, deployed with `kubectl apply -k` of an overlay of deploy/
//! that changes only the image and the ConfigMap's `api-server`.
//!
//! The documentation's example — Deployment `httpd` (2 replicas, port 80) and Service
//! `httpd-svc` (NodePort, 8080 → 80) — is answered by both pods from an outside client (a
//! network namespace), from a pod and from a host process, through the ClusterIP and the
//! NodePort on the node's address; `kubectl rollout restart` of the DaemonSet under a
//! request loop fails no request; scaling 2 → 3 → 1 is followed; the Service deleted, nothing
//! answers. Measured and printed: the time from `kubectl apply -k` to the first request
//! served through the ClusterIP on a fresh node, the agent pod's peak memory (its memory
//! cgroup), the failed requests during the rollout restart.
//!
//! The cluster has a Service range (10.112.0.0/16) and a pod range (10.124.0.0/16) that no
//! other test uses: the DaemonSet puts the socket hooks on the machine's cgroup2 root, where
//! every process on the machine meets them.
//!
//! The outside client's requests go to an alias of the frontend that its namespace's iptables
//! turn into the frontend ([`alias`]): every process of the test runs under the machine's
//! cgroup2 root, where the DaemonSet's socket hooks would otherwise translate them before
//! they leave, and the packets would never meet XDP.
//!
//! Issue 15's fixes this test found, one behind the other: the interface (item 7), map memory
//! (1), the read-only /proc/sys (2), the API server address (4), the NodePort replies through
//! cni0 (5), host → NodePort (6); and after `kubectl rollout restart`, the new pod's
//! adoption of the Maglev tables, which opened them by id (CAP_SYS_ADMIN only).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, Service};
use lb_testbed::agent::{lb_bin, services, workspace_dir};
use lb_testbed::client::http_request;
use lb_testbed::k8s::node::{Node, NodeConfig};
use lb_testbed::k8s::{API_IP, API_PORT, Config, ControlPlane, Kube, ScratchDir, run_dir};
use lb_testbed::netns::{Netns, unique_name};
use serde_json::json;

const NODE: &str = "node-a";
/// Not eth0: the DaemonSet must find the node's interface (issue 15, item 7).
const NODE_IF: &str = "ens-lbt";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 112, 0, 10);
const NODE_PORT: u16 = 30080;
const LB_IMAGE: &str = "lb-tests/lb:dev";
/// Where the DaemonSet pins its maps and links (deploy/daemonset.yaml).
const PIN_PATH: &str = "/sys/fs/bpf/lb";

/// `lb teardown` of the DaemonSet's pins on drop (the agent's programs outlive its pod).
struct Pins;

impl Drop for Pins {
    fn drop(&mut self) {
        let out = Command::new(lb_bin())
            .args(["teardown", "--pin-path", PIN_PATH])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cleanup: lb teardown: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cleanup: lb teardown: {e}"),
        }
    }
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs kubectl with the admin kubeconfig; its stdout, or a panic with its output.
fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args(args)
        .output()
        .expect("kubectl (cargo xtask setup installs one)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `to` relative to `from` (both absolute directories).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for c in &to[common..] {
        path.push(c);
    }
    path
}

/// The overlay of deploy/ that the test applies: the image and `api-server`, nothing else.
fn overlay(dir: &Path) -> PathBuf {
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let deploy = relative(&overlay, &workspace_dir().join("deploy"));
    let (name, tag) = LB_IMAGE.split_once(':').unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{}]\n\
             images:\n  - {{name: ghcr.io/example/lb, newName: {name}, newTag: {tag}}}\n\
             configMapGenerator:\n  - name: lb-config\n    namespace: kube-system\n    \
             behavior: merge\n    literals: [api-server=https://{API_IP}:{API_PORT}]\n",
            deploy.display()
        ),
    )
    .unwrap();
    overlay
}

/// The agent's image, as `cargo xtask image` builds it, from the binary under test.
fn lb_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("lb-rootfs");
    lb_testbed::image::add_binary(&rootfs, &lb_bin(), "/usr/local/bin/lb").unwrap();
    let out = dir.join("lb-image.tar");
    lb_testbed::image::docker_archive(&rootfs, LB_IMAGE, &["/usr/local/bin/lb"], &out).unwrap();
    out
}

/// The example: Deployment httpd (busybox httpd answering with the pod's name on its port
/// `http-web-svc`, 80) and Service httpd-svc (NodePort 8080 → http-web-svc).
fn example(kube: &Kube, replicas: i32) {
    kube.apply::<Deployment>(
        &serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "httpd", "namespace": "default"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "httpd"}},
                "template": {
                    "metadata": {"labels": {"app": "httpd"}},
                    "spec": {"containers": [{
                        "name": "httpd",
                        "image": lb_testbed::k8s::images::BUSYBOX,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c",
                            "mkdir -p /tmp/www && hostname > /tmp/www/index.html && \
                             exec httpd -f -p 80 -h /tmp/www"],
                        "ports": [{"name": "http-web-svc", "containerPort": 80}],
                        "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1},
                    }]},
                },
            },
        }))
        .unwrap(),
    )
    .unwrap();
    kube.apply::<Service>(
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "httpd-svc", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": CLUSTER_IP.to_string(),
                "selector": {"app": "httpd"},
                "ports": [{"name": "http", "protocol": "TCP", "port": 8080,
                           "targetPort": "http-web-svc", "nodePort": NODE_PORT}],
            },
        }))
        .unwrap(),
    )
    .unwrap();
}

/// The names of the ready pods of the example.
fn ready_httpd_pods(kube: &Kube) -> BTreeSet<String> {
    kube.list::<Pod>(Some("default"))
        .unwrap()
        .into_iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(String::as_str)
                == Some("httpd")
                && p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// One HTTP GET through `target` from `ns` (a host process when `ns` is the node's): the
/// pod's name, or why not.
fn get(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    match http_request(ns, target, "/") {
        Ok((200, body, _)) => Ok(body.trim().to_owned()),
        Ok((status, body, _)) => Err(format!("{status}: {body}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The address the outside client dials for `target`: an alias that the client namespace's
/// own iptables turn into `target` (DNAT in its OUTPUT chain). The test's processes run
/// under the machine's cgroup2 root, where the DaemonSet's socket hooks translate every
/// connect() to a frontend; through the alias the client's packets leave with the frontend
/// as their destination after the hooks, and reach the node's interface as a machine's
/// beside the node would (XDP's path, and the replies' way back through cni0).
fn alias(target: SocketAddr) -> SocketAddr {
    let [_, b, _, d] = match target.ip() {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => unreachable!("the test's frontends are IPv4"),
    };
    // 10.112.0.10 -> 198.18.112.10: the benchmarking range, to which nothing here has a
    // route (a packet the DNAT missed would go no further than the node).
    SocketAddr::new(Ipv4Addr::new(198, 18, b, d).into(), target.port())
}

/// The outside client's DNAT of [`alias`] for each of `targets`.
fn outside_client(node: &Node, targets: &[SocketAddr]) {
    for target in targets {
        let alias = alias(*target);
        lb_testbed::netns::run(node.client.command("iptables").args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &alias.ip().to_string(),
            "--dport",
            &alias.port().to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &target.to_string(),
        ]))
        .expect("iptables DNAT in the client namespace");
    }
}

/// One GET through `target` from the outside client (by its [`alias`]).
fn outside(node: &Node, target: SocketAddr) -> Result<String, String> {
    get(&node.client, alias(target))
}

/// GET through `target` from a pod (kubectl exec of busybox nc in the client pod).
fn get_from_pod(cp: &ControlPlane, target: SocketAddr) -> Result<String, String> {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} {}",
        target.ip(),
        target.port()
    );
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args(["exec", "client", "--", "sh", "-c", &script])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), text.split("\r\n\r\n").nth(1)) {
        (true, Some(body)) if text.starts_with("HTTP/1.") => Ok(body.trim().to_owned()),
        _ => Err(format!("{}{}", text, String::from_utf8_lossy(&out.stderr))),
    }
}

/// Asks `ask` until every name in `want` has answered (at most 60 times); panics with what
/// was seen.
fn answered_by_all(
    what: &str,
    want: &BTreeSet<String>,
    mut ask: impl FnMut() -> Result<String, String>,
) {
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for _ in 0..60 {
        match ask() {
            Ok(name) => {
                seen.insert(name);
            }
            Err(e) => errors.push(e),
        }
        if &seen == want {
            return;
        }
    }
    panic!("{what}: answered by {seen:?}, not {want:?}; errors: {errors:#?}");
}

/// The agent's pod: name, uid, container id (without the runtime prefix), Ready.
fn agent_pod(kube: &Kube) -> Option<(String, String, String, bool)> {
    kube.list::<Pod>(Some("kube-system"))
        .ok()?
        .into_iter()
        .find_map(|p| {
            let labels = p.metadata.labels.as_ref()?;
            (labels.get("app.kubernetes.io/name").map(String::as_str) == Some("lb")
                && p.metadata.deletion_timestamp.is_none())
            .then_some(())?;
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let container = status
                .container_statuses
                .as_ref()?
                .first()?
                .container_id
                .clone()?
                .rsplit("://")
                .next()?
                .to_owned();
            Some((p.metadata.name?, p.metadata.uid?, container, ready))
        })
}

/// Why the agent's pod is not running, for a failure message: its status and logs.
fn agent_trouble(cp: &ControlPlane) -> String {
    let pods = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args(["-n", "kube-system", "get", "pods", "-o", "wide"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let logs = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args(["-n", "kube-system", "logs", "ds/lb", "--tail=30"])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    let previous = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args([
            "-n",
            "kube-system",
            "logs",
            "ds/lb",
            "--previous",
            "--tail=30",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("{pods}\nagent log:\n{logs}\nprevious container's log:\n{previous}")
}

/// The agent container's peak memory, from its memory cgroup (cgroup v1 on these VMs).
fn agent_peak_memory(node: &Node, uid: &str, container: &str) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup/memory")
        .join(node.cgroup_root())
        .join("kubepods");
    let pod = format!("pod{uid}");
    [
        root.join("burstable"),
        root.join("besteffort"),
        root.clone(),
    ]
    .iter()
    .map(|qos| {
        qos.join(&pod)
            .join(container)
            .join("memory.max_usage_in_bytes")
    })
    .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
}

#[test]
fn lb_replaces_kube_proxy_on_a_real_node() {
    let cp = ControlPlane::start(Config {
        service_cidrs: vec!["10.112.0.0/16".into()],
        pod_cidrs: vec!["10.124.0.0/16".into()],
        allocate_node_cidrs: true,
        scheduler: true,
        node_lifecycle: true,
        agent_apiserver: false,
    })
    .expect("control plane");
    let node = Node::start(
        &cp,
        NodeConfig {
            name: NODE.into(),
            interface: NODE_IF.into(),
            node_ip: NODE_IP,
            client_ip: CLIENT_IP,
        },
    )
    .expect("node");
    let _pins = Pins;
    let dir = ScratchDir::new(&run_dir().join(unique_name("real-node"))).unwrap();
    let image = lb_image(dir.path());
    lb_testbed::netns::run(
        Command::new("ctr")
            .arg("--address")
            .arg(node.containerd_socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&image),
    )
    .expect("import the lb image");
    let kube = cp.kube();

    // The example first, its pods ready (nothing serves its frontends yet).
    example(kube, 2);
    kube.apply::<Pod>(
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "client", "namespace": "default"},
            "spec": {"containers": [{"name": "client", "image": lb_testbed::k8s::images::BUSYBOX,
                                     "imagePullPolicy": "Never",
                                     "command": ["/bin/sh", "-c", "exec sleep 100000"]}]},
        }))
        .unwrap(),
    )
    .unwrap();
    let two = kube
        .wait_for("two httpd pods ready", Duration::from_secs(90), |k| {
            let pods = ready_httpd_pods(k);
            Ok((pods.len() == 2).then_some(pods))
        })
        .unwrap();
    let cluster_ip = SocketAddr::new(CLUSTER_IP.into(), 8080);
    let node_port = SocketAddr::new(NODE_IP.into(), NODE_PORT);
    outside_client(&node, &[cluster_ip, node_port]);
    assert!(
        outside(&node, cluster_ip).is_err(),
        "the ClusterIP answers before lb runs"
    );

    // kubectl apply -k, to the first request served through the ClusterIP.
    let overlay = overlay(dir.path());
    let applied = Instant::now();
    kubectl(&cp, &["apply", "-k", overlay.to_str().unwrap()]);
    let mut first = None;
    while first.is_none() {
        if outside(&node, cluster_ip).is_ok() {
            first = Some(applied.elapsed());
        }
        assert!(
            applied.elapsed() < Duration::from_secs(120),
            "no request served through the ClusterIP 120 s after kubectl apply -k:\n{}",
            agent_trouble(&cp)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = first.unwrap();
    let (_, uid, container, _) = kube
        .wait_for("the agent's pod ready", Duration::from_secs(60), |k| {
            Ok(agent_pod(k).filter(|p| p.3))
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent_trouble(&cp)));
    let peak = agent_peak_memory(&node, &uid, &container);

    // Both pods, from outside, from a pod and from a host process, through the ClusterIP
    // and the NodePort.
    for target in [cluster_ip, node_port] {
        answered_by_all(&format!("the client through {target}"), &two, || {
            outside(&node, target)
        });
        answered_by_all(&format!("a host process through {target}"), &two, || {
            get(&node.ns, target)
        });
        answered_by_all(&format!("a pod through {target}"), &two, || {
            get_from_pod(&cp, target)
        });
    }

    // kubectl rollout restart of the DaemonSet under a request loop: no request fails.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| {
        let requests = s.spawn(|| {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for target in [cluster_ip, node_port] {
                    match outside(&node, target) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        // The loop ends also when this thread panics (else the scope would wait for ever).
        let _stop = StopOnDrop(&stop);
        let (before, ..) = agent_pod(kube).unwrap();
        kubectl(&cp, &["-n", "kube-system", "rollout", "restart", "ds/lb"]);
        let status = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cp.admin_kubeconfig())
            .args([
                "-n",
                "kube-system",
                "rollout",
                "status",
                "ds/lb",
                "--timeout=120s",
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "kubectl rollout status: {}{}\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr),
            agent_trouble(&cp)
        );
        kube.wait_for("a new agent pod ready", Duration::from_secs(60), |k| {
            Ok(agent_pod(k).filter(|p| p.3 && p.0 != before))
        })
        .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        requests.join().unwrap()
    });
    assert!(
        failed.is_empty() && ok > 0,
        "{} of {} requests failed during the rollout restart: {failed:#?}",
        failed.len(),
        ok as usize + failed.len()
    );

    // Scaled 2 → 3 → 1: the frontends follow.
    for replicas in [3, 1] {
        kube.patch::<Deployment>(
            Some("default"),
            "httpd",
            json!({"spec": {"replicas": replicas}}),
        )
        .unwrap();
        let pods = kube
            .wait_for(
                &format!("{replicas} httpd pods ready"),
                Duration::from_secs(90),
                |k| {
                    let pods = ready_httpd_pods(k);
                    Ok((pods.len() == replicas as usize).then_some(pods))
                },
            )
            .unwrap();
        kube.wait_for(
            &format!("{replicas} backends programmed"),
            Duration::from_secs(30),
            |_| {
                let s = services(&lb_bin(), Path::new(PIN_PATH))?;
                Ok(s.iter()
                    .find(|s| s.frontend == format!("{cluster_ip}/TCP"))
                    .is_some_and(|s| s.selectable().len() == replicas as usize)
                    .then_some(()))
            },
        )
        .unwrap();
        answered_by_all(
            &format!("the client with {replicas} replicas"),
            &pods,
            || outside(&node, cluster_ip),
        );
    }

    // The Service deleted: nothing answers.
    assert!(
        kube.delete::<Service>(Some("default"), "httpd-svc", None)
            .unwrap()
    );
    kube.wait_for(
        "no answer through the deleted Service",
        Duration::from_secs(30),
        |_| {
            Ok(
                (outside(&node, cluster_ip).is_err() && outside(&node, node_port).is_err())
                    .then_some(()),
            )
        },
    )
    .unwrap();
    assert!(
        kube.get::<DaemonSet>(Some("kube-system"), "lb")
            .unwrap()
            .is_some()
    );

    eprintln!(
        "real node: first request through the ClusterIP {first:?} after kubectl apply -k; \
         the agent pod's peak memory {} MiB; {} requests during the rollout restart, 0 failed",
        peak.map_or_else(|| "unknown".to_owned(), |b| (b >> 20).to_string()),
        ok
    );
}
