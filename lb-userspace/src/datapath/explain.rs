//! `lb explain`: which frontend a flow hits, which backend it gets, and why, read from the
//! pinned maps with the datapath's own rules and hash (`lb_common::flow_hash`, the table
//! layout of `lb_common::maglev`, the conntrack rules of `lb_common::Event`). An IPv6 flow
//! is explained from the IPv6 maps (`lb_common::v6`), by the same rules.

use crate::datapath::Pins;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{HashMap, Map, MapData, MapError, lpm_trie};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_REMOVED, BACKEND_TERMINATING,
    CT_FORWARD, Ct4Key, Ct6Entry, Ct6Key, CtEntry, Frontend4, Frontend6, PROTO_UDP, SERVICE_F_DSR,
    SERVICE_F_RANDOM, SERVICE_F_REJECT, SERVICE_F_SHORT_CIRCUIT, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, Service, SourceRange4, SourceRange6, addr6, flow_hash, flow_hash6,
    map_names,
};
use serde::Serialize;

use crate::{
    datapath::{BpfMaps, DatapathError},
    model::Protocol,
};

/// A flow as the client sends it: IPv4 or IPv6, both addresses of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Client address and port.
    pub src: SocketAddr,
    /// Frontend address and port.
    pub dst: SocketAddr,
    /// Protocol.
    pub proto: Protocol,
    /// Explain a TCP SYN (a new connection) rather than a packet of an established one.
    pub syn: bool,
}

/// How the flow's backend is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Not a frontend: passed untouched.
    NotFrontend,
    /// The frontend has no backend (or no table): dropped.
    NoBackend,
    /// The Service has no endpoint anywhere: answered with ICMP port unreachable.
    Rejected,
    /// The source is outside the frontend's loadBalancerSourceRanges: dropped.
    SourceDenied,
    /// The conntrack entry's backend.
    Conntrack,
    /// The client's affinity entry's backend.
    Affinity,
    /// The Maglev table entry of the flow hash.
    Maglev,
    /// A random table entry: any of the table's backends.
    Random,
}

/// The answer of `lb explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// The frontend's service id.
    pub service_id: Option<u32>,
    /// The backend the packet goes to (none for a drop, a pass or a random choice).
    pub backend: Option<SocketAddr>,
    /// Its id.
    pub backend_id: Option<u32>,
    /// Each step, for humans.
    pub steps: Vec<String>,
}

/// The maps `lb explain` reads.
pub struct Explainer {
    maps: BpfMaps,
    conntrack: HashMap<MapData, Ct4Key, CtEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    conntrack6: HashMap<MapData, Ct6Key, Ct6Entry>,
    affinity6: HashMap<MapData, Affinity6Key, AffinityEntry>,
}

/// A backend of either family, as explain names it.
#[derive(Debug, Clone, Copy)]
struct Backend {
    addr: SocketAddr,
    state: u8,
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

fn open_lru<K: aya::Pod, V: aya::Pod>(
    pins: &Pins,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let map = pins.open_map(name, Map::LruHashMap)?;
    HashMap::try_from(map).map_err(map_error(name))
}

fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, DatapathError> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(map_error(name)(source)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which the affinity
/// and conntrack timestamps use.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The name of a backend state.
pub fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_ACTIVE => "active",
        BACKEND_TERMINATING => "terminating",
        BACKEND_REMOVED => "removed",
        _ => "unknown",
    }
}

fn addr(b: &Backend) -> SocketAddr {
    b.addr
}

/// An address and port as the maps hold them (network byte order).
fn v4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// [`v4`] of an address the caller knows is IPv4 (0 for an IPv6 one).
fn ip4(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(_) => 0,
    }
}

impl Explainer {
    /// Opens the pinned maps.
    pub fn open_pinned(pins: &Pins) -> Result<Self, DatapathError> {
        Ok(Self {
            maps: BpfMaps::open_pinned(pins)?,
            conntrack: open_lru(pins, map_names::CONNTRACK)?,
            affinity: open_lru(pins, map_names::AFFINITY)?,
            conntrack6: open_lru(pins, map_names::CONNTRACK6)?,
            affinity6: open_lru(pins, map_names::AFFINITY6)?,
        })
    }

    /// Backend `id` of the family of `ipv6` (the families share ids, each has its map).
    fn backend(&self, id: u32, ipv6: bool) -> Result<Option<Backend>, DatapathError> {
        Ok(if ipv6 {
            lookup(&self.maps.backends6, &id, map_names::BACKENDS6)?.map(|b| Backend {
                addr: SocketAddr::from((Ipv6Addr::from(b.octets()), b.port())),
                state: b.state,
            })
        } else {
            lookup(&self.maps.backends, &id, map_names::BACKENDS)?.map(|b| Backend {
                addr: SocketAddr::from((Ipv4Addr::from(b.octets()), b.port())),
                state: b.state,
            })
        })
    }

