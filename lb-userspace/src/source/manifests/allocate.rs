//! The API server's allocators, for a folder of manifests: what an API server would fill in
//! when a Service leaves it out, so that an application's manifests work as they are.
//!
//! - `spec.clusterIPs`: a Service without cluster IPs (not headless, not ExternalName) gets
//!   one per IP family it asks for, from the `--service-cidr` of that family (Kubernetes'
//!   default range 10.96.0.0/12), as the API server chooses the families: `spec.ipFamilies`
//!   when given, else the first `--service-cidr`'s family; PreferDualStack adds the other
//!   family when there is a range of it, RequireDualStack needs both (else none is
//!   allocated, as the API server refuses such a Service).
//! - `spec.ports[].nodePort` of a NodePort Service, and of a LoadBalancer Service unless
//!   `allocateLoadBalancerNodePorts: false`, from `--service-node-port-range`
//!   (30000-32767); ports with the same port number (TCP and UDP of one port, say) share
//!   one node port, as the API server gives them.
//! - `spec.healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy Local,
//!   from the same range.
//!
//! Deterministic and collision-free, on every node and after every restart: every value is a
//! function of the folder (and the ranges) alone. Values written in the folder are taken
//! first, whatever their range. Then each missing value is at home at the place its hash
//! names in the range (FNV-1a of `namespace/name`, with `:<port>` for a node port and
//! `:healthCheckNodePort`): every value whose home is free takes it (in namespace/name
//! order, for two with one home); then every value whose home was taken probes onwards from
//! it to the next free one, in the same order. As the API server's allocators do since
//! Kubernetes 1.27 and 1.29 (KEP-3070, KEP-3668), a range is split in two bands: homes are in
//! the upper band, and probing reaches the lower band last, so that it stays free for values
//! written by hand (kube-dns' 10.96.0.10, say). A value at its home stays there while the
//! folder changes, unless a value written into the folder, or a new Service that sorts first
//! and has the same home, takes it; only values that had to probe may move more.

#![deny(missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use crate::model::{
    ClusterIp, ClusterIps, ClusterState, IpCidr, IpFamily, IpFamilyPolicy, ObjectRef, Service,
    ServiceType,
};

/// Kubernetes' default Service range (`--service-cluster-ip-range`).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
/// Kubernetes' default node port range (`--service-node-port-range`).
pub const DEFAULT_NODE_PORTS: RangeInclusive<u16> = 30000..=32767;
/// The most host bits a Service range may have (the API server's limit: /12 for IPv4,
/// /108 for IPv6).
const MAX_HOST_BITS: u8 = 20;

/// Where allocated values come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    service_cidrs: Vec<IpCidr>,
    node_ports: RangeInclusive<u16>,
}

/// A range that cannot be allocated from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Two Service ranges of one family.
    #[error("--service-cidr {second}: a second {family} range (at most one per family)")]
    SecondOfFamily {
        /// The family.
        family: IpFamily,
        /// The second range.
        second: IpCidr,
    },
    /// A range too large or too small.
    #[error(
        "--service-cidr {cidr}: {reason} (an IPv4 range of /12 to /30, an IPv6 range of /108 to /126)"
    )]
    Size {
        /// The range.
        cidr: IpCidr,
        /// Too large or too small.
        reason: &'static str,
    },
    /// A node port range that is empty or includes 0.
    #[error("--service-node-port-range {0}-{1}: not a range of ports (1-65535, first <= last)")]
    NodePorts(u16, u16),
}

