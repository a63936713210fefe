//! The validated cluster model that every source fills and `translate` reads.
//!
//! Sources (the manifests folder, later the Kubernetes watch) hand over k8s-openapi objects;
//! the conversions here (`Service::from_k8s`, `EndpointSlice::from_k8s`,
//! `EndpointSlice::from_k8s_endpoints`) check them once and keep only what the datapath needs,
//! in parsed form: `IpAddr` instead of strings, `u16` ports, enums for types and policies.
//! They apply the API server's defaults (protocol TCP, type ClusterIP, traffic policies
//! Cluster, affinity timeout 10800 s, namespace "default", EndpointSlice port name ""), because
//! objects read from files have not been through an API server.
//!
//! Both IP families are kept: a Service's cluster IPs of each family (`spec.clusterIPs`,
//! checked against `spec.ipFamilies` and `spec.ipFamilyPolicy` as the API server checks
//! them), IPv4 and IPv6 externalIPs, ingress IPs and source ranges, and the endpoints of
//! IPv4 and IPv6 EndpointSlices; `translate` gives each frontend the backends of its own
//! family. SCTP ports are valid and kept; `translate` skips them with a warning because this
//! datapath does not handle SCTP.
//!
//! Nothing here reads files or talks to an API server.

#![deny(missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

/// The label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label with which an Endpoints object opts out of being mirrored to EndpointSlices.
pub const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
/// sessionAffinityConfig.clientIP.timeoutSeconds when it is not given.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The largest sessionAffinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;
/// The namespace of an object that does not name one.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The Node label with the node's host name (the kubelet sets it, usually to the node's
/// name); the topology key an endpoint's `nodeName` answers.
pub const LABEL_HOSTNAME: &str = "kubernetes.io/hostname";
/// The Node label with the node's zone; the topology key an endpoint's `zone` answers.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The Node label with the node's region.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// The topology key that matches every endpoint (`spec.topologyKeys`, last).
pub const TOPOLOGY_KEY_ANY: &str = "*";
/// The most `spec.topologyKeys` the API accepts.
pub const MAX_TOPOLOGY_KEYS: usize = 16;

/// A namespaced object name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What is wrong with an object, with the path of the offending field.
///
/// The `field` of every variant is a path in the object as written, such as
/// `spec.ports[0].port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is absent or empty.
    #[error("{field}: required but missing")]
    Missing {
        /// Field path.
        field: String,
    },
    /// A number outside its allowed range.
    #[error("{field}: {value} is out of range {min}-{max}")]
    OutOfRange {
        /// Field path.
        field: String,
        /// The value found.
        value: i64,
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// A string that should be an IP address and is not.
    #[error("{field}: {value:?} is not an IP address")]
    InvalidIp {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
    },
    /// An address of an EndpointSlice that is not of the slice's address type (an IPv6
    /// address in an IPv4 slice, or the reverse).
    #[error("{field}: {value:?} is not an {family} address (the slice's addressType is {family})")]
    WrongFamily {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
        /// The slice's family.
        family: IpFamily,
    },
    /// A string that should be a CIDR (`address/prefix-length`) and is not.
    #[error("{field}: {value:?} is not a CIDR (address/prefix-length)")]
    InvalidCidr {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
    },
    /// A name that Kubernetes would not accept.
    #[error("{field}: {value:?} is not a valid name: {reason}")]
    InvalidName {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A value that is not one of the values the field takes.
    #[error("{field}: unsupported value {value:?}, expected one of {expected}")]
    UnsupportedValue {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },
    /// A rule between fields, such as unique port names.
    #[error("{field}: {reason}")]
    Inconsistent {
        /// Field path.
        field: String,
        /// What is inconsistent.
        reason: String,
    },
}

/// Transport protocol of a Service or EndpointSlice port, and of a frontend or backend
/// (which are TCP or UDP only: translation skips SCTP ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP: valid in Kubernetes, not handled by this datapath.
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as stored in the maps.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol with this IP protocol number, if the datapath handles it (TCP, UDP).
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    fn parse(field: String, value: Option<&str>) -> Result<Self, ValidationError> {
        match value {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(ValidationError::UnsupportedValue {
                field,
                value: other.to_owned(),
                expected: "TCP, UDP, SCTP",
            }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// How new flows of a frontend choose among its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The Maglev table entry of the flow hash: the same flow gets the same backend on
    /// every node and after every restart, and a backend change moves few flows.
    #[default]
    Maglev,
    /// A uniformly random entry of the Maglev table (as balanced as the table).
    Random,
}

/// The prefix of lb's annotations: `lb` (the component: the binary, the DaemonSet and its
/// ServiceAccount are all `lb`) under `kube-lb.io` (the project, a Kubernetes Service load
/// balancer), so that the keys never collide with another controller's and stay out of
/// the `kubernetes.io` and `k8s.io` prefixes that Kubernetes reserves for itself.
pub const ANNOTATION_PREFIX: &str = "lb.kube-lb.io/";
/// The placeholder prefix of earlier releases: still read, with a deprecation warning
/// ([`Service::deprecated_annotations`]); the key under [`ANNOTATION_PREFIX`] wins when both
/// are given.
pub const DEPRECATED_ANNOTATION_PREFIX: &str = "lb.example.io/";
/// The Service annotation that chooses the [`Selection`] of its frontends: `maglev` or
/// `random`. Without it the agent's `--selection` applies.
pub const SELECTION_ANNOTATION: &str = "lb.kube-lb.io/selection";
/// [`SELECTION_ANNOTATION`] under the deprecated prefix.
pub const DEPRECATED_SELECTION_ANNOTATION: &str = "lb.example.io/selection";
/// The Service annotation that chooses the [`Forwarding`] of its flows to backends on other
/// nodes: `snat` or `dsr`. Without it the agent's `--forwarding` applies.
pub const FORWARDING_ANNOTATION: &str = "lb.kube-lb.io/forwarding";
/// [`FORWARDING_ANNOTATION`] under the deprecated prefix.
pub const DEPRECATED_FORWARDING_ANNOTATION: &str = "lb.example.io/forwarding";
/// Every annotation lb reads: its key, and its key under the deprecated prefix.
pub const ANNOTATIONS: [(&str, &str); 2] = [
    (SELECTION_ANNOTATION, DEPRECATED_SELECTION_ANNOTATION),
    (FORWARDING_ANNOTATION, DEPRECATED_FORWARDING_ANNOTATION),
];

/// How a flow from outside the node reaches a backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Source NAT to this node's address: the replies come back through this node (what
    /// kube-proxy does). Works on any network.
    #[default]
    Snat,
    /// Direct server return: the packet is carried to the backend's node (Geneve over UDP,
    /// `lb_common::dsr`) with the client's address kept, and the replies go from there
    /// straight to the client. Every node must run lb, and the network must let a node send
    /// packets from the frontend's address.
    Dsr,
}

impl std::str::FromStr for Forwarding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snat" => Ok(Forwarding::Snat),
            "dsr" => Ok(Forwarding::Dsr),
            other => Err(format!(
                "unknown forwarding {other:?} (expected snat or dsr)"
            )),
        }
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Snat => "snat",
            Forwarding::Dsr => "dsr",
        })
    }
}

impl std::str::FromStr for Selection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "maglev" => Ok(Selection::Maglev),
            "random" => Ok(Selection::Random),
            other => Err(format!(
                "unknown selection {other:?} (expected maglev or random)"
            )),
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Selection::Maglev => "maglev",
            Selection::Random => "random",
        })
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceType {
    /// ClusterIP (the default).
    ClusterIp,
    /// NodePort.
    NodePort,
    /// LoadBalancer.
    LoadBalancer,
    /// ExternalName: a DNS alias, never proxied.
    ExternalName,
}

/// An IP family (`spec.ipFamilies`, the `addressType` of an EndpointSlice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum IpFamily {
    /// IPv4.
    #[serde(rename = "IPv4")]
    V4,
    /// IPv6.
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub const fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    fn parse(field: impl FnOnce() -> String, value: &str) -> Result<Self, ValidationError> {
        match value {
            "IPv4" => Ok(IpFamily::V4),
            "IPv6" => Ok(IpFamily::V6),
            other => Err(ValidationError::UnsupportedValue {
                field: field(),
                value: other.to_owned(),
                expected: "IPv4, IPv6",
            }),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// `spec.ipFamilyPolicy` of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IpFamilyPolicy {
    /// One family (the default).
    #[default]
    SingleStack,
    /// Both families when the cluster has both, else one.
    PreferDualStack,
    /// Both families.
    RequireDualStack,
}

/// The allocated cluster IPs of a Service: at most one of each family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterIps {
    /// The IPv4 cluster IP.
    pub v4: Option<Ipv4Addr>,
    /// The IPv6 cluster IP.
    pub v6: Option<Ipv6Addr>,
}

impl ClusterIps {
    /// The cluster IP of `family`.
    pub fn get(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.v4.map(IpAddr::V4),
            IpFamily::V6 => self.v6.map(IpAddr::V6),
        }
    }
}

/// The cluster IPs of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClusterIp {
    /// `clusterIP: None`: a headless Service, never proxied.
    Headless,
    /// No clusterIP given. An API server always allocates them; only hand-written manifests
    /// lack them.
    Unassigned,
    /// Allocated (`spec.clusterIPs`, or `spec.clusterIP` alone).
    Assigned(ClusterIps),
}

/// externalTrafficPolicy or internalTrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the default).
    Cluster,
    /// Only endpoints on this node.
    Local,
}

