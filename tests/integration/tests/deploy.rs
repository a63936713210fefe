//! The manifests in `deploy/` are valid Kubernetes objects that match the agent: read-only
//! RBAC on exactly what it watches, the three capabilities the agent needs, the host's bpffs,
//! probes on the address the agent serves, and only flags that `lb agent` accepts.

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use lb_testbed::agent::{lb_bin, workspace_dir};
use serde::Deserialize;

fn documents(file: &str) -> Vec<serde_yaml_ng::Value> {
    let path = workspace_dir().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).expect("YAML"))
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml_ng::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_yaml_ng::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn rbac_allows_only_reading_services_endpointslices_and_nodes() {
    let docs = documents("rbac.yaml");
    let role: ClusterRole = of_kind(&docs, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    let expected: BTreeSet<String> = ["/services", "/nodes", "discovery.k8s.io/endpointslices"]
        .map(String::from)
        .into();
    assert_eq!(granted, expected);
    let binding: ClusterRoleBinding = of_kind(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(subject.name, "lb");
}

#[test]
fn the_daemonset_runs_the_agent_with_three_capabilities_on_the_host_bpffs() {
    let ds: DaemonSet = of_kind(&documents("daemonset.yaml"), "DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
    let agent = &pod.containers[0];
    let security = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));

    // Where the host's directory `host` is mounted in the agent's container.
    let mounted = |host: &str| {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host))
            .unwrap_or_else(|| panic!("a hostPath volume of {host}"));
        agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("the volume of {host} is mounted"))
            .mount_path
            .clone()
    };
    assert_eq!(mounted("/sys/fs/bpf"), "/sys/fs/bpf");
    // The socket hooks go on the host's cgroup2 root, not on the container's own cgroup
    // namespace.
    let host_cgroup = mounted("/sys/fs/cgroup");
    let args = agent.args.clone().unwrap_or_default();
    assert!(
        args.contains(&format!("--cgroup={host_cgroup}")),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a.starts_with("--pod-interfaces=")),
        "{args:?}"
    );

    // Every flag is one `lb agent` accepts, and the probes use the metrics address.
    let args = agent.args.clone().unwrap_or_default();
    assert_eq!(args[0], "agent");
    let help = Command::new(lb_bin())
        .args(["agent", "--help"])
        .output()
        .expect("lb agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut metrics_port = None;
    for arg in &args[1..] {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        assert!(
            help.contains(&format!("{flag} ")),
            "lb agent does not accept {flag}"
        );
        if flag == "--metrics-addr" {
            metrics_port = value
                .rsplit_once(':')
                .map(|(_, p)| p.parse::<i32>().unwrap());
        }
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--manifests")),
        "in-cluster: no folder"
    );
    let metrics_port = metrics_port.expect("--metrics-addr is set");
    // kube-proxy's proxy health port, named among the pod's (the node's) ports.
    assert!(
        args.contains(&"--healthz-bind-address=0.0.0.0:10256".to_owned()),
        "{args:?}"
    );
    let ports: Vec<(Option<&str>, i32)> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("proxy-healthz"), 10256)]);
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(metrics_port)
        );
    }
}

#[test]
fn the_kustomization_deploys_every_manifest_and_the_api_server_setting() {
    let docs = documents("kustomization.yaml");
    let kustomization = &docs[0];
    assert_eq!(kustomization["kind"].as_str(), Some("Kustomization"));
    // Every manifest of deploy/ is a resource of it.
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let dir = workspace_dir().join("deploy");
    let manifests: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources,
        manifests
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
    );
    // The ConfigMap lb-config in kube-system, key api-server (empty: in-cluster).
    let generator = kustomization["configMapGenerator"]
        .as_sequence()
        .and_then(|g| g.iter().find(|c| c["name"].as_str() == Some("lb-config")))
        .expect("a configMapGenerator lb-config");
    assert_eq!(generator["namespace"].as_str(), Some("kube-system"));
    let literals: Vec<&str> = generator["literals"]
        .as_sequence()
        .expect("literals")
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(literals, ["api-server="]);
    // The DaemonSet gives it to the agent as LB_API_SERVER.
    let ds: DaemonSet = of_kind(&documents("daemonset.yaml"), "DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    let env = pod.containers[0].env.clone().unwrap_or_default();
    let api_server = env
        .iter()
        .find(|e| e.name == "LB_API_SERVER")
        .expect("LB_API_SERVER");
    let key = api_server
        .value_from
        .as_ref()
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("from a ConfigMap");
    assert_eq!(
        (key.name.as_str(), key.key.as_str()),
        ("lb-config", "api-server")
    );
}
