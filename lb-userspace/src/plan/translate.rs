//! Translation: cluster state + this node -> desired datapath state. A pure function holding
//! Kubernetes' Service semantics as kube-proxy implements them (pkg/proxy: servicechangetracker,
//! endpointslicecache, topology.go `CategorizeEndpoints`), for both IP families.
//!
//! Families: a Service is translated once per IP family it has a cluster IP of (one for a
//! single-stack Service, two for a dual-stack one), as kube-proxy's proxier of each family
//! sees it: every address below (node addresses, externalIPs, ingress IPs, source ranges,
//! endpoints) counts only in its own family, so an IPv6 frontend gets the backends of the
//! IPv6 EndpointSlices and an IPv4 one those of the IPv4 slices. A family the Service has no
//! cluster IP of gets nothing, not even its externalIPs (kube-proxy skips the Service).
//!
//! Frontends of a Service port (TCP and UDP; SCTP ports are skipped with a warning), per
//! family:
//! - ClusterIP: the family's cluster IP : `port`. A Service without a cluster IP (headless,
//!   ExternalName) gets no frontends at all, as in kube-proxy. Only hand-written manifests
//!   can lack a cluster IP altogether: then the other frontends of its `ipFamilies` (IPv4
//!   when not given) are still programmed, with a warning.
//! - NodePort (types NodePort and LoadBalancer): every address of the family in
//!   [`NodeInfo::addresses`] : `nodePort`.
//! - ExternalIP: every `externalIPs` entry of the family : `port`.
//! - LoadBalancer (type LoadBalancer): every `status.loadBalancer.ingress[].ip` of the family
//!   whose `ipMode` is VIP (the default) : `port`; with `ipMode: Proxy` the load balancer
//!   itself delivers to the nodes and kube-proxy does not capture the address.
//!
//! Backends: the endpoints of every EndpointSlice of the family labelled with the Service's
//! name, in its namespace, through the slice port whose name and protocol equal the Service
//! port's; the slice port gives the backend port (a named targetPort is resolved per pod that
//! way). Duplicates across slices are merged, preferring a non-terminating copy.
//!
//! Which endpoints (kube-proxy's `CategorizeEndpoints`):
//! - Cluster policy: ready endpoints, narrowed by topology; none at all -> the serving and
//!   terminating ones. Topology: if every ready endpoint has a `hints.forNodes` and one names
//!   this node, only endpoints hinted for this node; else if every ready endpoint has
//!   `hints.forZones` and one names this node's zone, only those for this zone; else no
//!   narrowing. kube-proxy does not read `spec.trafficDistribution` itself: the EndpointSlice
//!   controller turns PreferClose / PreferSameZone / PreferSameNode into these hints (as it
//!   does for the `service.kubernetes.io/topology-mode: Auto` annotation), so hand-written
//!   slices must carry hints for topology to apply.
//! - Local policy: ready endpoints on this node (`nodeName` = [`NodeInfo::name`]); none ->
//!   serving and terminating ones on this node; none -> no backends (packets dropped).
//! - ClusterIP frontends follow internalTrafficPolicy; NodePort, ExternalIP and LoadBalancer
//!   frontends follow externalTrafficPolicy. Local counts where kube-proxy's
//!   `ExternallyAccessible` holds: types NodePort and LoadBalancer, and ClusterIP with
//!   externalIPs (`Service::external_policy_local`).
//! - Short-circuit: the external frontends of a Local policy carry their Service's cluster
//!   frontend ([`FrontendPlan::short_circuit`]): this node's pods and processes get its
//!   backends through them (kube-proxy's "short-circuit pod traffic" and "route LOCAL
//!   traffic" rules jump to the cluster chain), only traffic from outside the local ones.
//!
//! Terminating backends: [`Backend::terminating`] is false for the endpoints chosen above as
//! ready, true for serving and terminating endpoints. The plan lists the serving-terminating
//! endpoints in the policy's scope (all of them for Cluster, this node's for Local) even when
//! ready ones exist, so that their established flows can drain. The datapath rule that gives
//! exactly kube-proxy's choice is: **new flows go to the non-terminating backends; only when
//! there are none, to the terminating ones** (kube-proxy's fallback); established flows keep
//! their backend while it is listed.
//!
//! Also: sessionAffinity ClientIP sets the affinity timeout on every frontend of the Service;
//! `loadBalancerSourceRanges` restrict the LoadBalancer frontends of their family only
//! (NodePorts and external IPs are not filtered, as in kube-proxy; a family without ranges is
//! not restricted); a `/0` range means no restriction; when a range contains one of this
//! node's addresses, the family's ingress IPs themselves are allowed as sources (kube-proxy's rule for node-originated traffic that loops back via the VIP).
//! Two Services claiming the same frontend: the one whose namespace/name sorts first keeps it,
//! the other is reported.

#![deny(missing_docs)]

use crate::model::Protocol;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::desired::{
    Backend, DesiredState, Frontend, FrontendKind, FrontendPlan, HealthCheck, ServicePortRef,
    TopologyChoice,
};
use crate::model::{
    self, ClusterIp, ClusterState, Endpoint, EndpointSlice, IpCidr, IpFamily, IpMode, NodeInfo,
    ObjectRef, Service, ServiceType, SessionAffinity, TrafficPolicy,
};

/// The result of [`translate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Every frontend to program.
    pub desired: DesiredState,
    /// The health checks to serve, by Service.
    pub health_checks: BTreeMap<ObjectRef, HealthCheck>,
    /// Things that were skipped or chosen, for the logs.
    pub warnings: Vec<Warning>,
}

/// Something translation skipped or had to choose.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Warning {
    /// Two Service ports claim the same frontend.
    #[error(
        "frontend {frontend} of {dropped} is already taken by {kept}; {dropped} does not get it"
    )]
    FrontendConflict {
        /// The frontend.
        frontend: Frontend,
        /// The Service port that keeps it.
        kept: ServicePortRef,
        /// The Service port that does not get it.
        dropped: ServicePortRef,
    },
    /// A port whose protocol the datapath does not handle.
    #[error(
        "{service}: port {port_name:?} is {protocol}, which this datapath does not handle; port skipped"
    )]
    UnsupportedProtocol {
        /// The Service.
        service: ObjectRef,
        /// The port's name.
        port_name: String,
        /// Its protocol.
        protocol: model::Protocol,
    },
    /// A Service without clusterIP (only possible in hand-written manifests).
    #[error(
        "{service}: no clusterIP (none given, none allocated); only its node ports, external IPs \
         and load balancer IPs are programmed"
    )]
    NoClusterIp {
        /// The Service.
        service: ObjectRef,
    },
    /// A NodePort Service port without nodePort (only possible in hand-written manifests).
    #[error(
        "{service}: port {port_name:?} has no nodePort (none given, none allocated); no node port \
         programmed"
    )]
    NoNodePort {
        /// The Service.
        service: ObjectRef,
        /// The port's name.
        port_name: String,
    },
    /// An EndpointSlice without the `kubernetes.io/service-name` label.
    #[error("EndpointSlice {slice} has no kubernetes.io/service-name label; no Service uses it")]
    SliceWithoutService {
        /// The slice.
        slice: ObjectRef,
    },
    /// An annotation under the deprecated prefix (`model::DEPRECATED_ANNOTATION_PREFIX`).
    #[error("{service}: {annotation}")]
    DeprecatedAnnotation {
        /// The Service.
        service: ObjectRef,
        /// Which, and what to do.
        annotation: model::DeprecatedAnnotation,
    },
}

/// Computes the desired datapath state of `node` from the cluster state. Pure and
/// deterministic. See the module documentation for the rules.
pub fn translate(state: &ClusterState, node: &NodeInfo) -> Translation {
    let mut translator = Translator::new(node.clone());
    translator.update(state, state.services.keys(), state.slices.keys());
    translator.translation()
}

/// What one Service translates to, in order: its frontends (claims, before conflicts with
/// other Services are settled) and its warnings.
#[derive(Clone, Debug, Default)]
struct ServiceOutput {
    entries: Vec<Entry>,
    health: Option<HealthCheck>,
}

#[derive(Clone, Debug)]
enum Entry {
    Frontend(Frontend, FrontendPlan),
    Warning(Warning),
}

/// Who claims a frontend: a Service and the position of the claim in its output. The
/// smallest claim owns the frontend (the Service whose namespace/name sorts first; within a
/// Service, its first port).
type Claim = (ObjectRef, usize);

/// [`translate`] kept up to date Service by Service, for a state that changes a few objects
/// at a time: [`Translator::update`] re-translates only the Services whose objects changed
/// and reports the frontends whose plan changed. The rules are [`translate`]'s (which runs
/// this over the whole state); the result equals `translate` of the current state.
#[derive(Debug)]
pub struct Translator {
    node: NodeInfo,
    node_addresses: BTreeSet<IpAddr>,
    /// The slices of each Service (by the Service's namespace/name).
    slices_of: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// The Service of each slice that names one.
    slice_owner: HashMap<ObjectRef, ObjectRef>,
    /// Slices without the service-name label.
    unowned_slices: BTreeSet<ObjectRef>,
    outputs: HashMap<ObjectRef, ServiceOutput>,
    claims: HashMap<Frontend, BTreeSet<Claim>>,
    desired: DesiredState,
    health_checks: BTreeMap<ObjectRef, HealthCheck>,
}

impl Translator {
    /// A translator for `node` with nothing translated yet.
    pub fn new(node: NodeInfo) -> Self {
        Translator {
            node_addresses: node.addresses.iter().copied().collect(),
            node,
            slices_of: HashMap::new(),
            slice_owner: HashMap::new(),
            unowned_slices: BTreeSet::new(),
            outputs: HashMap::new(),
            claims: HashMap::new(),
            desired: DesiredState::default(),
            health_checks: BTreeMap::new(),
        }
    }

    /// The node it translates for.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Translates for another node (its addresses or zone changed): every Service again.
    pub fn set_node(&mut self, state: &ClusterState, node: NodeInfo) -> Changed {
        self.node_addresses = node.addresses.iter().copied().collect();
        self.node = node;
        let services: Vec<ObjectRef> = self.outputs.keys().cloned().collect();
        self.update(state, services.iter(), std::iter::empty())
    }

    /// The desired state of everything translated so far.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The health checks of everything translated so far, by Service.
    pub fn health_checks(&self) -> &BTreeMap<ObjectRef, HealthCheck> {
        &self.health_checks
    }

    /// The desired state and every warning, as [`translate`] returns them.
    pub fn translation(&self) -> Translation {
        let mut warnings: Vec<Warning> = self
            .unowned_slices
            .iter()
            .map(|slice| Warning::SliceWithoutService {
                slice: slice.clone(),
            })
            .collect();
        let mut services: Vec<&ObjectRef> = self.outputs.keys().collect();
        services.sort_unstable();
        for service in services {
            self.service_warnings(service, &mut warnings);
        }
        Translation {
            desired: self.desired.clone(),
            health_checks: self.health_checks.clone(),
            warnings,
        }
    }