impl Default for Ranges {
    /// Kubernetes' defaults: 10.96.0.0/12 and 30000-32767.
    fn default() -> Self {
        Ranges {
            service_cidrs: vec![DEFAULT_SERVICE_CIDR.parse().expect("a valid CIDR")],
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

impl Ranges {
    /// Service ranges (at most one per family; the first one's family is the cluster's
    /// primary) and a node port range.
    pub fn new(
        service_cidrs: Vec<IpCidr>,
        node_ports: RangeInclusive<u16>,
    ) -> Result<Self, RangeError> {
        let mut seen = BTreeSet::new();
        for &cidr in &service_cidrs {
            if !seen.insert(cidr.family()) {
                return Err(RangeError::SecondOfFamily {
                    family: cidr.family(),
                    second: cidr,
                });
            }
            let host_bits = host_bits(cidr);
            if host_bits > MAX_HOST_BITS {
                return Err(RangeError::Size {
                    cidr,
                    reason: "too large",
                });
            }
            if host_bits < 2 {
                return Err(RangeError::Size {
                    cidr,
                    reason: "too small",
                });
            }
        }
        if *node_ports.start() == 0 || node_ports.start() > node_ports.end() {
            return Err(RangeError::NodePorts(
                *node_ports.start(),
                *node_ports.end(),
            ));
        }
        Ok(Ranges {
            service_cidrs,
            node_ports,
        })
    }

    /// The Service range of `family`.
    fn cidr(&self, family: IpFamily) -> Option<IpCidr> {
        self.service_cidrs
            .iter()
            .copied()
            .find(|c| c.family() == family)
    }
}

fn host_bits(cidr: IpCidr) -> u8 {
    match cidr {
        IpCidr::V4(c) => 32 - c.prefix_len,
        IpCidr::V6(c) => 128 - c.prefix_len,
    }
}

/// Parses `--service-node-port-range`: `first-last`.
pub fn parse_node_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let parse = |p: &str| p.trim().parse::<u16>().ok();
    match s.split_once('-').map(|(a, b)| (parse(a), parse(b))) {
        Some((Some(a), Some(b))) if a != 0 && a <= b => Ok(a..=b),
        _ => Err(format!(
            "{s:?} is not a port range (first-last, 1-65535, e.g. 30000-32767)"
        )),
    }
}

/// What was allocated to a Service, or could not be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// A value was allocated.
    Allocated {
        /// The Service.
        service: ObjectRef,
        /// The field, e.g. `spec.clusterIPs[0]` or `spec.ports[0].nodePort`.
        field: String,
        /// The value.
        value: String,
        /// The range it comes from.
        range: String,
    },
    /// A value could not be allocated.
    NotAllocated {
        /// The Service.
        service: ObjectRef,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

impl Note {
    /// The Service it is about.
    pub fn service(&self) -> &ObjectRef {
        match self {
            Note::Allocated { service, .. } | Note::NotAllocated { service, .. } => service,
        }
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::Allocated {
                service,
                field,
                value,
                range,
            } => write!(f, "{service}: {field} {value} allocated from {range}"),
            Note::NotAllocated {
                service,
                field,
                reason,
            } => write!(f, "{service}: {field} not allocated: {reason}"),
        }
    }
}

/// The values allocated to one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Allocation {
    /// Cluster IPs in the Service's family order; empty when none was allocated.
    cluster_ips: Vec<IpAddr>,
    /// A node port for each port number whose ports lacked one.
    node_ports: BTreeMap<u16, u16>,
    health_check_node_port: Option<u16>,
    notes: Vec<Note>,
}

/// Allocates for the Services of a [`ClusterState`] as they change: it keeps the Services
/// that lack values as written ([`Allocator::update`] puts their completed form in the
/// state) and what they got.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    ranges: Ranges,
    /// The Services that lack values, as written.
    requests: BTreeMap<ObjectRef, Service>,
    allocations: BTreeMap<ObjectRef, Allocation>,
}

/// What [`Allocator::update`] did.
#[derive(Debug, Default)]
pub struct Updated {
    /// Services not among those updated whose allocated values changed (another Service
    /// took or freed one), with the form they had in the state before.
    pub moved: BTreeMap<ObjectRef, Service>,
    /// What was allocated, or could not be, for Services whose allocation is new or changed.
    pub notes: Vec<Note>,
}

impl Allocator {
    /// An allocator from `ranges` that knows no Service yet.
    pub fn new(ranges: Ranges) -> Self {
        Allocator {
            ranges,
            ..Allocator::default()
        }
    }

