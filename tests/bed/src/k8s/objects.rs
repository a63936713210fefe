//! Objects the tests make on a real control plane without a kubelet: Nodes with the
//! addresses the test chooses, and pods bound to them whose status the test sets (running,
//! ready or not, IPs), so that the real EndpointSlice controller writes the EndpointSlices.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::client::Kube;

/// Creates (or updates) the Node `name` with these labels and addresses (`(type, address)`,
/// e.g. `("InternalIP", "10.200.0.1")`), Ready.
pub fn node(kube: &Kube, name: &str, labels: Value, addresses: &[(&str, String)]) -> Result<Node> {
    kube.apply::<Node>(&serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    }))?)?;
    set_node_addresses(kube, name, addresses)
}

/// Replaces the Node's addresses (and reports it Ready).
pub fn set_node_addresses(kube: &Kube, name: &str, addresses: &[(&str, String)]) -> Result<Node> {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(kind, address)| json!({"type": kind, "address": address}))
        .collect();
    kube.patch_status::<Node>(
        None,
        name,
        json!({
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "set by the test"}],
        }),
    )
}

/// A Service in `default` selecting the pods labelled `app: <selector>`, with the port
/// `http` 8080 → 80 (TCP); `extra` is merged into its spec (e.g. `type`, `clusterIP`).
pub fn service(kube: &Kube, name: &str, selector: &str, extra: Value) -> Result<Service> {
    let mut spec = json!({
        "selector": {"app": selector},
        "ports": [{"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    kube.apply::<Service>(&serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))?)
}

/// A pod in `default` labelled `app: <app>`, bound to `node`, running with these IPs (the
/// first is `podIP`), ready or not. Its image is never pulled: no kubelet runs it.
pub fn pod(
    kube: &Kube,
    name: &str,
    app: &str,
    node: &str,
    ips: &[IpAddr],
    ready: bool,
) -> Result<Pod> {
    kube.apply::<Pod>(&serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "lb-tests/none:never-pulled",
                            "ports": [{"name": "http", "containerPort": 80}]}],
        },
    }))?)?;
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    kube.patch_status::<Pod>(
        Some("default"),
        name,
        json!({
            "phase": "Running",
            "podIP": ips.first().map(ToString::to_string),
            "podIPs": pod_ips,
            "conditions": [ready_condition(ready)],
        }),
    )
}

/// Sets the pod's Ready condition.
pub fn set_pod_ready(kube: &Kube, name: &str, ready: bool) -> Result<Pod> {
    kube.patch_status::<Pod>(
        Some("default"),
        name,
        json!({"conditions": [ready_condition(ready)]}),
    )
}

/// Deletes the pod with a grace period of an hour: with no kubelet to finish it, it stays
/// terminating (and, if ready, serving) until the test deletes it again with none.
pub fn terminate_pod(kube: &Kube, name: &str) -> Result<bool> {
    kube.delete::<Pod>(Some("default"), name, Some(3600))
}

/// Deletes the pod at once.
pub fn delete_pod(kube: &Kube, name: &str) -> Result<bool> {
    kube.delete::<Pod>(Some("default"), name, Some(0))
}

fn ready_condition(ready: bool) -> Value {
    json!({"type": "Ready", "status": if ready { "True" } else { "False" }})
}

/// An IPv4 EndpointSlice of `service` (in `default`), port `http` 80/TCP, with these
/// endpoints on `node`, ready (the object only: apply it, or give it to the fake API server).
/// Labelled as managed by the tests, so that the EndpointSlice controller leaves it alone.
pub fn endpoint_slice(name: &str, service: &str, node: &str, ready: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| {
            json!({
                "addresses": [ip.to_string()], "nodeName": node,
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "lb-tests"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}
