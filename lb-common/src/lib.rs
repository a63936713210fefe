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
//! new layout gets a new name instead of being read with the wrong one. [`map_names::ALL`]
//! and [`program_names::ALL`] are the schema of the object ([`schema`]): this crate's tests
//! hold every layout to a golden table, and lb-userspace's the compiled object to the schema.
//!
//! The maps keyed by an address have one twin per family (the IPv6 types, such as
//! [`Frontend6`], are in `v6.rs`); [`Family`] names each family's types, so that code
//! written once for both is generic over [`V4`] and [`V6`]. The counters' indexes are the
//! enums [`Reason`], [`Event`], [`NatEvent`] and [`TableEvent`].
#![no_std]
#![deny(missing_docs)]

mod counters;
mod family;
pub mod names;
pub mod pktgen;
pub mod schema;
mod v6;
pub use counters::{Event, NatEvent, Reason, TableEvent};
pub use family::{BackendValue, CtValue, Family, FlowKey, NatValue, V4, V6};
pub use schema::{Capacity, MapSpec, ProgramSpec};
pub use v6::*;

/// IP protocol number of TCP, as stored in keys.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as stored in keys.
pub const PROTO_UDP: u8 = 17;

/// Highest service id plus one with the compiled-in map sizes: service ids index
/// [`map_names::SERVICE_STATS`], an array (the agent can make it larger).
pub const MAX_SERVICES: u32 = capacity::SERVICES;

/// Names of the maps, exactly as the eBPF object declares them (and so as they are pinned).
pub mod map_names {
    use crate::schema::{
        Entries::{Fixed, Sized},
        MapKind::*,
        MapSpec,
        Sizing::*,
    };

    /// The hash maps only the agent writes (services, backends, reverse NAT, the Maglev
    /// tables' map) take their memory as they fill, not all at creation: maps are charged to
    /// the memory cgroup of the agent that creates them (deploy/README.md). Lookups cost the
    /// same. The LRU maps the datapath fills stay preallocated (a program cannot allocate).
    const NO_PREALLOC: u32 = crate::schema::BPF_F_NO_PREALLOC;
    use crate::{
        Affinity6Key, AffinityEntry, AffinityKey, Backend4, Backend6, Ct4Key, Ct6Entry, Ct6Key,
        CtEntry, Event, Frontend4, Frontend6, Nat4Entry, Nat4Key, Nat6Entry, Nat6Key, Nat6Pending,
        NatEvent, PairKey, Reason, RevNat4, RevNat6, Service, ServiceStats, Sock6Entry, Sock6Key,
        SockAffinityKey, SockEntry, SockKey, SourceRange4, SourceRange6, TableEvent, capacity,
        prefilter, prog_slot, tc_prog_slot,
    };

    /// Hash map [`crate::Frontend4`] -> [`crate::Service`]. A missing key means "not ours".
    pub const SERVICES: &str = "LB_SVC4_V1";
    /// Hash map `u32` backend id -> [`crate::Backend4`]. Id 0 is never used. (V2: the
    /// backend's flags; V1 held [`crate::legacy::Backend4V1`].)
    pub const BACKENDS: &str = "LB_BACKEND4_V2";
    /// Hash of maps `u32` key -> a Maglev table, an array map of [`crate::MaglevCell`] (see
    /// [`crate::maglev`]). Each service has up to two tables: key `id`, and key
    /// `id | maglev::KEY_TABLE_B`; [`crate::SERVICE_F_TABLE_B`] in its service entry says
    /// which one new flows use ([`crate::maglev::table_key`]). A new table is written whole
    /// into the table not in use, then the service entry switches to it. (V2: two keys per
    /// service and twice the entries; V1, [`crate::legacy::MAGLEV_V1`], had one per service.)
    pub const MAGLEV: &str = "LB_MAGLEV_V2";
    /// LRU hash map [`crate::Ct4Key`] -> [`crate::CtEntry`]: both directions of each flow.
    /// V2: the entry carries the translation (see [`crate::legacy::CtEntryV1`] for V1).
    pub const CONNTRACK: &str = "LB_CT4_V2";
    /// Hash map `u32` service id -> [`crate::RevNat4`]: the frontend replies must come from.
    pub const REV_NAT: &str = "LB_REVNAT4_V1";
    /// Per-CPU array indexed by service id -> [`crate::ServiceStats`].
    pub const SERVICE_STATS: &str = "LB_SVCSTAT_V1";
    /// Per-CPU array indexed by [`crate::Reason`] -> `u64` packet count (V4: the rejected
    /// packets; V3: the IPv6 reasons; V2: more reasons than V1).
    pub const REASON_STATS: &str = "LB_REASON_V4";
    /// Per-CPU array of [`crate::ServiceStats`]: the backends' counters, each at its
    /// backend's [`crate::backend_stats_slot`] (V2: an array, whose lookups the verifier
    /// inlines, in place of V1's hash map keyed by backend id). Its size is a power of two;
    /// the agent gives each live backend a slot of its own and zeroes the slot of a new id.
    pub const BACKEND_STATS: &str = "LB_BESTAT_V2";
    /// LRU per-CPU hash map [`crate::PairKey`] (service id, backend id) -> `u64`: the flows
    /// each frontend gave each backend (one backend shared by a ClusterIP and a NodePort is
    /// counted apart for each), as ipvsadm's Conns per virtual and real server. The datapath
    /// counts a pair when a flow is created, never per packet (a lookup of this map on every
    /// packet cost an established flow about 25 ns, a third of its cost): a pair's packets
    /// and bytes are not counted, a backend's over all its frontends are
    /// ([`BACKEND_STATS`]). It adds an entry on a pair's first flow; the least recently
    /// counted pairs give way when it is full (as many pairs as `--max-services` frontends).
    /// V2: flows only (V1 counted [`crate::ServiceStats`] per packet).
    pub const PAIR_STATS: &str = "LB_PAIRSTAT_V2";
    /// Per-CPU array indexed by [`crate::Event`] -> `u64`: flow decisions and conntrack
    /// writes.
    pub const EVENTS: &str = "LB_EVENT_V1";
    /// LRU hash map [`crate::AffinityKey`] -> [`crate::AffinityEntry`]: sessionAffinity
    /// ClientIP.
    pub const AFFINITY: &str = "LB_AFFINITY4_V1";
    /// LPM trie ([`crate::SOURCE_RANGE_ID_BITS`] + prefix length, [`crate::SourceRange4`])
    /// -> `u8` (always 1): the sources allowed to use a frontend with
    /// [`crate::SERVICE_F_SOURCE_RANGES`].
    pub const SOURCE_RANGES: &str = "LB_SRCRANGE4_V1";
    /// Array of one `u32`, the backend generation: the agent adds one after every write
    /// that takes a backend out of ACTIVE (a state change or a delete), so that a
    /// conntrack entry can tell that its backend is still ACTIVE without reading it (see
    /// [`crate::CtEntry::backend_gen`]).
    pub const BACKEND_GEN: &str = "LB_BEGEN_V1";
    /// Array of [`crate::prefilter::WORDS`] `u64`, a bitmap over
    /// [`crate::prefilter::bucket`]s of frontends (address, port, protocol): a bucket's bit
    /// is set while some frontend in it has a service entry, so a packet whose bucket's bit
    /// is clear is not for a frontend, without a hash lookup. `BPF_F_MMAPABLE`. (Pinned as
    /// `LB_PREFILTER4_V1` before: see [`crate::legacy::RENAMED`].)
    pub const PREFILTER: &str = "LB_PREFILTER_V1";
    /// LRU hash map [`crate::Nat4Key`] -> [`crate::Nat4Entry`]: the source NAT of flows to
    /// remote backends (see [`crate::nat`]).
    pub const NAT: &str = "LB_NAT4_V1";
    /// Per-CPU array indexed by [`crate::NatEvent`] -> `u64`: source NAT, forwarding, DSR
    /// and ICMP translation counters. V2: room for the DSR counters (V1 had 12).
    pub const NAT_EVENTS: &str = "LB_NATEVENT_V2";