    /// Takes in that `services` may have changed in `state` (which holds them as written, or
    /// not at all when they are gone), allocates again for every Service that lacks values,
    /// and puts the completed Services in `state`.
    pub fn update<'a>(
        &mut self,
        state: &mut ClusterState,
        services: impl IntoIterator<Item = &'a ObjectRef>,
    ) -> Updated {
        let touched: BTreeSet<&ObjectRef> = services.into_iter().collect();
        for &id in &touched {
            match state.services.get(id) {
                Some(svc) if self.needs_allocation(svc) => {
                    self.requests.insert(id.clone(), svc.clone());
                }
                _ => {
                    self.requests.remove(id);
                }
            }
        }
        let allocations = self.allocate(state);
        let mut updated = Updated::default();
        for (id, raw) in &self.requests {
            let allocation = &allocations[id];
            let completed = complete(raw, allocation);
            let before = state.services.insert(id.clone(), completed.clone());
            if !touched.contains(id)
                && let Some(before) = before
                && before != completed
            {
                updated.moved.insert(id.clone(), before);
            }
            if self.allocations.get(id) != Some(allocation) || touched.contains(id) {
                updated.notes.extend(allocation.notes.iter().cloned());
            }
        }
        self.allocations = allocations;
        updated
    }

    /// Whether the API server would fill something in.
    fn needs_allocation(&self, svc: &Service) -> bool {
        let cluster_ip =
            svc.cluster_ip == ClusterIp::Unassigned && svc.type_ != ServiceType::ExternalName;
        let node_ports = wants_node_ports(svc) && svc.ports.iter().any(|p| p.node_port.is_none());
        cluster_ip || node_ports || wants_health_check_port(svc)
    }

    /// The allocation of every request. Values written in the state are taken first; then,
    /// in namespace/name order, each value its own hash names (its home) when that is free;
    /// then, in the same order, the values whose home was taken probe onwards from it.
    fn allocate(&self, state: &ClusterState) -> BTreeMap<ObjectRef, Allocation> {
        let mut ips: BTreeMap<IpFamily, Pool<IpAddr>> = self
            .ranges
            .service_cidrs
            .iter()
            .map(|&cidr| (cidr.family(), Pool::addresses(cidr)))
            .collect();
        let mut ports = Pool::ports(&self.ranges.node_ports);
        let written = state
            .services
            .iter()
            .filter(|(id, _)| !self.requests.contains_key(*id))
            .map(|(_, svc)| svc)
            .chain(self.requests.values());
        for svc in written {
            if let ClusterIp::Assigned(assigned) = svc.cluster_ip {
                for family in IpFamily::ALL {
                    if let (Some(ip), Some(pool)) = (assigned.get(family), ips.get_mut(&family)) {
                        pool.taken.insert(ip);
                    }
                }
            }
            ports
                .taken
                .extend(svc.ports.iter().filter_map(|p| p.node_port));
            ports.taken.extend(svc.health_check_node_port);
        }

        let mut allocations = BTreeMap::new();
        let mut needs: Vec<(ObjectRef, Need)> = Vec::new();
        for (id, svc) in &self.requests {
            let mut allocation = Allocation::default();
            for need in self.needs(svc, &mut allocation) {
                needs.push((id.clone(), need));
            }
            allocations.insert(id.clone(), allocation);
        }
        // Homes first, then the probes: a value at its home moves only when a value written
        // into the folder, or a Service sorting first with the same home, takes it.
        let mut got: Vec<Option<Value>> = needs
            .iter()
            .map(|(_, need)| match need {
                Need::ClusterIp { family, .. } => ips
                    .get_mut(family)
                    .and_then(|pool| pool.take_home(need.hash()))
                    .map(Value::Ip),
                Need::NodePort { .. } => ports.take_home(need.hash()).map(Value::Port),
            })
            .collect();
        for ((_, need), got) in needs.iter().zip(&mut got) {
            if got.is_none() {
                *got = match need {
                    Need::ClusterIp { family, .. } => ips
                        .get_mut(family)
                        .and_then(|pool| pool.probe(need.hash()))
                        .map(Value::Ip),
                    Need::NodePort { .. } => ports.probe(need.hash()).map(Value::Port),
                };
            }
        }
        for ((id, need), got) in needs.into_iter().zip(got) {
            if let Some(allocation) = allocations.get_mut(&id) {
                self.assign(&id, need, got, allocation);
            }
        }
        allocations
    }

    /// What `svc` lacks, in the order the API server fills it in. Cluster IPs that cannot
    /// be allocated at all are noted in `out`.
    fn needs(&self, svc: &Service, out: &mut Allocation) -> Vec<Need> {
        let mut needs = Vec::new();
        let id = svc.id.to_string();
        if svc.cluster_ip == ClusterIp::Unassigned && svc.type_ != ServiceType::ExternalName {
            match self.families(svc) {
                Ok(families) => {
                    needs.extend(families.into_iter().enumerate().map(|(index, family)| {
                        Need::ClusterIp {
                            key: id.clone(),
                            family,
                            index,
                        }
                    }))
                }
                Err(reason) => out.notes.push(Note::NotAllocated {
                    service: svc.id.clone(),
                    field: "spec.clusterIPs".into(),
                    reason,
                }),
            }
        }
        if wants_node_ports(svc) {
            // Ports with one port number share a node port, a written one if any.
            let written: BTreeSet<u16> = svc
                .ports
                .iter()
                .filter(|p| p.node_port.is_some())
                .map(|p| p.port)
                .collect();
            let mut numbers = BTreeSet::new();
            for (i, port) in svc.ports.iter().enumerate() {
                if port.node_port.is_none()
                    && !written.contains(&port.port)
                    && numbers.insert(port.port)
                {
                    needs.push(Need::NodePort {
                        key: format!("{id}:{}", port.port),
                        field: format!("spec.ports[{i}].nodePort"),
                        port: Some(port.port),
                    });
                }
            }
        }
        if wants_health_check_port(svc) {
            needs.push(Need::NodePort {
                key: format!("{id}:healthCheckNodePort"),
                field: "spec.healthCheckNodePort".into(),
                port: None,
            });
        }
        needs
    }

    /// The families the API server would give `svc` cluster IPs of, or why it would give it
    /// none.
    fn families(&self, svc: &Service) -> Result<Vec<IpFamily>, String> {
        let mut families: Vec<IpFamily> = svc.ip_families_requested.clone();
        if families.is_empty() {
            families.extend(self.ranges.service_cidrs.first().map(|c| c.family()));
        }
        let other = IpFamily::ALL
            .into_iter()
            .find(|f| !families.contains(f))
            .filter(|_| families.len() == 1);
        match svc.ip_family_policy {
            IpFamilyPolicy::SingleStack => families.truncate(1),
            IpFamilyPolicy::PreferDualStack => {
                families.extend(other.filter(|&o| self.ranges.cidr(o).is_some()));
            }
            IpFamilyPolicy::RequireDualStack => families.extend(other),
        }
        let missing: Vec<String> = families
            .iter()
            .filter(|&&f| self.ranges.cidr(f).is_none())
            .map(ToString::to_string)
            .collect();
        if families.is_empty() {
            return Err("no --service-cidr is given".into());
        }
        if !missing.is_empty() {
            return Err(format!("no --service-cidr of {}", missing.join(" and ")));
        }
        Ok(families)
    }

    /// Records what `need` got.
    fn assign(&self, id: &ObjectRef, need: Need, got: Option<Value>, out: &mut Allocation) {
        let (field, range) = match &need {
            Need::ClusterIp { family, index, .. } => (
                format!("spec.clusterIPs[{index}]"),
                self.ranges
                    .cidr(*family)
                    .map_or_else(String::new, |c| c.to_string()),
            ),
            Need::NodePort { field, .. } => {
                let r = &self.ranges.node_ports;
                (field.clone(), format!("{}-{}", r.start(), r.end()))
            }
        };
        let note = match got {
            None => Note::NotAllocated {
                service: id.clone(),
                field,
                reason: format!("every value of {range} is taken"),
            },
            Some(value) => {
                match (value, &need) {
                    (Value::Ip(ip), _) => out.cluster_ips.push(ip),
                    (
                        Value::Port(p),
                        Need::NodePort {
                            port: Some(number), ..
                        },
                    ) => {
                        out.node_ports.insert(*number, p);
                    }
                    (Value::Port(p), _) => out.health_check_node_port = Some(p),
                }
                Note::Allocated {
                    service: id.clone(),
                    field,
                    value: value.to_string(),
                    range,
                }
            }
        };
        out.notes.push(note);
    }
}

