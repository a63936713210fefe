//! The load balancer's agent and CLI, as a pipeline of stages, one folder each; a stage imports
//! only from the stages above it:
//!
//! - [`model`]: the validated Kubernetes objects (no dependencies);
//! - [`metrics`]: what the sources and the agent report (no dependencies);
//! - [`source`]: cluster state from the API server or a folder of manifests (model, metrics);
//! - [`plan`]: translation to the desired frontends and backends, Maglev (model, source);
//! - [`datapath`]: the pinned maps behind one family-polymorphic trait, the programs, the
//!   pin directory, east-west, migration, counters (model, plan);
//! - [`sync`]: the desired state into the maps, write by write (model, plan, datapath);
//! - [`agent`]: the loop that runs them all.

pub mod agent;
pub mod datapath;
pub mod health;
pub mod http;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod source;
pub mod sync;

#[cfg(test)]
mod layering;

/// The eBPF object (XDP and TC programs, maps), built by build.rs and embedded.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Programs that do nothing (`lb_noop_xdp`, `lb_noop_tc`), embedded the same way: the floor
/// the benchmarks measure the real programs against.
pub static NOOP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-noop"));

/// The benchmarks' packet generator (`lb_pktgen_xdp`; see `lb_common::pktgen`), embedded
/// the same way.
pub static PKTGEN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pktgen"));

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// A fixed pseudo-random sequence (xorshift32): each call gives a number below `n`.
    pub fn walk(mut seed: u32) -> impl FnMut(u32) -> u32 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        }
    }

    /// The objects of a YAML stream (Services, EndpointSlices, Endpoints), which must all be
    /// valid; nothing allocated.
    pub fn state(yaml: &str) -> crate::model::ClusterState {
        let set = crate::source::manifests::load::load_str(std::path::Path::new("t.yaml"), yaml);
        let errors: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{errors:#?}");
        set.state
    }
}