    /// LRU hash map [`crate::SockKey`] -> [`crate::SockEntry`]: what the socket hooks
    /// translated, per socket (its cookie): the backend of each frontend it addressed, and
    /// the frontend each backend stands for.
    pub const SOCKETS: &str = "LB_SOCK4_V1";
    /// LRU hash map [`crate::SockAffinityKey`] -> [`crate::AffinityEntry`]:
    /// sessionAffinity ClientIP at the socket hooks, where the client is a network namespace.
    /// Keyed by service id and namespace, so it serves the IPv6 hooks as well.
    pub const SOCK_AFFINITY: &str = "LB_SOCKAFF4_V1";
    /// Per-CPU array indexed by [`crate::TableEvent`] -> `u64`: entries the datapath
    /// inserted into its LRU tables (other than conntrack's, counted as events), from which
    /// the agent derives their evictions. (Pinned as `LB_TABLEEVENT_V1` before: see
    /// [`crate::legacy::RENAMED`].)
    pub const TABLE_EVENTS: &str = "LB_TBLEVENT_V1";
    /// Hash map `u32` service id -> `u32` service id: for each external frontend with
    /// [`crate::SERVICE_F_SHORT_CIRCUIT`] (externalTrafficPolicy Local), the id of its
    /// Service's cluster frontend (the ClusterIP of the same port, family and protocol),
    /// whose backends this node's pods and processes get through it (kube-proxy's
    /// "short-circuit" of local traffic). Both families' (service ids are shared); the
    /// cluster frontend is found by its reverse NAT entry.
    pub const SHORT_CIRCUIT: &str = "LB_SHORTCIRC_V1";

    /// Hash map [`crate::Frontend6`] -> [`crate::Service`]: the IPv6 frontends (service ids
    /// are shared with [`SERVICES`]).
    pub const SERVICES6: &str = "LB_SVC6_V1";
    /// Hash map `u32` backend id -> [`crate::Backend6`] (backend ids are shared with
    /// [`BACKENDS`]: an id is in one of the two).
    pub const BACKENDS6: &str = "LB_BACKEND6_V1";
    /// LRU hash map [`crate::Ct6Key`] -> [`crate::Ct6Entry`]: IPv6 conntrack.
    pub const CONNTRACK6: &str = "LB_CT6_V1";
    /// Hash map `u32` service id -> [`crate::RevNat6`].
    pub const REV_NAT6: &str = "LB_REVNAT6_V1";
    /// LRU hash map [`crate::Affinity6Key`] -> [`crate::AffinityEntry`].
    pub const AFFINITY6: &str = "LB_AFFINITY6_V1";
    /// LPM trie ([`crate::SOURCE_RANGE_ID_BITS`] + prefix length, [`crate::SourceRange6`])
    /// -> `u8` (always 1).
    pub const SOURCE_RANGES6: &str = "LB_SRCRANGE6_V1";
    /// LRU hash map [`crate::Sock6Key`] -> [`crate::Sock6Entry`]: [`SOCKETS`] of the IPv6
    /// socket hooks (an IPv6 socket addressing an IPv4-mapped frontend is in [`SOCKETS`]).
    pub const SOCKETS6: &str = "LB_SOCK6_V1";
    /// LRU hash map [`crate::Nat6Key`] -> [`crate::Nat6Entry`]: the source NAT of IPv6
    /// flows to remote backends, by the rules of [`NAT`] (see [`crate::nat`]).
    pub const NAT6: &str = "LB_NAT6_V1";
    /// Per-CPU array of one [`crate::Nat6Pending`]: what
    /// [`crate::program_names::XDP_INGRESS6`] hands to [`crate::program_names::XDP_NAT6`]
    /// with its tail call (the two programs run one after the other on one CPU).
    pub const NAT6_PENDING: &str = "LB_NAT6PEND_V1";
    /// Per-CPU array of one [`crate::FibScratch`]: the kernel's FIB lookup parameters of
    /// the pod interfaces' TC programs, off their stack (with them on it, the IPv6 program
    /// was over the stack limit). Nothing outside one program run reads it.
    pub const FIB_SCRATCH: &str = "LB_FIBSCR_V1";

    /// Program array (`BPF_MAP_TYPE_PROG_ARRAY`) indexed by [`crate::prog_slot`]: the XDP
    /// programs [`crate::program_names::XDP_INGRESS`] tail-calls (and the one
    /// [`crate::program_names::XDP_INGRESS6`] tail-calls). The agent writes every slot on
    /// each start, so that the slots hold the programs of the running agent's object. (V2:
    /// the slot of [`crate::program_names::XDP_NAT6`]; V3: of
    /// [`crate::program_names::XDP_DSR6`] and [`crate::program_names::XDP_DSR4`].)
    pub const PROGRAMS: &str = "LB_PROGS_V3";
    /// Program array (`BPF_MAP_TYPE_PROG_ARRAY`) indexed by [`crate::tc_prog_slot`]: the TC
    /// classifiers [`crate::program_names::TC_POD_INGRESS`] tail-calls (a program array
    /// holds programs of one type, so the XDP ones are in [`PROGRAMS`]). The agent writes
    /// every slot whenever it loads the pod interfaces' program.
    pub const TC_PROGRAMS: &str = "LB_TCPROGS_V1";

    /// Hash map [`crate::names::NameKey`] -> [`crate::names::FrontendName`]: the Service
    /// port of each frontend, which the agent writes beside the service entries and the
    /// CLI reads. The agent creates it (it is not in the programs' object, nor in [`ALL`]).
    pub const NAMES: &str = "LB_NAMES_V1";

