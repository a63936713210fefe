//! The load balancer's agent and CLI: sources of cluster state, translation to the desired
//! datapath state, and the BPF maps and programs that carry it.

pub mod agent;
pub mod datapath;
pub mod desired;
pub mod inspect;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod sync;
pub mod sys;
pub mod translate;

/// The eBPF object (XDP and TC programs, maps), built by build.rs and embedded.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Programs that do nothing (`lb_noop_xdp`, `lb_noop_tc`), embedded the same way: the floor
/// the benchmarks measure the real programs against.
pub static NOOP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-noop"));
