//! Map keys and values shared by the eBPF programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type here is a map key or value, so every type is `#[repr(C)]` with explicit padding
//! fields, holds no `bool`, `Option` or enum, and has its size checked at compile time.
//! Addresses and ports are stored in network byte order: a `u32` address holds the four octets
//! of the address in memory order (`u32::from_ne_bytes(ip.octets())`), a `u16` port holds
//! `port.to_be()`. That is how they sit in the packet, so the datapath compares and copies
//! them without swapping bytes.
//!
//! Map names carry a version suffix (`_V1`): the maps are pinned and outlive the agent, so a
//! new layout gets a new name instead of being read with the wrong one.
#![no_std]
#![deny(missing_docs)]

/// IP protocol number of TCP, as stored in keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as stored in keys.
pub const PROTO_UDP: u8 = 17;

/// Highest service id plus one with the compiled-in map sizes: service ids index
/// [`map_names::SERVICE_STATS`], an array (the agent can make it larger).
pub const MAX_SERVICES: u32 = 65_536;

/// Names of the maps, exactly as the eBPF object declares them (and so as they are pinned).
pub mod map_names {
    /// Hash map [`crate::Frontend4`] -> [`crate::Service`]. A missing key means "not ours".
    pub const SERVICES: &str = "LB_SVC4_V1";
    /// Hash map `u32` backend id -> [`crate::Backend4`]. Id 0 is never used.
    pub const BACKENDS: &str = "LB_BACKEND4_V1";
    /// Hash of maps `u32` key -> a Maglev table, an array map of [`crate::MaglevCell`] (see
    /// [`crate::maglev`]). Each service has up to two tables: key `id`, and key
    /// `id | maglev::KEY_TABLE_B`; [`crate::SERVICE_F_TABLE_B`] in its service entry says
    /// which one new flows use ([`crate::maglev::table_key`]). A new table is written whole
    /// into the table not in use, then the service entry switches to it.
    pub const MAGLEV: &str = "LB_MAGLEV_V1";
    /// LRU hash map [`crate::Ct4Key`] -> [`crate::CtEntry`]: both directions of each flow.
    pub const CONNTRACK: &str = "LB_CT4_V1";
    /// Hash map `u32` service id -> [`crate::RevNat4`]: the frontend replies must come from.
    pub const REV_NAT: &str = "LB_REVNAT4_V1";
    /// Per-CPU array indexed by service id -> [`crate::ServiceStats`].
    pub const SERVICE_STATS: &str = "LB_SVCSTAT_V1";
    /// Per-CPU array indexed by [`crate::reason`] -> `u64` packet count (V2: more reasons).
    pub const REASON_STATS: &str = "LB_REASON_V2";
    /// Per-CPU hash map `u32` backend id -> [`crate::ServiceStats`]: the backend's counters.
    /// The agent creates an entry with the backend and deletes it with the backend.
    pub const BACKEND_STATS: &str = "LB_BESTAT_V1";
    /// Per-CPU array indexed by [`crate::event`] -> `u64`: flow decisions and conntrack
    /// writes.
    pub const EVENTS: &str = "LB_EVENT_V1";
    /// LRU hash map [`crate::AffinityKey`] -> [`crate::AffinityEntry`]: sessionAffinity
    /// ClientIP.
    pub const AFFINITY: &str = "LB_AFFINITY4_V1";
    /// LPM trie ([`crate::SOURCE_RANGE_ID_BITS`] + prefix length, [`crate::SourceRange4`])
    /// -> `u8` (always 1): the sources allowed to use a frontend with
    /// [`crate::SERVICE_F_SOURCE_RANGES`].
    pub const SOURCE_RANGES: &str = "LB_SRCRANGE4_V1";

    /// Every map, for pinning, adoption and teardown.
    pub const ALL: [&str; 11] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        REV_NAT,
        SERVICE_STATS,
        REASON_STATS,
        BACKEND_STATS,
        EVENTS,
        AFFINITY,
        SOURCE_RANGES,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// XDP program on the external interface: frontend -> backend translation.
    pub const XDP_INGRESS: &str = "lb_xdp_ingress";
    /// TC egress program on the external interface: backend -> frontend for replies.
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// In the benchmarks' floor object: an XDP program that passes every packet.
    pub const NOOP_XDP: &str = "lb_noop_xdp";
    /// In the benchmarks' floor object: a TC program that passes every packet.
    pub const NOOP_TC: &str = "lb_noop_tc";
}