impl TrafficPolicy {
    fn parse(field: &str, value: Option<&str>) -> Result<Self, ValidationError> {
        match value {
            None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
            Some("Local") => Ok(TrafficPolicy::Local),
            Some(other) => Err(ValidationError::UnsupportedValue {
                field: field.to_owned(),
                value: other.to_owned(),
                expected: "Cluster, Local",
            }),
        }
    }
}

/// `spec.sessionAffinity` with its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionAffinity {
    /// No affinity (the default).
    None,
    /// ClientIP: a client address keeps its backend for `timeout_secs` after its last packet.
    ClientIp {
        /// sessionAffinityConfig.clientIP.timeoutSeconds (default 10800).
        timeout_secs: u32,
    },
}

/// `spec.trafficDistribution`. kube-proxy does not read it: the EndpointSlice controller
/// turns it into the hints of the slices, and kube-proxy follows the hints. It is kept here
/// for display.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TrafficDistribution {
    /// PreferClose (the older name of PreferSameZone).
    PreferClose,
    /// PreferSameZone.
    PreferSameZone,
    /// PreferSameNode.
    PreferSameNode,
    /// A value this version does not know (newer API servers may add some).
    Other(String),
}

/// `targetPort` of a Service port. kube-proxy does not use it: the EndpointSlices carry the
/// resolved port of every endpoint. Kept for display.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A container port name, resolved per pod by the EndpointSlice controller.
    Name(String),
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// Port name; empty for the single unnamed port of a Service.
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// The Service port (frontend port of the cluster IP, external IPs and ingress IPs).
    pub port: u16,
    /// targetPort (defaults to `port`).
    pub target_port: TargetPort,
    /// nodePort, when allocated.
    pub node_port: Option<u16>,
}

/// A load balancer ingress point of `status.loadBalancer.ingress` with an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoadBalancerIngress {
    /// The ingress IP.
    pub ip: IpAddr,
    /// ipMode: with `Proxy` the load balancer proxies to the nodes itself, and kube-proxy does
    /// not capture the ingress IP.
    pub ip_mode: IpMode,
}

/// `ipMode` of a load balancer ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpMode {
    /// Traffic arrives with the ingress IP as destination (the default).
    Vip,
    /// Traffic arrives at the node from the load balancer, not addressed to the ingress IP.
    Proxy,
}

/// An IPv4 network: address (host bits cleared) and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Ipv4Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// The network of `addr` with this prefix length (host bits cleared); `None` above 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= 32).then(|| Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix_len) == u32::from(self.addr)
    }
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An IPv6 network: address (host bits cleared) and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Ipv6Cidr {
    /// Network address.
    pub addr: Ipv6Addr,
    /// Prefix length, 0 to 128.
    pub prefix_len: u8,
}

impl Ipv6Cidr {
    /// The network of `addr` with this prefix length (host bits cleared); `None` above 128.
    pub fn new(addr: Ipv6Addr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= 128).then(|| Ipv6Cidr {
            addr: Ipv6Addr::from(u128::from(addr) & mask6(prefix_len)),
            prefix_len,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & mask6(self.prefix_len) == u128::from(self.addr)
    }
}

fn mask6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A network of either family. Serialized as its family's network (`{addr, prefix_len}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(untagged)]
pub enum IpCidr {
    /// An IPv4 network.
    V4(Ipv4Cidr),
    /// An IPv6 network.
    V6(Ipv6Cidr),
}

impl IpCidr {
    /// The network of `addr` with this prefix length; `None` when it is longer than the
    /// family's addresses.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        match addr {
            IpAddr::V4(a) => Ipv4Cidr::new(a, prefix_len).map(IpCidr::V4),
            IpAddr::V6(a) => Ipv6Cidr::new(a, prefix_len).map(IpCidr::V6),
        }
    }

    /// The network of one address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(addr) => IpCidr::V4(Ipv4Cidr {
                addr,
                prefix_len: 32,
            }),
            IpAddr::V6(addr) => IpCidr::V6(Ipv6Cidr {
                addr,
                prefix_len: 128,
            }),
        }
    }

    /// Its family.
    pub const fn family(&self) -> IpFamily {
        match self {
            IpCidr::V4(_) => IpFamily::V4,
            IpCidr::V6(_) => IpFamily::V6,
        }
    }

    /// Its prefix length.
    pub const fn prefix_len(&self) -> u8 {
        match self {
            IpCidr::V4(c) => c.prefix_len,
            IpCidr::V6(c) => c.prefix_len,
        }
    }

    /// Whether `ip` is inside this network (never for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpCidr::V4(c), IpAddr::V4(ip)) => c.contains(ip),
            (IpCidr::V6(c), IpAddr::V6(ip)) => c.contains(ip),
            _ => false,
        }
    }
}

impl From<Ipv4Cidr> for IpCidr {
    fn from(c: Ipv4Cidr) -> Self {
        IpCidr::V4(c)
    }
}

impl From<Ipv6Cidr> for IpCidr {
    fn from(c: Ipv6Cidr) -> Self {
        IpCidr::V6(c)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpCidr::V4(c) => c.fmt(f),
            IpCidr::V6(c) => c.fmt(f),
        }
    }
}

impl std::str::FromStr for IpCidr {
    type Err = String;

    /// `address/prefix-length`, either family, as the API server reads CIDRs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cidr(String::new, s)
            .map_err(|_| format!("{s:?} is not a CIDR (address/prefix-length)"))
    }
}

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace and name.
    pub id: ObjectRef,
    /// spec.type.
    pub type_: ServiceType,
    /// spec.clusterIPs / spec.clusterIP.
    pub cluster_ip: ClusterIp,
    /// The Service's IP families, primary first: those of its cluster IPs when they are
    /// assigned; else `spec.ipFamilies`, or both for `RequireDualStack`, or IPv4.
    pub ip_families: Vec<IpFamily>,
    /// spec.ipFamilyPolicy.
    pub ip_family_policy: IpFamilyPolicy,
    /// spec.ipFamilies as written (empty when not given): what an allocator honours when
    /// the Service has no cluster IP yet.
    pub ip_families_requested: Vec<IpFamily>,
    /// spec.ports.
    pub ports: Vec<ServicePort>,
    /// spec.externalIPs, both families.
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress entries with an `ip`.
    pub load_balancer_ingress: Vec<LoadBalancerIngress>,
    /// spec.loadBalancerSourceRanges, both families, as written (`0.0.0.0/0` included).
    pub load_balancer_source_ranges: Vec<IpCidr>,
    /// spec.externalTrafficPolicy.
    pub external_traffic_policy: TrafficPolicy,
    /// spec.healthCheckNodePort: where kube-proxy serves the Service's health check (a
    /// LoadBalancer Service with externalTrafficPolicy Local), when allocated.
    pub health_check_node_port: Option<u16>,
    /// spec.allocateLoadBalancerNodePorts (default true): whether a LoadBalancer Service
    /// gets node ports.
    pub allocate_load_balancer_node_ports: bool,
    /// spec.internalTrafficPolicy.
    pub internal_traffic_policy: TrafficPolicy,
    /// spec.sessionAffinity and its timeout.
    pub session_affinity: SessionAffinity,
    /// spec.trafficDistribution.
    pub traffic_distribution: Option<TrafficDistribution>,
    /// The [`SELECTION_ANNOTATION`] annotation.
    pub selection: Option<Selection>,
    /// The [`FORWARDING_ANNOTATION`] annotation.
    pub forwarding: Option<Forwarding>,
    /// The annotations given under the [`DEPRECATED_ANNOTATION_PREFIX`] (their keys), each
    /// with its key under the new prefix.
    pub deprecated_annotations: Vec<DeprecatedAnnotation>,
    /// spec.topologyKeys (Kubernetes 1.17-1.21, feature gate ServiceTopology), checked as
    /// the v1.21 API server checks them: node labels in order of preference, `*` (last) for
    /// any endpoint.
    pub topology_keys: Vec<String>,
}

/// An annotation of a Service under the [`DEPRECATED_ANNOTATION_PREFIX`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeprecatedAnnotation {
    /// The key given, e.g. `lb.example.io/selection`.
    pub key: &'static str,
    /// Its key under [`ANNOTATION_PREFIX`].
    pub replacement: &'static str,
    /// The Service gives the new key too, so this one is ignored.
    pub ignored: bool,
}

impl fmt::Display for DeprecatedAnnotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ignored {
            write!(
                f,
                "annotation {} is deprecated and ignored: {} is given too",
                self.key, self.replacement
            )
        } else {
            write!(
                f,
                "annotation {} is deprecated: rename it to {}",
                self.key, self.replacement
            )
        }
    }
}

/// The value of lb's annotation `key` (one of [`ANNOTATIONS`]) and the key it was found
/// under: the new key, else the deprecated one.
fn lb_annotation<'a>(
    annotations: Option<&'a BTreeMap<String, String>>,
    key: &'static str,
    deprecated: &mut Vec<DeprecatedAnnotation>,
) -> Option<(&'static str, &'a String)> {
    let annotations = annotations?;
    let old = ANNOTATIONS
        .iter()
        .find(|(new, _)| *new == key)
        .map(|(_, old)| *old)?;
    let new_value = annotations.get(key);
    if annotations.contains_key(old) {
        deprecated.push(DeprecatedAnnotation {
            key: old,
            replacement: key,
            ignored: new_value.is_some(),
        });
    }
    match new_value {
        Some(v) => Some((key, v)),
        None => annotations.get(old).map(|v| (old, v)),
    }
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressType {
    /// IPv4 addresses.
    Ipv4,
    /// IPv6 addresses.
    Ipv6,
    /// Domain names: ignored (kube-proxy ignores them too).
    Fqdn,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPort {
    /// Name; matches the name of the Service port (empty for an unnamed one).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number; `None` when absent or 0 (kube-proxy ignores such a port).
    pub port: Option<u16>,
}

/// The conditions of an endpoint, as written: each may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointConditions {
    /// ready; absent means ready.
    pub ready: Option<bool>,
    /// serving; absent means serving (older clusters set only `ready`).
    pub serving: Option<bool>,
    /// terminating; absent means not terminating.
    pub terminating: Option<bool>,
}

impl EndpointConditions {
    /// Ready as kube-proxy reads it: absent counts as ready.
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }

    /// Serving as kube-proxy reads it: absent counts as serving.
    pub fn is_serving(&self) -> bool {
        self.serving.unwrap_or(true)
    }

    /// Terminating as kube-proxy reads it: absent counts as not terminating.
    pub fn is_terminating(&self) -> bool {
        self.terminating.unwrap_or(false)
    }
}

