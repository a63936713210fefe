//! The demo topology with the real `lb` agent on the node, programmed from `examples/`.

use anyhow::Result;

use crate::agent::{Agent, examples_dir};
use crate::topology::{NODE_IF, Topology};

/// The frontends that the example manifests define, as `lb services` names them.
pub const EXAMPLE_FRONTENDS: &[&str] = &[
    "10.96.0.10:8080/TCP",
    "10.96.0.11:8080/TCP",
    "10.200.0.1:30080/TCP",
    "10.96.0.12:5353/UDP",
    "10.96.0.13:80/TCP",
    "10.200.0.1:30081/TCP",
    "10.97.0.1:80/TCP",
    "10.98.0.1:80/TCP",
];

/// A two-pod [`Topology`] and an [`Agent`] on its node, serving `examples/`.
pub struct Testbed {
    /// Declared first so that it is stopped and torn down before the namespaces go.
    pub agent: Agent,
    /// The namespaces and servers.
    pub topology: Topology,
}

impl Testbed {
    /// Builds the topology, starts the agent, and waits until `frontends` (see
    /// [`EXAMPLE_FRONTENDS`]) are programmed with both pods as backends.
    pub fn start(frontends: &[&str]) -> Result<Self> {
        let topology = Topology::new(2)?;
        let agent = Agent::start(&topology.node, &examples_dir(), NODE_IF)?;
        agent.wait_for(frontends, topology.pods.len() as u32)?;
        Ok(Testbed { agent, topology })
    }
}
