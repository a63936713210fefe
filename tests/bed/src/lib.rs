//! The test beds of the load balancer: network-namespace topologies with RAII cleanup, backend
//! servers and clients that send real traffic, a guard around the real `lb` agent
//! ([`testbed`] puts them together as the demo's topology), a fake API server ([`fakeapi`])
//! and a real Kubernetes control plane and node ([`k8s`]), and the packet bed that runs the
//! programs through BPF_PROG_TEST_RUN ([`packet`]). Used by the integration tests
//! (`tests/integration`), the benchmarks (`tests/bench`) and `cargo xtask demo`.
//!
//! Everything here needs root (namespaces, veths, bpffs).

#![deny(missing_docs)]

pub mod agent;
pub mod backends;
// Uses the agent's library (to find the cgroup2 root), like the packet bed.
#[cfg(feature = "datapath")]
pub mod cgroup;
pub mod churn;
pub mod client;
pub mod conns;
pub mod fakeapi;
pub mod image;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod manifests;
pub mod netns;
#[cfg(feature = "datapath")]
pub mod packet;
pub mod testbed;
pub mod topology;

pub use agent::{Agent, Explanation, PinDir, ServiceInfo, ensure_bpffs, examples_dir, lb_bin};
pub use backends::{HttpServer, UdpEchoServer};
#[cfg(feature = "datapath")]
pub use cgroup::Cgroup;
pub use churn::{Churn, ChurnCounts};
pub use client::{
    Tally, ensure_all_served, http_get, http_request, http_tally, udp_request, udp_tally,
};
pub use conns::{ConnPool, ConnRecord, FailureKind};
pub use fakeapi::FakeApiServer;
pub use manifests::{ClusterIpService, Condition, Folder};
pub use netns::Netns;
pub use testbed::{EXAMPLE_FRONTENDS, Testbed};
pub use topology::{
    CLIENT_IP, CLIENT_IP6, HTTP_PORT, NODE_A_NAME, NODE_B_IP, NODE_B_IP6, NODE_B_NAME, NODE_IF,
    NODE_IP, NODE_IP6, NODE_NAME, Pod, Topology, TwoNodes, UDP_PORT,
};