/// Topology hints of an endpoint (`hints.forZones[].name`, `hints.forNodes[].name`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointHints {
    /// Zones that should use this endpoint.
    pub for_zones: BTreeSet<String>,
    /// Nodes that should use this endpoint.
    pub for_nodes: BTreeSet<String>,
}

impl AddressType {
    /// The IP family of its addresses; `None` for FQDN.
    pub const fn family(self) -> Option<IpFamily> {
        match self {
            AddressType::Ipv4 => Some(IpFamily::V4),
            AddressType::Ipv6 => Some(IpFamily::V6),
            AddressType::Fqdn => None,
        }
    }
}

/// One endpoint of an EndpointSlice with an IP address (of the slice's family).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `addresses[0]` (consumers use only the first address).
    pub address: IpAddr,
    /// Conditions.
    pub conditions: EndpointConditions,
    /// The node hosting the endpoint.
    pub node_name: Option<String>,
    /// The zone of the endpoint.
    pub zone: Option<String>,
    /// deprecatedTopology: topology labels other than the host name and zone (those are
    /// `nodeName` and `zone`), e.g. the region of slices written through the v1beta1 API.
    pub deprecated_topology: BTreeMap<String, String>,
    /// Topology hints.
    pub hints: EndpointHints,
}

impl Endpoint {
    /// The endpoint's value of the topology key `key`: `nodeName` for the host name, `zone`
    /// for the zone (where the v1 EndpointSlice API keeps them, and the only two kube-proxy
    /// v1.21 reads), `deprecatedTopology` for any other key.
    pub fn topology_value(&self, key: &str) -> Option<&str> {
        match key {
            LABEL_HOSTNAME => self.node_name.as_deref(),
            LABEL_ZONE => self.zone.as_deref(),
            other => self.deprecated_topology.get(other).map(String::as_str),
        }
    }
}

/// A validated EndpointSlice (or one subset of a legacy Endpoints object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace and name.
    pub id: ObjectRef,
    /// The Service it belongs to (label `kubernetes.io/service-name`); `None` when the label is
    /// missing, and then no Service uses it.
    pub service_name: Option<String>,
    /// addressType.
    pub address_type: AddressType,
    /// ports.
    pub ports: Vec<EndpointPort>,
    /// endpoints, all of the slice's family; always empty for FQDN.
    pub endpoints: Vec<Endpoint>,
}

/// What this node is, for traffic policies, topology and NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node name (compared with `nodeName` of endpoints and `hints.forNodes`).
    pub name: String,
    /// The addresses that NodePorts listen on, both families.
    pub addresses: Vec<IpAddr>,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The node's labels, which `spec.topologyKeys` name (kube-proxy v1.21 compares the
    /// Node object's labels with the endpoints' topology).
    pub labels: BTreeMap<String, String>,
}

/// Flags that set this node's topology labels over what its Node object says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTopology {
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `topology.kubernetes.io/region`.
    pub region: Option<String>,
    /// Whether `kubernetes.io/hostname` defaults to the node's name when the Node object
    /// does not give it (manifests: there may be no Node object at all; a cluster's kubelet
    /// always sets it, and kube-proxy v1.21 takes the label as it is).
    pub hostname_is_name: bool,
}

impl NodeInfo {
    /// This node: its `name` and NodePort `addresses`, and its labels and zone from `facts`
    /// (its Node object, if known) with the flags of `topology` over them.
    pub fn new(
        name: String,
        addresses: Vec<IpAddr>,
        facts: Option<&NodeFacts>,
        topology: &NodeTopology,
    ) -> Self {
        let mut labels = facts.map(|f| f.labels.clone()).unwrap_or_default();
        if topology.hostname_is_name && !name.is_empty() {
            labels
                .entry(LABEL_HOSTNAME.to_owned())
                .or_insert_with(|| name.clone());
        }
        for (key, value) in [
            (LABEL_ZONE, &topology.zone),
            (LABEL_REGION, &topology.region),
        ] {
            if let Some(value) = value {
                labels.insert(key.to_owned(), value.clone());
            }
        }
        NodeInfo {
            name,
            addresses,
            zone: labels.get(LABEL_ZONE).cloned(),
            labels,
        }
    }
}

/// What a source knows about a node (the kube source: its Node object; the manifests
/// source: a Node in the folder).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's InternalIP and ExternalIP addresses, both families.
    pub addresses: Vec<IpAddr>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// It is being deleted, or the cluster autoscaler is about to delete it (taint
    /// `ToBeDeletedByClusterAutoscaler`): kube-proxy's proxy health check (`/healthz`) then
    /// fails, so that load balancers stop sending to it.
    pub being_deleted: bool,
}

/// The taint with which the cluster autoscaler marks a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeFacts {
    /// The name of a Node object, checked.
    pub fn name_of(node: &core::Node) -> Result<String, ValidationError> {
        checked_name(&node.metadata, dns1123_subdomain).map(str::to_owned)
    }

    /// What a Node object says: its InternalIP then ExternalIP addresses (those that parse,
    /// each once), its zone label and its labels.
    pub fn from_k8s(node: &core::Node) -> NodeFacts {
        let mut addresses = Vec::new();
        let listed = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for wanted in ["InternalIP", "ExternalIP"] {
            for a in listed.iter().filter(|a| a.type_ == wanted) {
                if let Ok(ip) = a.address.parse::<IpAddr>()
                    && !addresses.contains(&ip)
                {
                    addresses.push(ip);
                }
            }
        }
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
        NodeFacts {
            addresses,
            zone: labels.get(LABEL_ZONE).cloned(),
            labels,
            being_deleted: node.metadata.deletion_timestamp.is_some() || tainted,
        }
    }
}

/// Everything a source knows about the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Services by namespace/name.
    pub services: BTreeMap<ObjectRef, Service>,
    /// EndpointSlices by namespace/name.
    pub slices: BTreeMap<ObjectRef, EndpointSlice>,
    /// Nodes by name, as far as the source reads them (the manifests source: the folder's;
    /// the kube source watches this node's only and keeps it apart).
    pub nodes: BTreeMap<String, NodeFacts>,
}

impl ClusterState {
    /// Adds or replaces a Service.
    pub fn insert_service(&mut self, service: Service) {
        self.services.insert(service.id.clone(), service);
    }

    /// Adds or replaces an EndpointSlice.
    pub fn insert_slice(&mut self, slice: EndpointSlice) {
        self.slices.insert(slice.id.clone(), slice);
    }
}

// ----- conversions from the API types -----

/// The namespace and name of an object, with the name checked by `check_name`.
fn object_ref(
    meta: &ObjectMeta,
    check_name: fn(&str) -> Result<(), &'static str>,
) -> Result<ObjectRef, ValidationError> {
    let name = checked_name(meta, check_name)?;
    let namespace = match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) => ns,
    };
    dns1123_label(namespace).map_err(|reason| ValidationError::InvalidName {
        field: "metadata.namespace".into(),
        value: namespace.to_owned(),
        reason,
    })?;
    Ok(ObjectRef::new(namespace, name))
}

fn dns_chars(s: &str, dots: bool) -> Result<(), &'static str> {
    let ok =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if !s.chars().all(ok) {
        return Err(if dots {
            "only lowercase letters, digits, '-' and '.' are allowed"
        } else {
            "only lowercase letters, digits and '-' are allowed"
        });
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// The name of an object, present and passing `check_name`.
fn checked_name(
    meta: &ObjectMeta,
    check_name: fn(&str) -> Result<(), &'static str>,
) -> Result<&str, ValidationError> {
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err(ValidationError::Missing {
            field: "metadata.name".into(),
        });
    }
    check_name(name).map_err(|reason| ValidationError::InvalidName {
        field: "metadata.name".into(),
        value: name.to_owned(),
        reason,
    })?;
    Ok(name)
}

/// RFC 1123 label: namespaces.
fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    dns_chars(s, false)
}

/// RFC 1035 label: Service names.
fn dns1035_label(s: &str) -> Result<(), &'static str> {
    dns1123_label(s)?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lowercase letter");
    }
    Ok(())
}

/// RFC 1123 subdomain: EndpointSlice and Endpoints names.
fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    dns_chars(s, true)
}

/// Parses an IP address of either family.
fn parse_ip(field: impl FnOnce() -> String, value: &str) -> Result<IpAddr, ValidationError> {
    value
        .parse::<IpAddr>()
        .map_err(|_| ValidationError::InvalidIp {
            field: field(),
            value: value.to_owned(),
        })
}

