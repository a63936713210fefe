//! `lb plan`: the desired state of a manifests folder, as the agent would program it, without
//! touching the kernel.
//!
//! It runs the same `manifest::load_dir` and `translate::translate` as the agent; this module only
//! arranges the result for people (a table) and for programs (JSON).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    desired::{FrontendKind, FrontendPlan},
    translate::Translation,
};
use crate::{
    model::{ClusterState, Forwarding, IpFamily, ObjectRef, Selection, TrafficPolicy},
    source::manifests::load::ManifestSet,
};

/// The plan of one folder: every frontend, and everything that was skipped or wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// One row per frontend, sorted by frontend.
    pub frontends: Vec<PlanRow>,
    /// The health checks the agent serves for cloud load balancers, by Service.
    pub health_checks: Vec<HealthCheckRow>,
    /// Objects skipped on purpose (kinds lb does not read) and values allocated (cluster IPs,
    /// node ports).
    pub notes: Vec<String>,
    /// Translation warnings (a frontend claimed twice, a slice without a Service, ...).
    pub warnings: Vec<String>,
    /// Objects, documents or files that could not be read; they are not in the plan.
    pub errors: Vec<String>,
}

/// A health check kube-proxy would serve: LoadBalancer, externalTrafficPolicy Local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheckRow {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Its healthCheckNodePort.
    pub port: u16,
    /// Ready endpoints on this node, by IP family: 0 answers 503.
    pub local_endpoints: BTreeMap<IpFamily, usize>,
}

/// One frontend and what it translates to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// ClusterIP, NodePort, ExternalIP or LoadBalancer.
    pub kind: FrontendKind,
    /// `namespace/name[:port-name]` of the Service port.
    pub service: String,
    /// The traffic policy that chose the backends: externalTrafficPolicy for external
    /// frontends, internalTrafficPolicy for the cluster IP.
    pub traffic_policy: &'static str,
    /// sessionAffinity ClientIP timeout, when affinity is on.
    pub affinity_timeout_secs: Option<u32>,
    /// Backend selection set by the Service's annotation; `None`: the agent's default.
    pub selection: Option<Selection>,
    /// Forwarding to other nodes' backends set by the Service's annotation; `None`: the
    /// agent's default.
    pub forwarding: Option<Forwarding>,
    /// The `spec.topologyKeys` key that chose the backends (`*` for any, `(no key
    /// matched)`); `None` for a Service without topology keys.
    pub topology: Option<String>,
    /// Allowed client networks; empty means every source.
    pub source_ranges: Vec<String>,
    /// Under externalTrafficPolicy Local, the cluster frontend (`address:port/PROTO`)
    /// whose backends this node's pods and processes get through this frontend
    /// (kube-proxy's "short-circuit"); `backends` are those of traffic from outside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_circuit: Option<String>,
    /// `address:port`, with ` (terminating)` for terminating endpoints. Empty: rejected
    /// (`reject`) or dropped.
    pub backends: Vec<String>,
    /// No endpoint anywhere: new flows get ICMP port unreachable (see
    /// [`crate::plan::desired::FrontendPlan::reject`]).
    pub reject: bool,
}