    /// Takes in that the Services `services` and the EndpointSlices `slices` may have changed
    /// in `state` (added, modified or removed), and re-translates the Services they concern.
    pub fn update<'a>(
        &mut self,
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a ObjectRef>,
        slices: impl IntoIterator<Item = &'a ObjectRef>,
    ) -> Changed {
        let mut changed = Changed::default();
        let mut dirty: BTreeSet<ObjectRef> = services.into_iter().cloned().collect();
        for slice in slices {
            if let Some(old) = self.slice_owner.remove(slice) {
                if let Some(set) = self.slices_of.get_mut(&old) {
                    set.remove(slice);
                    if set.is_empty() {
                        self.slices_of.remove(&old);
                    }
                }
                dirty.insert(old);
            }
            self.unowned_slices.remove(slice);
            let Some(new) = state.slices.get(slice) else {
                continue;
            };
            match &new.service_name {
                Some(name) => {
                    let owner = ObjectRef::new(new.id.namespace.clone(), name.clone());
                    self.slices_of
                        .entry(owner.clone())
                        .or_default()
                        .insert(slice.clone());
                    self.slice_owner.insert(slice.clone(), owner.clone());
                    dirty.insert(owner);
                }
                None => {
                    self.unowned_slices.insert(slice.clone());
                    changed.warnings.push(Warning::SliceWithoutService {
                        slice: slice.clone(),
                    });
                }
            }
        }

        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        for service in &dirty {
            let output = match state.services.get(service) {
                Some(svc) => {
                    let slices: Vec<&EndpointSlice> = self
                        .slices_of
                        .get(service)
                        .into_iter()
                        .flatten()
                        .filter_map(|id| state.slices.get(id))
                        .collect();
                    Some(translate_service(
                        svc,
                        &slices,
                        &self.node,
                        &self.node_addresses,
                    ))
                }
                None => None,
            };
            if let Some(old) = self.outputs.remove(service) {
                for (i, entry) in old.entries.iter().enumerate() {
                    if let Entry::Frontend(frontend, _) = entry {
                        touched.insert(*frontend);
                        if let Some(claims) = self.claims.get_mut(frontend) {
                            claims.remove(&(service.clone(), i));
                            if claims.is_empty() {
                                self.claims.remove(frontend);
                            }
                        }
                    }
                }
            }
            match output.as_ref().and_then(|o| o.health.clone()) {
                Some(health) => self.health_checks.insert(service.clone(), health),
                None => self.health_checks.remove(service),
            };
            if let Some(output) = output {
                for (i, entry) in output.entries.iter().enumerate() {
                    if let Entry::Frontend(frontend, _) = entry {
                        touched.insert(*frontend);
                        self.claims
                            .entry(*frontend)
                            .or_default()
                            .insert((service.clone(), i));
                    }
                }
                self.outputs.insert(service.clone(), output);
            }
        }

        // A short-circuit names a cluster frontend of the frontend's own Service: when a
        // cluster frontend changes hands (a conflict settled otherwise), the frontends of
        // its claimants that name it are looked at again.
        let naming: Vec<Frontend> = touched
            .iter()
            .flat_map(|cluster| self.naming(cluster))
            .collect();
        touched.extend(naming);
        for frontend in touched {
            let plan = self.owner_plan(&frontend).cloned().map(|mut plan| {
                if let Some(cluster) = plan.short_circuit
                    && self.owner(&cluster).map(|(s, _)| s) != self.owner(&frontend).map(|(s, _)| s)
                {
                    // Another Service's cluster IP: not this Service's endpoints.
                    plan.short_circuit = None;
                }
                plan
            });
            let old = match plan {
                Some(plan) => self.desired.frontends.insert(frontend, plan),
                None => self.desired.frontends.remove(&frontend),
            };
            if old.as_ref() != self.desired.frontends.get(&frontend) {
                changed.frontends.insert(frontend);
            }
        }
        for service in &dirty {
            self.service_warnings(service, &mut changed.warnings);
        }
        changed
    }

    /// The claim that owns `frontend`.
    fn owner(&self, frontend: &Frontend) -> Option<&Claim> {
        self.claims.get(frontend)?.first()
    }

    /// The frontends of the Services claiming `cluster` whose short-circuit names it.
    fn naming(&self, cluster: &Frontend) -> Vec<Frontend> {
        let claimants = self.claims.get(cluster).into_iter().flatten();
        claimants
            .filter_map(|(service, _)| self.outputs.get(service))
            .flat_map(|output| &output.entries)
            .filter_map(|entry| match entry {
                Entry::Frontend(frontend, plan) if plan.short_circuit == Some(*cluster) => {
                    Some(*frontend)
                }
                _ => None,
            })
            .collect()
    }

    /// The plan of the claim that owns `frontend`.
    fn owner_plan(&self, frontend: &Frontend) -> Option<&FrontendPlan> {
        let (service, i) = self.owner(frontend)?;
        match self.outputs.get(service)?.entries.get(*i)? {
            Entry::Frontend(_, plan) => Some(plan),
            Entry::Warning(_) => None,
        }
    }

    /// The warnings of one Service, in the order of its output, with a conflict warning for
    /// each frontend another claim owns.
    fn service_warnings(&self, service: &ObjectRef, out: &mut Vec<Warning>) {
        let Some(output) = self.outputs.get(service) else {
            return;
        };
        for (i, entry) in output.entries.iter().enumerate() {
            match entry {
                Entry::Warning(w) => out.push(w.clone()),
                Entry::Frontend(frontend, plan) => {
                    let owner = self.owner(frontend);
                    if owner.is_some_and(|(s, j)| (s, *j) != (service, i))
                        && let Some(kept) = self.owner_plan(frontend)
                    {
                        out.push(Warning::FrontendConflict {
                            frontend: *frontend,
                            kept: kept.service.clone(),
                            dropped: plan.service.clone(),
                        });
                    }
                }
            }
        }
    }
}

/// What [`Translator::update`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Frontends added, changed or removed in [`Translator::desired`].
    pub frontends: BTreeSet<Frontend>,
    /// The warnings of the re-translated Services and of the changed slices.
    pub warnings: Vec<Warning>,
}

fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    node_addresses: &BTreeSet<IpAddr>,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    for annotation in &svc.deprecated_annotations {
        out.entries
            .push(Entry::Warning(Warning::DeprecatedAnnotation {
                service: svc.id.clone(),
                annotation: annotation.clone(),
            }));
    }
    // The families the Service has, with the cluster IP of each.
    let families: Vec<(IpFamily, Option<IpAddr>)> = match (svc.type_, svc.cluster_ip) {
        (ServiceType::ExternalName, _) | (_, ClusterIp::Headless) => return out,
        (_, ClusterIp::Assigned(ips)) => IpFamily::ALL
            .iter()
            .filter_map(|&f| Some((f, Some(ips.get(f)?))))
            .collect(),
        (_, ClusterIp::Unassigned) => {
            out.entries.push(Entry::Warning(Warning::NoClusterIp {
                service: svc.id.clone(),
            }));
            svc.ip_families.iter().map(|&f| (f, None)).collect()
        }
    };
    let has_node_ports = matches!(svc.type_, ServiceType::NodePort | ServiceType::LoadBalancer);
    let external_local = svc.external_policy_local();
    let internal_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let lb_vips: Vec<IpAddr> = if svc.type_ == ServiceType::LoadBalancer {
        svc.load_balancer_ingress
            .iter()
            .filter(|i| i.ip_mode == IpMode::Vip)
            .map(|i| i.ip)
            .collect()
    } else {
        Vec::new()
    };
    let affinity_timeout_secs = match svc.session_affinity {
        SessionAffinity::None => None,
        SessionAffinity::ClientIp { timeout_secs } => Some(timeout_secs),
    };
    // Everything of one family, as kube-proxy's proxier of that family sees the Service.
    struct Family {
        family: IpFamily,
        cluster_ip: Option<IpAddr>,
        node_addresses: Vec<IpAddr>,
        external_ips: Vec<IpAddr>,
        lb_vips: Vec<IpAddr>,
        source_ranges: Vec<IpCidr>,
    }
    let of = |family: IpFamily| move |ip: &&IpAddr| IpFamily::of(ip) == family;
    let families: Vec<Family> = families
        .into_iter()
        .map(|(family, cluster_ip)| {
            let node_addresses: BTreeSet<IpAddr> =
                node_addresses.iter().filter(of(family)).copied().collect();
            let lb_vips: Vec<IpAddr> = lb_vips.iter().filter(of(family)).copied().collect();
            Family {
                family,
                cluster_ip,
                external_ips: svc
                    .external_ips
                    .iter()
                    .filter(of(family))
                    .copied()
                    .collect(),
                source_ranges: source_ranges(svc, family, &lb_vips, &node_addresses),
                node_addresses: node_addresses.into_iter().collect(),
                lb_vips,
            }
        })
        .collect();

    // kube-proxy's NeedsHealthCheck, with the port allocated.
    if svc.type_ == ServiceType::LoadBalancer
        && external_local
        && let Some(port) = svc.health_check_node_port
    {
        let local_endpoints = families
            .iter()
            .map(|fam| (fam.family, local_ready_endpoints(slices, fam.family, node)))
            .collect();
        out.health = Some(HealthCheck {
            port,
            local_endpoints,
        });
    }

    for port in &svc.ports {
        let proto = match port.protocol {
            proto @ (Protocol::Tcp | Protocol::Udp) => proto,
            protocol @ Protocol::Sctp => {
                out.entries
                    .push(Entry::Warning(Warning::UnsupportedProtocol {
                        service: svc.id.clone(),
                        port_name: port.name.clone(),
                        protocol,
                    }));
                continue;
            }
        };
        let service = ServicePortRef {
            namespace: svc.id.namespace.clone(),
            name: svc.id.name.clone(),
            port_name: port.name.clone(),
        };
        if has_node_ports && port.node_port.is_none() && svc.type_ == ServiceType::NodePort {
            out.entries.push(Entry::Warning(Warning::NoNodePort {
                service: svc.id.clone(),
                port_name: port.name.clone(),
            }));
        }
        for fam in &families {
            // Each frontend gets the backends of its own family only.
            let family_slices: Vec<&EndpointSlice> = slices
                .iter()
                .copied()
                .filter(|s| s.address_type.family() == Some(fam.family))
                .collect();
            let endpoints = port_endpoints(&family_slices, &port.name, port.protocol, node);
            let (cluster, local, topology) = if svc.topology_keys.is_empty() {
                let cluster = cluster_backends(&endpoints, node);
                (cluster, local_backends(&endpoints), None)
            } else {
                // kube-proxy v1.21: the keys decide for every frontend, before (and in place
                // of) internalTrafficPolicy and topology hints.
                let (chosen, choice) = topology_filter(&endpoints, &svc.topology_keys, node);
                let backends = backends(chosen.into_iter(), |e| e.ready());
                (backends.clone(), backends, Some(choice))
            };
            let internal = if internal_local && topology.is_none() {
                &local
            } else {
                &cluster
            };
            let external = if external_local { &local } else { &cluster };
            // kube-proxy's "has no endpoints" (REJECT), as against "has no local endpoints"
            // (DROP): no ready or serving-terminating endpoint on any node; with topology
            // keys (v1.21), none that the keys chose.
            let no_endpoints = match &topology {
                Some(_) => cluster.is_empty(),
                None => !endpoints
                    .values()
                    .any(|e| e.ready() || e.serving_terminating()),
            };

            // (address, port, kind, backends, source ranges) of every frontend of this port.
            type Candidate<'a> = (IpAddr, u16, FrontendKind, &'a [Backend], &'a [IpCidr]);
            let mut frontends: Vec<Candidate<'_>> = Vec::new();
            if let Some(ip) = fam.cluster_ip {
                frontends.push((ip, port.port, FrontendKind::ClusterIp, internal, &[]));
            }
            // LoadBalancer with allocateLoadBalancerNodePorts: false has no nodePort.
            if has_node_ports && let Some(node_port) = port.node_port {
                for &addr in &fam.node_addresses {
                    frontends.push((addr, node_port, FrontendKind::NodePort, external, &[]));
                }
            }
            for &ip in &fam.external_ips {
                frontends.push((ip, port.port, FrontendKind::ExternalIp, external, &[]));
            }
            for &ip in &fam.lb_vips {
                frontends.push((
                    ip,
                    port.port,
                    FrontendKind::LoadBalancer,
                    external,
                    &fam.source_ranges,
                ));
            }

            // kube-proxy's "short-circuit": this node's pods and processes reach a Local
            // external frontend as they reach the cluster IP.
            let cluster_frontend = fam.cluster_ip.map(|addr| Frontend {
                addr,
                port: port.port,
                proto,
            });
            for (addr, port, kind, backends, ranges) in frontends {
                let frontend = Frontend { addr, port, proto };
                let short_circuit =
                    cluster_frontend.filter(|_| kind.is_external() && external_local);
                let plan = FrontendPlan {
                    service: service.clone(),
                    kind,
                    backends: backends.to_vec(),
                    reject: backends.is_empty() && no_endpoints,
                    affinity_timeout_secs,
                    source_ranges: ranges.to_vec(),
                    selection: svc.selection,
                    forwarding: svc.forwarding,
                    topology: topology.clone(),
                    short_circuit,
                };
                out.entries.push(Entry::Frontend(frontend, plan));
            }
        }
    }
    out
}