    /// Every map, what it is: the schema the object is checked against (see
    /// [`crate::schema`]), and the maps the agent pins, adopts, migrates and tears down.
    pub const ALL: [MapSpec; 32] = [
        MapSpec::new::<Frontend4, Service>(SERVICES, Hash, Sized(Services)).with_flags(NO_PREALLOC),
        MapSpec::new::<u32, Backend4>(BACKENDS, Hash, Sized(Backends)).with_flags(NO_PREALLOC),
        MapSpec::hash_of_maps::<u32>(MAGLEV, &crate::maglev::INNER, Sized(MaglevTables))
            .with_flags(NO_PREALLOC),
        MapSpec::new::<Ct4Key, CtEntry>(CONNTRACK, LruHash, Sized(Conntrack)),
        MapSpec::new::<u32, RevNat4>(REV_NAT, Hash, Sized(Services)).with_flags(NO_PREALLOC),
        MapSpec::new::<u32, ServiceStats>(SERVICE_STATS, PerCpuArray, Sized(ServiceIds)),
        MapSpec::new::<u32, u64>(REASON_STATS, PerCpuArray, Fixed(Reason::COUNT)),
        MapSpec::new::<u32, ServiceStats>(BACKEND_STATS, PerCpuArray, Sized(BackendSlots)),
        MapSpec::new::<PairKey, u64>(PAIR_STATS, LruPerCpuHash, Sized(Services)),
        MapSpec::new::<u32, u64>(EVENTS, PerCpuArray, Fixed(Event::COUNT)),
        MapSpec::new::<AffinityKey, AffinityEntry>(AFFINITY, LruHash, Sized(Affinity)),
        MapSpec::lpm_trie::<SourceRange4, u8>(SOURCE_RANGES, Fixed(capacity::SOURCE_RANGES)),
        MapSpec::new::<u32, u32>(BACKEND_GEN, Array, Fixed(1)),
        MapSpec::new::<u32, u64>(PREFILTER, Array, Fixed(prefilter::WORDS))
            .with_flags(prefilter::MAP_FLAGS),
        MapSpec::new::<Nat4Key, Nat4Entry>(NAT, LruHash, Sized(Conntrack)),
        MapSpec::new::<u32, u64>(NAT_EVENTS, PerCpuArray, Fixed(NatEvent::COUNT)),
        MapSpec::new::<SockKey, SockEntry>(SOCKETS, LruHash, Sized(Conntrack)),
        MapSpec::new::<SockAffinityKey, AffinityEntry>(SOCK_AFFINITY, LruHash, Sized(Affinity)),
        MapSpec::new::<u32, u64>(TABLE_EVENTS, PerCpuArray, Fixed(TableEvent::COUNT)),
        MapSpec::new::<u32, u32>(SHORT_CIRCUIT, Hash, Sized(Services)).with_flags(NO_PREALLOC),
        MapSpec::new::<Frontend6, Service>(SERVICES6, Hash, Sized(Services))
            .with_flags(NO_PREALLOC),
        MapSpec::new::<u32, Backend6>(BACKENDS6, Hash, Sized(Backends)).with_flags(NO_PREALLOC),
        MapSpec::new::<Ct6Key, Ct6Entry>(CONNTRACK6, LruHash, Sized(Conntrack)),
        MapSpec::new::<u32, RevNat6>(REV_NAT6, Hash, Sized(Services)).with_flags(NO_PREALLOC),
        MapSpec::new::<Affinity6Key, AffinityEntry>(AFFINITY6, LruHash, Sized(Affinity)),
        MapSpec::lpm_trie::<SourceRange6, u8>(SOURCE_RANGES6, Fixed(capacity::SOURCE_RANGES)),
        MapSpec::new::<Sock6Key, Sock6Entry>(SOCKETS6, LruHash, Sized(Conntrack)),
        MapSpec::new::<Nat6Key, Nat6Entry>(NAT6, LruHash, Sized(Conntrack)),
        MapSpec::new::<u32, Nat6Pending>(NAT6_PENDING, PerCpuArray, Fixed(1)),
        MapSpec::new::<u32, crate::FibScratch>(FIB_SCRATCH, PerCpuArray, Fixed(1)),
        MapSpec::program_array(PROGRAMS, prog_slot::COUNT),
        MapSpec::program_array(TC_PROGRAMS, tc_prog_slot::COUNT),
    ];

    /// The map named `name`.
    pub fn spec(name: &str) -> Option<&'static MapSpec> {
        ALL.iter().find(|m| m.name == name)
    }
}

/// Slots of [`map_names::PROGRAMS`].
pub mod prog_slot {
    /// [`crate::program_names::XDP_INGRESS6`]: the IPv6 frames of the external interface.
    pub const XDP_INGRESS6: u32 = 0;
    /// [`crate::program_names::XDP_NAT6`]: IPv6 source NAT, tail-called by
    /// [`crate::program_names::XDP_INGRESS6`].
    pub const XDP_NAT6: u32 = 1;
    /// [`crate::program_names::XDP_ICMP6`]: ICMPv6 errors about NATed flows, tail-called by
    /// [`crate::program_names::XDP_INGRESS6`].
    pub const XDP_ICMP6: u32 = 2;
    /// [`crate::program_names::XDP_DSR6`]: IPv6 direct server return, tail-called by
    /// [`crate::program_names::XDP_INGRESS6`].
    pub const XDP_DSR6: u32 = 3;
    /// [`crate::program_names::XDP_DSR4`]: IPv4 direct server return, tail-called by
    /// [`crate::program_names::XDP_INGRESS`].
    pub const XDP_DSR4: u32 = 4;
    /// Number of slots: the size of the program array.
    pub const COUNT: u32 = 5;
}

/// Slots of [`map_names::TC_PROGRAMS`].
pub mod tc_prog_slot {
    /// [`crate::program_names::TC_POD_INGRESS6`]: the IPv6 frames pods send.
    pub const POD_INGRESS6: u32 = 0;
    /// [`crate::program_names::TC_EGRESS`]: the ICMPv6 errors pods send, which
    /// [`crate::program_names::TC_POD_INGRESS6`] passes on to it.
    pub const EGRESS: u32 = 1;
    /// Number of slots: the size of the program array.
    pub const COUNT: u32 = 2;
}

/// The destination pre-filter ([`map_names::PREFILTER`]): one bit per bucket of frontends,
/// looked up before conntrack so that a packet for no frontend costs an array read.
pub mod prefilter {
    /// Buckets: 2^20 bits (128 KiB), so that 10,000 frontends fill about 1% of them.
    pub const BITS: u32 = 1 << 20;
    /// Elements (`u64` words) of the bitmap array.
    pub const WORDS: u32 = BITS / 64;
    /// `BPF_F_MMAPABLE`: the agent reads the bitmap in one go on start.
    pub const MAP_FLAGS: u32 = 1 << 10;

    /// The bucket of a frontend (address and port in network byte order, as in the
    /// packet): Fibonacci hashing of the fields, whose top bits spread consecutive
    /// addresses and ports over the whole range. Two multiplications in BPF.
    #[inline(always)]
    pub const fn bucket(addr: u32, port: u16, proto: u8) -> u32 {
        let h = addr.wrapping_mul(0x9e37_79b1)
            ^ (((port as u32) << 8) | proto as u32).wrapping_mul(0x85eb_ca6b);
        let h = (h ^ (h >> 15)).wrapping_mul(0x2c1b_3c6d);
        h >> (32 - BITS.trailing_zeros())
    }

    /// The bucket of an IPv6 frontend: [`bucket`] of its address's four words folded into
    /// one (both families share the bitmap; a bucket shared across families only costs
    /// the hash lookup that follows).
    #[inline(always)]
    pub const fn bucket6(addr: crate::Addr6, port: u16, proto: u8) -> u32 {
        bucket(addr[0] ^ addr[1] ^ addr[2] ^ addr[3], port, proto)
    }

    /// The word of `bucket` in the bitmap, and its bit in that word.
    #[inline(always)]
    pub const fn position(bucket: u32) -> (u32, u64) {
        (bucket / 64, 1 << (bucket % 64))
    }
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    use crate::schema::{ProgramKind::*, ProgramSpec};