    /// The service of the flow's frontend.
    fn service(&self, flow: &Flow, proto: u8) -> Result<Option<Service>, DatapathError> {
        match flow.dst.ip() {
            IpAddr::V4(ip) => {
                let frontend = Frontend4::new(ip.octets(), flow.dst.port(), proto);
                lookup(&self.maps.services, &frontend, map_names::SERVICES)
            }
            IpAddr::V6(ip) => {
                let frontend = Frontend6::new(ip.octets(), flow.dst.port(), proto);
                lookup(&self.maps.services6, &frontend, map_names::SERVICES6)
            }
        }
    }

    /// The flow's forward conntrack entry: its service id and backend id.
    fn conntrack(&self, flow: &Flow, proto: u8) -> Result<Option<(u32, u32)>, DatapathError> {
        let (sport, dport) = (flow.src.port().to_be(), flow.dst.port().to_be());
        Ok(match (flow.src.ip(), flow.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let key = Ct4Key {
                    saddr: v4(src),
                    daddr: v4(dst),
                    sport,
                    dport,
                    proto,
                    dir: CT_FORWARD,
                    _pad: [0; 2],
                };
                lookup(&self.conntrack, &key, map_names::CONNTRACK)?
                    .map(|e| (e.service_id, e.backend_id))
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let key = Ct6Key {
                    saddr: addr6(src.octets()),
                    daddr: addr6(dst.octets()),
                    sport,
                    dport,
                    proto,
                    dir: CT_FORWARD,
                    _pad: [0; 2],
                };
                lookup(&self.conntrack6, &key, map_names::CONNTRACK6)?
                    .map(|e| (e.service_id, e.backend_id))
            }
            _ => None,
        })
    }

    /// Whether `src` is in the source ranges of service `service_id`.
    fn in_source_ranges(&self, service_id: u32, src: IpAddr) -> Result<bool, DatapathError> {
        let found = match src {
            IpAddr::V4(ip) => self.maps.source_ranges.get(
                &lpm_trie::Key::new(
                    SOURCE_RANGE_ID_BITS + 32,
                    SourceRange4 {
                        service_id,
                        addr: v4(ip),
                    },
                ),
                0,
            ),
            IpAddr::V6(ip) => self.maps.source_ranges6.get(
                &lpm_trie::Key::new(
                    SOURCE_RANGE_ID_BITS + 128,
                    SourceRange6 {
                        service_id,
                        addr: addr6(ip.octets()),
                    },
                ),
                0,
            ),
        };
        let name = if src.is_ipv6() {
            map_names::SOURCE_RANGES6
        } else {
            map_names::SOURCE_RANGES
        };
        match found {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(map_error(name)(source)),
        }
    }

    /// The affinity entry of client `src` for service `service_id`.
    fn affinity_entry(
        &self,
        service_id: u32,
        src: IpAddr,
    ) -> Result<Option<AffinityEntry>, DatapathError> {
        match src {
            IpAddr::V4(ip) => {
                let key = AffinityKey {
                    service_id,
                    client: v4(ip),
                };
                lookup(&self.affinity, &key, map_names::AFFINITY)
            }
            IpAddr::V6(ip) => {
                let key = Affinity6Key {
                    service_id,
                    client: addr6(ip.octets()),
                };
                lookup(&self.affinity6, &key, map_names::AFFINITY6)
            }
        }
    }

    /// What the datapath does with the next packet of `flow` now (`now_ns`:
    /// CLOCK_MONOTONIC, the datapath's clock, for affinity timeouts).
    pub fn explain(&self, flow: &Flow, now_ns: u64) -> Result<Explanation, DatapathError> {
        let proto = flow.proto.number();
        let ipv6 = flow.dst.is_ipv6();
        let mut out = Explanation {
            decision: Decision::NotFrontend,
            service_id: None,
            backend: None,
            backend_id: None,
            steps: Vec::new(),
        };
        if flow.src.is_ipv6() != ipv6 {
            out.steps.push(format!(
                "{} -> {}: the addresses are of different families, no packet is: passed",
                flow.src, flow.dst
            ));
            return Ok(out);
        }
        let Some(svc) = self.service(flow, proto)? else {
            out.steps.push(format!(
                "{}/{} is not a frontend: passed untouched",
                flow.dst, flow.proto
            ));
            return Ok(out);
        };
        out.service_id = Some(svc.id);
        out.steps.push(format!(
            "frontend {}/{}: service id {}, {} backends",
            flow.dst, flow.proto, svc.id, svc.backend_count
        ));
        if svc.flags & SERVICE_F_SHORT_CIRCUIT != 0 {
            out.steps.push(
                "externalTrafficPolicy Local: a client from outside (explained here) gets this \
                 node's endpoints; this node's own pods and processes get the cluster IP's \
                 (short-circuit)"
                    .to_owned(),
            );
        }
        if svc.flags & SERVICE_F_DSR != 0 {
            out.steps.push(
                "forwarding dsr: a backend on another node gets the flow from outside in a \
                 carrier (Geneve, UDP 6081) with the client's address kept, and answers from \
                 its own node; this node's backends as always"
                    .to_owned(),
            );
        }
        let syn = flow.syn && flow.proto == Protocol::Tcp;
        match self.conntrack(flow, proto)? {
            Some((service_id, backend_id)) if service_id == svc.id => {
                let backend = self.backend(backend_id, ipv6)?;
                // The rules of lb_common::event.
                let keep = match backend.map(|b| b.state) {
                    None => false,
                    Some(BACKEND_ACTIVE) => true,
                    Some(_) if syn => false,
                    Some(BACKEND_TERMINATING) => true,
                    Some(_) => proto != PROTO_UDP,
                };
                let what = match &backend {
                    Some(b) => format!("{} ({})", addr(b), state_name(b.state)),
                    None => "(gone)".to_owned(),
                };
                let verdict = if keep { "kept" } else { "selected again" };
                out.steps.push(format!(
                    "conntrack hit: backend {backend_id} {what}: {verdict}"
                ));
                if keep {
                    out.decision = Decision::Conntrack;
                    out.backend = backend.as_ref().map(addr);
                    out.backend_id = Some(backend_id);
                    return Ok(out);
                }
            }
            _ => out.steps.push("no conntrack entry: a new flow".to_owned()),
        }
        if svc.backend_count == 0 && svc.flags & SERVICE_F_REJECT != 0 {
            out.decision = Decision::Rejected;
            out.steps.push(
                "no endpoint anywhere: rejected (ICMP port unreachable, rejected_no_endpoints)"
                    .to_owned(),
            );
            return Ok(out);
        }
        if svc.backend_count == 0 {
            out.decision = Decision::NoBackend;
            out.steps.push("no backend here: dropped".to_owned());
            return Ok(out);
        }
        if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
            if !self.in_source_ranges(svc.id, flow.src.ip())? {
                out.decision = Decision::SourceDenied;
                out.steps.push(format!(
                    "{} is outside the source ranges: dropped",
                    flow.src.ip()
                ));
                return Ok(out);
            }
            out.steps
                .push(format!("{} is in the source ranges", flow.src.ip()));
        }
        if svc.affinity_timeout_secs != 0
            && let Some((id, backend)) = self.affinity(
                svc.id,
                flow.src.ip(),
                svc.affinity_timeout_secs,
                now_ns,
                &mut out.steps,
            )?
        {
            out.decision = Decision::Affinity;
            out.backend = Some(addr(&backend));
            out.backend_id = Some(id);
            return Ok(out);
        }
        if svc.flags & SERVICE_F_RANDOM != 0 {
            out.decision = Decision::Random;
            out.steps
                .push("selection random: any entry of the Maglev table".to_owned());
            return Ok(out);
        }
        let (sport, dport) = (flow.src.port().to_be(), flow.dst.port().to_be());
        let hash = match (flow.src.ip(), flow.dst.ip()) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => flow_hash6(
                addr6(src.octets()),
                addr6(dst.octets()),
                sport,
                dport,
                proto,
            ),
            (src, dst) => flow_hash(ip4(src), ip4(dst), sport, dport, proto),
        };
        let slot = self
            .maps
            .table_entry(lb_common::maglev::table_key(svc.id, svc.flags), hash)
            .map_err(|e| DatapathError::Table(Box::new(e)))?;
        let Some(slot) = slot else {
            out.decision = Decision::NoBackend;
            out.steps
                .push("no Maglev table: dropped (backend_missing)".to_owned());
            return Ok(out);
        };
        out.decision = Decision::Maglev;
        out.backend_id = Some(slot.backend_id);
        let backend = self.backend(slot.backend_id, ipv6)?;
        out.backend = backend.as_ref().map(addr);
        out.steps.push(format!(
            "Maglev: flow hash {hash:#010x} % {} = entry {}: backend {} {}",
            slot.size,
            slot.index,
            slot.backend_id,
            backend.map_or_else(|| "(missing: dropped)".to_owned(), |b| addr(&b).to_string())
        ));
        Ok(out)
    }

    /// The client's affinity entry's backend when it decides (fresh, on an active backend).
    fn affinity(
        &self,
        service_id: u32,
        client: IpAddr,
        timeout_secs: u32,
        now_ns: u64,
        steps: &mut Vec<String>,
    ) -> Result<Option<(u32, Backend)>, DatapathError> {
        let Some(entry) = self.affinity_entry(service_id, client)? else {
            steps.push("no affinity entry".to_owned());
            return Ok(None);
        };
        let age_ns = now_ns.wrapping_sub(entry.last_used_ns);
        if age_ns >= u64::from(timeout_secs) * 1_000_000_000 {
            steps.push(format!("affinity entry expired (timeout {timeout_secs} s)"));
            return Ok(None);
        }
        match self.backend(entry.backend_id, client.is_ipv6())? {
            Some(b) if b.state == BACKEND_ACTIVE => {
                steps.push(format!(
                    "affinity: backend {} {} (last new flow {} s ago)",
                    entry.backend_id,
                    addr(&b),
                    age_ns / 1_000_000_000
                ));
                Ok(Some((entry.backend_id, b)))
            }
            _ => {
                steps.push(format!(
                    "affinity entry names backend {}, which is not active: ignored",
                    entry.backend_id
                ));
                Ok(None)
            }
        }
    }
}
