//! The demo topology: a client, a node (where lb attaches) and N pods running backends.
//!
//! ```text
//! client eth0 10.200.0.2/24 ── eth0 10.200.0.1/24  node  veth-pod1 10.244.1.1/24 ── eth0 10.244.1.2/24 pod1
//!   default via 10.200.0.1     (lb's interface)          veth-pod2 10.244.2.1/24 ── eth0 10.244.2.2/24 pod2
//! ```
//!
//! Every pod runs [`HttpServer`] on port 80 and [`UdpEchoServer`] on 5353, both answering with
//! the pod's name (`pod1`, `pod2`, ...). The example manifests in `examples/` describe this.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};

use crate::backends::{HttpServer, UdpEchoServer};
use crate::netns::{self, Netns};

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The node's address on its external interface (the NodePort address).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The node's name, as the examples' EndpointSlices give it (`nodeName`).
pub const NODE_NAME: &str = "node";
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
    /// The pod's IPv6 address, if its topology gives it one ([`TwoNodes`]: fd00:244:i::2 on
    /// node A, fd00:245:i::2 on node B).
    pub ip6: Option<Ipv6Addr>,
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
        add_pod(&self.node, &format!("pod{i}"), [10, 244, i])
    }

    /// The pods' names, pod1 first.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// Adds IPv6 beside IPv4: client fd00:200::2 -- fd00:200::1 node (IPv6 forwarding on),
    /// pod<i> fd00:244:<i>::2 behind veth-pod<i> fd00:244:<i>::1 (the addresses of
    /// `tests/fixtures/dual-stack`), and starts HTTP on 80 and UDP echo on 5353 at each pod's
    /// IPv6 address; the servers stop when the returned value is dropped.
    pub fn add_ipv6(&self) -> Result<Vec<(HttpServer, UdpEchoServer)>> {
        let ip = |ns: &Netns, args: &[&str]| {
            ns.ip(args)
                .with_context(|| format!("ip {args:?} in {}", ns.name()))
                .map(drop)
        };
        ip(
            &self.node,
            &["addr", "add", "fd00:200::1/64", "dev", NODE_IF, "nodad"],
        )?;
        self.node.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        ip(
            &self.client,
            &["addr", "add", "fd00:200::2/64", "dev", "eth0", "nodad"],
        )?;
        ip(
            &self.client,
            &["-6", "route", "add", "default", "via", "fd00:200::1"],
        )?;
        let mut servers = Vec::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let i = i + 1;
            let host = format!("fd00:244:{i}::1");
            let dev = format!("veth-pod{i}");
            ip(
                &self.node,
                &["addr", "add", &format!("{host}/64"), "dev", &dev, "nodad"],
            )?;
            let addr = format!("fd00:244:{i}::2");
            ip(
                &pod.ns,
                &["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"],
            )?;
            ip(&pod.ns, &["-6", "route", "add", "default", "via", &host])?;
            let addr: IpAddr = addr.parse::<Ipv6Addr>().context("pod address")?.into();
            servers.push((
                HttpServer::start_on(&pod.ns, addr, HTTP_PORT, &pod.name)?,
                UdpEchoServer::start_on(&pod.ns, addr, UDP_PORT, &pod.name)?,
            ));
        }
        Ok(servers)
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

/// A pod named `name` behind `node`, in the /24 `net`: the node side is `net`.1, the pod `net`.2.
fn add_pod(node: &Netns, name: &str, net: [u8; 3]) -> Result<Pod> {
    let ns = Netns::new(name)?;
    let node_side = format!("veth-{name}");
    node.veth(&node_side, &ns, "eth0")?;
    let [a, b, c] = net;
    node.addr(&node_side, &format!("{a}.{b}.{c}.1/24"))?;
    let ip = Ipv4Addr::new(a, b, c, 2);
    ns.addr("eth0", &format!("{ip}/24"))?;
    ns.default_route(&format!("{a}.{b}.{c}.1"))?;
    Ok(Pod {
        name: name.to_owned(),
        ip,
        ip6: None,
        ns,
    })
}

