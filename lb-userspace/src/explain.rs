//! `lb explain`: which frontend a flow hits, which backend it gets, and why, read from the
//! pinned maps with the datapath's own rules and hash (`lb_common::flow_hash`, the table
//! layout of `lb_common::maglev`, the conntrack rules of `lb_common::event`).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError, lpm_trie};
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_REMOVED, BACKEND_TERMINATING, Backend4,
    CT_FORWARD, Ct4Key, CtEntry, Frontend4, PROTO_UDP, SERVICE_F_RANDOM, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, SourceRange4, flow_hash, map_names,
};
use serde::Serialize;

use crate::{
    datapath::{BpfMaps, DatapathError},
    desired::Protocol,
};

/// A flow as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Client address and port.
    pub src: SocketAddrV4,
    /// Frontend address and port.
    pub dst: SocketAddrV4,
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
    pub backend: Option<SocketAddrV4>,
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
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

fn open_lru<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotPinned(pin_dir.to_owned()));
    }
    let data = MapData::from_pin(&path).map_err(map_error(name))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(map_error(name))
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

fn addr(b: &Backend4) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(b.octets()), b.port())
}

impl Explainer {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            maps: BpfMaps::open_pinned(pin_dir)?,
            conntrack: open_lru(pin_dir, map_names::CONNTRACK)?,
            affinity: open_lru(pin_dir, map_names::AFFINITY)?,
        })
    }

    fn backend(&self, id: u32) -> Result<Option<Backend4>, DatapathError> {
        lookup(&self.maps.backends, &id, map_names::BACKENDS)
    }

    /// What the datapath does with the next packet of `flow` now (`now_ns`:
    /// CLOCK_MONOTONIC, the datapath's clock, for affinity timeouts).
    pub fn explain(&self, flow: &Flow, now_ns: u64) -> Result<Explanation, DatapathError> {
        let proto = flow.proto.number();
        let frontend = Frontend4::new(flow.dst.ip().octets(), flow.dst.port(), proto);
        let mut out = Explanation {
            decision: Decision::NotFrontend,
            service_id: None,
            backend: None,
            backend_id: None,
            steps: Vec::new(),
        };
        let Some(svc) = lookup(&self.maps.services, &frontend, map_names::SERVICES)? else {
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
        let key = Ct4Key {
            saddr: u32::from_ne_bytes(flow.src.ip().octets()),
            daddr: u32::from_ne_bytes(flow.dst.ip().octets()),
            sport: flow.src.port().to_be(),
            dport: flow.dst.port().to_be(),
            proto,
            dir: CT_FORWARD,
            _pad: [0; 2],
        };
        let syn = flow.syn && flow.proto == Protocol::Tcp;
        match lookup(&self.conntrack, &key, map_names::CONNTRACK)? {
            Some(entry) if entry.service_id == svc.id => {
                let backend = self.backend(entry.backend_id)?;
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
                    "conntrack hit: backend {} {what}: {verdict}",
                    entry.backend_id
                ));
                if keep {
                    out.decision = Decision::Conntrack;
                    out.backend = backend.as_ref().map(addr);
                    out.backend_id = Some(entry.backend_id);
                    return Ok(out);
                }
            }
            _ => out.steps.push("no conntrack entry: a new flow".to_owned()),
        }
        if svc.backend_count == 0 {
            out.decision = Decision::NoBackend;
            out.steps.push("no backend: dropped".to_owned());
            return Ok(out);
        }
        if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
            let source = lpm_trie::Key::new(
                SOURCE_RANGE_ID_BITS + 32,
                SourceRange4 {
                    service_id: svc.id,
                    addr: key.saddr,
                },
            );
            match self.maps.source_ranges.get(&source, 0) {
                Ok(_) => out
                    .steps
                    .push(format!("{} is in the source ranges", flow.src.ip())),
                Err(MapError::KeyNotFound) => {
                    out.decision = Decision::SourceDenied;
                    out.steps.push(format!(
                        "{} is outside the source ranges: dropped",
                        flow.src.ip()
                    ));
                    return Ok(out);
                }
                Err(source) => return Err(map_error(map_names::SOURCE_RANGES)(source)),
            }
        }
        if svc.affinity_timeout_secs != 0
            && let Some((id, backend)) = self.affinity(
                svc.id,
                key.saddr,
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
        let hash = flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto);
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
        let backend = self.backend(slot.backend_id)?;
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
        client: u32,
        timeout_secs: u32,
        now_ns: u64,
        steps: &mut Vec<String>,
    ) -> Result<Option<(u32, Backend4)>, DatapathError> {
        let key = AffinityKey { service_id, client };
        let Some(entry) = lookup(&self.affinity, &key, map_names::AFFINITY)? else {
            steps.push("no affinity entry".to_owned());
            return Ok(None);
        };
        let age_ns = now_ns.wrapping_sub(entry.last_used_ns);
        if age_ns >= u64::from(timeout_secs) * 1_000_000_000 {
            steps.push(format!("affinity entry expired (timeout {timeout_secs} s)"));
            return Ok(None);
        }
        match self.backend(entry.backend_id)? {
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