    /// XDP program on the external interface: frontend -> backend translation.
    pub const XDP_INGRESS: &str = "lb_xdp_ingress";
    /// XDP program for the IPv6 frames of the external interface: frontend -> backend
    /// translation. Not attached: [`XDP_INGRESS`] tail-calls it through
    /// [`crate::map_names::PROGRAMS`] (slot [`crate::prog_slot::XDP_INGRESS6`]).
    pub const XDP_INGRESS6: &str = "lb_xdp_ingress6";
    /// XDP program for IPv6 remote backends: the source NAT of a packet
    /// [`XDP_INGRESS6`] translated to a remote backend, and the translation back of the
    /// backend's replies. Not attached: [`XDP_INGRESS6`] tail-calls it (slot
    /// [`crate::prog_slot::XDP_NAT6`]), handing it the flow in
    /// [`crate::map_names::NAT6_PENDING`]. Its own program for its own stack: with the NAT
    /// inline, [`XDP_INGRESS6`]'s stack would pass 512 bytes.
    pub const XDP_NAT6: &str = "lb_xdp_nat6";
    /// XDP program for ICMPv6 errors about IPv6 flows [`XDP_NAT6`] translated: rewritten
    /// to be about the packet the client sent, and sent to the client. Tail-called by
    /// [`XDP_INGRESS6`] (slot [`crate::prog_slot::XDP_ICMP6`]); its own program for its own
    /// stack, as [`XDP_NAT6`].
    pub const XDP_ICMP6: &str = "lb_xdp_icmp6";
    /// XDP program for IPv6 direct server return (`crate::dsr`): a packet of a flow to a
    /// remote backend sent in a carrier, and a carrier to this node unwrapped. Tail-called
    /// by [`XDP_INGRESS6`] (slot [`crate::prog_slot::XDP_DSR6`]) with the flow in
    /// [`crate::map_names::NAT6_PENDING`]; its own program for its own stack, as
    /// [`XDP_NAT6`].
    pub const XDP_DSR6: &str = "lb_xdp_dsr6";
    /// XDP program for IPv4 direct server return, as [`XDP_DSR6`]: tail-called by
    /// [`XDP_INGRESS`] (slot [`crate::prog_slot::XDP_DSR4`]) for a carrier to this node and
    /// for a packet of a direct server return flow (its backend from conntrack). Its own
    /// program so that the carrier's code and stack weigh on no other path of
    /// [`XDP_INGRESS`].
    pub const XDP_DSR4: &str = "lb_xdp_dsr4";
    /// TC egress program on the external interface: backend -> frontend for replies.
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// TC ingress program on the pods' host-side interfaces: what pods send to a frontend
    /// (forward) and the replies of backend pods (reverse), for sockets the hooks did not see.
    pub const TC_POD_INGRESS: &str = "lb_tc_pod_in";
    /// TC program for the IPv6 frames of the pods' host-side interfaces, as
    /// [`TC_POD_INGRESS`] for IPv4. Not attached: [`TC_POD_INGRESS`] tail-calls it through
    /// [`crate::map_names::TC_PROGRAMS`] (slot [`crate::tc_prog_slot::POD_INGRESS6`]).
    pub const TC_POD_INGRESS6: &str = "lb_tc_pod_in6";
    /// cgroup/connect4: a socket connecting to a ClusterIP frontend connects to a backend.
    pub const SOCK_CONNECT4: &str = "lb_sk_connect4";
    /// cgroup/sendmsg4: a UDP datagram sent to a ClusterIP frontend goes to a backend.
    pub const SOCK_SENDMSG4: &str = "lb_sk_sendmsg4";
    /// cgroup/recvmsg4: a datagram from a backend reads as coming from the frontend.
    pub const SOCK_RECVMSG4: &str = "lb_sk_recvmsg4";
    /// cgroup/getpeername4: a socket connected through a frontend names the frontend.
    pub const SOCK_GETPEERNAME4: &str = "lb_sk_peername4";
    /// cgroup/connect6: [`SOCK_CONNECT4`] for IPv6 sockets (IPv6 frontends, and IPv4
    /// frontends addressed as IPv4-mapped IPv6 addresses).
    pub const SOCK_CONNECT6: &str = "lb_sk_connect6";
    /// cgroup/sendmsg6: [`SOCK_SENDMSG4`] for IPv6 sockets (the kernel hands a datagram to
    /// an IPv4-mapped address to [`SOCK_SENDMSG4`]).
    pub const SOCK_SENDMSG6: &str = "lb_sk_sendmsg6";
    /// cgroup/recvmsg6: [`SOCK_RECVMSG4`] for IPv6 sockets.
    pub const SOCK_RECVMSG6: &str = "lb_sk_recvmsg6";
    /// cgroup/getpeername6: [`SOCK_GETPEERNAME4`] for IPv6 sockets.
    pub const SOCK_GETPEERNAME6: &str = "lb_sk_peername6";
    /// Every program of the object, and its hook: the schema the object is checked
    /// against (see [`crate::schema`]). The agent loads each by name as the program type
    /// of its hook.
    pub const ALL: [ProgramSpec; 17] = [
        ProgramSpec {
            name: XDP_INGRESS,
            kind: Xdp,
        },
        ProgramSpec {
            name: XDP_INGRESS6,
            kind: Xdp,
        },
        ProgramSpec {
            name: XDP_NAT6,
            kind: Xdp,
        },
        ProgramSpec {
            name: XDP_ICMP6,
            kind: Xdp,
        },
        ProgramSpec {
            name: XDP_DSR6,
            kind: Xdp,
        },
        ProgramSpec {
            name: XDP_DSR4,
            kind: Xdp,
        },
        ProgramSpec {
            name: TC_EGRESS,
            kind: Classifier,
        },
        ProgramSpec {
            name: TC_POD_INGRESS,
            kind: Classifier,
        },
        ProgramSpec {
            name: TC_POD_INGRESS6,
            kind: Classifier,
        },
        ProgramSpec {
            name: SOCK_CONNECT4,
            kind: CgroupSockAddr("connect4"),
        },
        ProgramSpec {
            name: SOCK_SENDMSG4,
            kind: CgroupSockAddr("sendmsg4"),
        },
        ProgramSpec {
            name: SOCK_RECVMSG4,
            kind: CgroupSockAddr("recvmsg4"),
        },
        ProgramSpec {
            name: SOCK_GETPEERNAME4,
            kind: CgroupSockAddr("getpeername4"),
        },
        ProgramSpec {
            name: SOCK_CONNECT6,
            kind: CgroupSockAddr("connect6"),
        },
        ProgramSpec {
            name: SOCK_SENDMSG6,
            kind: CgroupSockAddr("sendmsg6"),
        },
        ProgramSpec {
            name: SOCK_RECVMSG6,
            kind: CgroupSockAddr("recvmsg6"),
        },
        ProgramSpec {
            name: SOCK_GETPEERNAME6,
            kind: CgroupSockAddr("getpeername6"),
        },
    ];

    /// In the benchmarks' floor object: an XDP program that passes every packet.
    pub const NOOP_XDP: &str = "lb_noop_xdp";
    /// In the benchmarks' floor object: a TC program that passes every packet.
    pub const NOOP_TC: &str = "lb_noop_tc";
    /// In the benchmarks' generator object: the packet generator and sink (see
    /// [`crate::pktgen`]).
    pub const PKTGEN_XDP: &str = "lb_pktgen_xdp";

    /// Every program of the benchmarks' floor object (it has no maps).
    pub const NOOP: [ProgramSpec; 2] = [
        ProgramSpec {
            name: NOOP_XDP,
            kind: Xdp,
        },
        ProgramSpec {
            name: NOOP_TC,
            kind: Classifier,
        },
    ];

    /// Every program of the benchmarks' generator object (its maps:
    /// [`crate::pktgen::map_names::ALL`]).
    pub const PKTGEN: [ProgramSpec; 1] = [ProgramSpec {
        name: PKTGEN_XDP,
        kind: Xdp,
    }];
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
/// The frontend has no backend because its Service has no usable endpoint anywhere
/// (kube-proxy's "has no endpoints"): a new flow is answered with ICMP (ICMPv6) port
/// unreachable, as kube-proxy's REJECT, not dropped. Without it a frontend without backends
/// drops (its endpoints are on other nodes, under a Local policy: "has no local endpoints").
pub const SERVICE_F_REJECT: u32 = 1 << 4;
/// An external frontend (NodePort, LoadBalancer, external IP) of a Service with
/// externalTrafficPolicy Local, whose own backends are this node's endpoints: this node's
/// pods and processes (the socket hooks, the pod interfaces' TC program) select from the
/// table of its Service's cluster frontend instead ([`map_names::SHORT_CIRCUIT`]), as
/// kube-proxy's "short-circuit" rules send them; traffic from outside (XDP) keeps the local
/// endpoints. Its flows are still counted, and answered, as the frontend's.
pub const SERVICE_F_SHORT_CIRCUIT: u32 = 1 << 5;
/// Direct server return: a flow from outside (XDP) whose backend is on another node is not
/// source-NATed but carried to the backend's node in a [`dsr`] carrier, whose agent makes the
/// backend's replies come from the frontend and sends them straight to the client.
pub const SERVICE_F_DSR: u32 = 1 << 6;
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

    /// Every inner map: an array of [`crate::MaglevCell`] (the template declares one
    /// element; `BPF_F_INNER_MAP` lets each table have its own size). Inner maps are not
    /// pinned and have no name.
    pub const INNER: crate::schema::MapSpec =
        crate::schema::MapSpec::new::<u32, crate::MaglevCell>(
            "",
            crate::schema::MapKind::Array,
            crate::schema::Entries::Fixed(1),
        )
        .with_flags(INNER_MAP_FLAGS);

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
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Always 0.
    pub _pad: [u8; 3],
}

