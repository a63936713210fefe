//! The desired state of the datapath: every frontend with the backends it translates to.
//!
//! `translate` produces it from the cluster state (a pure function); `sync` diffs it against
//! what is programmed and writes the maps. Nothing here knows about Kubernetes objects or
//! about BPF.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::Serialize;

use crate::model::{Forwarding, IpCidr, IpFamily, Protocol, Selection};

/// A frontend: the address, port and protocol that clients send to. IPv4 frontends sort
/// before IPv6 ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Frontend {
    /// Frontend address, either family.
    pub addr: IpAddr,
    /// Frontend port.
    pub port: u16,
    /// Protocol.
    pub proto: Protocol,
}

/// The key of a frontend in the services map of its family ([`lb_common::map_names::SERVICES`]
/// or [`lb_common::map_names::SERVICES6`]). IPv4 keys sort before IPv6 ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKey {
    /// An IPv4 frontend.
    V4(lb_common::Frontend4),
    /// An IPv6 frontend.
    V6(lb_common::Frontend6),
}

impl FrontendKey {
    /// The destination pre-filter's bucket of the frontend (`lb_common::prefilter`; both
    /// families share the bitmap).
    pub fn prefilter_bucket(&self) -> u32 {
        match self {
            FrontendKey::V4(k) => lb_common::prefilter::bucket(k.addr, k.port, k.proto),
            FrontendKey::V6(k) => lb_common::prefilter::bucket6(k.addr, k.port, k.proto),
        }
    }

    /// The family of the frontend.
    pub const fn family(&self) -> IpFamily {
        match self {
            FrontendKey::V4(_) => IpFamily::V4,
            FrontendKey::V6(_) => IpFamily::V6,
        }
    }
}

impl Frontend {
    /// An IPv4 frontend.
    pub fn v4(addr: Ipv4Addr, port: u16, proto: Protocol) -> Self {
        Frontend {
            addr: addr.into(),
            port,
            proto,
        }
    }

    /// The key of this frontend in the services map of its family.
    pub fn key(&self) -> FrontendKey {
        match self.addr {
            IpAddr::V4(a) => FrontendKey::V4(lb_common::Frontend4::new(
                a.octets(),
                self.port,
                self.proto.number(),
            )),
            IpAddr::V6(a) => FrontendKey::V6(lb_common::Frontend6::new(
                a.octets(),
                self.port,
                self.proto.number(),
            )),
        }
    }

    /// The frontend a services-map key stands for; `None` for a protocol we do not handle.
    pub fn from_key(key: &FrontendKey) -> Option<Self> {
        Some(match key {
            FrontendKey::V4(k) => Frontend {
                addr: Ipv4Addr::from(k.octets()).into(),
                port: k.port(),
                proto: Protocol::from_number(k.proto)?,
            },
            FrontendKey::V6(k) => Frontend {
                addr: Ipv6Addr::from(k.octets()).into(),
                port: k.port(),
                proto: Protocol::from_number(k.proto)?,
            },
        })
    }

    /// The address and port (`a:p`, `[a]:p` for IPv6).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for Frontend {
    /// `10.0.0.1:80/TCP`, `[fd00::1]:80/TCP` (RFC 5952).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.proto)
    }
}

/// Which kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)` : `port`.
    ClusterIp,
    /// A node address : `nodePort`.
    NodePort,
    /// `spec.externalIPs` : `port`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip` : `port`.
    LoadBalancer,
}

impl FrontendKind {
    /// Whether traffic to this frontend comes from outside the cluster (externalTrafficPolicy
    /// applies to it).
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// A backend of a frontend: a pod (or any endpoint) address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    /// Endpoint address (of its frontend's family).
    pub addr: IpAddr,
    /// Target port, resolved.
    pub port: u16,
    /// The endpoint is terminating: it keeps its flows but takes no new ones.
    pub terminating: bool,
    /// The endpoint is on another node (its `nodeName` is set and is not this node's):
    /// the datapath source-NATs flows to it, so that its replies come back through this node.
    pub remote: bool,
}