/// Node B's address in [`TwoNodes`].
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// Node A's IPv6 address in [`TwoNodes`] (an IPv6 NodePort address).
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// The client's IPv6 address in [`TwoNodes`].
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
/// Node B's IPv6 address in [`TwoNodes`].
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3);
/// The names of the two nodes of [`TwoNodes`], as EndpointSlices give them (`nodeName`).
pub const NODE_A_NAME: &str = "node-a";
/// See [`NODE_A_NAME`].
pub const NODE_B_NAME: &str = "node-b";

/// Two nodes and a client on one LAN (a bridge in its own namespace), each node with its
/// own pods; lb attaches to node A's eth0.
///
/// ```text
/// client eth0 10.200.0.2/24 ─┐
/// node A eth0 10.200.0.1/24 ─┼─ br0 (namespace lan)
/// node B eth0 10.200.0.3/24 ─┘
/// node A: pods a-pod<i> 10.244.i.2 (veth 10.244.i.1/24), route 10.245.0.0/16 via node B
/// node B: pods b-pod<i> 10.245.i.2 (veth 10.245.i.1/24), route 10.244.0.0/16 via node A
/// ```
///
/// IPv6 beside it: the LAN fd00:200::/64 (client ::2, node A ::1, node B ::3; the
/// client's default route node A), node A's pods fd00:244:<i>::2/64 (routed to node A from
/// node B by fd00:244::/32), node B's fd00:245:<i>::2/64 (fd00:245::/32 via node B),
/// addresses added with `nodad` so that they are usable at once.
///
/// The client's default route is node A. Every pod runs [`HttpServer`] on [`HTTP_PORT`] and
/// [`UdpEchoServer`] on [`UDP_PORT`] on both of its addresses, answering with its name. Node B's pods send full
/// checksums (their replies reach node A's XDP, which cannot complete partial ones). A veth
/// takes the frames node A's XDP sends back out (XDP_TX) only when its peer runs an XDP
/// program: see [`TwoNodes::xdp_on_lan_port`].
pub struct TwoNodes {
    // Declared first so that they are dropped (stopped) before the namespaces.
    http: Vec<HttpServer>,
    udp: Vec<UdpEchoServer>,
    /// The client namespace.
    pub client: Netns,
    /// Node A, where lb runs.
    pub node_a: Netns,
    /// Node B.
    pub node_b: Netns,
    /// The LAN: a bridge joining the client and both nodes.
    pub lan: Netns,
    /// Node A's pods.
    pub pods_a: Vec<Pod>,
    /// Node B's pods.
    pub pods_b: Vec<Pod>,
}