/// The backend runs on another node (its EndpointSlice `nodeName` is not this node's): flows
/// to it are source-NATed to this node's address ([`nat`]), so that its replies come back
/// through this node.
pub const BACKEND_F_REMOTE: u8 = 1 << 0;

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

/// Value of [`map_names::CONNTRACK`] (V2).
///
/// The entry carries the flow's translation, so that a packet of an established flow needs
/// no other lookup: a forward entry the backend's address and port (the new destination),
/// a reply entry the frontend's (the new source). `nat_addr` 0 means "not recorded" (an
/// entry migrated from [`legacy::CtEntryV1`]): the datapath then reads the backend (forward)
/// or [`map_names::REV_NAT`] (reply) as V1 did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The backend this flow was given.
    pub backend_id: u32,
    /// The service (frontend) the flow was addressed to: reverse NAT id.
    pub service_id: u32,
    /// Forward entries: `bpf_ktime_get_coarse_ns()` when a packet in this direction was last
    /// seen, refreshed when it moved by at least [`CT_LAST_SEEN_GRANULARITY_NS`]; reply
    /// entries: the time the flow was (re)selected.
    pub last_seen_ns: u64,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// Forward entries: the [`map_names::BACKEND_GEN`] value at which the backend was last
    /// seen ACTIVE. While it equals the current value no backend has left ACTIVE since, so
    /// the flow keeps its backend without reading it. Reply entries: 0.
    pub backend_gen: u32,
    /// Forward: the backend's IPv4 address; reply: the frontend's. Network byte order; 0 when
    /// not recorded.
    pub nat_addr: u32,
    /// Forward: the backend's port; reply: the frontend's. Network byte order.
    pub nat_port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// Earlier layouts of pinned map values, kept so that the agent can migrate pinned maps
/// left by an older version.
pub mod legacy {
    /// Value of `LB_CT4_V1` (conntrack before V2). Migration to [`crate::CtEntry`]: the
    /// same fields, `backend_gen`, `nat_addr` and `nat_port` 0 (the datapath fills them on
    /// the flow's next packet).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtEntryV1 {
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

    /// Name of the V1 conntrack map.
    pub const CONNTRACK_V1: &str = "LB_CT4_V1";

    const _: () = {
        assert!(core::mem::size_of::<CtEntryV1>() == 24);
        assert!(core::mem::align_of::<CtEntryV1>() == 8);
    };

    #[cfg(feature = "user")]
    // SAFETY: #[repr(C)], explicit padding, integer fields only.
    unsafe impl aya::Pod for CtEntryV1 {}

    impl From<CtEntryV1> for crate::CtEntry {
        fn from(v1: CtEntryV1) -> Self {
            crate::CtEntry {
                backend_id: v1.backend_id,
                service_id: v1.service_id,
                last_seen_ns: v1.last_seen_ns,
                flags: v1.flags,
                backend_gen: 0,
                nat_addr: 0,
                nat_port: 0,
                _pad: 0,
            }
        }
    }

    /// Value of `LB_BACKEND4_V1` (now [`crate::map_names::BACKENDS`], V2): a
    /// [`crate::Backend4`] without flags.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Backend4V1 {
        /// Backend (pod) IPv4 address, network byte order.
        pub addr: u32,
        /// Backend port, network byte order.
        pub port: u16,
        /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
        pub proto: u8,
        /// The state, as in [`crate::Backend4::state`].
        pub state: u8,
    }

    /// The map name of V1.
    pub const BACKENDS_V1: &str = "LB_BACKEND4_V1";

    /// Former names of current maps whose layout did not change: `(former, current)`. Both
    /// had 16 characters, of which the kernel keeps [`crate::schema::MAX_NAME_LEN`] (so
    /// `bpftool` showed them cut short). An agent that finds a former name pinned treats
    /// the map as an older version of the current one.
    pub const RENAMED: [(&str, &str); 2] = [
        ("LB_PREFILTER4_V1", crate::map_names::PREFILTER),
        ("LB_TABLEEVENT_V1", crate::map_names::TABLE_EVENTS),
    ];

    /// The Maglev map before V2: one table per service, under its id, and as many entries
    /// as services. Its keys and values are kept as they are in V2 (where key `id` is the
    /// first table of the service, which a V1 service entry selects).
    pub const MAGLEV_V1: &str = "LB_MAGLEV_V1";

    impl From<Backend4V1> for crate::Backend4 {
        /// A V1 backend had no flags: it was treated as local.
        fn from(b: Backend4V1) -> Self {
            Self {
                addr: b.addr,
                port: b.port,
                proto: b.proto,
                state: b.state,
                flags: 0,
                _pad: [0; 3],
            }
        }
    }
}

/// A FIN or RST was seen in this direction.
pub const CT_F_CLOSING: u32 = 1 << 0;
/// The flow's backend is on another node (`BACKEND_F_REMOTE`): its packets are source-NATed,
/// so an established packet knows it from its entry alone.
pub const CT_F_REMOTE: u32 = 1 << 1;
/// The flow's packets go to its remote backend by direct server return
/// ([`SERVICE_F_DSR`]): in a [`dsr`] carrier, not source-NATed.
pub const CT_F_DSR: u32 = 1 << 2;

/// A forward entry's [`CtEntry::last_seen_ns`] is written again only once the clock moved
/// by this much (so an established packet does not dirty the entry every time).
pub const CT_LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

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

/// Key of [`map_names::NAT`]: a flow as the NAT table knows it, in one of two directions.
///
/// - [`NAT_OUT`]: the client's flow as it reached the frontend (client, frontend, client
///   port, frontend port): the same tuple as the conntrack forward key, so two frontends
///   that share a backend never share an entry even when a client uses one source port for
///   both.
/// - [`NAT_IN`]: the backend's reply as it arrives at this node (backend, NAT address,
///   backend port, NAT port). Unique per allocated port: allocation inserts it with
///   `BPF_NOEXIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat4Key {
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
    /// [`NAT_OUT`] or [`NAT_IN`].
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}

/// Direction of a [`Nat4Key`]: client -> frontend, as received.
pub const NAT_OUT: u8 = 0;
/// Direction of a [`Nat4Key`]: backend -> this node's NAT address and port, as received.
pub const NAT_IN: u8 = 1;

/// Value of [`map_names::NAT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nat4Entry {
    /// [`NAT_OUT`]: the NAT (source) address the flow leaves with; [`NAT_IN`]: the client's
    /// address. Network byte order.
    pub addr: u32,
    /// [`NAT_OUT`]: the NAT port; [`NAT_IN`]: the client's port. Network byte order.
    pub port: u16,
    /// `NAT_F_*` bits.
    pub flags: u16,
    /// [`NAT_IN`]: the frontend address the client addressed (replies leave from it);
    /// [`NAT_OUT`]: the backend address. Network byte order.
    pub peer_addr: u32,
    /// [`NAT_IN`]: the frontend port; [`NAT_OUT`]: the backend port. Network byte order.
    pub peer_port: u16,
    /// Always 0.
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last packet of the flow in this direction.
    pub last_seen_ns: u64,
}

/// A FIN or RST was seen in this direction: the entry expires after
/// [`nat::CLOSING_TIMEOUT_NS`].
pub const NAT_F_CLOSING: u16 = 1 << 0;

