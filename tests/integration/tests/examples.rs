//! The example manifests parse as Kubernetes objects, describe the test bed (two pods, the
//! node address), and define exactly the frontends that `EXAMPLE_FRONTENDS` lists. No kernel
//! needed.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_testbed::{EXAMPLE_FRONTENDS, NODE_IP, examples_dir};
use serde::Deserialize;

/// Every Service and EndpointSlice in examples/*.yaml.
fn load() -> (Vec<Service>, Vec<EndpointSlice>) {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(examples_dir()).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            match value["kind"].as_str() {
                Some("Service") => services.push(typed(value, &path)),
                Some("EndpointSlice") => slices.push(typed(value, &path)),
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
        }
    }
    (services, slices)
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml_ng::Value, path: &Path) -> T {
    serde_yaml_ng::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn examples_define_the_example_frontends() {
    let (services, _) = load();
    let mut frontends = BTreeSet::new();
    for service in &services {
        let spec = service.spec.as_ref().expect("spec");
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref()?.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.clone());
        let addresses: Vec<String> = spec
            .cluster_ip
            .iter()
            .chain(spec.external_ips.iter().flatten())
            .cloned()
            .chain(ingress)
            .collect();
        for port in spec.ports.iter().flatten() {
            let proto = port.protocol.as_deref().unwrap_or("TCP");
            for addr in &addresses {
                frontends.insert(format!("{addr}:{}/{proto}", port.port));
            }
            if let Some(node_port) = port.node_port {
                frontends.insert(format!("{NODE_IP}:{node_port}/{proto}"));
            }
        }
    }
    let expected: BTreeSet<String> = EXAMPLE_FRONTENDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(frontends, expected);
}

#[test]
fn every_service_has_a_slice_of_both_pods_with_matching_port_names() {
    let (services, slices) = load();
    assert_eq!(services.len(), 4);
    for service in &services {
        let name = service.metadata.name.as_deref().expect("name");
        let slice = slices
            .iter()
            .find(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    == Some(&name.to_owned())
            })
            .unwrap_or_else(|| panic!("no EndpointSlice for {name}"));
        assert_eq!(slice.address_type, "IPv4");
        let addresses: Vec<&str> = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect();
        assert_eq!(addresses, ["10.244.1.2", "10.244.2.2"], "{name}");
        let service_ports = service.spec.as_ref().unwrap().ports.iter().flatten();
        for port in service_ports {
            assert!(
                slice.ports.iter().flatten().any(|p| p.name == port.name),
                "{name}: no slice port named {:?}",
                port.name
            );
        }
    }
}