/// One value a Service lacks.
#[derive(Clone, Debug)]
enum Need {
    /// A cluster IP of `family`, the `index`th of the Service's.
    ClusterIp {
        key: String,
        family: IpFamily,
        index: usize,
    },
    /// A node port: for the ports of port number `port`, or (`None`) the health check's.
    NodePort {
        key: String,
        field: String,
        port: Option<u16>,
    },
}

impl Need {
    fn hash(&self) -> u64 {
        match self {
            Need::ClusterIp { key, .. } | Need::NodePort { key, .. } => hash(key),
        }
    }
}

/// An allocated value.
#[derive(Clone, Copy, Debug)]
enum Value {
    Ip(IpAddr),
    Port(u16),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Ip(ip) => ip.fmt(f),
            Value::Port(port) => port.fmt(f),
        }
    }
}

/// The values of a range: `size` of them, the first `lower` the static band, those taken.
struct Pool<T> {
    size: u64,
    lower: u64,
    value: Box<dyn Fn(u64) -> T>,
    taken: HashSet<T>,
}

impl Pool<IpAddr> {
    /// The addresses of a Service range: not the network address, nor IPv4's broadcast
    /// address, at most 65,535 of an IPv6 range (the API server's limits); a static band of
    /// size/16 bounded by 16 and 256 (KEP-3070).
    fn addresses(cidr: IpCidr) -> Self {
        let size = 1u64 << host_bits(cidr);
        let size = match cidr {
            IpCidr::V4(_) => size - 2,
            IpCidr::V6(_) => size.min(1 << 16) - 1,
        };
        Pool {
            size,
            lower: band(size, 16, 16, 256),
            value: Box::new(move |offset| match cidr {
                IpCidr::V4(c) => Ipv4Addr::from(u32::from(c.addr) + 1 + offset as u32).into(),
                IpCidr::V6(c) => Ipv6Addr::from(u128::from(c.addr) + 1 + u128::from(offset)).into(),
            }),
            taken: HashSet::new(),
        }
    }
}