/// Key of [`map_names::SERVICES`]: one frontend (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend4 {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Value of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// Service (frontend) id, `1..MAX_SERVICES`: key of the Maglev table, reverse NAT,
    /// affinity, source ranges and stats.
    pub id: u32,
    /// Number of backends new flows choose from (the distinct backends of the service's
    /// Maglev table); 0 means drop (no backend).
    pub backend_count: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_secs: u32,
}

/// The frontend is reachable from outside the cluster (NodePort, LoadBalancer, externalIP).
pub const SERVICE_F_EXTERNAL: u32 = 1 << 0;
/// New flows pick a uniformly random entry of the Maglev table instead of the entry of
/// their flow hash (selection `random`).
pub const SERVICE_F_RANDOM: u32 = 1 << 1;
/// Only sources in [`map_names::SOURCE_RANGES`] for this service may open flows
/// (loadBalancerSourceRanges); others are dropped.
pub const SERVICE_F_SOURCE_RANGES: u32 = 1 << 2;
/// New flows use the service's second Maglev table (key `id | maglev::KEY_TABLE_B`), not
/// the first (key `id`).
pub const SERVICE_F_TABLE_B: u32 = 1 << 3;

/// One element of a Maglev table's inner array map: two table entries (backend ids).
///
/// Array maps round every value up to 8 bytes, so two `u32` entries per element halve the
/// memory of one per element. Element 0 is the header `[table size M, backend count]`;
/// entry `i` (`0..M`) is half `i & 1` of element `1 + i / 2`. See [`maglev`].
pub type MaglevCell = [u32; 2];

/// The layout of a Maglev table in its inner array map (shared by the datapath, the agent
/// and `lb explain`).
pub mod maglev {
    /// Flags of every inner map (they must equal the template's): `BPF_F_INNER_MAP` (inner
    /// maps may differ in size, so the table size is the agent's choice) and
    /// `BPF_F_MMAPABLE` (the agent writes a whole table with one memory copy).
    pub const INNER_MAP_FLAGS: u32 = (1 << 12) | (1 << 10);

    /// The bit of a Maglev map key that names a service's second table (service ids are
    /// below it).
    pub const KEY_TABLE_B: u32 = 1 << 31;

    /// The Maglev map key of the table a service entry (`id`, `flags`) selects.
    #[inline(always)]
    pub const fn table_key(id: u32, flags: u32) -> u32 {
        if flags & crate::SERVICE_F_TABLE_B != 0 {
            id | KEY_TABLE_B
        } else {
            id
        }
    }

    /// Elements of the inner array for a table of `size` entries: the header and
    /// `ceil(size / 2)` pairs.
    pub const fn elements(size: u32) -> u32 {
        1 + size.div_ceil(2)
    }

    /// The element and the half of it holding table entry `index`.
    #[inline(always)]
    pub const fn position(index: u32) -> (u32, usize) {
        (1 + index / 2, (index & 1) as usize)
    }
}

/// Value of [`map_names::BACKENDS`]: where a backend is. One backend shared by several
/// services is one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend4 {
    /// Backend (pod) IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`BACKEND_ACTIVE`], [`BACKEND_TERMINATING`] or [`BACKEND_REMOVED`].
    pub state: u8,
}

/// The backend takes new flows.
pub const BACKEND_ACTIVE: u8 = 0;
/// The backend is draining: existing flows continue, new ones go elsewhere.
pub const BACKEND_TERMINATING: u8 = 1;
/// The backend left the EndpointSlices; its entry stays for a drain period so that
/// established TCP connections to a pod that is still shutting down continue. A TCP SYN or
/// any UDP packet of a flow pinned to it selects a new backend.
pub const BACKEND_REMOVED: u8 = 2;

/// Key of [`map_names::AFFINITY`]: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// [`Service::id`].
    pub service_id: u32,
    /// Client IPv4 address, network byte order.
    pub client: u32,
}

