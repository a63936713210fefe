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
        Mode::Direct => panic!("the direct mode programs no Service"),
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

/// The packets-per-second bed forwards the generator's frames in each way of forwarding and
/// the sink counts them, translated as the mode translates (`measure_one` fails otherwise:
/// no frame at the backend's address and port, or from another source than expected).
#[test]
fn the_pps_generator_circulates_through_each_mode_and_the_sink_counts_it() {
    use lb_bench::pps::{self, BackendKind, L4, PpsMode, PpsPlan};
    let plan = PpsPlan {
        seconds: 0.2,
        warmup: 0.1,
        flows: 64,
        ..PpsPlan::new(true)
    };
    let cases = [
        (PpsMode::Routing, BackendKind::Remote, L4::Udp),
        (PpsMode::Lb, BackendKind::Remote, L4::Tcp),
        (PpsMode::Lb, BackendKind::Local, L4::Udp),
        (PpsMode::Iptables, BackendKind::Remote, L4::Tcp),
        (PpsMode::Nftables, BackendKind::Local, L4::Tcp),
    ];
    for (mode, kind, proto) in cases {
        let (run, checked) = pps::measure_one(&plan, mode, kind, 10, proto)
            .unwrap_or_else(|e| panic!("{mode:?} {kind:?} {proto}: {e:#}"));
        assert!(
            run.sink_mpps > 0.0 && run.node_ns > 0.0 && run.node_busy > 0.0,
            "{mode:?} {kind:?} {proto}: {run:?}"
        );
        assert!(
            run.circulating > 0 && run.circulating <= u64::from(plan.seeds),
            "{mode:?} {kind:?} {proto}: {run:?}"
        );
        assert!(checked.contains(&format!("{proto}")), "{checked}");
    }
}