pub mod dsr {
    //! The carrier of direct server return ([`crate::SERVICE_F_DSR`]): Geneve (RFC 8926)
    //! over UDP, addressed to the backend itself, with one option that names the frontend
    //! the client addressed. A flow's packets are translated to their backend (destination
    //! address and port) as for a local backend, then wrapped:
    //!
    //! ```text
    //! outer IP (this node -> the backend; IPv4 DF, IPv6 flow label from the flow hash)
    //! UDP (source port from the flow hash, destination PORT; IPv4 checksum 0, IPv6's computed)
    //! Geneve: version 0, options OPT_WORDS, C (a critical option), protocol 0x0800/0x86dd, VNI 0
    //!   option: class OPT_CLASS, type OPT_TYPE (critical), length; data: frontend port,
    //!   2 bytes 0, frontend address (4 or 16 bytes)
    //! the translated packet (IP header onwards)
    //! ```
    //!
    //! Addressed to the backend, the carrier goes where a source-NATed packet to it goes,
    //! through any network that routes pod addresses (no node address to know, no tunnel
    //! device). The backend's node (its XDP) takes the option, strips the carrier, records
    //! the flow's reply entry (replies from the frontend) and passes the packet on to the
    //! backend; the replies leave that node straight to the client.

    /// The carrier's UDP destination port: Geneve's (IANA).
    pub const PORT: u16 = 6081;
    /// Geneve's fixed header.
    pub const GENEVE_LEN: usize = 8;
    /// The option's class: of Geneve's experimental range (0xff00-0xffff), `L`.
    pub const OPT_CLASS: u16 = 0xff4c;
    /// The option's type: critical (the high bit), so that a Geneve endpoint that does not
    /// know it drops the packet instead of delivering it untranslated.
    pub const OPT_TYPE: u8 = 0x81;
    /// Geneve's flags byte: C, critical options present.
    pub const FLAGS_CRITICAL: u8 = 0x40;

    /// The option's data length for an address of `addr_len` bytes: the port, 2 bytes 0,
    /// the address.
    pub const fn opt_data_len(addr_len: usize) -> usize {
        4 + addr_len
    }

    /// The options' length in Geneve's 4-byte words (option header included).
    pub const fn opt_words(addr_len: usize) -> u8 {
        ((4 + opt_data_len(addr_len)) / 4) as u8
    }

    /// Offset of the carried packet from the outer IP header's start: everything the
    /// carrier adds, for an outer header of `ip_len` bytes.
    pub const fn overhead(ip_len: usize, addr_len: usize) -> usize {
        ip_len + 8 + GENEVE_LEN + 4 + opt_data_len(addr_len)
    }

    /// The carrier's UDP source port: from the flow hash, in 49152-65535 (as the kernel's
    /// UDP tunnels pick theirs), so that ECMP and RSS spread flows.
    pub const fn source_port(hash: u32) -> u16 {
        0xc000 | (hash as u16 & 0x3fff)
    }

    /// IPv4's overhead: 48 bytes.
    pub const OVERHEAD4: usize = overhead(20, 4);
    /// IPv6's overhead: 80 bytes.
    pub const OVERHEAD6: usize = overhead(40, 16);
}

/// The source NAT of flows to remote backends (backends on other nodes).
///
/// A new flow whose backend has [`BACKEND_F_REMOTE`] is given a port of this node's address
/// (the address the kernel's route to the backend prefers) from [`PORT_MIN`]`..=`[`PORT_MAX`]:
/// the first try is a hash of the flow, then the following ports, at most [`TRIES`] in all. A
/// port is free for a backend when no [`NAT_IN`] entry (backend, address, backend port, port)
/// exists, or when the existing one has expired ([`TCP_TIMEOUT_NS`], [`UDP_TIMEOUT_NS`],
/// [`CLOSING_TIMEOUT_NS`] since its last packet); an expired entry is taken over. A flow
/// whose [`NAT_OUT`] entry's port was taken over is given a new port. The map is an LRU, so
/// it never refuses an entry; it is sized like conntrack.
///
/// The range lies above Linux's default ephemeral ports (`ip_local_port_range` 32768-60999),
/// so a NAT port never collides with a connection the node itself opened to a backend.
pub mod nat {
    /// Lowest NAT port.
    pub const PORT_MIN: u16 = 61_000;
    /// Highest NAT port.
    pub const PORT_MAX: u16 = 65_535;
    /// Number of NAT ports per (backend, address).
    pub const PORTS: u32 = (PORT_MAX - PORT_MIN) as u32 + 1;
    /// Ports tried for a new flow before it is dropped ([`crate::NatEvent::Exhausted`]).
    pub const TRIES: u32 = 32;
    /// An idle TCP flow's NAT entry may be reused after this.
    pub const TCP_TIMEOUT_NS: u64 = 2 * 3600 * 1_000_000_000;
    /// An idle UDP flow's NAT entry may be reused after this.
    pub const UDP_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
    /// A TCP flow that saw FIN or RST may have its NAT port reused after this.
    pub const CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;

    /// The port of try `i` for a flow of hash `hash`, host order.
    #[inline(always)]
    pub const fn port(hash: u32, i: u32) -> u16 {
        PORT_MIN + ((hash % PORTS + i % PORTS) % PORTS) as u16
    }

    /// Whether an entry last seen at `last_seen_ns` with `flags` has expired at `now_ns`.
    #[inline(always)]
    pub const fn expired(proto: u8, flags: u16, last_seen_ns: u64, now_ns: u64) -> bool {
        let timeout = if flags & crate::NAT_F_CLOSING != 0 {
            CLOSING_TIMEOUT_NS
        } else if proto == crate::PROTO_TCP {
            TCP_TIMEOUT_NS
        } else {
            UDP_TIMEOUT_NS
        };
        now_ns.wrapping_sub(last_seen_ns) > timeout
    }
}

/// Key of [`map_names::SOCKETS`]: a socket and an address it exchanged data with.
///
/// [`CT_FORWARD`]: `addr`/`port` are a frontend the socket addressed; the entry names its
/// backend. [`CT_REPLY`]: `addr`/`port` are a backend; the entry names the frontend it stands
/// for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The socket's cookie (`bpf_get_socket_cookie`, unique while the system runs).
    pub cookie: u64,
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
}

/// Value of [`map_names::SOCKETS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockEntry {
    /// The backend the socket was given.
    pub backend_id: u32,
    /// The service (frontend) it addressed.
    pub service_id: u32,
    /// [`CT_REPLY`] entries: the frontend's IPv4 address, network byte order; else the
    /// backend's.
    pub addr: u32,
    /// [`CT_REPLY`] entries: the frontend's port, network byte order; else the backend's.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// Key of [`map_names::SOCK_AFFINITY`]: a client of a service at the socket hooks. At
/// connect() the socket has no source address yet, so the client is its network namespace
/// (a pod, or the host).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAffinityKey {
    /// [`Service::id`].
    pub service_id: u32,
    /// Always 0.
    pub _pad: u32,
    /// The socket's network namespace cookie (`bpf_get_netns_cookie`).
    pub netns_cookie: u64,
}

/// The source address a pod sees on a flow to a frontend that was given the pod itself as
/// its backend (hairpin), when the pod interfaces' TC program translated it: the pod cannot
/// receive a packet from its own address, so the program puts this link-local address in
/// its place, and puts the pod's address back into the replies. Network byte order.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

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

/// Value of [`map_names::FIB_SCRATCH`]: room for the kernel's `struct bpf_fib_lookup`
/// (64 bytes, 4-byte aligned), which the program that uses it lays over it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FibScratch {
    /// The parameters' bytes.
    pub bytes: [u8; 64],
}

/// Key of [`map_names::PAIR_STATS`]: a frontend (its service id) and one of its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    /// [`Service::id`] of the frontend.
    pub service_id: u32,
    /// The backend id.
    pub backend_id: u32,
}

/// The name of the eBPF object's global holding `slots - 1`, where `slots` is the size of
/// [`map_names::BACKEND_STATS`] (a power of two); the agent sets it when it loads the object.
pub const BACKEND_STATS_MASK_GLOBAL: &str = "LB_BESTAT_MASK";