/// Value of [`map_names::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityEntry {
    /// The backend the client's new flows go to while the entry is fresh.
    pub backend_id: u32,
    /// Always 0.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the client's last new flow.
    pub last_used_ns: u64,
}

/// The data of a [`map_names::SOURCE_RANGES`] key: the prefix length counts the
/// [`SOURCE_RANGE_ID_BITS`] of the service id plus the network's prefix length, so a
/// lookup with the full length matches only the ranges of that service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4 {
    /// [`Service::id`] (all its bits are always part of the prefix, so its byte order is
    /// irrelevant).
    pub service_id: u32,
    /// Source IPv4 address or network, network byte order.
    pub addr: u32,
}

/// Bits of [`SourceRange4::service_id`] in every source-range prefix.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// Key of [`map_names::CONNTRACK`]: a flow's 5-tuple as it is seen on the wire, and its
/// direction. The forward key is (client, frontend); the reply key is (backend, client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}

/// Direction of a [`Ct4Key`]: client -> frontend, as received.
pub const CT_FORWARD: u8 = 0;
/// Direction of a [`Ct4Key`]: backend -> client, as sent by the backend.
pub const CT_REPLY: u8 = 1;

/// Value of [`map_names::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The backend this flow was given.
    pub backend_id: u32,
    /// The service (frontend) the flow was addressed to: reverse NAT id.
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// Always 0.
    pub _pad: u32,
}

/// A FIN or RST was seen in this direction.
pub const CT_F_CLOSING: u32 = 1 << 0;

/// Value of [`map_names::REV_NAT`]: the frontend that replies are rewritten to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// Value of [`map_names::SERVICE_STATS`] and [`map_names::BACKEND_STATS`], per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceStats {
    /// Packets translated to a backend.
    pub packets: u64,
    /// Bytes of those packets (from the Ethernet header on).
    pub bytes: u64,
    /// Flows (conntrack entries) created.
    pub new_flows: u64,
}

/// Indexes of [`map_names::REASON_STATS`]: why a packet was not translated, or why it was
/// dropped. The datapath passes everything it cannot prove is for a frontend (the kernel
/// then handles it as if we were not there) and drops only frontend packets it cannot serve.
pub mod reason {
    /// Passed: not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    pub const NOT_IPV4: u32 = 0;
    /// Passed: shorter than an Ethernet header.
    pub const SHORT_ETHERNET: u32 = 1;
    /// Passed: shorter than an IPv4 header.
    pub const SHORT_IPV4: u32 = 2;
    /// Passed: IPv4 version field is not 4 or IHL < 5.
    pub const BAD_IPV4_HEADER: u32 = 3;
    /// Passed: IPv4 options present (IHL > 5); we do not translate them.
    pub const IPV4_OPTIONS: u32 = 4;
    /// Passed: a fragment (MF set or offset > 0); only whole datagrams are translated.
    pub const IPV4_FRAGMENT: u32 = 5;
    /// Passed: total length is below the header length or beyond the received bytes.
    pub const BAD_IPV4_LENGTH: u32 = 6;
    /// Passed: neither TCP nor UDP.
    pub const NOT_TCP_UDP: u32 = 7;
    /// Passed: the TCP or UDP header is cut short.
    pub const SHORT_L4: u32 = 8;
    /// Passed: not addressed to a frontend.
    pub const NOT_FRONTEND: u32 = 9;
    /// Dropped: the frontend has no backend.
    pub const NO_BACKEND: u32 = 10;
    /// Dropped: a slot names a backend id that is not in the backends map.
    pub const BACKEND_MISSING: u32 = 11;
    /// Translated, but the conntrack entry could not be written.
    pub const CT_INSERT_FAILED: u32 = 12;
    /// Egress, passed: a reply whose service has no reverse-NAT entry any more.
    pub const REV_NAT_MISSING: u32 = 13;
    /// Egress, dropped: a reply that could not be rewritten (skb helper failed).
    pub const REPLY_REWRITE_FAILED: u32 = 14;
    /// Dropped: a new flow from a source outside the frontend's loadBalancerSourceRanges.
    pub const SOURCE_RANGE_DENIED: u32 = 15;