impl Pool<u16> {
    /// The node ports of `range`; a static band of size/32 bounded by 16 and 128 (KEP-3668).
    fn ports(range: &RangeInclusive<u16>) -> Self {
        let (first, size) = (*range.start(), u64::from(range.end() - range.start()) + 1);
        Pool {
            size,
            lower: band(size, 16, 32, 128),
            value: Box::new(move |offset| first + offset as u16),
            taken: HashSet::new(),
        }
    }
}

impl<T: Copy + Eq + std::hash::Hash> Pool<T> {
    /// The home of `hash`: its place in the upper band.
    fn home(&self, hash: u64) -> u64 {
        self.lower + hash % (self.size - self.lower)
    }

    /// Takes the home of `hash` if it is free.
    fn take_home(&mut self, hash: u64) -> Option<T> {
        let value = (self.value)(self.home(hash));
        self.taken.insert(value).then_some(value)
    }

    /// Takes the first free value after the home of `hash` in the upper band (wrapping
    /// within it), else from its place in the lower band onwards.
    fn probe(&mut self, hash: u64) -> Option<T> {
        let upper = self.size - self.lower;
        let home = self.home(hash) - self.lower;
        let in_upper = (1..=upper).map(|i| self.lower + (home + i) % upper);
        let in_lower = (0..self.lower).map(|i| hash.wrapping_add(i) % self.lower.max(1));
        let offsets: Vec<u64> = in_upper.chain(in_lower).collect();
        for offset in offsets {
            let value = (self.value)(offset);
            if self.taken.insert(value) {
                return Some(value);
            }
        }
        None
    }
}

/// Whether `svc`'s ports get node ports.
fn wants_node_ports(svc: &Service) -> bool {
    match svc.type_ {
        ServiceType::NodePort => true,
        ServiceType::LoadBalancer => svc.allocate_load_balancer_node_ports,
        ServiceType::ClusterIp | ServiceType::ExternalName => false,
    }
}