/// The index of backend `id`'s counters in [`map_names::BACKEND_STATS`], of `mask + 1`
/// entries. Backend ids only grow; the agent skips an id whose slot a live backend holds,
/// so live backends never share counters.
#[inline(always)]
pub const fn backend_stats_slot(id: u32, mask: u32) -> u32 {
    id & mask
}

/// The size of [`map_names::BACKEND_STATS`] for `backends` backends: the next power of two.
pub const fn backend_stats_slots(backends: u32) -> u32 {
    match backends.checked_next_power_of_two() {
        Some(slots) => slots,
        None => 1 << 31,
    }
}

/// Default capacities of the maps (entries); the agent can override them.
///
/// Sized so that the maps and the agent fit the DaemonSet's memory limit on a fresh node
/// (BPF maps are charged to the memory cgroup of the process that creates them): the hash
/// maps only the agent writes are not preallocated (`BPF_F_NO_PREALLOC`: they take memory
/// as they fill), the LRU tables the datapath fills must be (their memory is taken at
/// creation), and the per-CPU counters take their size once per possible CPU. See
/// deploy/README.md for the figures.
pub mod capacity {
    /// Frontends: 10,000 Services with a ClusterIP and NodePorts on two node addresses.
    pub const SERVICES: u32 = 32_768;
    /// Backends (distinct address, port, protocol): 10,000 Services x 10 endpoints.
    pub const BACKENDS: u32 = 131_072;
    /// Conntrack entries (two per flow), per family: 65,536 flows of each.
    pub const CONNTRACK: u32 = 131_072;
    /// sessionAffinity clients (service, client address), LRU.
    pub const AFFINITY: u32 = 16_384;
    /// loadBalancerSourceRanges entries, over all frontends.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Source NAT entries (two per flow to a remote backend), LRU.
    pub const NAT: u32 = CONNTRACK;
    /// Socket-hook entries (two per socket and frontend), LRU.
    pub const SOCKETS: u32 = CONNTRACK;
}

/// Incremental Internet checksum updates (RFC 1624: `HC' = ~(~HC + ~m + m')`).
///
/// Every value is taken exactly as it sits in memory (network byte order read as a native
/// integer): the one's-complement sum is independent of byte order, so no swapping is needed.
pub mod csum {
    /// A one's-complement sum of 16-bit words (carries in the upper bits) folded to 16 bits;
    /// its complement is the checksum.
    #[inline(always)]
    pub const fn fold(mut sum: u64) -> u16 {
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

    /// The checksum after a 16-bit field covered by it changed from `old` to `new`.
    #[inline(always)]
    pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
        !fold(!check as u64 + !old as u64 + new as u64)
    }

    /// The checksum after a 32-bit field (an address in the pseudo-header) and a 16-bit field
    /// (a port) covered by it changed.
    #[inline(always)]
    pub const fn replace4_2(check: u16, old4: u32, new4: u32, old2: u16, new2: u16) -> u16 {
        !fold(!check as u64 + !old4 as u64 + new4 as u64 + !old2 as u64 + new2 as u64)
    }

    /// The one's-complement sum of the change of a 128-bit field from `old` to `new`.
    #[inline(always)]
    const fn delta16(old: crate::Addr6, new: crate::Addr6) -> u64 {
        !old[0] as u64
            + !old[1] as u64
            + !old[2] as u64
            + !old[3] as u64
            + new[0] as u64
            + new[1] as u64
            + new[2] as u64
            + new[3] as u64
    }

    /// The change of a 128-bit field from `old` to `new` as a 32-bit one's-complement sum:
    /// what the kernel's `bpf_csum_diff` gives, and what its checksum helpers take as a
    /// difference.
    #[inline(always)]
    pub const fn diff16(old: crate::Addr6, new: crate::Addr6) -> u32 {
        let sum = delta16(old, new);
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        ((sum & 0xffff_ffff) + (sum >> 32)) as u32
    }

    /// The checksum after a 128-bit field covered by it (an IPv6 address in the
    /// pseudo-header) changed from `old` to `new`.
    #[inline(always)]
    pub const fn replace16(check: u16, old: crate::Addr6, new: crate::Addr6) -> u16 {
        !fold(!check as u64 + delta16(old, new))
    }

    /// The checksum after a 128-bit field (an IPv6 address) and a 16-bit field (a port)
    /// covered by it changed.
    #[inline(always)]
    pub const fn replace16_2(
        check: u16,
        old16: crate::Addr6,
        new16: crate::Addr6,
        old2: u16,
        new2: u16,
    ) -> u16 {
        !fold(!check as u64 + delta16(old16, new16) + !old2 as u64 + new2 as u64)
    }
}

/// The flow hash that selects a backend slot: a function of the forward 5-tuple only, so
/// every packet of a flow (and `lb explain`, in userspace) gets the same answer. All inputs are
/// in network byte order, as in [`Ct4Key`].
#[inline(always)]
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    // murmur3's 32-bit mixing steps and finaliser: cheap in BPF (no loops, no tables) and
    // well spread over the low bits, which the slot modulo uses.
    let mut h = 0x9747_b28c ^ proto as u32;
    h = hash_mix(h, saddr);
    h = hash_mix(h, daddr);
    h = hash_mix(h, ((sport as u32) << 16) | dport as u32);
    hash_finish(h, 13)
}

/// murmur3's mixing step of one 32-bit word into the hash `h`.
#[inline(always)]
const fn hash_mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser of a hash over `len` bytes.
#[inline(always)]
const fn hash_finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// [`flow_hash`] of an IPv6 forward 5-tuple: the same mixing over the eight address words.
#[inline(always)]
pub const fn flow_hash6(saddr: Addr6, daddr: Addr6, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9747_b28c ^ proto as u32;
    h = hash_mix(h, saddr[0]);
    h = hash_mix(h, saddr[1]);
    h = hash_mix(h, saddr[2]);
    h = hash_mix(h, saddr[3]);
    h = hash_mix(h, daddr[0]);
    h = hash_mix(h, daddr[1]);
    h = hash_mix(h, daddr[2]);
    h = hash_mix(h, daddr[3]);
    h = hash_mix(h, ((sport as u32) << 16) | dport as u32);
    hash_finish(h, 37)
}