impl Plan {
    /// Arranges the translation of `set` (which must be what `translation` was made from).
    pub fn new(set: &ManifestSet, translation: &Translation) -> Self {
        Plan {
            frontends: translation
                .desired
                .frontends
                .iter()
                .map(|(frontend, plan)| PlanRow {
                    frontend: frontend.to_string(),
                    kind: plan.kind,
                    service: plan.service.to_string(),
                    traffic_policy: traffic_policy(&set.state, plan),
                    affinity_timeout_secs: plan.affinity_timeout_secs,
                    selection: plan.selection,
                    forwarding: plan.forwarding,
                    topology: plan.topology.as_ref().map(ToString::to_string),
                    source_ranges: plan.source_ranges.iter().map(|c| c.to_string()).collect(),
                    short_circuit: plan.short_circuit.as_ref().map(ToString::to_string),
                    backends: plan.backends.iter().map(|b| b.to_string()).collect(),
                    reject: plan.reject,
                })
                .collect(),
            notes: set.notes.iter().map(|n| n.to_string()).collect(),
            health_checks: translation
                .health_checks
                .iter()
                .map(|(service, check)| HealthCheckRow {
                    service: service.to_string(),
                    port: check.port,
                    local_endpoints: check.local_endpoints.clone(),
                })
                .collect(),
            warnings: translation.warnings.iter().map(|w| w.to_string()).collect(),
            errors: set.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// A plain-text table, one frontend a line.
    pub fn table(&self) -> String {
        let header = ["FRONTEND", "KIND", "SERVICE", "POLICY", "BACKENDS"];
        let rows: Vec<[String; 5]> = self
            .frontends
            .iter()
            .map(|r| {
                let mut policy = r.traffic_policy.to_owned();
                if let Some(key) = &r.topology {
                    policy.push_str(&format!(" topology={key}"));
                }
                if let Some(selection) = r.selection {
                    policy.push_str(&format!(" selection={selection}"));
                }
                if let Some(forwarding) = r.forwarding {
                    policy.push_str(&format!(" forwarding={forwarding}"));
                }
                if let Some(t) = r.affinity_timeout_secs {
                    policy.push_str(&format!(" affinity={t}s"));
                }
                if !r.source_ranges.is_empty() {
                    policy.push_str(&format!(" from={}", r.source_ranges.join(",")));
                }
                if let Some(cluster) = &r.short_circuit {
                    policy.push_str(&format!(" short-circuit={cluster}"));
                }
                let backends = if r.reject {
                    "(none anywhere: rejected)".to_owned()
                } else if r.backends.is_empty() {
                    "(none here: dropped)".to_owned()
                } else {
                    r.backends.join(", ")
                };
                [
                    r.frontend.clone(),
                    r.kind.to_string(),
                    r.service.clone(),
                    policy,
                    backends,
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for cells in std::iter::once(header.map(str::to_owned)).chain(rows) {
            let line: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        for h in &self.health_checks {
            let counts: Vec<String> = h
                .local_endpoints
                .iter()
                .map(|(family, n)| format!("{family} {n}"))
                .collect();
            out.push_str(&format!(
                "health check {}: node port {}, local ready endpoints {}\n",
                h.service,
                h.port,
                counts.join(", ")
            ));
        }
        out
    }
}

/// "Cluster" or "Local": the policy of the Service that applied to this frontend.
fn traffic_policy(state: &ClusterState, plan: &FrontendPlan) -> &'static str {
    let id = ObjectRef::new(plan.service.namespace.clone(), plan.service.name.clone());
    // Translation only makes frontends of Services it read; the rule is translation's.
    let local = state.services.get(&id).is_some_and(|svc| {
        if plan.kind.is_external() {
            svc.external_policy_local()
        } else {
            // spec.topologyKeys decide in its place (kube-proxy v1.21).
            svc.internal_traffic_policy == TrafficPolicy::Local && svc.topology_keys.is_empty()
        }
    });
    if local { "Local" } else { "Cluster" }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{model::NodeInfo, plan::translate, source::manifests::load as manifest};

    fn plan_of(yaml: &str, node: &NodeInfo) -> Plan {
        let set = manifest::load_str(std::path::Path::new("objects.yaml"), yaml);
        let translation = translate::translate(&set.state, node);
        Plan::new(&set, &translation)
    }

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30500}]
status:
  loadBalancer: {ingress: [{ip: 10.98.0.9}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.244.1.2]
    nodeName: here
  - addresses: [10.244.2.2]
    nodeName: elsewhere
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec: {ports: [{port: 70000}]}
"#;

    /// The node `here`, at 192.168.1.5.
    fn here() -> NodeInfo {
        NodeInfo {
            name: "here".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 1, 5).into()],
            zone: None,
            labels: Default::default(),
        }
    }

    #[test]
    fn the_plan_shows_policies_backends_and_errors() {
        let node = here();
        let plan = plan_of(SERVICE, &node);
        let by_frontend = |f: &str| {
            plan.frontends
                .iter()
                .find(|r| r.frontend == f)
                .unwrap_or_else(|| panic!("no {f} in {:#?}", plan.frontends))
        };
        let cluster = by_frontend("10.96.0.20:80/TCP");
        assert_eq!(cluster.kind, FrontendKind::ClusterIp);
        assert_eq!(cluster.service, "shop/web:http");
        assert_eq!(cluster.traffic_policy, "Cluster");
        assert_eq!(cluster.affinity_timeout_secs, Some(10800));
        // The terminating endpoint stays listed so that its flows drain; it takes no new ones.
        assert_eq!(
            cluster.backends,
            ["10.244.1.2:8080", "10.244.2.2:8080 (terminating)"]
        );
        assert!(cluster.source_ranges.is_empty());

        // eTP Local: the node port and the ingress use only this node's endpoint.
        let node_port = by_frontend("192.168.1.5:30500/TCP");
        assert_eq!(node_port.traffic_policy, "Local");
        assert_eq!(node_port.backends, ["10.244.1.2:8080"]);
        let ingress = by_frontend("10.98.0.9:80/TCP");
        assert_eq!(ingress.kind, FrontendKind::LoadBalancer);
        assert_eq!(ingress.source_ranges, ["192.0.2.0/24"]);
        assert_eq!(plan.frontends.len(), 3, "{:#?}", plan.frontends);

        assert_eq!(plan.errors.len(), 1, "{:?}", plan.errors);
        assert!(plan.errors[0].contains("shop/broken"), "{:?}", plan.errors);

        let table = plan.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("FRONTEND"), "{table}");
        assert_eq!(lines.len(), 5, "{table}");
        assert!(
            table.contains(
                "Local affinity=10800s from=192.0.2.0/24 short-circuit=10.96.0.20:80/TCP"
            ),
            "{table}"
        );
        // This node's pods and processes get every endpoint through the Local frontends
        // (kube-proxy's short-circuit), as through the cluster IP.
        assert_eq!(
            node_port.short_circuit.as_deref(),
            Some("10.96.0.20:80/TCP")
        );
        assert_eq!(cluster.short_circuit, None);
        // The LoadBalancer Service with externalTrafficPolicy Local: its health check, with
        // this node's one ready endpoint (the other is elsewhere, and terminating).
        assert_eq!(
            plan.health_checks,
            [HealthCheckRow {
                service: "shop/web".into(),
                port: 32000,
                local_endpoints: [(IpFamily::V4, 1)].into(),
            }]
        );
        assert_eq!(
            lines[4],
            "health check shop/web: node port 32000, local ready endpoints IPv4 1"
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["frontends"][0]["kind"], "ClusterIp");
    }

    #[test]
    fn the_policy_shown_is_the_one_that_chose_the_backends() {
        let node = here();
        // externalTrafficPolicy Local counts where the Service is externally accessible:
        // on a ClusterIP Service with externalIPs, not on one without.
        let yaml = format!(
            "{}---\n{}",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.20, externalTrafficPolicy: Local, externalIPs: [203.0.113.9], \
             ports: [{name: http, port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.21, externalTrafficPolicy: Local, ports: [{name: http, port: 80}]}\n",
            SERVICE.split("---\n").nth(1).unwrap()
        );
        let plan = plan_of(&yaml, &node);
        let rows: Vec<(&str, &str, &[String])> = plan
            .frontends
            .iter()
            .map(|r| (r.frontend.as_str(), r.traffic_policy, r.backends.as_slice()))
            .collect();
        let both = [
            "10.244.1.2:8080".to_owned(),
            "10.244.2.2:8080 (terminating)".to_owned(),
        ];
        let local = ["10.244.1.2:8080".to_owned()];
        assert_eq!(
            rows,
            [
                ("10.96.0.20:80/TCP", "Cluster", &both[..]),
                ("10.96.0.21:80/TCP", "Cluster", &[][..]),
                ("203.0.113.9:80/TCP", "Local", &local[..]),
            ],
            "{plan:#?}"
        );
    }
}