/// kube-proxy's `LocalReadyEndpoints` of one family: the distinct address and port of the
/// ready endpoints on this node, over every port of every slice of the Service.
fn local_ready_endpoints(slices: &[&EndpointSlice], family: IpFamily, node: &NodeInfo) -> usize {
    let mut local = BTreeSet::new();
    for slice in slices
        .iter()
        .filter(|s| s.address_type.family() == Some(family))
    {
        for port in slice.ports.iter().filter_map(|p| p.port) {
            for ep in &slice.endpoints {
                if ep.conditions.is_ready()
                    && !node.name.is_empty()
                    && ep.node_name.as_deref() == Some(node.name.as_str())
                {
                    local.insert((ep.address, port));
                }
            }
        }
    }
    local.len()
}

/// The allowed sources of the LoadBalancer frontends of `family`; empty = all. As in
/// kube-proxy, each family's frontends get the ranges of their family only.
fn source_ranges(
    svc: &Service,
    family: IpFamily,
    lb_vips: &[IpAddr],
    node_addresses: &BTreeSet<IpAddr>,
) -> Vec<IpCidr> {
    let ranges: Vec<IpCidr> = svc
        .load_balancer_source_ranges
        .iter()
        .filter(|r| r.family() == family)
        .copied()
        .collect();
    if ranges.iter().any(|r| r.prefix_len() == 0) {
        return Vec::new();
    }
    let mut out: BTreeSet<IpCidr> = ranges.iter().copied().collect();
    if ranges
        .iter()
        .any(|r| node_addresses.iter().any(|&a| r.contains(a)))
    {
        out.extend(lb_vips.iter().map(|&vip| IpCidr::host(vip)));
    }
    out.into_iter().collect()
}

/// An endpoint of one Service port, merged over the slices.
struct PortEndpoint<'a> {
    addr: IpAddr,
    port: u16,
    local: bool,
    /// On another node: a `nodeName` that is not this node's (an endpoint without one is
    /// taken to be reachable as it is).
    remote: bool,
    ep: &'a Endpoint,
}

impl PortEndpoint<'_> {
    fn ready(&self) -> bool {
        self.ep.conditions.is_ready()
    }

    fn serving_terminating(&self) -> bool {
        self.ep.conditions.is_serving() && self.ep.conditions.is_terminating()
    }
}

/// The endpoints of the Service port `name`/`protocol`, keyed and sorted by address and port.
fn port_endpoints<'a>(
    slices: &[&'a EndpointSlice],
    name: &str,
    protocol: model::Protocol,
    node: &NodeInfo,
) -> BTreeMap<(IpAddr, u16), PortEndpoint<'a>> {
    let mut endpoints = BTreeMap::new();
    for slice in slices {
        let ports = slice
            .ports
            .iter()
            .filter(|p| p.name == name && p.protocol == protocol);
        for port in ports.filter_map(|p| p.port) {
            for ep in &slice.endpoints {
                let local =
                    !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
                let remote = !node.name.is_empty()
                    && ep.node_name.as_deref().is_some_and(|n| n != node.name);
                let new = PortEndpoint {
                    addr: ep.address,
                    port,
                    local,
                    remote,
                    ep,
                };
                // Prefer a non-terminating copy (an IP reused by a new pod before the old one
                // is gone), as kube-proxy does.
                let key = (ep.address, port);
                if !endpoints.contains_key(&key) || !ep.conditions.is_terminating() {
                    endpoints.insert(key, new);
                }
            }
        }
    }
    endpoints
}

/// The topology narrowing kube-proxy chooses from the hints of the ready endpoints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology_mode<'a>(
    endpoints: impl Iterator<Item = &'a PortEndpoint<'a>> + Clone,
    node: &NodeInfo,
) -> Topology {
    let zone = node.zone.as_deref().unwrap_or("");
    let mut ready = endpoints
        .filter(|e| e.ready())
        .map(|e| &e.ep.hints)
        .peekable();
    if ready.peek().is_none() {
        return Topology::None;
    }
    let all_have = |f: fn(&model::EndpointHints) -> bool| ready.clone().all(f);
    if all_have(|h| !h.for_nodes.is_empty())
        && ready.clone().any(|h| h.for_nodes.contains(&node.name))
    {
        return Topology::SameNode;
    }
    if all_have(|h| !h.for_zones.is_empty()) && ready.clone().any(|h| h.for_zones.contains(zone)) {
        return Topology::SameZone;
    }
    Topology::None
}

/// kube-proxy v1.21's `FilterTopologyEndpoint`: the first of `keys` for which some endpoint
/// (ready or not) has this node's value of it chooses those endpoints; `*` chooses all; a
/// key this node has no label for is passed over; no key matching chooses none.
fn topology_filter<'a>(
    endpoints: &'a BTreeMap<(IpAddr, u16), PortEndpoint<'a>>,
    keys: &[String],
    node: &NodeInfo,
) -> (Vec<&'a PortEndpoint<'a>>, TopologyChoice) {
    for key in keys {
        if key == model::TOPOLOGY_KEY_ANY {
            return (endpoints.values().collect(), TopologyChoice::Any);
        }
        let Some(value) = node.labels.get(key) else {
            continue;
        };
        let chosen: Vec<&PortEndpoint<'_>> = endpoints
            .values()
            .filter(|e| e.ep.topology_value(key) == Some(value.as_str()))
            .collect();
        if !chosen.is_empty() {
            return (chosen, TopologyChoice::Key(key.clone()));
        }
    }
    (Vec::new(), TopologyChoice::NoMatch)
}

/// Backends for the Cluster traffic policy.
fn cluster_backends(
    endpoints: &BTreeMap<(IpAddr, u16), PortEndpoint<'_>>,
    node: &NodeInfo,
) -> Vec<Backend> {
    let mode = topology_mode(endpoints.values(), node);
    let zone = node.zone.as_deref().unwrap_or("");
    let available = |e: &PortEndpoint<'_>| match mode {
        Topology::None => true,
        Topology::SameNode => e.ep.hints.for_nodes.contains(&node.name),
        Topology::SameZone => e.ep.hints.for_zones.contains(zone),
    };
    backends(endpoints.values(), |e| e.ready() && available(e))
}

/// Backends for the Local traffic policy.
fn local_backends(endpoints: &BTreeMap<(IpAddr, u16), PortEndpoint<'_>>) -> Vec<Backend> {
    backends(endpoints.values().filter(|e| e.local), |e| e.ready())
}