/// Parses a CIDR of either family (surrounding whitespace allowed, as the API allows it in
/// source ranges).
fn parse_cidr(field: impl FnOnce() -> String, value: &str) -> Result<IpCidr, ValidationError> {
    let invalid = |field: String| ValidationError::InvalidCidr {
        field,
        value: value.to_owned(),
    };
    let Some((addr, len)) = value.trim().split_once('/') else {
        return Err(invalid(field()));
    };
    // Digits only, no sign and no leading zero, like Go's ParseCIDR.
    let digits = !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit());
    let len: u8 = match len.parse() {
        Ok(n) if digits && (len == "0" || !len.starts_with('0')) => n,
        _ => return Err(invalid(field())),
    };
    addr.parse::<IpAddr>()
        .ok()
        .and_then(|ip| IpCidr::new(ip, len))
        .ok_or_else(|| invalid(field()))
}

fn port_number(field: impl FnOnce() -> String, value: i32) -> Result<u16, ValidationError> {
    u16::try_from(value)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| ValidationError::OutOfRange {
            field: field(),
            value: value.into(),
            min: 1,
            max: 65535,
        })
}

/// Checks that no two ports share a name.
fn unique_port_names<'a>(
    field: &str,
    names: impl Iterator<Item = (&'a str, Protocol)>,
    by_protocol: bool,
) -> Result<(), ValidationError> {
    let mut seen = BTreeSet::new();
    for (i, (name, proto)) in names.enumerate() {
        if !seen.insert((name, by_protocol.then_some(proto))) {
            return Err(ValidationError::Inconsistent {
                field: format!("{field}[{i}].name"),
                reason: format!("duplicate port name {name:?}"),
            });
        }
    }
    Ok(())
}

impl Service {
    /// [`Service::from_k8s_with_topology_keys`] without topology keys (k8s-openapi's Service
    /// has no `spec.topologyKeys`, which Kubernetes 1.22 removed: a source that can see it
    /// passes it on).
    pub fn from_k8s(svc: &core::Service) -> Result<Service, ValidationError> {
        Self::from_k8s_with_topology_keys(svc, &[])
    }

    /// kube-proxy's `ExternallyAccessible`: traffic from outside the cluster reaches the
    /// Service through node ports, load balancer IPs or external IPs: types NodePort and
    /// LoadBalancer, and ClusterIP with externalIPs.
    pub fn externally_accessible(&self) -> bool {
        match self.type_ {
            ServiceType::NodePort | ServiceType::LoadBalancer => true,
            ServiceType::ClusterIp => !self.external_ips.is_empty(),
            ServiceType::ExternalName => false,
        }
    }

    /// kube-proxy's `ExternalPolicyLocal`: externalTrafficPolicy Local on an externally
    /// accessible Service (elsewhere the field means nothing). Its node ports, load balancer
    /// IPs and external IPs then use this node's endpoints only.
    pub fn external_policy_local(&self) -> bool {
        self.externally_accessible() && self.external_traffic_policy == TrafficPolicy::Local
    }

    /// Validates a Service from the API (or a manifest), whose `spec.topologyKeys` are
    /// `topology_keys`, and keeps what the datapath needs.
    pub fn from_k8s_with_topology_keys(
        svc: &core::Service,
        topology_keys: &[String],
    ) -> Result<Service, ValidationError> {
        let id = object_ref(&svc.metadata, dns1035_label)?;
        let default_spec = core::ServiceSpec::default();
        let spec = svc.spec.as_ref().unwrap_or(&default_spec);

        let type_ = match spec.type_.as_deref() {
            None | Some("ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => {
                return Err(ValidationError::UnsupportedValue {
                    field: "spec.type".into(),
                    value: other.to_owned(),
                    expected: "ClusterIP, NodePort, LoadBalancer, ExternalName",
                });
            }
        };

        let (cluster_ip, ip_families, ip_family_policy) = cluster_ip(spec)?;
        // Valid: cluster_ip checked them.
        let ip_families_requested = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|f| IpFamily::parse(String::new, f).ok())
            .collect();
        let health_check_node_port = match spec.health_check_node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(|| "spec.healthCheckNodePort".into(), n)?),
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| service_port(i, p))
            .collect::<Result<Vec<_>, _>>()?;
        if ports.len() > 1
            && let Some(i) = ports.iter().position(|p| p.name.is_empty())
        {
            return Err(ValidationError::Missing {
                field: format!("spec.ports[{i}].name"),
            });
        }
        unique_port_names(
            "spec.ports",
            ports.iter().map(|p| (p.name.as_str(), p.protocol)),
            false,
        )?;

        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            external_ips.push(parse_ip(|| format!("spec.externalIPs[{i}]"), ip)?);
        }

        let mut load_balancer_source_ranges = Vec::new();
        for (i, cidr) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            load_balancer_source_ranges.push(parse_cidr(
                || format!("spec.loadBalancerSourceRanges[{i}]"),
                cidr,
            )?);
        }

        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        let mut load_balancer_ingress = Vec::new();
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let field = || format!("status.loadBalancer.ingress[{i}]");
            let ip_mode = match ing.ip_mode.as_deref() {
                None | Some("VIP") => IpMode::Vip,
                Some("Proxy") => IpMode::Proxy,
                Some(other) => {
                    return Err(ValidationError::UnsupportedValue {
                        field: format!("{}.ipMode", field()),
                        value: other.to_owned(),
                        expected: "VIP, Proxy",
                    });
                }
            };
            // An ingress with only a hostname has nothing for the datapath.
            let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue;
            };
            let ip = parse_ip(|| format!("{}.ip", field()), ip)?;
            load_balancer_ingress.push(LoadBalancerIngress { ip, ip_mode });
        }

        let session_affinity = match spec.session_affinity.as_deref() {
            None | Some("None") => SessionAffinity::None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                let timeout_secs = match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_SECS,
                    Some(t) => u32::try_from(t)
                        .ok()
                        .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(t))
                        .ok_or_else(|| ValidationError::OutOfRange {
                            field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                            value: t.into(),
                            min: 1,
                            max: MAX_AFFINITY_TIMEOUT_SECS.into(),
                        })?,
                };
                SessionAffinity::ClientIp { timeout_secs }
            }
            Some(other) => {
                return Err(ValidationError::UnsupportedValue {
                    field: "spec.sessionAffinity".into(),
                    value: other.to_owned(),
                    expected: "None, ClientIP",
                });
            }
        };

        let traffic_distribution = spec.traffic_distribution.as_deref().map(|td| match td {
            "PreferClose" => TrafficDistribution::PreferClose,
            "PreferSameZone" => TrafficDistribution::PreferSameZone,
            "PreferSameNode" => TrafficDistribution::PreferSameNode,
            other => TrafficDistribution::Other(other.to_owned()),
        });

        let mut deprecated_annotations = Vec::new();
        let selection = lb_annotation(
            svc.metadata.annotations.as_ref(),
            SELECTION_ANNOTATION,
            &mut deprecated_annotations,
        )
        .map(|(key, value)| {
            value
                .parse()
                .map_err(|_| ValidationError::UnsupportedValue {
                    field: format!("metadata.annotations[{key:?}]"),
                    value: value.clone(),
                    expected: "maglev, random",
                })
        })
        .transpose()?;
        let forwarding = lb_annotation(
            svc.metadata.annotations.as_ref(),
            FORWARDING_ANNOTATION,
            &mut deprecated_annotations,
        )
        .map(|(key, value)| {
            value
                .parse()
                .map_err(|_| ValidationError::UnsupportedValue {
                    field: format!("metadata.annotations[{key:?}]"),
                    value: value.clone(),
                    expected: "snat, dsr",
                })
        })
        .transpose()?;

        let external_traffic_policy = TrafficPolicy::parse(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?;
        check_topology_keys(topology_keys, external_traffic_policy)?;

        Ok(Service {
            id,
            type_,
            cluster_ip,
            ip_families,
            ip_family_policy,
            ip_families_requested,
            ports,
            external_ips,
            load_balancer_ingress,
            load_balancer_source_ranges,
            external_traffic_policy,
            health_check_node_port,
            allocate_load_balancer_node_ports: spec
                .allocate_load_balancer_node_ports
                .unwrap_or(true),
            internal_traffic_policy: TrafficPolicy::parse(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            session_affinity,
            traffic_distribution,
            selection,
            forwarding,
            deprecated_annotations,
            topology_keys: topology_keys.to_vec(),
        })
    }
}