const _: () = {
    assert!(core::mem::size_of::<Frontend4>() == 8);
    assert!(core::mem::size_of::<Service>() == 16);
    assert!(core::mem::size_of::<MaglevCell>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<AffinityEntry>() == 16);
    assert!(core::mem::align_of::<AffinityEntry>() == 8);
    assert!(core::mem::size_of::<SourceRange4>() == 8);
    assert!(core::mem::size_of::<Backend4>() == 12);
    assert!(core::mem::size_of::<legacy::Backend4V1>() == 8);
    assert!(core::mem::size_of::<Nat4Key>() == 16);
    assert!(core::mem::size_of::<Nat4Entry>() == 24);
    assert!(core::mem::align_of::<Nat4Entry>() == 8);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<CtEntry>() == 32);
    assert!(core::mem::align_of::<CtEntry>() == 8);
    assert!(core::mem::size_of::<RevNat4>() == 8);
    assert!(core::mem::size_of::<ServiceStats>() == 24);
    assert!(core::mem::size_of::<PairKey>() == 8);
    assert!(core::mem::size_of::<FibScratch>() == 64);
    assert!(core::mem::size_of::<SockKey>() == 16);
    assert!(core::mem::size_of::<SockEntry>() == 16);
    assert!(core::mem::size_of::<SockAffinityKey>() == 16);
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
    unsafe impl aya::Pod for legacy::Backend4V1 {}
    unsafe impl aya::Pod for Nat4Key {}
    unsafe impl aya::Pod for Nat4Entry {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for FibScratch {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockEntry {}
    unsafe impl aya::Pod for SockAffinityKey {}
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
    /// A backend from an address's octets, a host-order port, a protocol and a state, without
    /// flags.
    pub const fn new(octets: [u8; 4], port: u16, proto: u8, state: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
            port: port.to_be(),
            proto,
            state,
            flags: 0,
            _pad: [0; 3],
        }
    }

    /// The same backend with `BACKEND_F_*` `flags`.
    pub const fn with_flags(self, flags: u8) -> Self {
        Self { flags, ..self }
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
        let b = Backend4::new([10, 244, 1, 2], 80, PROTO_UDP, BACKEND_TERMINATING)
            .with_flags(BACKEND_F_REMOTE);
        let bytes: [u8; 12] = unsafe { core::mem::transmute(b) };
        assert_eq!(
            bytes,
            [
                10,
                244,
                1,
                2,
                0,
                80,
                PROTO_UDP,
                BACKEND_TERMINATING,
                BACKEND_F_REMOTE,
                0,
                0,
                0
            ]
        );
        assert_eq!((b.octets(), b.port()), ([10, 244, 1, 2], 80));
    }

    #[test]
    fn field_offsets_match_the_documented_layout() {
        assert_eq!(core::mem::offset_of!(Ct4Key, sport), 8);
        assert_eq!(core::mem::offset_of!(Ct4Key, proto), 12);
        assert_eq!(core::mem::offset_of!(Ct4Key, dir), 13);
        assert_eq!(core::mem::offset_of!(CtEntry, last_seen_ns), 8);
        assert_eq!(core::mem::offset_of!(CtEntry, backend_gen), 20);
        assert_eq!(core::mem::offset_of!(CtEntry, nat_addr), 24);
        assert_eq!(core::mem::offset_of!(CtEntry, nat_port), 28);
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

    #[test]
    fn prefilter_buckets_spread_cluster_ips_and_node_ports() {
        // Distinct buckets of `keys`, counted in a bitmap like the datapath's (no_std).
        fn distinct(keys: impl Iterator<Item = u32>) -> u32 {
            let mut seen = [0u64; prefilter::WORDS as usize];
            let mut count = 0;
            for b in keys {
                assert!(b < prefilter::BITS);
                let (word, bit) = prefilter::position(b);
                count += u32::from(seen[word as usize] & bit == 0);
                seen[word as usize] |= bit;
            }
            count
        }
        // 10,000 consecutive ClusterIPs on one port, and 10,000 ports of one address: few
        // share a bucket (a uniform hash would put 10,000 keys in ~9,950 of 2^20 buckets).
        let ips = distinct(
            (0..10_000u32)
                .map(|i| prefilter::bucket((0x0a60_0000 + i).to_be(), 80u16.to_be(), PROTO_TCP)),
        );
        assert!(ips > 9_900, "{ips}");
        let ports = distinct(
            (30_000..40_000u16).map(|p| prefilter::bucket(0x0a00_c80a, p.to_be(), PROTO_TCP)),
        );
        assert!(ports > 9_900, "{ports}");
        // The protocol matters.
        assert_ne!(
            prefilter::bucket(1, 2, PROTO_TCP),
            prefilter::bucket(1, 2, PROTO_UDP)
        );
        assert_eq!(prefilter::position(64 * 3 + 5), (3, 1 << 5));
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

            // The 16-bit-only variant.
            let stored = u16::from_ne_bytes(buf[10..12].try_into().unwrap());
            let updated = csum::replace2(stored, new2, old2);
            buf[22..24].copy_from_slice(&old2.to_ne_bytes());
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
    fn incremental_checksum_of_an_ipv6_address_equals_recomputation() {
        // A buffer like an IPv6 pseudo-header and its segment: checksum at 2..4, an
        // "address" at 8..24 and a "port" at 26..28. Change both and compare with a checksum
        // computed from scratch.
        let mut seed = 0x9abc_def0u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            seed
        };
        for _ in 0..2_000 {
            let mut buf = [0u8; 40];
            for b in buf.iter_mut() {
                *b = (next() >> 16) as u8;
            }
            buf[2..4].fill(0);
            let check = full_checksum(&buf);
            buf[2..4].copy_from_slice(&check.to_be_bytes());
            assert_eq!(full_checksum(&buf), 0);

            let old16 = crate::addr6(buf[8..24].try_into().unwrap());
            let old2 = u16::from_ne_bytes(buf[26..28].try_into().unwrap());
            let new16 = [next(), next(), next(), next()];
            let new2 = next() as u16;
            let stored = u16::from_ne_bytes(buf[2..4].try_into().unwrap());
            let updated = csum::replace16_2(stored, old16, new16, old2, new2);
            buf[8..24].copy_from_slice(&crate::octets6(new16));
            buf[26..28].copy_from_slice(&new2.to_ne_bytes());
            buf[2..4].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full_checksum(&buf), 0, "{buf:?}");

            // The address-only variant, back to the old address.
            let stored = u16::from_ne_bytes(buf[2..4].try_into().unwrap());
            let updated = csum::replace16(stored, new16, old16);
            buf[8..24].copy_from_slice(&crate::octets6(old16));
            buf[2..4].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full_checksum(&buf), 0, "{buf:?}");
        }
        // An address that changes to itself leaves the checksum as it was.
        let a = [1, 2, 3, 4];
        assert_eq!(csum::replace16(0x1234, a, a), 0x1234);
        // The difference, applied as the kernel's checksum helpers apply one (non-PARTIAL:
        // `csum_fold(diff + ~csum_unfold(check))`), gives the same checksum.
        let fold = |mut s: u64| {
            while s >> 16 != 0 {
                s = (s & 0xffff) + (s >> 16);
            }
            s as u16
        };
        for _ in 0..2_000 {
            let (old, new) = (
                [next(), next(), next(), next()],
                [next(), next(), next(), u32::MAX],
            );
            let check = next() as u16;
            let kernel = !fold(csum::diff16(old, new) as u64 + !(check as u32) as u64);
            assert_eq!(kernel, csum::replace16(check, old, new));
        }
    }

    #[test]
    fn flow_hash6_depends_on_every_field() {
        let (s, d) = ([1, 2, 3, 4], [5, 6, 7, 8]);
        let base = flow_hash6(s, d, 3, 4, 6);
        assert_eq!(base, flow_hash6(s, d, 3, 4, 6));
        for i in 0..4 {
            let mut s2 = s;
            s2[i] ^= 1;
            let mut d2 = d;
            d2[i] ^= 1;
            assert_ne!(base, flow_hash6(s2, d, 3, 4, 6), "source word {i}");
            assert_ne!(base, flow_hash6(s, d2, 3, 4, 6), "destination word {i}");
        }
        assert_ne!(base, flow_hash6(s, d, 3, 4, 17));
        assert_ne!(base, flow_hash6(d, s, 3, 4, 6));
        assert_ne!(base, flow_hash6(s, d, 4, 3, 6));
    }

    #[test]
    fn nat_ports_stay_in_their_range_and_tries_are_consecutive() {
        for hash in [0, 1, nat::PORTS - 1, u32::MAX, 0x8000_0000] {
            for i in 0..nat::TRIES {
                let port = nat::port(hash, i);
                assert!(
                    (nat::PORT_MIN..=nat::PORT_MAX).contains(&port),
                    "{hash} {i}"
                );
                let next = nat::port(hash, i + 1);
                let wrapped = port == nat::PORT_MAX && next == nat::PORT_MIN;
                assert!(Some(next) == port.checked_add(1) || wrapped, "{hash} {i}");
            }
        }
        let s = 1_000_000_000;
        assert!(!nat::expired(PROTO_UDP, 0, 100 * s, 150 * s));
        assert!(nat::expired(PROTO_UDP, 0, 100 * s, 161 * s));
        assert!(!nat::expired(PROTO_TCP, 0, 100 * s, 161 * s));
        assert!(nat::expired(PROTO_TCP, NAT_F_CLOSING, 100 * s, 111 * s));
        // The clock is compared with wrapping arithmetic, as in the datapath.
        assert!(!nat::expired(PROTO_UDP, 0, u64::MAX - s, s));
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