    /// Number of reasons: the size of the reason array.
    pub const COUNT: u32 = 16;

    /// Name of each reason, by index, for the CLI and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "not_ipv4",
        "short_ethernet",
        "short_ipv4",
        "bad_ipv4_header",
        "ipv4_options",
        "ipv4_fragment",
        "bad_ipv4_length",
        "not_tcp_udp",
        "short_l4",
        "not_frontend",
        "no_backend",
        "backend_missing",
        "ct_insert_failed",
        "rev_nat_missing",
        "reply_rewrite_failed",
        "source_range_denied",
    ];
}

/// Indexes of [`map_names::EVENTS`]: how flows got their backend, and the conntrack
/// writes, counted per packet (or per entry) for `lb stats` and `lb explain`.
///
/// Conntrack semantics (the datapath implements exactly these):
/// - a conntrack hit on an ACTIVE or TERMINATING backend keeps it (established flows keep
///   their backend while others come and go; terminating backends drain);
/// - a TCP SYN whose entry points at a backend that is not ACTIVE (or is missing) selects
///   again and overwrites the entries ([`RESELECT_SYN`]: port reuse);
/// - any UDP packet whose entry points at a REMOVED or missing backend selects again
///   ([`RESELECT_UDP`]);
/// - an established TCP packet whose backend is REMOVED keeps going to it during the drain
///   ([`DRAIN_REMOVED`]); once the entry is gone it selects again ([`RESELECT_GONE`]), so the
///   new backend answers RST and the client fails fast instead of hanging.
///
/// Conntrack evictions are not counted by the kernel; they follow from these counters:
/// `evictions = CT_INSERTS - CT_DELETES - occupancy` (the datapath is the only writer and
/// only the agent's teardown deletes otherwise).
pub mod event {
    /// Conntrack entries created (new keys only; overwrites are not counted).
    pub const CT_INSERTS: u32 = 0;
    /// Conntrack entries the datapath deleted (the old reply entry of a re-selected flow).
    pub const CT_DELETES: u32 = 1;
    /// New flows whose backend came from the Maglev table entry of their flow hash.
    pub const SELECT_MAGLEV: u32 = 2;
    /// New flows whose backend came from a random Maglev table entry.
    pub const SELECT_RANDOM: u32 = 3;
    /// New flows whose backend came from the client's fresh affinity entry.
    pub const SELECT_AFFINITY: u32 = 4;
    /// Affinity entries ignored because they expired.
    pub const AFFINITY_EXPIRED: u32 = 5;
    /// Affinity entries ignored because their backend is not ACTIVE (or is gone).
    pub const AFFINITY_NOT_ACTIVE: u32 = 6;
    /// TCP SYNs of a known flow whose backend is not ACTIVE or is gone: selected again.
    pub const RESELECT_SYN: u32 = 7;
    /// UDP packets of a known flow whose backend is REMOVED or gone: selected again.
    pub const RESELECT_UDP: u32 = 8;
    /// Established TCP packets whose backend entry is gone (after the drain): selected
    /// again.
    pub const RESELECT_GONE: u32 = 9;
    /// Established TCP packets sent on to a REMOVED backend during its drain.
    pub const DRAIN_REMOVED: u32 = 10;

    /// Number of events: the size of the event array.
    pub const COUNT: u32 = 11;

    /// Name of each event, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "ct_inserts",
        "ct_deletes",
        "select_maglev",
        "select_random",
        "select_affinity",
        "affinity_expired",
        "affinity_not_active",
        "reselect_syn",
        "reselect_udp",
        "reselect_gone",
        "drain_removed",
    ];
}

/// Default capacities of the maps (entries); the agent can override them.
pub mod capacity {
    /// Frontends: 10,000 Services with a ClusterIP, NodePorts on two node addresses and
    /// an external address each leave room to spare.
    pub const SERVICES: u32 = 65_536;
    /// Backends (distinct address, port, protocol): 10,000 Services x 10 endpoints, with
    /// room for multi-port endpoints.
    pub const BACKENDS: u32 = 262_144;
    /// Conntrack entries (two per flow).
    pub const CONNTRACK: u32 = 262_144;
    /// sessionAffinity clients (service, client address), LRU.
    pub const AFFINITY: u32 = 65_536;
    /// loadBalancerSourceRanges entries, over all frontends.
    pub const SOURCE_RANGES: u32 = 16_384;
}