/// Whether `svc` needs a health check node port it lacks (kube-proxy's `NeedsHealthCheck`).
fn wants_health_check_port(svc: &Service) -> bool {
    svc.type_ == ServiceType::LoadBalancer
        && svc.external_policy_local()
        && svc.health_check_node_port.is_none()
}

/// `svc` with `allocation` filled in.
fn complete(svc: &Service, allocation: &Allocation) -> Service {
    let mut svc = svc.clone();
    if !allocation.cluster_ips.is_empty() {
        let mut ips = ClusterIps::default();
        for ip in &allocation.cluster_ips {
            match *ip {
                IpAddr::V4(v4) => ips.v4 = Some(v4),
                IpAddr::V6(v6) => ips.v6 = Some(v6),
            }
        }
        svc.cluster_ip = ClusterIp::Assigned(ips);
        svc.ip_families = allocation.cluster_ips.iter().map(IpFamily::of).collect();
    }
    // Ports with one port number share: a written one, else the allocated one.
    let written: BTreeMap<u16, u16> = svc
        .ports
        .iter()
        .filter_map(|p| Some((p.port, p.node_port?)))
        .collect();
    for port in &mut svc.ports {
        if port.node_port.is_none() {
            port.node_port = written
                .get(&port.port)
                .or_else(|| allocation.node_ports.get(&port.port))
                .copied();
        }
    }
    if allocation.health_check_node_port.is_some() {
        svc.health_check_node_port = allocation.health_check_node_port;
    }
    svc
}

/// The size of the lower band of a range of `size` values: `size / step` bounded by `min`
/// and `max` (KEP-3070, KEP-3668); none when that would leave less than as much above it.
fn band(size: u64, min: u64, step: u64, max: u64) -> u64 {
    let lower = (size / step).clamp(min, max);
    if lower * 2 > size { 0 } else { lower }
}