/// Checks `spec.topologyKeys` as the v1.21 API server does (with the feature gate
/// ServiceTopology on), in its words: not with externalTrafficPolicy Local, at most 16, no
/// duplicates, `*` only last, every other key a qualified name (a label key). It accepts
/// them with internalTrafficPolicy Local (and kube-proxy v1.21 then follows the keys).
fn check_topology_keys(
    keys: &[String],
    external_traffic_policy: TrafficPolicy,
) -> Result<(), ValidationError> {
    let field = "spec.topologyKeys";
    if keys.is_empty() {
        return Ok(());
    }
    if external_traffic_policy == TrafficPolicy::Local {
        return Err(ValidationError::Inconsistent {
            field: field.into(),
            reason: "Forbidden: may not be specified when `externalTrafficPolicy=Local`".into(),
        });
    }
    if keys.len() > MAX_TOPOLOGY_KEYS {
        return Err(ValidationError::Inconsistent {
            field: field.into(),
            reason: format!(
                "Too many: {}: must have at most {MAX_TOPOLOGY_KEYS} items",
                keys.len()
            ),
        });
    }
    let mut seen = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        let field = format!("{field}[{i}]");
        if !seen.insert(key) {
            return Err(ValidationError::Inconsistent {
                field,
                reason: format!("Duplicate value: {key:?}"),
            });
        }
        if key == TOPOLOGY_KEY_ANY {
            if i != keys.len() - 1 {
                return Err(ValidationError::Inconsistent {
                    field,
                    reason: format!(
                        "Invalid value: {key:?}: \"*\" must be the last value specified"
                    ),
                });
            }
        } else if let Err(reason) = qualified_name(key) {
            return Err(ValidationError::InvalidName {
                field,
                value: key.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// A qualified name (a label key), as Kubernetes' `IsQualifiedName`: an optional DNS
/// subdomain prefix and `/`, then a name of at most 63 characters, alphanumeric at both
/// ends, with `-`, `_` and `.` inside.
fn qualified_name(key: &str) -> Result<(), &'static str> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty");
            }
            dns1123_subdomain(prefix).map_err(
                |_| "prefix part must be a lowercase RFC 1123 subdomain (e.g. 'example.com')",
            )?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("name part must be non-empty");
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters");
    }
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !name.chars().all(inner) || !ends(name.chars().next()) || !ends(name.chars().last()) {
        return Err(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must \
             start and end with an alphanumeric character",
        );
    }
    Ok(())
}

/// The cluster IPs, IP families and family policy of a Service, checked as the API server
/// checks them: `spec.clusterIP` is `spec.clusterIPs[0]`; at most one cluster IP per family;
/// `spec.ipFamilies[i]` is the family of `spec.clusterIPs[i]`; `SingleStack` has one family,
/// `RequireDualStack` (with assigned cluster IPs) both. Without a policy it is inferred as
/// the API server does: `RequireDualStack` for two families, else `SingleStack`.
fn cluster_ip(
    spec: &core::ServiceSpec,
) -> Result<(ClusterIp, Vec<IpFamily>, IpFamilyPolicy), ValidationError> {
    let given = match spec.ip_family_policy.as_deref() {
        None => None,
        Some("SingleStack") => Some(IpFamilyPolicy::SingleStack),
        Some("PreferDualStack") => Some(IpFamilyPolicy::PreferDualStack),
        Some("RequireDualStack") => Some(IpFamilyPolicy::RequireDualStack),
        Some(other) => {
            return Err(ValidationError::UnsupportedValue {
                field: "spec.ipFamilyPolicy".into(),
                value: other.to_owned(),
                expected: "SingleStack, PreferDualStack, RequireDualStack",
            });
        }
    };
    let mut families = Vec::new();
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        let family = IpFamily::parse(|| format!("spec.ipFamilies[{i}]"), family)?;
        if families.contains(&family) || i >= 2 {
            return Err(ValidationError::Inconsistent {
                field: format!("spec.ipFamilies[{i}]"),
                reason: "at most one entry per family (IPv4, IPv6)".into(),
            });
        }
        families.push(family);
    }
    let single = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let list = spec.cluster_ips.as_deref().unwrap_or_default();
    if let (Some(single), Some(first)) = (single, list.first())
        && single != first
    {
        return Err(ValidationError::Inconsistent {
            field: "spec.clusterIPs[0]".into(),
            reason: format!("{first:?} differs from spec.clusterIP {single:?}"),
        });
    }
    let (field, ips): (&str, Vec<&str>) = if list.is_empty() {
        ("spec.clusterIP", single.into_iter().collect())
    } else {
        ("spec.clusterIPs", list.iter().map(String::as_str).collect())
    };
    let two = families.len() == 2 || list.len() == 2;
    let policy = given.unwrap_or(if two {
        IpFamilyPolicy::RequireDualStack
    } else {
        IpFamilyPolicy::SingleStack
    });
    let check_policy = |families: &[IpFamily]| match policy {
        IpFamilyPolicy::SingleStack if families.len() > 1 => Err(ValidationError::Inconsistent {
            field: "spec.ipFamilyPolicy".into(),
            reason: "SingleStack allows one IP family, but two are given".into(),
        }),
        _ => Ok(()),
    };
    match ips.first() {
        None => {
            check_policy(&families)?;
            if families.is_empty() {
                families = match policy {
                    IpFamilyPolicy::RequireDualStack => IpFamily::ALL.to_vec(),
                    _ => vec![IpFamily::V4],
                };
            } else if policy == IpFamilyPolicy::RequireDualStack && families.len() < 2 {
                // The API server adds the other family (the given one stays primary).
                let other = IpFamily::ALL.into_iter().find(|f| !families.contains(f));
                families.extend(other);
            }
            return Ok((ClusterIp::Unassigned, families, policy));
        }
        Some(&"None") => {
            check_policy(&families)?;
            return Ok((ClusterIp::Headless, families, policy));
        }
        Some(_) => {}
    }
    let mut assigned = ClusterIps::default();
    let mut ip_families = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = || {
            if list.is_empty() {
                field.to_owned()
            } else {
                format!("{field}[{i}]")
            }
        };
        let ip = parse_ip(field, ip)?;
        let family = IpFamily::of(&ip);
        if ip_families.contains(&family) || i >= 2 {
            return Err(ValidationError::Inconsistent {
                field: field(),
                reason: format!("{ip} is a second {family} cluster IP (at most one per family)"),
            });
        }
        if let Some(&want) = families.get(i)
            && want != family
        {
            return Err(ValidationError::Inconsistent {
                field: format!("spec.ipFamilies[{i}]"),
                reason: format!("{want} does not match {}: {ip} is {family}", field()),
            });
        }
        ip_families.push(family);
        match ip {
            IpAddr::V4(ip) => assigned.v4 = Some(ip),
            IpAddr::V6(ip) => assigned.v6 = Some(ip),
        }
    }
    if let Some(extra) = families.get(ip_families.len()) {
        return Err(ValidationError::Inconsistent {
            field: format!("spec.ipFamilies[{}]", ip_families.len()),
            reason: format!("{extra} is listed but {field} has no {extra} address"),
        });
    }
    check_policy(&ip_families)?;
    if policy == IpFamilyPolicy::RequireDualStack && ip_families.len() < 2 {
        return Err(ValidationError::Inconsistent {
            field: field.to_owned(),
            reason: "ipFamilyPolicy RequireDualStack needs a cluster IP of each family".into(),
        });
    }
    Ok((ClusterIp::Assigned(assigned), ip_families, policy))
}

fn service_port(i: usize, p: &core::ServicePort) -> Result<ServicePort, ValidationError> {
    let field = |f: &str| format!("spec.ports[{i}].{f}");
    let port = port_number(|| field("port"), p.port)?;
    let target_port = match &p.target_port {
        None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
        Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
        Some(IntOrString::Int(n)) => TargetPort::Number(port_number(|| field("targetPort"), *n)?),
        Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
    };
    let node_port = match p.node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(|| field("nodePort"), n)?),
    };
    Ok(ServicePort {
        name: p.name.clone().unwrap_or_default(),
        protocol: Protocol::parse(field("protocol"), p.protocol.as_deref())?,
        port,
        target_port,
        node_port,
    })
}

