//! The real `lb agent` in the test topology, fed a folder that changes under it and holds bad
//! input next to good input.

use std::path::{Path, PathBuf};

use lb_tests::{
    agent::{Agent, ServiceInfo, backends_of, examples_dir, metric, ops},
    client::http_get,
    netns::unique_name,
    topology::{NODE_IF, Topology},
};

/// A scratch copy of examples/, removed on drop.
struct Folder(PathBuf);

impl Folder {
    fn copy_of_examples() -> Self {
        let dir = std::env::temp_dir().join(unique_name("manifests"));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(examples_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        Folder(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Replaces a file atomically, as editors and ConfigMap mounts do.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_until(agent: &Agent, what: &str, check: impl Fn(&[ServiceInfo]) -> bool) {
    agent.wait_until(what, check).unwrap();
}

const CLUSTER_IP: &str = "10.96.0.10:8080/TCP";

#[test]
fn bad_input_is_reported_by_file_and_object_and_everything_else_is_programmed() {
    let folder = Folder::copy_of_examples();
    folder.write(
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
    );
    let topology = Topology::new(2).expect("topology");
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let all: Vec<&str> = lb_tests::testbed::EXAMPLE_FRONTENDS.to_vec();
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
    let folder = Folder::copy_of_examples();
    let topology = Topology::new(2).expect("topology");
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    agent.wait_for(&[CLUSTER_IP], 2).expect("programmed");

    // pod2 leaves httpd-svc's EndpointSlice: new connections only reach pod1.
    let text = std::fs::read_to_string(folder.path().join("httpd-svc.yaml")).unwrap();
    let pod2 = topology.pods[1].ip.to_string();
    assert!(text.contains(&pod2), "examples/httpd-svc.yaml lists {pod2}");
    let without_pod2: String = remove_endpoint(&text, &pod2);
    folder.write("httpd-svc.yaml", &without_pod2);
    wait_until(&agent, "pod2 to leave the ClusterIP", |s| {
        backends_of(s, CLUSTER_IP).is_some_and(|b| b.len() == 1)
    });
    for _ in 0..10 {
        let (body, _) = http_get(&topology.client, [10, 96, 0, 10], 8080).unwrap();
        assert_eq!(body.trim(), topology.pods[0].name, "only pod1 serves now");
    }

    // A whole file removed: its frontend goes; restored: it comes back.
    let udp = std::fs::read_to_string(folder.path().join("echo-udp.yaml")).unwrap();
    std::fs::remove_file(folder.path().join("echo-udp.yaml")).unwrap();
    wait_until(&agent, "the UDP frontend to go", |s| {
        backends_of(s, "10.96.0.12:5353/UDP").is_none()
    });
    folder.write("echo-udp.yaml", &udp);
    wait_until(&agent, "the UDP frontend to return", |s| {
        backends_of(s, "10.96.0.12:5353/UDP").is_some_and(|b| b.len() == 2)
    });
    // The ClusterIP kept its state throughout.
    assert_eq!(
        backends_of(&agent.services().unwrap(), CLUSTER_IP)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn the_manifests_agent_serves_metrics_and_readiness() {
    let folder = Folder::copy_of_examples();
    let topology = Topology::new(2).expect("topology");
    let mut agent = Agent::start(&topology.node, folder.path(), NODE_IF).expect("agent");
    let all = lb_tests::testbed::EXAMPLE_FRONTENDS;
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