/// Incremental Internet checksum updates (RFC 1624: `HC' = ~(~HC + ~m + m')`).
///
/// Every value is taken exactly as it sits in memory (network byte order read as a native
/// integer): the one's-complement sum is independent of byte order, so no swapping is needed.
pub mod csum {
    #[inline(always)]
    const fn fold(mut sum: u64) -> u16 {
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    /// The checksum after a 32-bit field covered by it changed from `old` to `new`.
    #[inline(always)]
    pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
        !fold(!check as u64 + !old as u64 + new as u64)
    }

    /// The checksum after a 32-bit field (an address in the pseudo-header) and a 16-bit field
    /// (a port) covered by it changed.
    #[inline(always)]
    pub const fn replace4_2(check: u16, old4: u32, new4: u32, old2: u16, new2: u16) -> u16 {
        !fold(!check as u64 + !old4 as u64 + new4 as u64 + !old2 as u64 + new2 as u64)
    }
}

/// The flow hash that selects a backend slot: a function of the forward 5-tuple only, so
/// every packet of a flow (and `lb explain`, in userspace) gets the same answer. All inputs are
/// in network byte order, as in [`Ct4Key`].
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    // murmur3's 32-bit mixing steps and finaliser: cheap in BPF (no loops, no tables) and
    // well spread over the low bits, which the slot modulo uses.
    const fn mix(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = 0x9747_b28c ^ proto as u32;
    h = mix(h, saddr);
    h = mix(h, daddr);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h ^= 13;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const _: () = {
    assert!(core::mem::size_of::<Frontend4>() == 8);
    assert!(core::mem::size_of::<Service>() == 16);
    assert!(core::mem::size_of::<MaglevCell>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<AffinityEntry>() == 16);
    assert!(core::mem::align_of::<AffinityEntry>() == 8);
    assert!(core::mem::size_of::<SourceRange4>() == 8);
    assert!(event::NAMES.len() == event::COUNT as usize);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<CtEntry>() == 24);
    assert!(core::mem::align_of::<CtEntry>() == 8);
    assert!(core::mem::size_of::<RevNat4>() == 8);
    assert!(core::mem::size_of::<ServiceStats>() == 24);
    assert!(reason::NAMES.len() == reason::COUNT as usize);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] with explicit padding and only integer fields, so
    // every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for Frontend4 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SourceRange4 {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for ServiceStats {}
}

/// Conversions between host types and the network-byte-order fields.
impl Frontend4 {
    /// A frontend key from an address's octets, a host-order port and a protocol.
    pub const fn new(octets: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }

    /// The address's octets.
    pub const fn octets(&self) -> [u8; 4] {
        self.addr.to_ne_bytes()
    }

