//! The synthetic clusters the benchmarks program: N ClusterIP Services with their endpoints,
//! written for each mode (manifests for the agent, a desired state for the packet benchmark,
//! iptables and nftables rules for kube-proxy's modes) from one description.

use lb_userspace::model::Protocol;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use lb_userspace::plan::desired::{
    Backend, DesiredState, Frontend, FrontendKind, FrontendPlan, ServicePortRef,
};

/// The namespace of every benchmark Service.
pub const NAMESPACE: &str = "bench";
/// The name of every Service port.
pub const PORT_NAME: &str = "http";
/// The pods' CIDR: clients outside it are masqueraded by kube-proxy's rules.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Service port of every ClusterIP.
pub const SERVICE_PORT: u16 = 80;
/// The target port of every endpoint.
pub const TARGET_PORT: u16 = 8080;

/// One endpoint: address and port.
pub type Endpoint = (Ipv4Addr, u16);

/// One port of a [`BenchService`]; its target port is [`TARGET_PORT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchPort {
    /// The port's name.
    pub name: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
}

impl BenchPort {
    /// [`PORT_NAME`], TCP, [`SERVICE_PORT`]: the only port of the Services [`services`]
    /// makes.
    pub fn http() -> Self {
        BenchPort {
            name: PORT_NAME.to_owned(),
            protocol: Protocol::Tcp,
            port: SERVICE_PORT,
        }
    }

    /// The protocol as kube-proxy writes it in chain names and rules: `tcp`, `udp`.
    pub fn proto(&self) -> String {
        self.protocol.to_string().to_lowercase()
    }
}

/// One ClusterIP Service and its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchService {
    /// metadata.name.
    pub name: String,
    /// spec.clusterIP.
    pub cluster_ip: Ipv4Addr,
    /// The Service ports (one, [`BenchPort::http`], unless changed).
    pub ports: Vec<BenchPort>,
    /// The endpoints, in the order kube-proxy would list them.
    pub endpoints: Vec<Endpoint>,
    /// The node every endpoint is on (EndpointSlice `nodeName`), if said.
    pub node: Option<String>,
}

impl BenchService {
    /// The first port's Service port.
    pub fn port(&self) -> u16 {
        self.ports.first().map_or(SERVICE_PORT, |p| p.port)
    }

    /// kube-proxy's name of a Service port: `namespace/name:port`.
    pub fn port_name(&self, port: &BenchPort) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, port.name)
    }

    /// The frontends the datapath programs for it, one per port.
    pub fn frontends(&self) -> impl Iterator<Item = (Frontend, &BenchPort)> {
        self.ports.iter().map(|p| {
            let frontend = Frontend {
                addr: self.cluster_ip.into(),
                port: p.port,
                proto: p.protocol,
            };
            (frontend, p)
        })
    }
}

/// `n` Services in kube-proxy's match order. Service `i` (from 0) is `svc-i` with ClusterIP
/// 10.96.0.0 + 1 + i and `endpoints_each` endpoints 10.128.0.0 + 16 i + j + 1 : 8080 (no
/// such hosts exist: no traffic goes there); the last one, the measured one, has `measured`
/// as its endpoints instead.
pub fn services(n: usize, endpoints_each: usize, measured: &[Endpoint]) -> Vec<BenchService> {
    assert!(endpoints_each < 16, "at most 15 synthetic endpoints each");
    assert!(n < 1 << 19, "at most 2^19 Services");
    (0..n)
        .map(|i| {
            let endpoints = if i + 1 == n {
                measured.to_vec()
            } else {
                (0..endpoints_each)
                    .map(|j| {
                        (
                            offset(Ipv4Addr::new(10, 128, 0, 0), 16 * i + j + 1),
                            TARGET_PORT,
                        )
                    })
                    .collect()
            };
            BenchService {
                name: format!("svc-{i}"),
                cluster_ip: offset(Ipv4Addr::new(10, 96, 0, 0), i + 1),
                ports: vec![BenchPort::http()],
                endpoints,
                node: None,
            }
        })
        .collect()
}

/// `base + n`.
pub fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

/// The plan of a frontend of the Service port `name` ([`PORT_NAME`]) with ready `backends`.
pub fn plan(name: &str, kind: FrontendKind, backends: &[Endpoint]) -> FrontendPlan {
    port_plan(name, PORT_NAME, kind, backends)
}

/// The plan of a frontend of the port `port_name` of the Service `name` with ready
/// `backends` (none on another node).
pub fn port_plan(
    name: &str,
    port_name: &str,
    kind: FrontendKind,
    backends: &[Endpoint],
) -> FrontendPlan {
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|&(addr, port)| Backend {
            addr: addr.into(),
            port,
            terminating: false,
            remote: false,
        })
        .collect();
    backends.sort();
    backends.dedup();
    FrontendPlan {
        service: ServicePortRef {
            namespace: NAMESPACE.to_owned(),
            name: name.to_owned(),
            port_name: port_name.to_owned(),
        },
        kind,
        backends,
        reject: false,
        affinity_timeout_secs: None,
        source_ranges: Vec::new(),
        selection: None,
        forwarding: None,
        topology: None,
        short_circuit: None,
    }
}