impl TwoNodes {
    /// Builds the topology with `a` pods on node A and `b` on node B (0 to 254 each), and
    /// starts their servers.
    pub fn new(a: usize, b: usize) -> Result<Self> {
        ensure!(
            a <= 254 && b <= 254,
            "{a} and {b} pods: at most 254 per node"
        );
        remove_stale_once();
        let client = Netns::new("client")?;
        let node_a = Netns::new("node-a")?;
        let node_b = Netns::new("node-b")?;
        let lan = Netns::new("lan")?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        for (port, ns) in [("to-client", &client), ("to-a", &node_a), ("to-b", &node_b)] {
            lan.veth(port, ns, "eth0")?;
            lan.ip(&["link", "set", port, "master", "br0"])?;
            lan.ip(&["link", "set", port, "up"])?;
        }
        client.addr("eth0", &format!("{CLIENT_IP}/24"))?;
        client.default_route(&NODE_IP.to_string())?;
        client.tx_checksum_off("eth0")?;
        node_a.addr(NODE_IF, &format!("{NODE_IP}/24"))?;
        node_a.sysctl("net/ipv4/ip_forward", "1")?;
        node_a.ip(&[
            "route",
            "add",
            "10.245.0.0/16",
            "via",
            &NODE_B_IP.to_string(),
        ])?;
        node_b.addr("eth0", &format!("{NODE_B_IP}/24"))?;
        node_b.sysctl("net/ipv4/ip_forward", "1")?;
        node_b.ip(&["route", "add", "10.244.0.0/16", "via", &NODE_IP.to_string()])?;
        for (ns, addr) in [
            (&client, CLIENT_IP6),
            (&node_a, NODE_IP6),
            (&node_b, NODE_B_IP6),
        ] {
            add_addr6(ns, "eth0", &format!("{addr}/64"))?;
        }
        client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &NODE_IP6.to_string(),
        ])?;
        node_a.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        node_a.ip(&[
            "-6",
            "route",
            "add",
            "fd00:245::/32",
            "via",
            &NODE_B_IP6.to_string(),
        ])?;
        node_b.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        node_b.ip(&[
            "-6",
            "route",
            "add",
            "fd00:244::/32",
            "via",
            &NODE_IP6.to_string(),
        ])?;

        let mut topology = TwoNodes {
            http: Vec::new(),
            udp: Vec::new(),
            client,
            node_a,
            node_b,
            lan,
            pods_a: Vec::new(),
            pods_b: Vec::new(),
        };
        for i in 1..=a as u8 {
            let mut pod = add_pod(&topology.node_a, &format!("a-pod{i}"), [10, 244, i])?;
            pod_ip6(&topology.node_a, &mut pod, 0x244, i)?;
            topology.serve(&pod)?;
            topology.pods_a.push(pod);
        }
        for i in 1..=b as u8 {
            let mut pod = add_pod(&topology.node_b, &format!("b-pod{i}"), [10, 245, i])?;
            pod_ip6(&topology.node_b, &mut pod, 0x245, i)?;
            pod.ns.tx_checksum_off("eth0")?;
            topology.serve(&pod)?;
            topology.pods_b.push(pod);
        }
        Ok(topology)
    }

    /// Attaches the XDP program of the ELF file `object` (section `xdp`; a program that
    /// passes everything, such as the benchmarks' floor) to node A's port on the LAN, so that
    /// the frames node A's XDP transmits (XDP_TX) are received there: a veth drops them
    /// unless its peer runs XDP (GRO alone did not do on this kernel).
    pub fn xdp_on_lan_port(&self, object: &std::path::Path) -> Result<()> {
        let object = object.to_str().context("object path is not UTF-8")?;
        self.lan.ip(&[
            "link", "set", "dev", "to-a", "xdp", "obj", object, "sec", "xdp",
        ])?;
        Ok(())
    }

    fn serve(&mut self, pod: &Pod) -> Result<()> {
        self.http
            .push(HttpServer::start(&pod.ns, HTTP_PORT, &pod.name)?);
        self.udp
            .push(UdpEchoServer::start(&pod.ns, UDP_PORT, &pod.name)?);
        if let Some(ip6) = pod.ip6 {
            self.http.push(HttpServer::start_on(
                &pod.ns,
                ip6.into(),
                HTTP_PORT,
                &pod.name,
            )?);
            self.udp.push(UdpEchoServer::start_on(
                &pod.ns,
                ip6.into(),
                UDP_PORT,
                &pod.name,
            )?);
        }
        Ok(())
    }
}

/// Adds the IPv6 address `cidr` to `dev` in `ns`, usable at once (no duplicate address
/// detection).
fn add_addr6(ns: &Netns, dev: &str, cidr: &str) -> Result<()> {
    ns.ip(&["addr", "add", cidr, "dev", dev, "nodad"])?;
    Ok(())
}

/// Gives `pod` (behind `node`) the IPv6 address fd00:`net`:`i`::2/64, the node side
/// fd00:`net`:`i`::1, and its default route.
fn pod_ip6(node: &Netns, pod: &mut Pod, net: u16, i: u8) -> Result<()> {
    let host = Ipv6Addr::new(0xfd00, net, i as u16, 0, 0, 0, 0, 1);
    let ip6 = Ipv6Addr::new(0xfd00, net, i as u16, 0, 0, 0, 0, 2);
    add_addr6(node, &format!("veth-{}", pod.name), &format!("{host}/64"))?;
    add_addr6(&pod.ns, "eth0", &format!("{ip6}/64"))?;
    pod.ns
        .ip(&["-6", "route", "add", "default", "via", &host.to_string()])?;
    pod.ip6 = Some(ip6);
    Ok(())
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