impl EndpointSlice {
    /// Validates an EndpointSlice from the API (or a manifest). FQDN slices are kept without
    /// endpoints.
    pub fn from_k8s(slice: &discovery::EndpointSlice) -> Result<EndpointSlice, ValidationError> {
        let id = object_ref(&slice.metadata, dns1123_subdomain)?;
        let service_name = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|n| !n.is_empty())
            .cloned();
        let address_type = match slice.address_type.as_str() {
            "IPv4" => AddressType::Ipv4,
            "IPv6" => AddressType::Ipv6,
            "FQDN" => AddressType::Fqdn,
            "" => {
                return Err(ValidationError::Missing {
                    field: "addressType".into(),
                });
            }
            other => {
                return Err(ValidationError::UnsupportedValue {
                    field: "addressType".into(),
                    value: other.to_owned(),
                    expected: "IPv4, IPv6, FQDN",
                });
            }
        };
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let port = match p.port {
                None | Some(0) => None,
                Some(n) => Some(port_number(|| format!("ports[{i}].port"), n)?),
            };
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::parse(format!("ports[{i}].protocol"), p.protocol.as_deref())?,
                port,
            });
        }
        unique_port_names(
            "ports",
            ports.iter().map(|p| (p.name.as_str(), p.protocol)),
            true,
        )?;

        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            let Some(first) = ep.addresses.first() else {
                return Err(ValidationError::Missing {
                    field: format!("endpoints[{i}].addresses"),
                });
            };
            let Some(family) = address_type.family() else {
                continue;
            };
            let field = || format!("endpoints[{i}].addresses[0]");
            let address = parse_ip(field, first)?;
            if IpFamily::of(&address) != family {
                return Err(ValidationError::WrongFamily {
                    field: field(),
                    value: first.clone(),
                    family,
                });
            }
            let conditions = ep
                .conditions
                .as_ref()
                .map(|c| EndpointConditions {
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                })
                .unwrap_or_default();
            let hints = ep
                .hints
                .as_ref()
                .map(|h| EndpointHints {
                    for_zones: h
                        .for_zones
                        .iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    for_nodes: h
                        .for_nodes
                        .iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                })
                .unwrap_or_default();
            endpoints.push(Endpoint {
                address,
                conditions,
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                deprecated_topology: ep.deprecated_topology.clone().unwrap_or_default(),
                hints,
            });
        }
        Ok(EndpointSlice {
            id,
            service_name,
            address_type,
            ports,
            endpoints,
        })
    }

    /// Converts a legacy Endpoints object the way the EndpointSlice mirroring controller does:
    /// one slice per subset (a subset's addresses share its ports, like a slice's), labelled
    /// with the Endpoints' name as Service name; `addresses` become ready endpoints,
    /// `notReadyAddresses` not-ready ones (serving and terminating left unset, as the mirroring
    /// controller leaves them). A subset's IPv6 addresses go to a slice of their own (a
    /// slice has one address type), made only when there are some. An Endpoints object
    /// labelled `endpointslice.kubernetes.io/skip-mirror: "true"` gives no slices.
    ///
    /// The slices are named `<name>:endpoints:<subset index>` (IPv4) and
    /// `<name>:endpoints6:<subset index>` (IPv6); a real EndpointSlice name cannot contain
    /// `:`, so they never collide with one.
    pub fn from_k8s_endpoints(ep: &core::Endpoints) -> Result<Vec<EndpointSlice>, ValidationError> {
        let id = object_ref(&ep.metadata, dns1123_subdomain)?;
        let labels = ep.metadata.labels.as_ref();
        if labels
            .and_then(|l| l.get(LABEL_SKIP_MIRROR))
            .is_some_and(|v| v == "true")
        {
            return Ok(Vec::new());
        }
        let mut slices = Vec::new();
        for (s, subset) in ep.subsets.iter().flatten().enumerate() {
            let mut ports = Vec::new();
            for (i, p) in subset.ports.iter().flatten().enumerate() {
                ports.push(EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: Protocol::parse(
                        format!("subsets[{s}].ports[{i}].protocol"),
                        p.protocol.as_deref(),
                    )?,
                    port: Some(port_number(
                        || format!("subsets[{s}].ports[{i}].port"),
                        p.port,
                    )?),
                });
            }
            unique_port_names(
                &format!("subsets[{s}].ports"),
                ports.iter().map(|p| (p.name.as_str(), p.protocol)),
                true,
            )?;
            let mut endpoints = Vec::new();
            let mut endpoints6 = Vec::new();
            let lists = [
                ("addresses", &subset.addresses, true),
                ("notReadyAddresses", &subset.not_ready_addresses, false),
            ];
            for (list, addresses, ready) in lists {
                for (i, a) in addresses.iter().flatten().enumerate() {
                    let field = || format!("subsets[{s}].{list}[{i}].ip");
                    let address = parse_ip(field, &a.ip)?;
                    let list = match address {
                        IpAddr::V4(_) => &mut endpoints,
                        IpAddr::V6(_) => &mut endpoints6,
                    };
                    list.push(Endpoint {
                        address,
                        conditions: EndpointConditions {
                            ready: Some(ready),
                            serving: None,
                            terminating: None,
                        },
                        node_name: a.node_name.clone(),
                        zone: None,
                        deprecated_topology: BTreeMap::new(),
                        hints: EndpointHints::default(),
                    });
                }
            }
            let v6 = (!endpoints6.is_empty()).then(|| EndpointSlice {
                id: ObjectRef::new(id.namespace.clone(), format!("{}:endpoints6:{s}", id.name)),
                service_name: Some(id.name.clone()),
                address_type: AddressType::Ipv6,
                ports: ports.clone(),
                endpoints: endpoints6,
            });
            slices.push(EndpointSlice {
                id: ObjectRef::new(id.namespace.clone(), format!("{}:endpoints:{s}", id.name)),
                service_name: Some(id.name.clone()),
                address_type: AddressType::Ipv4,
                ports,
                endpoints,
            });
            slices.extend(v6);
        }
        Ok(slices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Result<Service, ValidationError> {
        Service::from_k8s(&serde_yaml_ng::from_str(yaml).expect("test YAML parses"))
    }

    fn slice(yaml: &str) -> Result<EndpointSlice, ValidationError> {
        EndpointSlice::from_k8s(&serde_yaml_ng::from_str(yaml).expect("test YAML parses"))
    }

    const HTTPD: &str = "
apiVersion: v1
kind: Service
metadata: {name: httpd-svc}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 8080, targetPort: 80}]
";

    #[test]
    fn service_defaults() {
        let s = svc(HTTPD).unwrap();
        assert_eq!(
            s,
            Service {
                id: ObjectRef::new("default", "httpd-svc"),
                type_: ServiceType::ClusterIp,
                cluster_ip: ClusterIp::Assigned(ClusterIps {
                    v4: Some(Ipv4Addr::new(10, 96, 0, 10)),
                    v6: None
                }),
                ip_families: vec![IpFamily::V4],
                ip_family_policy: IpFamilyPolicy::SingleStack,
                ip_families_requested: vec![],
                ports: vec![ServicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                    target_port: TargetPort::Number(80),
                    node_port: None,
                }],
                external_ips: vec![],
                load_balancer_ingress: vec![],
                load_balancer_source_ranges: vec![],
                external_traffic_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
                allocate_load_balancer_node_ports: true,
                internal_traffic_policy: TrafficPolicy::Cluster,
                session_affinity: SessionAffinity::None,
                traffic_distribution: None,
                selection: None,
                forwarding: None,
                deprecated_annotations: vec![],
                topology_keys: vec![],
            }
        );
    }

    #[test]
    fn selection_annotation() {
        let with = |annotations: &str| {
            svc(&HTTPD.replace(
                "metadata: {name: httpd-svc}",
                &format!("metadata: {{name: httpd-svc, annotations: {{{annotations}}}}}"),
            ))
        };
        let new = |value: &str| with(&format!("lb.kube-lb.io/selection: {value}"));
        assert_eq!(new("random").unwrap().selection, Some(Selection::Random));
        assert_eq!(new("maglev").unwrap().selection, Some(Selection::Maglev));
        assert_eq!(new("maglev").unwrap().deprecated_annotations, vec![]);
        let error = new("round-robin").unwrap_err().to_string();
        assert!(error.contains("lb.kube-lb.io/selection"), "{error}");
        assert!(error.contains("round-robin"), "{error}");

        // The placeholder prefix of earlier releases still works, and says so.
        let old = with("lb.example.io/selection: random").unwrap();
        assert_eq!(old.selection, Some(Selection::Random));
        assert_eq!(
            old.deprecated_annotations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "annotation lb.example.io/selection is deprecated: rename it to lb.kube-lb.io/selection"
            ]
        );
        let error = with("lb.example.io/selection: rr").unwrap_err().to_string();
        assert_eq!(
            error,
            "metadata.annotations[\"lb.example.io/selection\"]: unsupported value \"rr\", expected one of maglev, random"
        );
        // Both: the new key wins; the old one, even invalid, is ignored and said to be.
        let both = with("lb.example.io/selection: rr, lb.kube-lb.io/selection: random").unwrap();
        assert_eq!(both.selection, Some(Selection::Random));
        assert_eq!(
            both.deprecated_annotations[0].to_string(),
            "annotation lb.example.io/selection is deprecated and ignored: lb.kube-lb.io/selection is given too"
        );
    }

    #[test]
    fn forwarding_annotation() {
        let with = |annotations: &str| {
            svc(&HTTPD.replace(
                "metadata: {name: httpd-svc}",
                &format!("metadata: {{name: httpd-svc, annotations: {{{annotations}}}}}"),
            ))
        };
        assert_eq!(with("a: b").unwrap().forwarding, None);
        let new = |value: &str| with(&format!("lb.kube-lb.io/forwarding: {value}"));
        assert_eq!(new("dsr").unwrap().forwarding, Some(Forwarding::Dsr));
        assert_eq!(new("snat").unwrap().forwarding, Some(Forwarding::Snat));
        assert_eq!(
            new("tunnel").unwrap_err().to_string(),
            "metadata.annotations[\"lb.kube-lb.io/forwarding\"]: unsupported value \"tunnel\", expected one of snat, dsr"
        );
        // Under the placeholder prefix too, said to be deprecated.
        let old = with("lb.example.io/forwarding: dsr").unwrap();
        assert_eq!(old.forwarding, Some(Forwarding::Dsr));
        assert_eq!(
            old.deprecated_annotations[0].to_string(),
            "annotation lb.example.io/forwarding is deprecated: rename it to lb.kube-lb.io/forwarding"
        );
    }

    #[test]
    fn service_full() {
        let s = svc("
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.0.0.1
  clusterIPs: [10.0.0.1, 'fd00::1']
  externalIPs: [192.0.2.1, '2001:db8::1']
  loadBalancerSourceRanges: [' 10.1.2.3/8 ', '2001:db8::/32']
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  trafficDistribution: PreferClose
  ports:
  - {name: http, port: 80, targetPort: http-web-svc, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {hostname: lb.example}, {ip: 198.51.100.2, ipMode: Proxy}, {ip: '2001:db8::7'}]
")
        .unwrap();
        assert_eq!(s.type_, ServiceType::LoadBalancer);
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            s.cluster_ip,
            ClusterIp::Assigned(ClusterIps {
                v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
                v6: Some(v6("fd00::1"))
            })
        );
        assert_eq!(s.ip_families, vec![IpFamily::V4, IpFamily::V6]);
        // Two cluster IPs and no policy: inferred as the API server does.
        assert_eq!(s.ip_family_policy, IpFamilyPolicy::RequireDualStack);
        assert_eq!(
            s.external_ips,
            vec![
                IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)),
                v6("2001:db8::1").into()
            ]
        );
        assert_eq!(
            s.load_balancer_source_ranges,
            vec![
                IpCidr::V4(Ipv4Cidr {
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                    prefix_len: 8
                }),
                IpCidr::V6(Ipv6Cidr {
                    addr: v6("2001:db8::"),
                    prefix_len: 32
                })
            ]
        );
        assert_eq!(
            s.load_balancer_ingress,
            vec![
                LoadBalancerIngress {
                    ip: Ipv4Addr::new(198, 51, 100, 1).into(),
                    ip_mode: IpMode::Vip
                },
                LoadBalancerIngress {
                    ip: Ipv4Addr::new(198, 51, 100, 2).into(),
                    ip_mode: IpMode::Proxy
                },
                LoadBalancerIngress {
                    ip: v6("2001:db8::7").into(),
                    ip_mode: IpMode::Vip
                },
            ]
        );
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(
            s.session_affinity,
            SessionAffinity::ClientIp { timeout_secs: 60 }
        );
        assert_eq!(
            s.traffic_distribution,
            Some(TrafficDistribution::PreferClose)
        );
        assert_eq!(
            s.ports[0].target_port,
            TargetPort::Name("http-web-svc".into())
        );
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.ports[1].target_port, TargetPort::Number(53));
        assert_eq!(s.health_check_node_port, None);
        assert!(s.allocate_load_balancer_node_ports);
        assert_eq!(s.ip_families_requested, vec![]);
    }

    #[test]
    fn topology_keys_are_checked_as_the_v1_21_api_server_checks_them() {
        // Each refusal in the words of the v1.21 API server (ServiceTopology=true), which
        // refused exactly these and accepted the rest (kubectl create, tried once).
        let with = |spec: &str, keys: &[&str]| {
            let svc: core::Service = serde_yaml_ng::from_str(&format!(
                "{{apiVersion: v1, kind: Service, metadata: {{name: a}}, spec: {spec}}}"
            ))
            .unwrap();
            let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            Service::from_k8s_with_topology_keys(&svc, &keys).map(|s| s.topology_keys)
        };
        let ports = "{ports: [{port: 80}]}";
        let refused: &[(&str, &[&str], &str)] = &[
            (
                "{type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                &["kubernetes.io/hostname"],
                "spec.topologyKeys: Forbidden: may not be specified when `externalTrafficPolicy=Local`",
            ),
            (
                "{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                &["*"],
                "spec.topologyKeys: Forbidden: may not be specified when `externalTrafficPolicy=Local`",
            ),
            (
                ports,
                &["a", "a"],
                "spec.topologyKeys[1]: Duplicate value: \"a\"",
            ),
            (
                ports,
                &["*", "a"],
                "spec.topologyKeys[0]: Invalid value: \"*\": \"*\" must be the last value specified",
            ),
            (
                ports,
                &[
                    "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11", "k12",
                    "k13", "k14", "k15", "k16", "k17",
                ],
                "spec.topologyKeys: Too many: 17: must have at most 16 items",
            ),
            (
                ports,
                &["-bad-"],
                "spec.topologyKeys[0]: \"-bad-\" is not a valid name: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ),
            (
                ports,
                &["x/y/z"],
                "spec.topologyKeys[0]: \"x/y/z\" is not a valid name: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ),
            (
                ports,
                &[""],
                "spec.topologyKeys[0]: \"\" is not a valid name: name part must be non-empty",
            ),
        ];
        for (spec, keys, want) in refused {
            assert_eq!(
                with(spec, keys).unwrap_err().to_string(),
                *want,
                "{spec} {keys:?}"
            );
        }
        let accepted: &[(&str, &[&str])] = &[
            (ports, &["kubernetes.io/hostname", "*"]),
            (
                "{internalTrafficPolicy: Local, ports: [{port: 80}]}",
                &["kubernetes.io/hostname"],
            ),
            (
                "{type: NodePort, externalTrafficPolicy: Cluster, ports: [{port: 80}]}",
                &["kubernetes.io/hostname"],
            ),
            (
                "{clusterIP: None, ports: [{port: 80}]}",
                &["topology.kubernetes.io/zone"],
            ),
            (ports, &["example.com/Rack_1"]),
            (
                "{type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                &[],
            ),
        ];
        for (spec, keys) in accepted {
            assert_eq!(
                with(spec, keys),
                Ok(keys.iter().map(|k| k.to_string()).collect())
            );
        }
    }

    #[test]
    fn what_an_allocator_reads() {
        let s = svc("
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: PreferDualStack
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  allocateLoadBalancerNodePorts: false
  ports: [{port: 80}]
")
        .unwrap();
        assert_eq!(s.cluster_ip, ClusterIp::Unassigned);
        assert_eq!(s.ip_families_requested, vec![IpFamily::V6, IpFamily::V4]);
        assert_eq!(s.health_check_node_port, Some(32000));
        assert!(!s.allocate_load_balancer_node_ports);
        assert_eq!(
            "10.96.0.0/12".parse::<IpCidr>().unwrap().to_string(),
            "10.96.0.0/12"
        );
        assert_eq!(
            "10.96.0.0".parse::<IpCidr>().unwrap_err(),
            "\"10.96.0.0\" is not a CIDR (address/prefix-length)"
        );
    }

    #[test]
    fn cluster_ip_forms() {
        let with = |spec: &str| {
            svc(&format!(
                "{{metadata: {{name: a}}, apiVersion: v1, kind: Service, spec: {spec}}}"
            ))
            .map(|s| s.cluster_ip)
        };
        let ips = |v4: Option<[u8; 4]>, v6: Option<&str>| {
            ClusterIp::Assigned(ClusterIps {
                v4: v4.map(Ipv4Addr::from),
                v6: v6.map(|s| s.parse().unwrap()),
            })
        };
        assert_eq!(with("{}"), Ok(ClusterIp::Unassigned));
        assert_eq!(with("{clusterIP: ''}"), Ok(ClusterIp::Unassigned));
        assert_eq!(with("{clusterIP: None}"), Ok(ClusterIp::Headless));
        assert_eq!(
            with("{clusterIPs: ['fd00::1']}"),
            Ok(ips(None, Some("fd00::1")))
        );
        assert_eq!(
            with("{clusterIPs: ['fd00::1', 10.0.0.2]}"),
            Ok(ips(Some([10, 0, 0, 2]), Some("fd00::1")))
        );
    }

    #[test]
    fn ip_families_and_policies() {
        let with = |spec: &str| {
            svc(&format!(
                "{{metadata: {{name: a}}, apiVersion: v1, kind: Service, spec: {spec}}}"
            ))
            .map(|s| (s.ip_families, s.ip_family_policy))
        };
        use IpFamily::{V4, V6};
        use IpFamilyPolicy::*;
        let cases: &[(&str, Vec<IpFamily>, IpFamilyPolicy)] = &[
            ("{clusterIP: 10.0.0.1}", vec![V4], SingleStack),
            ("{clusterIPs: ['fd00::1']}", vec![V6], SingleStack),
            (
                "{clusterIPs: ['fd00::1', 10.0.0.1], ipFamilies: [IPv6, IPv4]}",
                vec![V6, V4],
                RequireDualStack,
            ),
            (
                "{clusterIPs: [10.0.0.1], ipFamilies: [IPv4], ipFamilyPolicy: PreferDualStack}",
                vec![V4],
                PreferDualStack,
            ),
            (
                "{clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilyPolicy: PreferDualStack}",
                vec![V4, V6],
                PreferDualStack,
            ),
            // Hand-written, no cluster IPs: the families asked for.
            ("{ipFamilies: [IPv6]}", vec![V6], SingleStack),
            (
                "{ipFamilyPolicy: RequireDualStack}",
                vec![V4, V6],
                RequireDualStack,
            ),
            (
                "{ipFamilyPolicy: PreferDualStack}",
                vec![V4],
                PreferDualStack,
            ),
            (
                "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6]}",
                vec![V6, V4],
                RequireDualStack,
            ),
            ("{}", vec![V4], SingleStack),
        ];
        for (spec, families, policy) in cases {
            assert_eq!(with(spec), Ok((families.clone(), *policy)), "for {spec}");
        }
    }

    #[test]
    fn service_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "{spec: {ports: [{port: 70000}]}}",
                "spec.ports[0].port: 70000 is out of range 1-65535",
            ),
            (
                "{spec: {clusterIP: 10.0.0.300}}",
                "spec.clusterIP: \"10.0.0.300\" is not an IP address",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.1, nope], clusterIP: 10.0.0.1}}",
                "spec.clusterIPs[1]: \"nope\" is not an IP address",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.2], clusterIP: 10.0.0.1}}",
                "spec.clusterIPs[0]: \"10.0.0.2\" differs from spec.clusterIP \"10.0.0.1\"",
            ),
            (
                "{spec: {ports: [{port: 1, nodePort: -1}]}}",
                "spec.ports[0].nodePort: -1 is out of range 1-65535",
            ),
            (
                "{spec: {ports: [{port: 1, targetPort: 65536}]}}",
                "spec.ports[0].targetPort: 65536 is out of range 1-65535",
            ),
            (
                "{spec: {ports: [{port: 1, protocol: HTTP}]}}",
                "spec.ports[0].protocol: unsupported value \"HTTP\", expected one of TCP, UDP, SCTP",
            ),
            (
                "{spec: {ports: [{port: 1, name: a}, {port: 2}]}}",
                "spec.ports[1].name: required but missing",
            ),
            (
                "{spec: {ports: [{port: 1, name: a}, {port: 2, name: a, protocol: UDP}]}}",
                "spec.ports[1].name: duplicate port name \"a\"",
            ),
            (
                "{spec: {externalIPs: [1.2.3]}}",
                "spec.externalIPs[0]: \"1.2.3\" is not an IP address",
            ),
            (
                "{spec: {loadBalancerSourceRanges: [10.0.0.0/33]}}",
                "spec.loadBalancerSourceRanges[0]: \"10.0.0.0/33\" is not a CIDR (address/prefix-length)",
            ),
            (
                "{spec: {loadBalancerSourceRanges: [10.0.0.0]}}",
                "spec.loadBalancerSourceRanges[0]: \"10.0.0.0\" is not a CIDR (address/prefix-length)",
            ),
            (
                "{spec: {type: Magic}}",
                "spec.type: unsupported value \"Magic\", expected one of ClusterIP, NodePort, LoadBalancer, ExternalName",
            ),
            (
                "{spec: {type: LoadBalancer, healthCheckNodePort: 65536}}",
                "spec.healthCheckNodePort: 65536 is out of range 1-65535",
            ),
            (
                "{spec: {externalTrafficPolicy: Global}}",
                "spec.externalTrafficPolicy: unsupported value \"Global\", expected one of Cluster, Local",
            ),
            (
                "{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range 1-86400",
            ),
            (
                "{status: {loadBalancer: {ingress: [{ip: x}]}}}",
                "status.loadBalancer.ingress[0].ip: \"x\" is not an IP address",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilies: [IPv6, IPv4]}}",
                "spec.ipFamilies[0]: IPv6 does not match spec.clusterIPs[0]: 10.0.0.1 is IPv4",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.1], ipFamilies: [IPv4, IPv6]}}",
                "spec.ipFamilies[1]: IPv6 is listed but spec.clusterIPs has no IPv6 address",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.1, 10.0.0.2]}}",
                "spec.clusterIPs[1]: 10.0.0.2 is a second IPv4 cluster IP (at most one per family)",
            ),
            (
                "{spec: {clusterIPs: ['fd00::1', 'fd00:::2']}}",
                "spec.clusterIPs[1]: \"fd00:::2\" is not an IP address",
            ),
            (
                "{spec: {clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilyPolicy: SingleStack}}",
                "spec.ipFamilyPolicy: SingleStack allows one IP family, but two are given",
            ),
            (
                "{spec: {clusterIPs: ['fd00::1'], ipFamilyPolicy: RequireDualStack}}",
                "spec.clusterIPs: ipFamilyPolicy RequireDualStack needs a cluster IP of each family",
            ),
            (
                "{spec: {ipFamilies: [IPv4, IPv4]}}",
                "spec.ipFamilies[1]: at most one entry per family (IPv4, IPv6)",
            ),
            (
                "{spec: {ipFamilies: [IPv7]}}",
                "spec.ipFamilies[0]: unsupported value \"IPv7\", expected one of IPv4, IPv6",
            ),
            (
                "{spec: {ipFamilyPolicy: DualStack}}",
                "spec.ipFamilyPolicy: unsupported value \"DualStack\", expected one of SingleStack, PreferDualStack, RequireDualStack",
            ),
            (
                "{spec: {externalIPs: ['2001:db8::g']}}",
                "spec.externalIPs[0]: \"2001:db8::g\" is not an IP address",
            ),
            (
                "{spec: {loadBalancerSourceRanges: ['2001:db8::/129']}}",
                "spec.loadBalancerSourceRanges[0]: \"2001:db8::/129\" is not a CIDR (address/prefix-length)",
            ),
        ];
        for (body, want) in cases {
            let yaml = format!(
                "{{apiVersion: v1, kind: Service, metadata: {{name: a}}, {}",
                &body[1..]
            );
            assert_eq!(svc(&yaml).unwrap_err().to_string(), *want, "for {body}");
        }
    }

    #[test]
    fn names_are_checked() {
        let err = svc("{apiVersion: v1, kind: Service, metadata: {}}").unwrap_err();
        assert_eq!(
            err,
            ValidationError::Missing {
                field: "metadata.name".into()
            }
        );
        let err = svc("{apiVersion: v1, kind: Service, metadata: {name: Web}}").unwrap_err();
        assert!(
            matches!(err, ValidationError::InvalidName { ref field, .. } if field == "metadata.name")
        );
        let err = svc("{apiVersion: v1, kind: Service, metadata: {name: 1web}}").unwrap_err();
        assert!(matches!(err, ValidationError::InvalidName { .. }));
        let err = svc("{apiVersion: v1, kind: Service, metadata: {name: web, namespace: a.b}}")
            .unwrap_err();
        assert!(
            matches!(err, ValidationError::InvalidName { ref field, .. } if field == "metadata.namespace")
        );
    }

    #[test]
    fn slice_conversion() {
        let s = slice(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {port: 0, name: x}]
endpoints:
- addresses: [10.1.0.1]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  zone: z1
  hints: {forZones: [{name: z1}], forNodes: [{name: n1}]}
- addresses: [10.1.0.2]
",
        )
        .unwrap();
        assert_eq!(s.id, ObjectRef::new("shop", "web-abc"));
        assert_eq!(s.service_name.as_deref(), Some("web"));
        assert_eq!(
            s.ports,
            vec![
                EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: Some(8080)
                },
                EndpointPort {
                    name: "x".into(),
                    protocol: Protocol::Tcp,
                    port: None
                },
            ]
        );
        assert_eq!(
            s.endpoints[0].conditions,
            EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true)
            }
        );
        assert_eq!(
            s.endpoints[0].hints.for_zones,
            BTreeSet::from(["z1".to_owned()])
        );
        assert_eq!(
            s.endpoints[0].hints.for_nodes,
            BTreeSet::from(["n1".to_owned()])
        );
        assert_eq!(s.endpoints[1].conditions, EndpointConditions::default());
        assert!(s.endpoints[1].conditions.is_ready());
        assert!(s.endpoints[1].conditions.is_serving());
        assert!(!s.endpoints[1].conditions.is_terminating());
    }

    #[test]
    fn ipv6_slices_keep_their_endpoints_and_fqdn_ones_none() {
        let s = slice(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ['fd00::1'], nodeName: n1}, {addresses: ['FD00:0::2'], conditions: {ready: false}}]
