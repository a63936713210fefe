//! The benchmark's helpers do what they claim: the manifests it writes translate to the
//! desired state it builds in code, and kube-proxy's rules it generates load with
//! iptables-restore / nft in a network namespace and DNAT a real connection to a pod.
//!
//! Needs root (namespaces, iptables, nftables).

use std::net::{SocketAddr, SocketAddrV4};

use lb_bench::cluster::{self, TARGET_PORT};
use lb_bench::e2e::{Bed, Mode, program_iptables, program_lb, program_nftables};
use lb_bench::{ScratchDir, load};
use lb_userspace::{model::NodeInfo, plan::translate, source::manifests::load as manifest};

#[test]
fn manifests_translate_to_the_desired_state_built_in_code() {
    let measured = [(std::net::Ipv4Addr::new(10, 244, 1, 2), TARGET_PORT)];
    let services = cluster::services(50, 10, &measured);
    let dir = ScratchDir::new("bench-manifests").unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        cluster::manifests_yaml(&services, |_| false),
    )
    .unwrap();
    let set = manifest::load_dir(dir.path()).unwrap();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    let node = NodeInfo {
        name: "node".into(),
        addresses: vec![],
        zone: None,
        labels: Default::default(),
    };
    let translation = translate::translate(&set.state, &node);
    assert!(
        translation.warnings.is_empty(),
        "{:?}",
        translation.warnings
    );
    assert_eq!(translation.desired, cluster::desired(&services));
}

/// Programs 100 Services in `mode` and fetches the last one (the measured one) through it.
fn fetch_last_service(mode: Mode) {
    let bed = Bed::new(2, 2).unwrap();
    let services = bed.services(100);
    let _lb = match mode {
        Mode::Lb => Some(program_lb(&bed, &services).unwrap()),
        Mode::Iptables => {
            program_iptables(&bed, "iptables-restore", &services).unwrap();
            None
        }
        Mode::IptablesLegacy => {
            program_iptables(&bed, "iptables-legacy-restore", &services).unwrap();
            None
        }
        Mode::Nftables => {
            program_nftables(&bed, &services).unwrap();
            None
        }
    };
    let last = services.last().unwrap();
    let target = SocketAddr::V4(SocketAddrV4::new(last.cluster_ip, last.port()));
    let latencies = load::first_request_latencies(&bed.topology.client, target, 20).unwrap();
    assert_eq!(latencies.len(), 20);
    // A Service that is not the last one leads nowhere (its endpoints do not exist): the
    // rules did not send everything to the pods.
    let first = &services[0];
    let elsewhere = SocketAddr::V4(SocketAddrV4::new(first.cluster_ip, first.port()));
    assert!(load::first_request_latencies(&bed.topology.client, elsewhere, 1).is_err());
}

#[test]
fn kube_proxy_iptables_rules_load_and_dnat() {
    fetch_last_service(Mode::Iptables);
}

#[test]
fn kube_proxy_iptables_rules_load_and_dnat_with_legacy_iptables() {
    fetch_last_service(Mode::IptablesLegacy);
}

#[test]
fn kube_proxy_nftables_rules_load_and_dnat() {
    fetch_last_service(Mode::Nftables);
}

#[test]
fn the_agent_programs_the_bench_manifests() {
    fetch_last_service(Mode::Lb);
}
