//! The integration tests: one binary with a module per area. They need root, BPF, bpffs and
//! network namespaces; `cargo xtask test` builds the `lb` they run (`LB_BIN`) and runs them
//! (a plain `cargo test` leaves this crate out: it is not a default member).
//!
//! The real-cluster tests also need the Kubernetes server binaries (`LB_K8S_DIR`, see
//! `lb_testbed::k8s`).

mod agent;
mod agent_guard;
mod bench_helpers;
mod capacity;
mod connections;
mod deploy;
mod dual_stack;
mod eastwest;
mod examples;
mod frontends;
mod health;
mod kube;
mod kube_cluster;
mod migrate;
mod multinode;
mod packet;
mod packet_dsr;
mod packet_flows;
mod packet_fuzz;
mod packet_nat;
mod packet_nat6;
mod packet_v6;
mod plan;
mod real_node;
mod reject;
mod restart;
mod security;
mod topology;