",
        )
        .unwrap();
        assert_eq!(s.address_type, AddressType::Ipv6);
        let addrs: Vec<(String, bool)> = s
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.conditions.is_ready()))
            .collect();
        assert_eq!(
            addrs,
            [("fd00::1".to_owned(), true), ("fd00::2".to_owned(), false)]
        );
        let fqdn = slice(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-dns}
addressType: FQDN
endpoints: [{addresses: [web.example]}]
",
        )
        .unwrap();
        assert!(fqdn.endpoints.is_empty());
    }

    #[test]
    fn slice_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.300]}]",
                "endpoints[0].addresses[0]: \"10.0.0.300\" is not an IP address",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]",
                "endpoints[0].addresses[0]: \"fd00::1\" is not an IPv4 address (the slice's addressType is IPv4)",
            ),
            (
                "addressType: IPv6\nendpoints: [{addresses: [10.0.0.1]}]",
                "endpoints[0].addresses[0]: \"10.0.0.1\" is not an IPv6 address (the slice's addressType is IPv6)",
            ),
            (
                "addressType: IPv6\nendpoints: [{addresses: ['fd00::1::2']}]",
                "endpoints[0].addresses[0]: \"fd00::1::2\" is not an IP address",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: []}]",
                "endpoints[0].addresses: required but missing",
            ),
            (
                "addressType: IPv4\nports: [{port: 65536}]",
                "ports[0].port: 65536 is out of range 1-65535",
            ),
            (
                "addressType: IPv5",
                "addressType: unsupported value \"IPv5\", expected one of IPv4, IPv6, FQDN",
            ),
        ];
        for (body, want) in cases {
            let yaml = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s}}\n{body}"
            );
            assert_eq!(slice(&yaml).unwrap_err().to_string(), *want, "for {body}");
        }
    }

    #[test]
    fn endpoints_conversion() {
        let ep: core::Endpoints = serde_yaml_ng::from_str(
            "
apiVersion: v1
kind: Endpoints
metadata: {name: ext, namespace: shop}
subsets:
- addresses: [{ip: 192.0.2.10, nodeName: n1}, {ip: '2001:db8::1'}]
  notReadyAddresses: [{ip: 192.0.2.11}]
  ports: [{port: 80, name: http}]
- addresses: [{ip: 192.0.2.12}]
  ports: [{port: 53, protocol: UDP}]
",
        )
        .unwrap();
        let slices = EndpointSlice::from_k8s_endpoints(&ep).unwrap();
        assert_eq!(slices.len(), 3);
        assert_eq!(slices[0].id, ObjectRef::new("shop", "ext:endpoints:0"));
        // The subset's IPv6 address: a slice of its own, with the subset's ports.
        assert_eq!(slices[1].id, ObjectRef::new("shop", "ext:endpoints6:0"));
        assert_eq!(slices[1].address_type, AddressType::Ipv6);
        assert_eq!(slices[1].ports, slices[0].ports);
        assert_eq!(
            slices[1]
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect::<Vec<_>>(),
            ["2001:db8::1"]
        );
        let slices = [slices[0].clone(), slices[2].clone()];
        assert_eq!(slices[0].service_name.as_deref(), Some("ext"));
        let addrs: Vec<_> = slices[0]
            .endpoints
            .iter()
            .map(|e| (e.address, e.conditions.ready, e.node_name.as_deref()))
            .collect();
        assert_eq!(
            addrs,
            vec![
                (Ipv4Addr::new(192, 0, 2, 10).into(), Some(true), Some("n1")),
                (Ipv4Addr::new(192, 0, 2, 11).into(), Some(false), None)
            ]
        );
        assert_eq!(
            slices[1].ports,
            vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Udp,
                port: Some(53)
            }]
        );

        let bad: core::Endpoints =
            serde_yaml_ng::from_str("{metadata: {name: x}, subsets: [{addresses: [{ip: nope}]}]}")
                .unwrap();
        assert_eq!(
            EndpointSlice::from_k8s_endpoints(&bad)
                .unwrap_err()
                .to_string(),
            "subsets[0].addresses[0].ip: \"nope\" is not an IP address"
        );
    }

    #[test]
    fn cidr_contains() {
        let c = Ipv4Cidr::new(Ipv4Addr::new(10, 1, 2, 3), 16).unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains(Ipv4Addr::new(10, 1, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 1)));
        let all = Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0).unwrap();
        assert_eq!(all.addr, Ipv4Addr::UNSPECIFIED);
        assert!(all.contains(Ipv4Addr::new(255, 255, 255, 255)));
        assert!(Ipv4Cidr::new(Ipv4Addr::LOCALHOST, 33).is_none());
    }
}