impl fmt::Display for Backend {
    /// `10.1.0.1:80`, `[fd00::10]:80` (RFC 5952).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))?;
        if self.terminating {
            f.write_str(" (terminating)")?;
        }
        Ok(())
    }
}

/// Identifies the Service port a frontend belongs to, for humans and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortRef {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the Service port (empty for an unnamed single port).
    pub port_name: String,
}

impl fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// What one frontend translates to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendPlan {
    /// The Service port this frontend serves.
    pub service: ServicePortRef,
    /// Which kind of address this is.
    pub kind: FrontendKind,
    /// Backends, sorted and without duplicates. Empty means new flows are rejected (see
    /// `reject`) or dropped.
    pub backends: Vec<Backend>,
    /// Without backends: the Service port has no usable endpoint anywhere (kube-proxy's
    /// "has no endpoints": none of the endpoints it would use for any of its frontends),
    /// so new flows are rejected (ICMP port unreachable, connection refused), not dropped
    /// as when its endpoints are on other nodes under a Local policy ("has no local
    /// endpoints"). Always false with backends.
    pub reject: bool,
    /// sessionAffinity ClientIP timeout in seconds, when affinity is on.
    pub affinity_timeout_secs: Option<u32>,
    /// Client source networks (address, prefix length) allowed to use this frontend; empty
    /// means every source. Filled from `loadBalancerSourceRanges` for LoadBalancer ingress
    /// frontends only (as kube-proxy applies them), of the frontend's family; other sources
    /// are dropped.
    pub source_ranges: Vec<IpCidr>,
    /// The Service's [`crate::model::SELECTION_ANNOTATION`]; `None` leaves it to the agent's default.
    pub selection: Option<Selection>,
    /// The Service's [`crate::model::FORWARDING_ANNOTATION`]; `None` leaves it to the
    /// agent's default.
    pub forwarding: Option<Forwarding>,
    /// Which of the Service's `spec.topologyKeys` chose the backends; `None` for a Service
    /// without topology keys.
    pub topology: Option<TopologyChoice>,
    /// For an external frontend under externalTrafficPolicy Local: its Service's cluster
    /// frontend (the cluster IP of the same port and family), whose backends this node's
    /// own pods and processes get through this frontend, as kube-proxy's "short-circuit"
    /// rules send them (`backends` are for traffic from outside). `None` otherwise, and
    /// for a Service without a cluster IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_circuit: Option<Frontend>,
}

/// What `spec.topologyKeys` chose (kube-proxy v1.21's `FilterTopologyEndpoint`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum TopologyChoice {
    /// The first key whose value on this node some endpoint shares: those endpoints.
    Key(String),
    /// `*`: every endpoint.
    Any,
    /// No key matched: no endpoint.
    NoMatch,
}

impl fmt::Display for TopologyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopologyChoice::Key(key) => f.write_str(key),
            TopologyChoice::Any => f.write_str(crate::model::TOPOLOGY_KEY_ANY),
            TopologyChoice::NoMatch => f.write_str("(no key matched)"),
        }
    }
}

/// The health check kube-proxy serves for a LoadBalancer Service with externalTrafficPolicy
/// Local (`NeedsHealthCheck`) on its `spec.healthCheckNodePort`: cloud load balancers send
/// the Service's traffic only to nodes that answer 200, those with a ready endpoint of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// The ready endpoints on this node (distinct address and port, over every port of the
    /// Service), by IP family: each family's node addresses answer for that family's
    /// endpoints, as kube-proxy's proxier of each family does. A family the Service has is
    /// present, even at 0.
    pub local_endpoints: BTreeMap<IpFamily, usize>,
}

/// The whole desired state: frontend -> plan. A frontend appears once; when two Services
/// claim the same frontend, translation keeps one and reports the other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    /// Every frontend to program.
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
}