    /// The port in host order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend4 {
    /// A backend from an address's octets, a host-order port, a protocol and a state.
    pub const fn new(octets: [u8; 4], port: u16, proto: u8, state: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
            port: port.to_be(),
            proto,
            state,
        }
    }

    /// The address's octets.
    pub const fn octets(&self) -> [u8; 4] {
        self.addr.to_ne_bytes()
    }

    /// The port in host order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl RevNat4 {
    /// The reverse-NAT value of a frontend.
    pub const fn of(frontend: &Frontend4) -> Self {
        Self {
            addr: frontend.addr,
            port: frontend.port,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_byte_order_round_trips() {
        let f = Frontend4::new([10, 96, 0, 10], 8080, PROTO_TCP);
        // In memory the address and port are exactly the wire bytes.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(f) };
        assert_eq!(bytes, [10, 96, 0, 10, 0x1f, 0x90, PROTO_TCP, 0]);
        assert_eq!(f.octets(), [10, 96, 0, 10]);
        assert_eq!(f.port(), 8080);
        let b = Backend4::new([10, 244, 1, 2], 80, PROTO_UDP, BACKEND_TERMINATING);
        let bytes: [u8; 8] = unsafe { core::mem::transmute(b) };
        assert_eq!(
            bytes,
            [10, 244, 1, 2, 0, 80, PROTO_UDP, BACKEND_TERMINATING]
        );
        assert_eq!((b.octets(), b.port()), ([10, 244, 1, 2], 80));
    }

    #[test]
    fn field_offsets_match_the_documented_layout() {
        assert_eq!(core::mem::offset_of!(Ct4Key, sport), 8);
        assert_eq!(core::mem::offset_of!(Ct4Key, proto), 12);
        assert_eq!(core::mem::offset_of!(Ct4Key, dir), 13);
        assert_eq!(core::mem::offset_of!(CtEntry, last_seen_ns), 8);
        assert_eq!(core::mem::offset_of!(Service, backend_count), 4);
        assert_eq!(core::mem::offset_of!(RevNat4, port), 4);
    }

    #[test]
    fn flow_hash_spreads_source_ports_evenly() {
        // 60,000 flows from one client to one frontend over 7 slots: each slot within 5%
        // of the mean. A weak hash (e.g. a plain XOR of the fields) fails this.
        let mut counts = [0u32; 7];
        for sport in 1024..61_024u16 {
            let h = flow_hash(0x0200_000a, 0x0a00_600a, sport.to_be(), 8080u16.to_be(), 6);
            counts[(h % 7) as usize] += 1;
        }
        let mean = 60_000 / 7;
        for c in counts {
            assert!(c.abs_diff(mean) < mean / 20, "{counts:?}");
        }
        // Every field matters.
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
        assert_ne!(base, flow_hash(2, 1, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 4, 3, 6));
    }

    /// RFC 1071 checksum of `data`, computed from scratch, as big-endian words.
    fn full_checksum(data: &[u8]) -> u16 {
        let mut sum = 0u64;
        for chunk in data.chunks(2) {
            let hi = chunk[0] as u64;
            let lo = chunk.get(1).copied().unwrap_or(0) as u64;
            sum += (hi << 8) | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_checksum_equals_recomputation() {
        // A header-like buffer: checksum at bytes 10..12, an "address" at 16..20 and a
        // "port" at 22..24. Change both and compare with a checksum computed from scratch.
        let mut seed = 0x1234_5678u32;
        for _ in 0..2_000 {
            let mut buf = [0u8; 24];
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (seed >> 16) as u8;
            }
            buf[10..12].fill(0);
            let check = full_checksum(&buf);
            buf[10..12].copy_from_slice(&check.to_be_bytes());
            assert_eq!(full_checksum(&buf), 0);

            let old4 = u32::from_ne_bytes(buf[16..20].try_into().unwrap());
            let old2 = u16::from_ne_bytes(buf[22..24].try_into().unwrap());
            let new4 = seed.rotate_left(7);
            let new2 = (seed >> 3) as u16;
            let stored = u16::from_ne_bytes(buf[10..12].try_into().unwrap());
            let updated = csum::replace4_2(stored, old4, new4, old2, new2);
            buf[16..20].copy_from_slice(&new4.to_ne_bytes());
            buf[22..24].copy_from_slice(&new2.to_ne_bytes());
            buf[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full_checksum(&buf), 0, "{buf:?}");

            // And the 32-bit-only variant.
            let stored = u16::from_ne_bytes(buf[10..12].try_into().unwrap());
            let updated = csum::replace4(stored, new4, old4);
            buf[16..20].copy_from_slice(&old4.to_ne_bytes());
            buf[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full_checksum(&buf), 0, "{buf:?}");
        }
    }

    #[test]
    fn reason_and_event_names_are_unique() {
        for names in [&reason::NAMES[..], &event::NAMES[..]] {
            for (i, a) in names.iter().enumerate() {
                for b in &names[i + 1..] {
                    assert_ne!(a, b);
                }
            }
        }
    }

    #[test]
    fn maglev_positions_cover_the_table_once() {
        // Size 5: header, then (0,1), (2,3), (4,-).
        assert_eq!(maglev::elements(5), 4);
        assert_eq!(maglev::elements(16381), 8192);
        let positions: [(u32, usize); 5] = core::array::from_fn(|i| maglev::position(i as u32));
        assert_eq!(positions, [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]);
    }
}
