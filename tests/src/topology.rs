//! The demo topology: a client, a node (where lb attaches) and N pods running backends.
//!
//! ```text
//! client eth0 10.200.0.2/24 ── eth0 10.200.0.1/24  node  veth-pod1 10.244.1.1/24 ── eth0 10.244.1.2/24 pod1
//!   default via 10.200.0.1     (lb's interface)          veth-pod2 10.244.2.1/24 ── eth0 10.244.2.2/24 pod2
//! ```
//!
//! Every pod runs [`HttpServer`] on port 80 and [`UdpEchoServer`] on 5353, both answering with
//! the pod's name (`pod1`, `pod2`, ...). The example manifests in `examples/` describe this.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};

use crate::backends::{HttpServer, UdpEchoServer};
use crate::netns::{self, Netns};

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The node's address on its external interface (the NodePort address).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The node's external interface, where lb attaches.
pub const NODE_IF: &str = "eth0";
/// The port of every pod's HTTP server.
pub const HTTP_PORT: u16 = 80;
/// The port of every pod's UDP echo server.
pub const UDP_PORT: u16 = 5353;

/// One pod: its namespace, its name (what its servers answer) and its address.
pub struct Pod {
    /// The pod's name, `pod<i>` with i from 1.
    pub name: String,
    /// The pod's address, 10.244.i.2.
    pub ip: Ipv4Addr,
    /// The pod's namespace.
    pub ns: Netns,
}

/// The namespaces, links, addresses and servers of the topology; all removed on drop.
pub struct Topology {
    // Declared first so that they are dropped (stopped) before the namespaces.
    http: Vec<HttpServer>,
    udp: Vec<UdpEchoServer>,
    /// The client namespace: eth0 10.200.0.2/24, default via the node.
    pub client: Netns,
    /// The node namespace: eth0 10.200.0.1/24 towards the client, one veth per pod.
    pub node: Netns,
    /// The pods, pod1 first.
    pub pods: Vec<Pod>,
}

impl Topology {
    /// Builds the topology with `pods` pods (1 to 254) and starts their servers.
    pub fn new(pods: usize) -> Result<Self> {
        ensure!((1..=254).contains(&pods), "{pods} pods: must be 1 to 254");
        remove_stale_once();
        let client = Netns::new("client")?;
        let node = Netns::new("node")?;
        node.veth(NODE_IF, &client, "eth0")?;
        node.addr(NODE_IF, &format!("{NODE_IP}/24"))?;
        node.sysctl("net/ipv4/ip_forward", "1")?;
        client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
        client.default_route(&NODE_IP.to_string())?;
        client.tx_checksum_off("eth0")?;

        let mut topology = Topology {
            http: Vec::new(),
            udp: Vec::new(),
            client,
            node,
            pods: Vec::new(),
        };
        for i in 1..=pods {
            let pod = topology.add_pod(i as u8)?;
            topology
                .http
                .push(HttpServer::start(&pod.ns, HTTP_PORT, &pod.name)?);
            topology
                .udp
                .push(UdpEchoServer::start(&pod.ns, UDP_PORT, &pod.name)?);
            topology.pods.push(pod);
        }
        Ok(topology)
    }

    /// Adds pod `i` (10.244.i.2, host side `veth-pod<i>`) without servers, and returns it
    /// (it is not in [`Topology::pods`]; dropping it removes it).
    pub fn add_pod(&self, i: u8) -> Result<Pod> {
        let name = format!("pod{i}");
        let ns = Netns::new(&name)?;
        let node_side = format!("veth-{name}");
        self.node.veth(&node_side, &ns, "eth0")?;
        self.node.addr(&node_side, &format!("10.244.{i}.1/24"))?;
        let ip = Ipv4Addr::new(10, 244, i, 2);
        ns.addr("eth0", &format!("{ip}/24"))?;
        ns.default_route(&format!("10.244.{i}.1"))?;
        Ok(Pod { name, ip, ns })
    }

    /// The pods' names, pod1 first.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// The names of all namespaces of this topology.
    pub fn namespace_names(&self) -> Vec<String> {
        [&self.client, &self.node]
            .into_iter()
            .chain(self.pods.iter().map(|p| &p.ns))
            .map(|ns| ns.name().to_owned())
            .collect()
    }
}

/// Removes namespaces left behind by killed runs, once per process.
fn remove_stale_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = netns::remove_stale().context("removing stale namespaces") {
            eprintln!("{e:#}");
        }
    });
}