/// `use_ready` endpoints as active backends, plus every other serving-terminating endpoint
/// as a terminating one (the fallback when there is no active backend, otherwise draining).
fn backends<'a>(
    endpoints: impl Iterator<Item = &'a PortEndpoint<'a>>,
    use_ready: impl Fn(&PortEndpoint<'_>) -> bool,
) -> Vec<Backend> {
    endpoints
        .filter_map(|e| {
            let terminating = if use_ready(e) {
                false
            } else if e.serving_terminating() {
                true
            } else {
                return None;
            };
            Some(Backend {
                addr: e.addr,
                port: e.port,
                terminating,
                remote: e.remote,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;
    use crate::testutil::state;

    /// Parses a YAML stream of Services, EndpointSlices and Endpoints; every object must be
    /// valid.
    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 0, 10).into()],
            zone: Some("zone-a".into()),
            labels: Default::default(),
        }
    }

    fn svc(name: &str, spec: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    }

    /// An IPv4 EndpointSlice of Service `service`; `endpoints` is a YAML flow sequence.
    fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: \
             {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    /// One line per frontend: `frontend kind service -> backends [affinity=..] [ranges=..]`,
    /// then one line per warning.
    fn render(t: &Translation) -> Vec<String> {
        let mut lines: Vec<String> = t
            .desired
            .frontends
            .iter()
            .map(|(f, p)| {
                let backends: Vec<String> = p.backends.iter().map(ToString::to_string).collect();
                let mut line = format!("{f} {} {} -> [{}]", p.kind, p.service, backends.join(", "));
                if let Some(t) = p.affinity_timeout_secs {
                    line += &format!(" affinity={t}");
                }
                if !p.source_ranges.is_empty() {
                    let r: Vec<String> = p.source_ranges.iter().map(ToString::to_string).collect();
                    line += &format!(" ranges=[{}]", r.join(", "));
                }
                if let Some(selection) = p.selection {
                    line += &format!(" selection={selection}");
                }
                if let Some(forwarding) = p.forwarding {
                    line += &format!(" forwarding={forwarding}");
                }
                if let Some(topology) = &p.topology {
                    line += &format!(" topology={topology}");
                }
                if p.reject {
                    line += " reject";
                }
                line
            })
            .collect();
        lines.extend(t.warnings.iter().map(|w| format!("warning: {w}")));
        lines
    }

    fn check(cases: &[(&str, String, NodeInfo, &[&str])]) {
        for (name, yaml, node, want) in cases {
            let got = render(&translate(&state(yaml), node));
            assert_eq!(got, *want, "case {name}");
        }
    }

    #[test]
    fn exact_plan_of_a_cluster_ip_service() {
        let yaml = svc(
            "httpd-svc",
            "{clusterIP: 10.96.0.10, ports: [{port: 8080, targetPort: 80}]}",
        ) + &slice(
            "httpd-svc-1",
            "httpd-svc",
            "[{port: 80}]",
            "[{addresses: [10.1.0.2]}, {addresses: [10.1.0.1]}]",
        );
        let t = translate(&state(&yaml), &node());
        let plan = FrontendPlan {
            service: ServicePortRef {
                namespace: "default".into(),
                name: "httpd-svc".into(),
                port_name: String::new(),
            },
            kind: FrontendKind::ClusterIp,
            backends: vec![
                Backend {
                    addr: Ipv4Addr::new(10, 1, 0, 1).into(),
                    port: 80,
                    terminating: false,
                    remote: false,
                },
                Backend {
                    addr: Ipv4Addr::new(10, 1, 0, 2).into(),
                    port: 80,
                    terminating: false,
                    remote: false,
                },
            ],
            reject: false,
            affinity_timeout_secs: None,
            source_ranges: vec![],
            selection: None,
            forwarding: None,
            topology: None,
            short_circuit: None,
        };
        let frontend = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 8080,
            proto: Protocol::Tcp,
        };
        assert_eq!(
            t,
            Translation {
                desired: DesiredState {
                    frontends: BTreeMap::from([(frontend, plan)])
                },
                health_checks: BTreeMap::new(),
                warnings: vec![]
            }
        );
    }

    #[test]
    fn seeds_httpd_example_from_the_fixtures_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/httpd");
        let set =
            crate::source::manifests::load::load_dir(&dir).expect("fixtures folder is readable");
        let errors: Vec<String> = set.errors.iter().map(|e| format!("{}", e.kind)).collect();
        assert_eq!(errors, Vec::<String>::new());
        let notes: Vec<String> = set.notes.iter().map(ToString::to_string).collect();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].ends_with("skipped: lb reads Service (v1), EndpointSlice (discovery.k8s.io/v1), Endpoints (v1) and Node (v1), not Deployment (apps/v1)"),
            "{notes:?}"
        );
        assert_eq!(
            render(&translate(&set.state, &node())),
            vec![
                "10.96.0.80:8080/TCP ClusterIP default/httpd-svc -> [10.244.1.5:80, 10.244.2.7:80]",
                "192.168.0.10:30080/TCP NodePort default/httpd-svc -> [10.244.1.5:80, 10.244.2.7:80]",
            ]
        );
    }

    #[test]
    fn frontends_ports_and_slices() {
        let two_nodes = NodeInfo {
            addresses: vec![
                Ipv4Addr::new(192, 168, 0, 11).into(),
                Ipv4Addr::new(192, 168, 0, 10).into(),
            ],
            ..node()
        };
        check(&[
            (
                "multi-port, named targetPort resolved per slice, duplicates merged, protocol must match",
                svc(
                    "web",
                    "{clusterIP: 10.0.0.1, ports: [{name: http, port: 80, targetPort: http-web-svc}, {name: dns, port: 53, protocol: UDP}]}",
                ) + &slice(
                    "web-a",
                    "web",
                    "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]",
                    "[{addresses: [10.1.0.1]}, {addresses: [10.1.0.2]}]",
                ) + &slice(
                    "web-b",
                    "web",
                    "[{name: http, port: 9090}]",
                    "[{addresses: [10.1.0.3]}]",
                ) + &slice(
                    "web-c",
                    "web",
                    "[{name: http, port: 8080}, {name: http, port: 7070, protocol: UDP}]",
                    "[{addresses: [10.1.0.1]}]",
                ) + &slice(
                    "other",
                    "other",
                    "[{name: http, port: 1}]",
                    "[{addresses: [10.9.9.9]}]",
                ),
                node(),
                &[
                    "10.0.0.1:53/UDP ClusterIP default/web:dns -> [10.1.0.1:5353, 10.1.0.2:5353]",
                    "10.0.0.1:80/TCP ClusterIP default/web:http -> [10.1.0.1:8080, 10.1.0.2:8080, 10.1.0.3:9090]",
                ],
            ),
            (
                "not-ready endpoints are not used; no slices means no backends",
                svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice(
                        "a-1",
                        "a",
                        "[{port: 80}]",
                        "[{addresses: [10.1.0.1], conditions: {ready: false}}, {addresses: [10.1.0.2], conditions: {ready: true}}]",
                    )
                    + &svc("b", "{clusterIP: 10.0.0.2, ports: [{port: 80}]}"),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80]",
                    "10.0.0.2:80/TCP ClusterIP default/b -> [] reject",
                ],
            ),
            (
                "NodePort on every node address",
                svc(
                    "np",
                    "{type: NodePort, clusterIP: 10.0.0.1, ports: [{port: 80, nodePort: 30080}]}",
                ) + &slice("np-1", "np", "[{port: 8080}]", "[{addresses: [10.1.0.1]}]"),
                two_nodes,
                &[
                    "10.0.0.1:80/TCP ClusterIP default/np -> [10.1.0.1:8080]",
                    "192.168.0.10:30080/TCP NodePort default/np -> [10.1.0.1:8080]",
                    "192.168.0.11:30080/TCP NodePort default/np -> [10.1.0.1:8080]",
                ],
            ),
            (
                "LoadBalancer: VIP ingress, not Proxy or hostname; externalIPs; no nodePort allocated",
                svc(
                    "lb",
                    "{type: LoadBalancer, clusterIP: 10.0.0.1, externalIPs: [203.0.113.5, '2001:db8::5'], ports: [{port: 443}]}",
                ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}, {hostname: lb.example}, {ip: '2001:db8::1'}]}}\n"
                    + &slice("lb-1", "lb", "[{port: 8443}]", "[{addresses: [10.1.0.1]}]"),
                node(),
                &[
                    "10.0.0.1:443/TCP ClusterIP default/lb -> [10.1.0.1:8443]",
                    "198.51.100.1:443/TCP LoadBalancer default/lb -> [10.1.0.1:8443]",
                    "203.0.113.5:443/TCP ExternalIP default/lb -> [10.1.0.1:8443]",
                ],
            ),
            (
                "externalIPs on a ClusterIP Service; ingress ignored unless type LoadBalancer",
                svc(
                    "e",
                    "{clusterIP: 10.0.0.1, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30000}]}",
                ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n",
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/e -> [] reject",
                    "203.0.113.5:80/TCP ExternalIP default/e -> [] reject",
                ],
            ),
            (
                "ExternalName and headless Services get no frontends; an IPv6-only one only IPv6 \
                 ones (its IPv4 externalIP is not of its family; no IPv6 node address)",
                svc(
                    "xn",
                    "{type: ExternalName, externalName: example.com, externalIPs: [203.0.113.5], ports: [{port: 80}]}",
                ) + &svc("hl", "{clusterIP: None, ports: [{port: 80}]}")
                    + &slice("hl-1", "hl", "[{port: 80}]", "[{addresses: [10.1.0.1]}]")
                    + &svc(
                        "v6",
                        "{type: NodePort, clusterIPs: ['fd00::1'], externalIPs: [203.0.113.6], ports: [{port: 80, nodePort: 30001}]}",
                    ),
                node(),
                &["[fd00::1]:80/TCP ClusterIP default/v6 -> [] reject"],
            ),
            (
                "dual stack: each cluster IP with the slices of its family",
                svc(
                    "ds",
                    "{clusterIPs: ['fd00::1', 10.0.0.1], ports: [{port: 80}]}",
                ) + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}\naddressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00::10']}]\n"
                    + &slice("ds-v4", "ds", "[{port: 80}]", "[{addresses: [10.1.0.1]}]"),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/ds -> [10.1.0.1:80]",
                    "[fd00::1]:80/TCP ClusterIP default/ds -> [[fd00::10]:80]",
                ],
            ),
            (
                "manifest without clusterIP: other frontends still programmed, with a warning",
                svc(
                    "m",
                    "{type: NodePort, ports: [{port: 80, nodePort: 30080}, {name: b, port: 81}]}",
                )
                .replace(
                    "{port: 80, nodePort: 30080}",
                    "{name: a, port: 80, nodePort: 30080}",
                ),
                node(),
                &[
                    "192.168.0.10:30080/TCP NodePort default/m:a -> [] reject",
                    "warning: default/m: no clusterIP (none given, none allocated); only its node ports, external IPs and load balancer IPs are programmed",
                    "warning: default/m: port \"b\" has no nodePort (none given, none allocated); no node port programmed",
                ],
            ),
            (
                "SCTP ports skipped with a warning",
                svc(
                    "s",
                    "{clusterIP: 10.0.0.1, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}]}",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/s:a -> [] reject",
                    "warning: default/s: port \"b\" is SCTP, which this datapath does not handle; port skipped",
                ],
            ),
            (
                "two Services on one frontend: the first by namespace/name keeps it",
                svc("b", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("b-1", "b", "[{port: 80}]", "[{addresses: [10.1.0.2]}]"),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] reject",
                    "warning: frontend 10.0.0.1:80/TCP of default/b is already taken by default/a; default/b does not get it",
                ],
            ),
            (
                "slices: label required, same namespace only",
                svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: nolabel}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}]\n"
                    + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-x, namespace: other, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.2]}]\n",
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] reject",
                    "warning: EndpointSlice default/nolabel has no kubernetes.io/service-name label; no Service uses it",
                ],
            ),
            (
                "Service without selector and a hand-written Endpoints object",
                svc(
                    "ext",
                    "{clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}",
                ) + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: ext}\nsubsets: [{addresses: [{ip: 192.0.2.10}], notReadyAddresses: [{ip: 192.0.2.11}], ports: [{name: http, port: 8080}]}]\n",
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/ext:http -> [192.0.2.10:8080]"],
            ),
        ]);
    }

    #[test]
    fn conditions_and_terminating() {
        let one = |endpoints: &str| {
            svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                + &slice("a-1", "a", "[{port: 80}]", endpoints)
        };
        check(&[
            (
                "ready used; serving-terminating listed to drain; not-serving terminating dropped",
                one(
                    "[{addresses: [10.1.0.1]}, {addresses: [10.1.0.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.0.3], conditions: {ready: false, serving: false, terminating: true}}, {addresses: [10.1.0.4], conditions: {ready: false, serving: false, terminating: false}}]",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80 (terminating)]",
                ],
            ),
            (
                "no ready endpoint: serving-terminating ones are the backends",
                one(
                    "[{addresses: [10.1.0.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.0.3], conditions: {ready: false, terminating: true}}, {addresses: [10.1.0.1], conditions: {ready: false}}]",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80 (terminating), 10.1.0.3:80 (terminating)]",
                ],
            ),
            (
                "absent conditions mean ready; ready wins over terminating (publishNotReadyAddresses)",
                one(
                    "[{addresses: [10.1.0.1], conditions: {}}, {addresses: [10.1.0.2], conditions: {ready: true, serving: true, terminating: true}}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "the same address in two slices: the non-terminating copy wins",
                svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice(
                        "a-1",
                        "a",
                        "[{port: 80}]",
                        "[{addresses: [10.1.0.1], conditions: {ready: false, serving: true, terminating: true}}]",
                    )
                    + &slice(
                        "a-2",
                        "a",
                        "[{port: 80}]",
                        "[{addresses: [10.1.0.1], conditions: {ready: true}}]",
                    )
                    + &slice(
                        "a-3",
                        "a",
                        "[{port: 80}]",
                        "[{addresses: [10.1.0.1], conditions: {ready: false, serving: true, terminating: true}}]",
                    ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80]"],
            ),
        ]);
    }

    /// kube-proxy's REJECT ("has no endpoints") and DROP ("has no local endpoints"), as
    /// its iptables and nftables proxiers' tests name them: a frontend whose Service port
    /// has no usable endpoint on any node rejects; one whose endpoints are all on other
    /// nodes under a Local policy drops.
    #[test]
    fn reject_without_endpoints_and_drop_without_local_endpoints() {
        let node_port = "{type: NodePort, clusterIP: 10.0.0.1, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}";
        let etp_local = "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}";
        let itp_local = "{clusterIP: 10.0.0.1, internalTrafficPolicy: Local, ports: [{port: 80}]}";
        check(&[
            (
                "TestClusterIPReject: a ClusterIP Service without endpoints rejects",
                svc("a", "{clusterIP: 10.0.0.1, ports: [{port: 80}]}"),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [] reject"],
            ),
            (
                "TestNodePortReject, TestExternalIPsReject: every frontend of a Service without \
                 endpoints rejects",
                svc("a", node_port),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] reject",
                    "192.168.0.10:30080/TCP NodePort default/a -> [] reject",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [] reject",
                ],
            ),
            (
                "no usable endpoints: only endpoints neither ready nor serving rejects",
                svc("a", node_port)
                    + &slice(
                        "a-1",
                        "a",
                        "[{port: 80}]",
                        "[{addresses: [10.1.0.1], nodeName: node-a, conditions: {ready: false}}]",
                    ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] reject",
                    "192.168.0.10:30080/TCP NodePort default/a -> [] reject",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [] reject",
                ],
            ),
            (
                "TestOnlyLocalNodePorts, has no local endpoints: externalTrafficPolicy Local \
                 with endpoints only on other nodes drops at the node port; the cluster IP serves",
                policy_case(etp_local, &[2]),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80]",
                    "192.168.0.10:30080/TCP NodePort default/a -> []",
                ],
            ),
            (
                "has no local endpoints: internalTrafficPolicy Local with endpoints only on \
                 other nodes drops at the cluster IP",
                policy_case(itp_local, &[2, 4]),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> []"],
            ),
            (
                "has endpoints: a serving-terminating endpoint elsewhere is one (drop, not \
                 reject, under internalTrafficPolicy Local)",
                policy_case(itp_local, &[4]),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> []"],
            ),
        ]);
    }

    /// Endpoints of one port 80 slice: .1 local ready, .2 remote ready, .3 local
    /// serving-terminating, .4 remote serving-terminating, filtered by `pick`.
    fn policy_case(spec: &str, pick: &[u8]) -> String {
        let eps = [
            "{addresses: [10.1.0.1], nodeName: node-a}",
            "{addresses: [10.1.0.2], nodeName: node-b}",
            "{addresses: [10.1.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
            "{addresses: [10.1.0.4], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}",
        ];
        let chosen: Vec<&str> = pick.iter().map(|&i| eps[usize::from(i) - 1]).collect();
        svc("a", spec)
            + &slice(
                "a-1",
                "a",
                "[{port: 80}]",
                &format!("[{}]", chosen.join(", ")),
            )
    }

    #[test]
    fn endpoints_on_other_nodes_are_remote_and_local_policy_keeps_none_of_them() {
        let spec = "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}";
        // An endpoint without nodeName is taken as reachable as it is (not NATed).
        let yaml = svc("a", spec)
            + &slice(
                "a-1",
                "a",
                "[{port: 80}]",
                "[{addresses: [10.1.0.1], nodeName: node-a}, {addresses: [10.1.0.2], nodeName: node-b}, {addresses: [10.1.0.5]}]",
            );
        let t = translate(&state(&yaml), &node());
        let remote = |f: &str| -> Vec<(String, bool)> {
            let plan = t.desired.frontends.iter().find(|(k, _)| k.to_string() == f);
            plan.unwrap()
                .1
                .backends
                .iter()
                .map(|b| (b.addr.to_string(), b.remote))
                .collect()
        };
        assert_eq!(
            remote("10.0.0.1:80/TCP"),
            [
                ("10.1.0.1".into(), false),
                ("10.1.0.2".into(), true),
                ("10.1.0.5".into(), false)
            ]
        );
        assert_eq!(
            remote("192.168.0.10:30080/TCP"),
            [("10.1.0.1".into(), false)]
        );
    }

    #[test]
    fn traffic_policies() {
        let etp_local = "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}";
        let itp_local = "{type: NodePort, clusterIP: 10.0.0.1, internalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}";
        check(&[
            (
                "externalTrafficPolicy Local: external frontends use local endpoints, ClusterIP all",
                policy_case(etp_local, &[1, 2, 3, 4]),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80, 10.1.0.3:80 (terminating), 10.1.0.4:80 (terminating)]",
                    "192.168.0.10:30080/TCP NodePort default/a -> [10.1.0.1:80, 10.1.0.3:80 (terminating)]",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [10.1.0.1:80, 10.1.0.3:80 (terminating)]",
                ],
            ),
            (
                "externalTrafficPolicy Local, no local ready: local serving-terminating, even with remote ready",
                policy_case(etp_local, &[2, 3]),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80, 10.1.0.3:80 (terminating)]",
                    "192.168.0.10:30080/TCP NodePort default/a -> [10.1.0.3:80 (terminating)]",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [10.1.0.3:80 (terminating)]",
                ],
            ),
            (
                "externalTrafficPolicy Local, nothing local: external frontends drop",
                policy_case(etp_local, &[2, 4]),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80, 10.1.0.4:80 (terminating)]",
                    "192.168.0.10:30080/TCP NodePort default/a -> []",
                    "203.0.113.5:80/TCP ExternalIP default/a -> []",
                ],
            ),
            (
                "internalTrafficPolicy Local: ClusterIP uses local endpoints, NodePort all",
                policy_case(itp_local, &[1, 2, 4]),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80]",
                    "192.168.0.10:30080/TCP NodePort default/a -> [10.1.0.1:80, 10.1.0.2:80, 10.1.0.4:80 (terminating)]",
                ],
            ),
            (
                "ExternallyAccessible: a ClusterIP Service with externalIPs and \
                 ExternalPolicyLocal: its external IPs use local endpoints, its cluster IP all",
                policy_case(
                    "{clusterIP: 10.0.0.1, externalTrafficPolicy: Local, externalIPs: [203.0.113.5], ports: [{port: 80}]}",
                    &[1, 2],
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [10.1.0.1:80]",
                ],
            ),
            (
                "ExternallyAccessible: a LoadBalancer Service: node ports, load balancer IPs and \
                 external IPs use local endpoints",
                policy_case(
                    "{type: LoadBalancer, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}\n\
                     status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}",
                    &[1, 2],
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]",
                    "192.168.0.10:30080/TCP NodePort default/a -> [10.1.0.1:80]",
                    "198.51.100.1:80/TCP LoadBalancer default/a -> [10.1.0.1:80]",
                    "203.0.113.5:80/TCP ExternalIP default/a -> [10.1.0.1:80]",
                ],
            ),
            (
                "not ExternallyAccessible: a ClusterIP Service without externalIPs has no external \
                 frontend, and externalTrafficPolicy Local changes nothing",
                policy_case(
                    "{clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                    &[1, 2],
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "a node without a name has no local endpoints",
                policy_case(itp_local, &[1]),
                NodeInfo {
                    name: String::new(),
                    ..node()
                },
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> []",
                    "192.168.0.10:30080/TCP NodePort default/a -> [10.1.0.1:80]",
                ],
            ),
        ]);
    }

    /// kube-proxy's "short-circuit" of local traffic (the iptables and nftables proxiers'
    /// external chain under ExternalPolicyLocal): "pod traffic for external destinations"
    /// and "route LOCAL traffic" jump to the cluster policy chain, so this node's pods and
    /// processes get, through every external frontend, what the Service's cluster IP of the
    /// same port and family gets. One line per frontend: `frontend -> cluster frontend`, or
    /// `frontend` alone when it has none.
    #[test]
    fn short_circuit_of_local_traffic() {
        let short_circuits = |yaml: &str, node: &NodeInfo| -> Vec<String> {
            translate(&state(yaml), node)
                .desired
                .frontends
                .iter()
                .map(|(f, p)| match &p.short_circuit {
                    Some(cluster) => format!("{f} -> {cluster}"),
                    None => f.to_string(),
                })
                .collect()
        };
        let cases: &[(&str, String, NodeInfo, &[&str])] = &[
            (
                "ExternalPolicyLocal: the node ports, load balancer IPs and external IPs                  short-circuit to the cluster IP of their port; the cluster IP is itself",
                policy_case(
                    "{type: LoadBalancer, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}\n\
                     status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}",
                    &[2],
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP",
                    "192.168.0.10:30080/TCP -> 10.0.0.1:80/TCP",
                    "198.51.100.1:80/TCP -> 10.0.0.1:80/TCP",
                    "203.0.113.5:80/TCP -> 10.0.0.1:80/TCP",
                ],
            ),
            (
                "externalTrafficPolicy Cluster: external frontends already use the cluster \
                 endpoints, nothing to short-circuit",
                policy_case(
                    "{type: NodePort, clusterIP: 10.0.0.1, externalIPs: [203.0.113.5], ports: [{port: 80, nodePort: 30080}]}",
                    &[1, 2],
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP",
                    "192.168.0.10:30080/TCP",
                    "203.0.113.5:80/TCP",
                ],
            ),
            (
                "internalTrafficPolicy Local alone: no short-circuit (the external frontends \
                 use every endpoint)",
                policy_case(
                    "{type: NodePort, clusterIP: 10.0.0.1, internalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
                    &[1, 2],
                ),
                node(),
                &["10.0.0.1:80/TCP", "192.168.0.10:30080/TCP"],
            ),
            (
                "ExternallyAccessible ClusterIP Service with externalIPs and \
                 ExternalPolicyLocal: its external IPs short-circuit",
                policy_case(
                    "{clusterIP: 10.0.0.1, externalTrafficPolicy: Local, externalIPs: [203.0.113.5], ports: [{port: 80}]}",
                    &[2],
                ),
                node(),
                &["10.0.0.1:80/TCP", "203.0.113.5:80/TCP -> 10.0.0.1:80/TCP"],
            ),
            (
                "each port and protocol to the cluster frontend of the same port and protocol",
                svc(
                    "a",
                    "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]}",
                ),
                node(),
                &[
                    "10.0.0.1:53/UDP",
                    "10.0.0.1:80/TCP",
                    "192.168.0.10:30053/UDP -> 10.0.0.1:53/UDP",
                    "192.168.0.10:30080/TCP -> 10.0.0.1:80/TCP",
                ],
            ),
            (
                "dual stack: each family's external frontends to that family's cluster IP",
                svc(
                    "a",
                    "{type: NodePort, clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilyPolicy: RequireDualStack, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
                ),
                node_ds(),
                &[
                    "10.0.0.1:80/TCP",
                    "192.168.0.10:30080/TCP -> 10.0.0.1:80/TCP",
                    "[fd00::1]:80/TCP",
                    "[fd00:ff::10]:30080/TCP -> [fd00::1]:80/TCP",
                ],
            ),
            (
                "two Services claim one cluster IP: the one that keeps it short-circuits to \
                 it, the other's node port (whose Service lost its cluster IP) does not",
                svc(
                    "a",
                    "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
                ) + &svc(
                    "b",
                    "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30081}]}",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP",
                    "192.168.0.10:30080/TCP -> 10.0.0.1:80/TCP",
                    "192.168.0.10:30081/TCP",
                ],
            ),
            (
                "a manifest without a cluster IP: nothing to short-circuit to (the node port \
                 keeps its local endpoints for everyone)",
                svc(
                    "a",
                    "{type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
                ),
                node(),
                &["192.168.0.10:30080/TCP"],
            ),
        ];
        for (name, yaml, node, want) in cases {
            assert_eq!(short_circuits(yaml, node), *want, "case {name}");
        }

        // Kept up to date: when the Service that kept the cluster IP goes, the other one
        // gets it, and its node port short-circuits to it.
        let both = svc(
            "a",
            "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
        ) + &svc(
            "b",
            "{type: NodePort, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30081}]}",
        );
        let before = state(&both);
        let mut translator = Translator::new(node());
        translator.update(&before, before.services.keys(), before.slices.keys());
        let mut after = before.clone();
        let a = ObjectRef::new("default", "a");
        after.services.remove(&a);
        let changed = translator.update(&after, [&a], []);
        let b_node_port = Frontend::v4(Ipv4Addr::new(192, 168, 0, 10), 30081, Protocol::Tcp);
        assert!(changed.frontends.contains(&b_node_port), "{changed:?}");
        assert_eq!(translator.desired(), &translate(&after, &node()).desired);
        assert_eq!(
            translator.desired().frontends[&b_node_port].short_circuit,
            Some(Frontend::v4(Ipv4Addr::new(10, 0, 0, 1), 80, Protocol::Tcp))
        );
    }

    /// A Service with `spec.topologyKeys` `keys` (a YAML flow sequence) and `extra` spec
    /// fields, over the endpoints of kube-proxy's TestFilterTopologyEndpoint: two on each of
    /// testNode1..4, with the nodeName and zone the EndpointSlice controller writes (zone
    /// 90001 for testNode1 and 2, 90002 for 3 and 4).
    fn topology_keys_case(keys: &str, extra: &str) -> String {
        let endpoints: Vec<String> = (1..=4)
            .flat_map(|n| {
                let zone = if n <= 2 { 90001 } else { 90002 };
                (1..=2).map(move |i| {
                    format!("{{addresses: [1.1.{n}.{i}], nodeName: testNode{n}, zone: '{zone}'}}")
                })
            })
            .collect();
        svc(
            "a",
            &format!("{{clusterIP: 10.0.0.1, topologyKeys: {keys}, ports: [{{port: 11}}]{extra}}}"),
        ) + &slice(
            "a-1",
            "a",
            "[{port: 11}]",
            &format!("[{}]", endpoints.join(", ")),
        )
    }

    /// The node `testNode<n>` in `zone` (region cd), with its labels as the kubelet sets them.
    fn test_node(n: u32, zone: &str) -> NodeInfo {
        NodeInfo::new(
            format!("testNode{n}"),
            vec![Ipv4Addr::new(192, 168, 0, 10).into()],
            Some(&model::NodeFacts {
                labels: [
                    (model::LABEL_HOSTNAME, format!("testNode{n}")),
                    (model::LABEL_ZONE, zone.to_owned()),
                    (model::LABEL_REGION, "cd".to_owned()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
                ..model::NodeFacts::default()
            }),
            &model::NodeTopology::default(),
        )
    }

    #[test]
    fn topology_keys_as_kube_proxy_v1_21_filters_endpoints() {
        let on = |nodes: &[u32]| -> String {
            let eps: Vec<String> = nodes
                .iter()
                .flat_map(|n| (1..=2).map(move |i| format!("1.1.{n}.{i}:11")))
                .collect();
            eps.join(", ")
        };
        let line = |nodes: &[u32], key: &str| {
            vec![format!(
                "10.0.0.1:11/TCP ClusterIP default/a -> [{}] topology={key}",
                on(nodes)
            )]
        };
        let hz = "[kubernetes.io/hostname, topology.kubernetes.io/zone]";
        // kube-proxy v1.21's TestFilterTopologyEndpoint, case by case (its names).
        let cases: Vec<(&str, String, NodeInfo, Vec<String>)> = vec![
            (
                "no topology key and endpoints",
                svc(
                    "a",
                    "{clusterIP: 10.0.0.1, topologyKeys: [], ports: [{port: 11}]}",
                ),
                test_node(1, "90001"),
                vec!["10.0.0.1:11/TCP ClusterIP default/a -> [] reject".to_owned()],
            ),
            (
                "no topology key but have endpoints",
                topology_keys_case("[]", ""),
                test_node(1, "90001"),
                vec![format!(
                    "10.0.0.1:11/TCP ClusterIP default/a -> [{}]",
                    on(&[1, 2, 3, 4])
                )],
            ),
            (
                "one topology key with one node matched",
                topology_keys_case("[kubernetes.io/hostname]", ""),
                test_node(1, "90001"),
                line(&[1], "kubernetes.io/hostname"),
            ),
            (
                "one topology key without node matched",
                topology_keys_case("[kubernetes.io/hostname]", ""),
                test_node(5, "90001"),
                vec![
                    "10.0.0.1:11/TCP ClusterIP default/a -> [] topology=(no key matched) reject"
                        .into(),
                ],
            ),
            (
                "one topology key with multiple nodes matched",
                topology_keys_case("[topology.kubernetes.io/zone]", ""),
                test_node(2, "90001"),
                line(&[1, 2], "topology.kubernetes.io/zone"),
            ),
            (
                "early match in multiple topology keys",
                topology_keys_case(hz, ""),
                test_node(2, "90001"),
                line(&[2], "kubernetes.io/hostname"),
            ),
            (
                "later match in multiple topology keys",
                topology_keys_case(hz, ""),
                test_node(5, "90002"),
                line(&[3, 4], "topology.kubernetes.io/zone"),
            ),
            (
                "multiple topology keys without node matched",
                topology_keys_case(hz, ""),
                test_node(5, "90003"),
                vec![
                    "10.0.0.1:11/TCP ClusterIP default/a -> [] topology=(no key matched) reject"
                        .into(),
                ],
            ),
            (
                "multiple topology keys matched node when 'Any' key ignored",
                topology_keys_case("[kubernetes.io/hostname, '*']", ""),
                test_node(1, "90001"),
                line(&[1], "kubernetes.io/hostname"),
            ),
            (
                "two topology keys matched node with 'Any' key",
                topology_keys_case("[kubernetes.io/hostname, '*']", ""),
                test_node(5, "90001"),
                line(&[1, 2, 3, 4], "*"),
            ),
            (
                "multiple topology keys matched node with 'Any' key",
                topology_keys_case(
                    "[kubernetes.io/hostname, topology.kubernetes.io/zone, '*']",
                    "",
                ),
                test_node(5, "90003"),
                line(&[1, 2, 3, 4], "*"),
            ),
            // kube-proxy v1.21's edge cases when it cannot determine the node's topology.
            (
                "no node labels: \"*\" last includes all endpoints",
                topology_keys_case("[kubernetes.io/hostname, '*']", ""),
                NodeInfo::default(),
                line(&[1, 2, 3, 4], "*"),
            ),
            (
                "no node labels: without \"*\", no endpoints",
                topology_keys_case("[kubernetes.io/hostname]", ""),
                NodeInfo::default(),
                vec![
                    "10.0.0.1:11/TCP ClusterIP default/a -> [] topology=(no key matched) reject"
                        .into(),
                ],
            ),
            // What kube-proxy v1.21 did on a v1.21 cluster (tests/tests/kube_cluster.rs and
            // the README say how it was found).
            (
                "the hostname key compares the Node's kubernetes.io/hostname label, not its \
                 name, with the endpoints' nodeName",
                topology_keys_case("[kubernetes.io/hostname]", ""),
                NodeInfo {
                    labels: [(model::LABEL_HOSTNAME.to_owned(), "host-1".to_owned())].into(),
                    ..test_node(1, "90001")
                },
                vec![
                    "10.0.0.1:11/TCP ClusterIP default/a -> [] topology=(no key matched) reject"
                        .into(),
                ],
            ),
            (
                "every frontend follows the keys (externalTrafficPolicy Cluster), and \
                 internalTrafficPolicy Local gives way to them (v1.21's FilterEndpoints)",
                topology_keys_case(
                    "[topology.kubernetes.io/zone]",
                    ", type: NodePort, internalTrafficPolicy: Local, externalIPs: [203.0.113.5]",
                )
                .replace(
                    "ports: [{port: 11}]",
                    "ports: [{port: 11, nodePort: 30011}]",
                ),
                test_node(1, "90002"),
                vec![
                    format!(
                        "10.0.0.1:11/TCP ClusterIP default/a -> [{}] topology=topology.kubernetes.io/zone",
                        on(&[3, 4])
                    ),
                    format!(
                        "192.168.0.10:30011/TCP NodePort default/a -> [{}] topology=topology.kubernetes.io/zone",
                        on(&[3, 4])
                    ),
                    format!(
                        "203.0.113.5:11/TCP ExternalIP default/a -> [{}] topology=topology.kubernetes.io/zone",
                        on(&[3, 4])
                    ),
                ],
            ),
        ];
        for (name, yaml, node, want) in cases {
            assert_eq!(
                render(&translate(&state(&yaml), &node)),
                want,
                "case {name}"
            );
        }
    }

    #[test]
    fn topology_keys_choose_among_all_endpoints_then_the_ready_ones() {
        let case = |keys: &str, endpoints: &str| {
            svc(
                "a",
                &format!("{{clusterIP: 10.0.0.1, topologyKeys: {keys}, ports: [{{port: 80}}]}}"),
            ) + &slice("a-1", "a", "[{port: 80}]", endpoints)
        };
        let node = test_node(1, "z1");
        check(&[
            (
                "a not-ready endpoint alone makes its key win (kube-proxy v1.21 filters every \
                 endpoint, then takes the ready ones): no endpoints, \"*\" is not reached",
                case(
                    "[kubernetes.io/hostname, '*']",
                    "[{addresses: [10.1.0.5], nodeName: testNode1, conditions: {ready: false}}, {addresses: [10.1.0.2], nodeName: n2}]",
                ),
                node.clone(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] topology=kubernetes.io/hostname reject",
                ],
            ),
            (
                "a serving, terminating endpoint the key chose is the fallback when none it \
                 chose is ready (current kube-proxy; v1.21 had no such fallback)",
                case(
                    "[kubernetes.io/hostname, '*']",
                    "[{addresses: [10.1.0.5], nodeName: testNode1, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.0.2], nodeName: n2}]",
                ),
                node.clone(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.5:80 (terminating)] topology=kubernetes.io/hostname",
                ],
            ),
            (
                "topology hints give way to the keys",
                case(
                    "[topology.kubernetes.io/zone]",
                    "[{addresses: [10.1.0.1], nodeName: n1, zone: z1, hints: {forZones: [{name: z2}]}}, {addresses: [10.1.0.2], nodeName: n2, zone: z2, hints: {forZones: [{name: z1}]}}]",
                ),
                node.clone(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80] topology=topology.kubernetes.io/zone",
                ],
            ),
            (
                "the zone then the region: a key other than the host name and the zone comes \
                 from deprecatedTopology (lb; kube-proxy v1.21 reads nodeName and zone only)",
                case(
                    "[topology.kubernetes.io/zone, topology.kubernetes.io/region]",
                    "[{addresses: [10.1.0.1], nodeName: n9, zone: z9, deprecatedTopology: {topology.kubernetes.io/region: cd}}, {addresses: [10.1.0.2], nodeName: n8, zone: z8, deprecatedTopology: {topology.kubernetes.io/region: ef}}]",
                ),
                node.clone(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80] topology=topology.kubernetes.io/region",
                ],
            ),
            (
                "an endpoint without nodeName has no host name, whatever its deprecatedTopology",
                case(
                    "[kubernetes.io/hostname]",
                    "[{addresses: [10.1.0.1], deprecatedTopology: {kubernetes.io/hostname: testNode1}}]",
                ),
                node,
                &["10.0.0.1:80/TCP ClusterIP default/a -> [] topology=(no key matched) reject"],
            ),
        ]);
    }

    #[test]
    fn health_checks_as_kube_proxy_serves_them() {
        let lb = |name: &str, spec: &str| {
            svc(name, spec) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n"
        };
        let endpoints = "[{addresses: [10.1.0.1], nodeName: node-a}, \
             {addresses: [10.1.0.2], nodeName: node-a, conditions: {ready: false}}, \
             {addresses: [10.1.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, \
             {addresses: [10.1.0.4], nodeName: node-b}, {addresses: [10.1.0.5]}]";
        let two_ports = "[{name: a, port: 80}, {name: b, port: 81}]";
        let cases: Vec<(&str, String, Vec<String>)> = vec![
            (
                "NeedsHealthCheck: a LoadBalancer Service with externalTrafficPolicy Local; its \
                 local ready endpoints, by address and port, over its ports",
                lb(
                    "web",
                    "{type: LoadBalancer, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]}",
                ) + &slice("web-1", "web", two_ports, endpoints),
                vec!["default/web :32000 {IPv4: 2}".to_owned()],
            ),
            (
                "no health check with externalTrafficPolicy Cluster, for a NodePort Service, or \
                 without a port",
                lb(
                    "cluster",
                    "{type: LoadBalancer, clusterIP: 10.0.0.2, healthCheckNodePort: 32001, ports: [{port: 80, nodePort: 30082}]}",
                ) + &svc(
                    "np",
                    "{type: NodePort, clusterIP: 10.0.0.3, externalTrafficPolicy: Local, healthCheckNodePort: 32002, ports: [{port: 80, nodePort: 30083}]}",
                ) + &lb(
                    "noport",
                    "{type: LoadBalancer, clusterIP: 10.0.0.4, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30084}]}",
                ),
                vec![],
            ),
            (
                "no local ready endpoint: 0 (terminating, not ready and remote ones do not count)",
                lb(
                    "web",
                    "{type: LoadBalancer, clusterIP: 10.0.0.1, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30080}]}",
                ) + &slice(
                    "web-1",
                    "web",
                    "[{port: 80}]",
                    "[{addresses: [10.1.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.1.0.4], nodeName: node-b}]",
                ),
                vec!["default/web :32000 {IPv4: 0}".to_owned()],
            ),
            (
                "dual stack: each family its own count",
                lb(
                    "ds",
                    "{type: LoadBalancer, clusterIPs: [10.0.0.5, 'fd00::5'], externalTrafficPolicy: Local, healthCheckNodePort: 32003, ports: [{port: 80, nodePort: 30085}]}",
                ) + &slice(
                    "ds-4",
                    "ds",
                    "[{port: 80}]",
                    "[{addresses: [10.1.0.1], nodeName: node-a}]",
                ) + &slice6(
                    "ds-6",
                    "ds",
                    "[{port: 80}]",
                    "[{addresses: ['fd00:1::1'], nodeName: node-a}, {addresses: ['fd00:1::2'], nodeName: node-a}]",
                ),
                vec!["default/ds :32003 {IPv4: 1, IPv6: 2}".to_owned()],
            ),
        ];
        for (name, yaml, want) in cases {
            let t = translate(&state(&yaml), &node());
            let got: Vec<String> = t
                .health_checks
                .iter()
                .map(|(s, h)| {
                    format!("{s} :{} {:?}", h.port, h.local_endpoints)
                        .replace("V4", "IPv4")
                        .replace("V6", "IPv6")
                })
                .collect();
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn topology() {
        let spec = "{clusterIP: 10.0.0.1, ports: [{port: 80}]}";
        let case = |endpoints: &str| svc("a", spec) + &slice("a-1", "a", "[{port: 80}]", endpoints);
        let zoned = "[{addresses: [10.1.0.1], hints: {forZones: [{name: zone-a}]}}, {addresses: [10.1.0.2], hints: {forZones: [{name: zone-b}]}}, {addresses: [10.1.0.3], conditions: {ready: false}}]";
        check(&[
            (
                "zone hints: only endpoints hinted for this zone",
                case(zoned),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80]"],
            ),
            (
                "zone hints ignored when a ready endpoint has none",
                case(
                    "[{addresses: [10.1.0.1], hints: {forZones: [{name: zone-a}]}}, {addresses: [10.1.0.2]}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "zone hints ignored when none is for this zone",
                case(zoned),
                NodeInfo {
                    zone: Some("zone-c".into()),
                    ..node()
                },
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "zone hints ignored when the node has no zone",
                case(zoned),
                NodeInfo {
                    zone: None,
                    ..node()
                },
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "node hints (PreferSameNode) win over zone hints",
                case(
                    "[{addresses: [10.1.0.1], hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}, {addresses: [10.1.0.2], hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}, {addresses: [10.1.0.3], hints: {forNodes: [{name: node-c}], forZones: [{name: zone-b}]}}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.2:80]"],
            ),
            (
                "node hints without one for this node fall back to zone hints",
                case(
                    "[{addresses: [10.1.0.1], hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}, {addresses: [10.1.0.3], hints: {forNodes: [{name: node-c}], forZones: [{name: zone-b}]}}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80]"],
            ),
            (
                "topology applies to ready endpoints; serving-terminating ones still drain",
                case(
                    "[{addresses: [10.1.0.1], hints: {forZones: [{name: zone-a}]}}, {addresses: [10.1.0.2], hints: {forZones: [{name: zone-b}]}}, {addresses: [10.1.0.4], conditions: {ready: false, serving: true, terminating: true}}]",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.4:80 (terminating)]",
                ],
            ),
            (
                "trafficDistribution alone (no hints in the slices) changes nothing, as in kube-proxy",
                svc(
                    "a",
                    "{clusterIP: 10.0.0.1, trafficDistribution: PreferSameNode, ports: [{port: 80}]}",
                ) + &slice(
                    "a-1",
                    "a",
                    "[{port: 80}]",
                    "[{addresses: [10.1.0.1], nodeName: node-a, zone: zone-a}, {addresses: [10.1.0.2], nodeName: node-b, zone: zone-b}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80, 10.1.0.2:80]"],
            ),
            (
                "topology does not narrow Local policy endpoints",
                svc(
                    "a",
                    "{clusterIP: 10.0.0.1, internalTrafficPolicy: Local, ports: [{port: 80}]}",
                ) + &slice(
                    "a-1",
                    "a",
                    "[{port: 80}]",
                    "[{addresses: [10.1.0.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}, {addresses: [10.1.0.2], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}]",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [10.1.0.1:80]"],
            ),
        ]);
    }

    #[test]
    fn affinity_and_source_ranges() {
        let lb = |extra: &str| {
            svc(
                "lb",
                &format!(
                    "{{type: LoadBalancer, clusterIP: 10.0.0.1, externalIPs: [203.0.113.5], ports: [{{port: 80, nodePort: 30080}}]{extra}}}"
                ),
            ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2}]}}\n"
        };
        check(&[
            (
                "ClientIP affinity with the default timeout on every frontend",
                svc(
                    "a",
                    "{type: NodePort, clusterIP: 10.0.0.1, sessionAffinity: ClientIP, ports: [{port: 80, nodePort: 30080}]}",
                ),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/a -> [] affinity=10800 reject",
                    "192.168.0.10:30080/TCP NodePort default/a -> [] affinity=10800 reject",
                ],
            ),
            (
                "the selection annotation reaches every frontend of the Service",
                "---\napiVersion: v1\nkind: Service\nmetadata: {name: r, annotations: {lb.kube-lb.io/selection: random}}\n\
                 spec: {type: NodePort, clusterIP: 10.0.0.1, ports: [{port: 80, nodePort: 30080}]}\n"
                    .to_owned(),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/r -> [] selection=random reject",
                    "192.168.0.10:30080/TCP NodePort default/r -> [] selection=random reject",
                ],
            ),
            (
                "the deprecated prefix of the annotation still works, with a warning",
                "---\napiVersion: v1\nkind: Service\nmetadata: {name: r, annotations: {lb.example.io/selection: random}}\n\
                 spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n"
                    .to_owned(),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/r -> [] selection=random reject",
                    "warning: default/r: annotation lb.example.io/selection is deprecated: rename it to lb.kube-lb.io/selection",
                ],
            ),
            (
                "ClientIP affinity with a timeout",
                svc(
                    "a",
                    "{clusterIP: 10.0.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, ports: [{port: 80}]}",
                ),
                node(),
                &["10.0.0.1:80/TCP ClusterIP default/a -> [] affinity=30 reject"],
            ),
            (
                "source ranges restrict only the LoadBalancer frontends",
                lb(", loadBalancerSourceRanges: [10.0.0.0/8, ' 172.16.0.0/12', '2001:db8::/32']"),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/lb -> [] reject",
                    "192.168.0.10:30080/TCP NodePort default/lb -> [] reject",
                    "198.51.100.1:80/TCP LoadBalancer default/lb -> [] ranges=[10.0.0.0/8, 172.16.0.0/12] reject",
                    "198.51.100.2:80/TCP LoadBalancer default/lb -> [] ranges=[10.0.0.0/8, 172.16.0.0/12] reject",
                    "203.0.113.5:80/TCP ExternalIP default/lb -> [] reject",
                ],
            ),
            (
                "a range holding a node address also allows the ingress IPs as sources",
                lb(", loadBalancerSourceRanges: [192.168.0.0/24]"),
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/lb -> [] reject",
                    "192.168.0.10:30080/TCP NodePort default/lb -> [] reject",
                    "198.51.100.1:80/TCP LoadBalancer default/lb -> [] ranges=[192.168.0.0/24, 198.51.100.1/32, 198.51.100.2/32] reject",
                    "198.51.100.2:80/TCP LoadBalancer default/lb -> [] ranges=[192.168.0.0/24, 198.51.100.1/32, 198.51.100.2/32] reject",
                    "203.0.113.5:80/TCP ExternalIP default/lb -> [] reject",
                ],
            ),
            (
                "a /0 range, or IPv6 ranges only, means every source",
                lb(", loadBalancerSourceRanges: [10.0.0.0/8, 0.0.0.0/0]")
                    + &svc(
                        "v6",
                        "{type: LoadBalancer, clusterIP: 10.0.0.2, loadBalancerSourceRanges: ['2001:db8::/32'], ports: [{port: 80}]}",
                    )
                    + "status: {loadBalancer: {ingress: [{ip: 198.51.100.3}]}}\n",
                node(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/lb -> [] reject",
                    "10.0.0.2:80/TCP ClusterIP default/v6 -> [] reject",
                    "192.168.0.10:30080/TCP NodePort default/lb -> [] reject",
                    "198.51.100.1:80/TCP LoadBalancer default/lb -> [] reject",
                    "198.51.100.2:80/TCP LoadBalancer default/lb -> [] reject",
                    "198.51.100.3:80/TCP LoadBalancer default/v6 -> [] reject",
                    "203.0.113.5:80/TCP ExternalIP default/lb -> [] reject",
                ],
            ),
        ]);
    }

    /// An IPv6 EndpointSlice of Service `service`.
    fn slice6(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
        slice(name, service, ports, endpoints).replace("addressType: IPv4", "addressType: IPv6")
    }

    /// A node with an address of each family.
    fn node_ds() -> NodeInfo {
        NodeInfo {
            addresses: vec![
                Ipv4Addr::new(192, 168, 0, 10).into(),
                "fd00:ff::10".parse::<IpAddr>().unwrap(),
            ],
            ..node()
        }
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let lb = "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: '2001:db8:1::1'}]}}\n";
        check(&[
            (
                "single-stack IPv6: every kind of frontend, by family; IPv4 slices, externalIPs \
                 and ingress are not its family",
                svc(
                    "web",
                    "{type: LoadBalancer, clusterIPs: ['fd00::10'], ipFamilies: [IPv6], externalIPs: [203.0.113.5, '2001:db8::5'], loadBalancerSourceRanges: ['2001:db8:2::/48', 10.0.0.0/8], sessionAffinity: ClientIP, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}",
                ) + lb
                    + &slice6(
                        "web-6",
                        "web",
                        "[{port: 8080}]",
                        "[{addresses: ['fd00:1::2']}, {addresses: ['fd00:1::1']}]",
                    )
                    + &slice(
                        "web-4",
                        "web",
                        "[{port: 8080}]",
                        "[{addresses: [10.1.0.1]}]",
                    ),
                node_ds(),
                &[
                    "[2001:db8::5]:80/TCP ExternalIP default/web -> [[fd00:1::1]:8080, [fd00:1::2]:8080] affinity=10800",
                    "[2001:db8:1::1]:80/TCP LoadBalancer default/web -> [[fd00:1::1]:8080, [fd00:1::2]:8080] affinity=10800 ranges=[2001:db8:2::/48]",
                    "[fd00::10]:80/TCP ClusterIP default/web -> [[fd00:1::1]:8080, [fd00:1::2]:8080] affinity=10800",
                    "[fd00:ff::10]:30080/TCP NodePort default/web -> [[fd00:1::1]:8080, [fd00:1::2]:8080] affinity=10800",
                ],
            ),
            (
                "dual stack: each family its own frontends, backends and source ranges; a node \
                 address in a range lets that family's ingress IPs in; ::/0 opens IPv6 only",
                svc(
                    "ds",
                    "{type: LoadBalancer, clusterIPs: [10.0.0.1, 'fd00::1'], ipFamilyPolicy: RequireDualStack, loadBalancerSourceRanges: [192.168.0.0/24, '::/0'], ports: [{port: 80, nodePort: 30081}]}",
                ) + lb
                    + &slice("ds-4", "ds", "[{port: 80}]", "[{addresses: [10.1.0.1]}]")
                    + &slice6("ds-6", "ds", "[{port: 80}]", "[{addresses: ['fd00:1::1']}]"),
                node_ds(),
                &[
                    "10.0.0.1:80/TCP ClusterIP default/ds -> [10.1.0.1:80]",
                    "192.168.0.10:30081/TCP NodePort default/ds -> [10.1.0.1:80]",
                    "198.51.100.1:80/TCP LoadBalancer default/ds -> [10.1.0.1:80] ranges=[192.168.0.0/24, 198.51.100.1/32]",
                    "[2001:db8:1::1]:80/TCP LoadBalancer default/ds -> [[fd00:1::1]:80]",
                    "[fd00::1]:80/TCP ClusterIP default/ds -> [[fd00:1::1]:80]",
                    "[fd00:ff::10]:30081/TCP NodePort default/ds -> [[fd00:1::1]:80]",
                ],
            ),
            (
                "PreferDualStack with one family: that family only, the other's slices unused",
                svc(
                    "p",
                    "{type: NodePort, clusterIPs: [10.0.0.2], ipFamilyPolicy: PreferDualStack, ports: [{port: 80, nodePort: 30082}]}",
                ) + &slice("p-4", "p", "[{port: 80}]", "[{addresses: [10.1.0.2]}]")
                    + &slice6("p-6", "p", "[{port: 80}]", "[{addresses: ['fd00:1::2']}]"),
                node_ds(),
                &[
                    "10.0.0.2:80/TCP ClusterIP default/p -> [10.1.0.2:80]",
                    "192.168.0.10:30082/TCP NodePort default/p -> [10.1.0.2:80]",
                ],
            ),
            (
                "mixed slices: named targetPort per slice, eTP Local, terminating fallback and \
                 topology hints in the IPv6 family exactly as in IPv4",
                svc(
                    "m",
                    "{type: NodePort, clusterIPs: ['fd00::3', 10.0.0.3], externalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: web, nodePort: 30083}]}",
                ) + &slice(
                    "m-4",
                    "m",
                    "[{name: http, port: 8080}]",
                    "[{addresses: [10.1.0.3], nodeName: node-a}, {addresses: [10.1.0.4], nodeName: node-b}]",
                ) + &slice6(
                    "m-6a",
                    "m",
                    "[{name: http, port: 9090}]",
                    "[{addresses: ['fd00:1::3'], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: ['fd00:1::4'], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}]",
                ) + &slice6(
                    "m-6b",
                    "m",
                    "[{name: http, port: 9191}]",
                    "[{addresses: ['fd00:1::5'], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}]",
                ),
                node_ds(),
                &[
                    "10.0.0.3:80/TCP ClusterIP default/m:http -> [10.1.0.3:8080, 10.1.0.4:8080]",
                    "192.168.0.10:30083/TCP NodePort default/m:http -> [10.1.0.3:8080]",
                    "[fd00::3]:80/TCP ClusterIP default/m:http -> [[fd00:1::3]:9090 (terminating), [fd00:1::4]:9090]",
                    "[fd00:ff::10]:30083/TCP NodePort default/m:http -> [[fd00:1::3]:9090 (terminating)]",
                ],
            ),
            (
                "a hand-written Endpoints object with addresses of both families",
                svc(
                    "ext",
                    "{clusterIPs: [10.0.0.4, 'fd00::4'], ports: [{port: 80}]}",
                ) + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: ext}\nsubsets: [{addresses: [{ip: 192.0.2.10}, {ip: '2001:db8::10'}], ports: [{port: 8080}]}]\n",
                node_ds(),
                &[
                    "10.0.0.4:80/TCP ClusterIP default/ext -> [192.0.2.10:8080]",
                    "[fd00::4]:80/TCP ClusterIP default/ext -> [[2001:db8::10]:8080]",
                ],
            ),
            (
                "manifest without cluster IPs asking for IPv6: IPv6 node ports, with a warning",
                svc(
                    "u",
                    "{type: NodePort, ipFamilies: [IPv6], ports: [{port: 80, nodePort: 30084}]}",
                ) + &slice6("u-6", "u", "[{port: 80}]", "[{addresses: ['fd00:1::6']}]"),
                node_ds(),
                &[
                    "[fd00:ff::10]:30084/TCP NodePort default/u -> [[fd00:1::6]:80]",
                    "warning: default/u: no clusterIP (none given, none allocated); only its node ports, external IPs and load balancer IPs are programmed",
                ],
            ),
            (
                "an IPv4 and an IPv6 Service on equal addresses do not conflict across families",
                svc(
                    "a",
                    "{clusterIPs: ['::ffff:10.0.0.5'], ports: [{port: 80}]}",
                ) + &svc("b", "{clusterIP: 10.0.0.5, ports: [{port: 80}]}"),
                node_ds(),
                &[
                    "10.0.0.5:80/TCP ClusterIP default/b -> [] reject",
                    "[::ffff:10.0.0.5]:80/TCP ClusterIP default/a -> [] reject",
                ],
            ),
        ]);
    }

    /// One object of the pool the walk below draws from, as YAML.
    fn walk_object(kind: u32, name: u32, variant: u32) -> String {
        if kind == 0 {
            // Services s0..s3 share two cluster IPs (conflicts) and node port 30080.
            let ip = 1 + variant % 2;
            let spec = match variant % 4 {
                0 => format!("{{clusterIP: 10.96.0.{ip}, ports: [{{name: http, port: 80}}]}}"),
                1 => format!(
                    "{{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: \
                     32000, clusterIP: 10.96.0.{ip}, ports: [{{name: http, port: 80, \
                     nodePort: 30080}}, {{name: dns, port: 53, protocol: UDP}}]}}"
                ),
                2 => format!(
                    "{{clusterIP: 10.96.0.{ip}, internalTrafficPolicy: Local, ports: [{{name: \
                     http, port: 80}}, {{name: alt, port: 80}}]}}"
                ),
                _ => "{clusterIP: None, ports: [{name: http, port: 80}]}".to_owned(),
            };
            svc(&format!("s{name}"), &spec)
        } else {
            // Slices e0..e4 move between the Services, or lose their label.
            let owner = variant % 5;
            let ready = if variant.is_multiple_of(3) {
                "false"
            } else {
                "true"
            };
            let endpoints = format!(
                "[{{addresses: [10.1.0.{}], nodeName: node-a, conditions: {{ready: {ready}, \
                 serving: true, terminating: {}}}}}, {{addresses: [10.1.1.{name}]}}]",
                variant % 7,
                ready == "false"
            );
            let ports = "[{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]";
            if owner == 4 {
                format!(
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: \
                     {{name: e{name}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
                )
            } else {
                slice(&format!("e{name}"), &format!("s{owner}"), ports, &endpoints)
            }
        }
    }

    #[test]
    fn the_translator_follows_changes_exactly_as_a_full_translation() {
        let mut next = crate::testutil::walk(0x9e37_79b9);
        let mut st = ClusterState::default();
        let mut translator = Translator::new(node());
        let mut previous = DesiredState::default();
        let mut health_seen = false;
        for step in 0..400 {
            let kind = next(2);
            let (name, variant) = (next(4 + kind), next(12));
            let id = ObjectRef::new("default", format!("{}{name}", ["s", "e"][kind as usize]));
            let delete = next(6) == 0;
            if kind == 0 {
                st.services.remove(&id);
                if !delete {
                    st.services
                        .extend(state(&walk_object(kind, name, variant)).services);
                }
            } else {
                st.slices.remove(&id);
                if !delete {
                    st.slices
                        .extend(state(&walk_object(kind, name, variant)).slices);
                }
            }
            let changed = if step == 200 {
                let mut moved = node();
                moved.addresses.push(Ipv4Addr::new(192, 168, 0, 11).into());
                let full = Translator::new(moved.clone());
                translator = full;
                translator.update(&st, st.services.keys(), st.slices.keys());
                translator.set_node(&st, moved)
            } else if kind == 0 {
                translator.update(&st, [&id], [])
            } else {
                translator.update(&st, [], [&id])
            };
            let full = translate(&st, translator.node());
            assert_eq!(
                render(&translator.translation()),
                render(&full),
                "step {step}"
            );
            assert_eq!(
                translator.health_checks(),
                &full.health_checks,
                "step {step}"
            );
            health_seen |= !full.health_checks.is_empty();
            let diff: BTreeSet<Frontend> = previous
                .frontends
                .keys()
                .chain(full.desired.frontends.keys())
                .filter(|f| previous.frontends.get(f) != full.desired.frontends.get(f))
                .copied()
                .collect();
            if step != 200 {
                assert_eq!(changed.frontends, diff, "step {step}");
            }
            previous = full.desired;
        }
        assert!(
            previous.frontends.len() > 1,
            "the walk ends with frontends: {previous:?}"
        );
        assert!(health_seen, "the walk had health checks");
    }
}