/// FNV-1a, 64 bits: the same on every machine and in every release.
fn hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::state;

    fn svc(name: &str, spec: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    }

    /// Allocates for every Service of `yaml` with `ranges`: each Service's cluster IPs and
    /// node ports (`name ips ports health`), and the notes.
    fn allocated(yaml: &str, ranges: Ranges) -> (Vec<String>, Vec<String>) {
        let mut st = state(yaml);
        let ids: Vec<ObjectRef> = st.services.keys().cloned().collect();
        let updated = Allocator::new(ranges).update(&mut st, &ids);
        let rows = st
            .services
            .values()
            .map(|s| {
                let ips: Vec<String> = match s.cluster_ip {
                    ClusterIp::Assigned(ips) => s
                        .ip_families
                        .iter()
                        .filter_map(|&f| ips.get(f))
                        .map(|ip| ip.to_string())
                        .collect(),
                    ClusterIp::Unassigned => vec!["-".into()],
                    ClusterIp::Headless => vec!["None".into()],
                };
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| p.node_port.map_or("-".into(), |n| n.to_string()))
                    .collect();
                let health = s
                    .health_check_node_port
                    .map_or("-".into(), |p| p.to_string());
                format!(
                    "{} {} {} {health}",
                    s.id.name,
                    ips.join(","),
                    ports.join(",")
                )
            })
            .collect();
        (
            rows,
            updated.notes.iter().map(ToString::to_string).collect(),
        )
    }

    fn ranges(cidrs: &[&str], ports: RangeInclusive<u16>) -> Ranges {
        Ranges::new(cidrs.iter().map(|c| c.parse().unwrap()).collect(), ports).unwrap()
    }

    #[test]
    fn the_documentation_s_httpd_service_gets_a_cluster_ip_and_a_node_port() {
        let (rows, notes) = allocated(
            &svc(
                "httpd-svc",
                "{type: NodePort, selector: {app: httpd}, ports: [{port: 8080, targetPort: 80}]}",
            ),
            Ranges::default(),
        );
        // The upper band of 10.96.0.0/12 (above 10.96.1.0) and of 30000-32767 (above 30085).
        assert_eq!(rows, ["httpd-svc 10.108.57.139 30908 -"]);
        assert_eq!(
            notes,
            [
                "default/httpd-svc: spec.clusterIPs[0] 10.108.57.139 allocated from 10.96.0.0/12",
                "default/httpd-svc: spec.ports[0].nodePort 30908 allocated from 30000-32767",
            ]
        );
    }

    #[test]
    fn what_the_api_server_fills_in() {
        let dual = || ranges(&["10.96.0.0/16", "fd00:96::/112"], 30000..=32767);
        let cases: &[(&str, String, Ranges, &[&str])] = &[
            (
                "values written are kept; only the missing ones are allocated",
                svc(
                    "a",
                    "{type: NodePort, clusterIP: 10.96.0.10, ports: [{name: a, port: 80, nodePort: 30001}, {name: b, port: 81}]}",
                ),
                dual(),
                &["a 10.96.0.10 30001,31875 -"],
            ),
            (
                "headless and ExternalName Services get no cluster IP; ClusterIP no node port",
                svc("h", "{clusterIP: None, ports: [{port: 80}]}")
                    + &svc(
                        "x",
                        "{type: ExternalName, externalName: a.example, ports: [{port: 80}]}",
                    )
                    + &svc("c", "{ports: [{port: 80, nodePort: 30001}]}"),
                dual(),
                &["c 10.96.49.39 30001 -", "h None - -", "x - - -"],
            ),
            (
                "ports with one port number (TCP and UDP) share a node port",
                svc(
                    "dns",
                    "{type: NodePort, ports: [{name: tcp, port: 53}, {name: udp, port: 53, protocol: UDP}, {name: m, port: 9153}]}",
                ),
                dual(),
                &["dns 10.96.245.229 30890,30890,32522 -"],
            ),
            (
                "a port number whose sibling has a node port written shares it",
                svc(
                    "dns",
                    "{type: NodePort, ports: [{name: tcp, port: 53}, {name: udp, port: 53, protocol: UDP, nodePort: 30053}]}",
                ),
                dual(),
                &["dns 10.96.245.229 30053,30053 -"],
            ),
            (
                "LoadBalancer: node ports unless allocateLoadBalancerNodePorts is false; \
                 healthCheckNodePort with externalTrafficPolicy Local (NeedsHealthCheck)",
                svc(
                    "lb",
                    "{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                ) + &svc(
                    "nolb",
                    "{type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}",
                ) + &svc(
                    "np",
                    "{type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                ),
                dual(),
                &[
                    "lb 10.96.92.216 30703 31910",
                    "nolb 10.96.18.13 - -",
                    "np 10.96.36.90 31671 -",
                ],
            ),
            (
                "families: the first range's by default; ipFamilies; PreferDualStack adds the \
                 other when there is a range of it; RequireDualStack both",
                svc("one", "{ports: [{port: 80}]}")
                    + &svc("six", "{ipFamilies: [IPv6], ports: [{port: 80}]}")
                    + &svc(
                        "prefer",
                        "{ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}",
                    )
                    + &svc(
                        "require6",
                        "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6], ports: [{port: 80}]}",
                    ),
                dual(),
                &[
                    "one 10.96.5.236 - -",
                    "prefer 10.96.248.64,fd00:96::66b9 - -",
                    "require6 fd00:96::6d15,10.96.206.255 - -",
                    "six fd00:96::916 - -",
                ],
            ),
            (
                "IPv4 only: PreferDualStack gets IPv4; IPv6 and RequireDualStack get nothing",
                svc(
                    "prefer",
                    "{ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}",
                ) + &svc("six", "{ipFamilies: [IPv6], ports: [{port: 80}]}")
                    + &svc(
                        "require",
                        "{ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}",
                    ),
                Ranges::default(),
                &["prefer 10.101.190.120 - -", "require - - -", "six - - -"],
            ),
        ];
        for (name, yaml, ranges, want) in cases {
            assert_eq!(allocated(yaml, ranges.clone()).0, *want, "case {name}");
        }
        let (_, notes) = allocated(
            &(svc("six", "{ipFamilies: [IPv6], ports: [{port: 80}]}")
                + &svc(
                    "require",
                    "{ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}",
                )),
            Ranges::default(),
        );
        assert_eq!(
            notes,
            [
                "default/require: spec.clusterIPs not allocated: no --service-cidr of IPv6",
                "default/six: spec.clusterIPs not allocated: no --service-cidr of IPv6",
            ]
        );
    }

    #[test]
    fn values_never_collide_and_move_only_for_a_collision() {
        // A /28 (14 addresses, no bands) and 14 node ports: collisions everywhere.
        let tiny = || ranges(&["10.0.0.0/28"], 30000..=30013);
        let many: String = (0..14)
            .map(|i| svc(&format!("s{i:02}"), "{type: NodePort, ports: [{port: 80}]}"))
            .collect();
        let mut st = state(&many);
        let ids: Vec<ObjectRef> = st.services.keys().cloned().collect();
        let mut allocator = Allocator::new(tiny());
        allocator.update(&mut st, &ids);
        let values = |st: &ClusterState| -> Vec<(IpAddr, u16)> {
            st.services
                .values()
                .map(|s| match s.cluster_ip {
                    ClusterIp::Assigned(ips) => (
                        ips.get(IpFamily::V4).unwrap(),
                        s.ports[0].node_port.unwrap(),
                    ),
                    _ => panic!("{s:?} has no cluster IP"),
                })
                .collect()
        };
        let before = values(&st);
        let distinct: BTreeSet<_> = before.iter().map(|v| v.0).collect();
        let ports: BTreeSet<_> = before.iter().map(|v| v.1).collect();
        assert_eq!((distinct.len(), ports.len()), (14, 14), "{before:?}");

        // The same folder again (another node, a restart): the same values.
        let mut again = state(&many);
        Allocator::new(tiny()).update(&mut again, &ids);
        assert_eq!(values(&again), before);

        // One more Service: the range is full, it gets none and says so.
        let mut more = state(&(many.clone() + &svc("zz", "{type: NodePort, ports: [{port: 80}]}")));
        let all: Vec<ObjectRef> = more.services.keys().cloned().collect();
        let updated = Allocator::new(tiny()).update(&mut more, &all);
        assert!(updated.notes.iter().any(|n| n.to_string()
            == "default/zz: spec.clusterIPs[0] not allocated: every value of 10.0.0.0/28 is taken"));

        // A value written into the folder takes its address from the Service that had it,
        // which moves (and is reported); the others keep theirs.
        let mut st = state(&many);
        let mut allocator = Allocator::new(tiny());
        allocator.update(&mut st, &ids);
        let (victim, ip) = (ids[3].clone(), before[3].0);
        let written = state(&svc(
            "w",
            &format!("{{clusterIP: {ip}, ports: [{{port: 80}}]}}"),
        ));
        st.services.extend(written.services);
        st.services.remove(&ids[13]);
        let w = ObjectRef::new("default", "w");
        let updated = allocator.update(&mut st, [&w, &ids[13]]);
        assert_eq!(updated.moved.keys().collect::<Vec<_>>(), [&victim]);
        st.services.remove(&w);
        let after = values(&st);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if i == 3 {
                assert_ne!(a.0, ip, "{victim} moved");
            } else {
                assert_eq!(a.0, b.0, "{} kept its address", ids[i]);
            }
        }
    }

    #[test]
    fn ranges_are_checked() {
        let cidr = |s: &str| s.parse::<IpCidr>().unwrap();
        let err = |cidrs: &[&str], ports| {
            Ranges::new(cidrs.iter().map(|c| cidr(c)).collect(), ports)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&["10.0.0.0/11"], 30000..=32767),
            "--service-cidr 10.0.0.0/11: too large (an IPv4 range of /12 to /30, an IPv6 range of /108 to /126)"
        );
        assert!(err(&["fd00::/107"], 30000..=32767).contains("too large"));
        assert!(err(&["10.0.0.0/31"], 30000..=32767).contains("too small"));
        assert_eq!(
            err(&["10.0.0.0/16", "10.1.0.0/16"], 30000..=32767),
            "--service-cidr 10.1.0.0/16: a second IPv4 range (at most one per family)"
        );
        assert_eq!(parse_node_ports("30000-32767"), Ok(30000..=32767));
        assert!(parse_node_ports("32767-30000").is_err());
        assert!(parse_node_ports("0-10").is_err());
        assert!(parse_node_ports("30000").is_err());
    }
}