/// The desired state of `services`, as translation would give it for ClusterIP Services.
pub fn desired(services: &[BenchService]) -> DesiredState {
    let frontends: BTreeMap<Frontend, FrontendPlan> = services
        .iter()
        .flat_map(|s| {
            s.frontends().map(|(frontend, port)| {
                let plan = port_plan(&s.name, &port.name, FrontendKind::ClusterIp, &s.endpoints);
                (frontend, plan)
            })
        })
        .collect();
    DesiredState { frontends }
}

/// The Service of `s` as a YAML document.
pub fn service_yaml(s: &BenchService) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
         spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  selector:\n    \
         app: {name}\n  ports:\n",
        name = s.name,
        ip = s.cluster_ip,
    );
    for p in &s.ports {
        let _ = writeln!(
            out,
            "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {TARGET_PORT}",
            p.name, p.protocol, p.port
        );
    }
    out
}

/// The EndpointSlice of `s` with `endpoints` as a YAML document (all ready, on `s.node`).
pub fn slice_yaml(s: &BenchService, endpoints: &[Endpoint]) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\n\
         addressType: IPv4\nports:\n",
        name = s.name
    );
    for p in &s.ports {
        let _ = writeln!(
            out,
            "  - name: {}\n    protocol: {}\n    port: {TARGET_PORT}",
            p.name, p.protocol
        );
    }
    out.push_str("endpoints:\n");
    let node = s
        .node
        .as_ref()
        .map(|n| format!("\n    nodeName: {n}"))
        .unwrap_or_default();
    for (addr, _) in endpoints {
        let _ = writeln!(
            out,
            "  - addresses: [{addr}]\n    conditions: {{ready: true, serving: true, terminating: false}}{node}"
        );
    }
    out
}

/// The Service of `s` as the API server serves it (for the fake API server): the same
/// object as [`service_yaml`].
pub fn service_object(s: &BenchService) -> anyhow::Result<core::Service> {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": s.name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.cluster_ip.to_string(),
            "clusterIPs": [s.cluster_ip.to_string()],
            "selector": {"app": s.name},
            "ports": s.ports.iter().map(|p| serde_json::json!({
                "name": p.name,
                "protocol": p.protocol.to_string(),
                "port": p.port,
                "targetPort": TARGET_PORT,
            })).collect::<Vec<_>>(),
        },
    }))
    .map_err(|e| anyhow::anyhow!("the Service {}: {e}", s.name))
}

/// The EndpointSlice of `s` with `endpoints` as the API server serves it: the same object
/// as [`slice_yaml`].
pub fn slice_object(
    s: &BenchService,
    endpoints: &[Endpoint],
) -> anyhow::Result<discovery::EndpointSlice> {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(addr, _)| {
            let mut endpoint = serde_json::json!({
                "addresses": [addr.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            });
            if let Some(node) = &s.node {
                endpoint["nodeName"] = node.clone().into();
            }
            endpoint
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{}-1", s.name),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": s.name},
        },
        "addressType": "IPv4",
        "ports": s.ports.iter().map(|p| serde_json::json!({
            "name": p.name,
            "protocol": p.protocol.to_string(),
            "port": TARGET_PORT,
        })).collect::<Vec<_>>(),
        "endpoints": endpoints,
    }))
    .map_err(|e| anyhow::anyhow!("the EndpointSlice of {}: {e}", s.name))
}

/// Every Service and EndpointSlice of `services` as one multi-document YAML file, except the
/// slices of the Services `skip_slice` says to leave out.
pub fn manifests_yaml(services: &[BenchService], skip_slice: impl Fn(usize) -> bool) -> String {
    let mut out = String::new();
    for (i, s) in services.iter().enumerate() {
        out.push_str("---\n");
        out.push_str(&service_yaml(s));
        if !skip_slice(i) {
            out.push_str("---\n");
            out.push_str(&slice_yaml(s, &s.endpoints));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_service_is_last_and_addresses_are_distinct() {
        let measured = [(Ipv4Addr::new(10, 244, 1, 2), TARGET_PORT)];
        let s = services(1000, 10, &measured);
        assert_eq!(s.len(), 1000);
        assert_eq!(s[999].endpoints, measured);
        assert_eq!(s[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(s[0].endpoints[0], (Ipv4Addr::new(10, 128, 0, 1), 8080));
        let ips: std::collections::BTreeSet<_> = s.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 1000);
        let eps: std::collections::BTreeSet<_> =
            s.iter().flat_map(|s| s.endpoints.clone()).collect();
        assert_eq!(eps.len(), 999 * 10 + 1);
        assert_eq!(desired(&s).frontends.len(), 1000);
    }
}
