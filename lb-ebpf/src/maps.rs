//! Every map of the object, as `lb_common::map_names` names them (and so as they are
//! pinned): their keys, values and sizes are those of `lb_common::map_names::ALL` (the agent
//! sizes those it sizes by its own `Capacity` when it creates them). lb-userspace's tests
//! check this object against that list.
//!
//! The hash maps only the agent writes (services, backends, reverse NAT, the Maglev tables'
//! map) are not preallocated ([`NO_PREALLOC`]): they take memory as the agent fills them, not
//! all of it at creation; lookups cost the same. The LRU maps the datapath fills must be
//! preallocated (an insert from a program cannot allocate).
//!
//! Keys: aya's map methods take `impl Borrow<K>`, and clippy's
//! `needless_borrows_for_generic_args` asks for keys by value. A key that lives on (used
//! again, a field, a map value) is then copied to a second stack slot for the helper; and
//! even where LLVM removes the copy, the changed code can change how far the verifier walks
//! (its state pruning). So a key is passed by value only where no program got longer nor
//! verified longer for it (`bpftool prog show`: xlated; BPF_OBJ_GET_INFO_BY_FD:
//! verified_insns); the others stay borrowed, each with an `expect` that gives the
//! measured cost of the copy.

use aya_ebpf::{
    btf_maps::{Array as InnerArray, HashOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, Backend4, Backend6, Ct4Key, Ct6Entry, Ct6Key,
    CtEntry, Event, Frontend4, Frontend6, MaglevCell, Nat4Entry, Nat4Key, Nat6Entry, Nat6Key,
    Nat6Pending, NatEvent, PairKey, Reason, RevNat4, RevNat6, Service, ServiceStats, Sock6Entry,
    Sock6Key, SockAffinityKey, SockEntry, SockKey, SourceRange4, SourceRange6, TableEvent,
    capacity, maglev, prefilter, prog_slot,
    schema::Sizing::{
        Affinity, BackendSlots, Backends, Conntrack, MaglevTables, ServiceIds, Services,
    },
    tc_prog_slot,
};

/// See the module's documentation.
const NO_PREALLOC: u32 = lb_common::schema::BPF_F_NO_PREALLOC;

// Services and backends.
#[map]
pub(crate) static LB_SVC4_V1: HashMap<Frontend4, Service> =
    HashMap::pinned(Services.default_entries(), NO_PREALLOC);
#[map]
pub(crate) static LB_BACKEND4_V2: HashMap<u32, Backend4> =
    HashMap::pinned(Backends.default_entries(), NO_PREALLOC);
/// Service id (or id | `maglev::KEY_TABLE_B`, see `maglev::table_key`) -> a Maglev table
/// of the service. BTF-defined (map-of-maps needs the inner map's BTF);
/// the agent pins it by path like the others. See `maglev::INNER_MAP_FLAGS`.
#[btf_map]
pub(crate) static LB_MAGLEV_V2: HashOfMaps<
    u32,
    InnerArray<MaglevCell, 1, { maglev::INNER_MAP_FLAGS as usize }>,
    { MaglevTables.default_entries() as usize },
    { NO_PREALLOC as usize },
> = HashOfMaps::new();
#[map]
pub(crate) static LB_REVNAT4_V1: HashMap<u32, RevNat4> =
    HashMap::pinned(Services.default_entries(), NO_PREALLOC);
#[map]
pub(crate) static LB_AFFINITY4_V1: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(Affinity.default_entries(), 0);
#[map]
pub(crate) static LB_SRCRANGE4_V1: LpmTrie<SourceRange4, u8> =
    LpmTrie::pinned(capacity::SOURCE_RANGES, 0);
#[map]
pub(crate) static LB_BEGEN_V1: Array<u32> = Array::pinned(1, 0);
/// See `lb_common::prefilter`. An array: the verifier inlines its lookups. Shared by both
/// families (`prefilter::bucket6`).
#[map]
pub(crate) static LB_PREFILTER_V1: Array<u64> =
    Array::pinned(prefilter::WORDS, prefilter::MAP_FLAGS);

// Conntrack and source NAT.
#[map]
pub(crate) static LB_CT4_V2: LruHashMap<Ct4Key, CtEntry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);
#[map]
pub(crate) static LB_NAT4_V1: LruHashMap<Nat4Key, Nat4Entry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);

// The IPv6 twins of the maps keyed by an address (`lb_common::v6`); the rest is shared.
#[map]
pub(crate) static LB_SVC6_V1: HashMap<Frontend6, Service> =
    HashMap::pinned(Services.default_entries(), NO_PREALLOC);
#[map]
pub(crate) static LB_BACKEND6_V1: HashMap<u32, Backend6> =
    HashMap::pinned(Backends.default_entries(), NO_PREALLOC);
#[map]
pub(crate) static LB_CT6_V1: LruHashMap<Ct6Key, Ct6Entry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);
#[map]
pub(crate) static LB_REVNAT6_V1: HashMap<u32, RevNat6> =
    HashMap::pinned(Services.default_entries(), NO_PREALLOC);
#[map]
pub(crate) static LB_AFFINITY6_V1: LruHashMap<Affinity6Key, AffinityEntry> =
    LruHashMap::pinned(Affinity.default_entries(), 0);
#[map]
pub(crate) static LB_SRCRANGE6_V1: LpmTrie<SourceRange6, u8> =
    LpmTrie::pinned(capacity::SOURCE_RANGES, 0);
#[map]
pub(crate) static LB_NAT6_V1: LruHashMap<Nat6Key, Nat6Entry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);
/// What `lb_xdp_ingress6` hands to `lb_xdp_nat6` with its tail call.
#[map]
pub(crate) static LB_NAT6PEND_V1: PerCpuArray<Nat6Pending> = PerCpuArray::pinned(1, 0);
/// The pod programs' FIB lookup parameters (`route::redirect_reply`), off their stack.
#[map]
pub(crate) static LB_FIBSCR_V1: PerCpuArray<lb_common::FibScratch> = PerCpuArray::pinned(1, 0);

// The socket hooks.
#[map]
pub(crate) static LB_SOCK4_V1: LruHashMap<SockKey, SockEntry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);
#[map]
pub(crate) static LB_SOCK6_V1: LruHashMap<Sock6Key, Sock6Entry> =
    LruHashMap::pinned(Conntrack.default_entries(), 0);
/// Both families' (service ids are shared): see `lb_common::map_names::SHORT_CIRCUIT`.
#[map]
pub(crate) static LB_SHORTCIRC_V1: HashMap<u32, u32> =
    HashMap::pinned(Services.default_entries(), NO_PREALLOC);
/// Both families' (the client is a network namespace, whichever family it uses).
#[map]
pub(crate) static LB_SOCKAFF4_V1: LruHashMap<SockAffinityKey, AffinityEntry> =
    LruHashMap::pinned(Affinity.default_entries(), 0);

// Counters.
#[map]
pub(crate) static LB_SVCSTAT_V1: PerCpuArray<ServiceStats> =
    PerCpuArray::pinned(ServiceIds.default_entries(), 0);
/// Indexed by `backend_stats_slot(id, LB_BESTAT_MASK)`; sized by the agent.
#[map]
pub(crate) static LB_BESTAT_V2: PerCpuArray<ServiceStats> =
    PerCpuArray::pinned(BackendSlots.default_entries(), 0);
/// The size of [`LB_BESTAT_V2`] less one, set by the agent at load time
/// (`lb_common::BACKEND_STATS_MASK_GLOBAL`). Read-only: the verifier knows its value.
#[unsafe(no_mangle)]
pub(crate) static LB_BESTAT_MASK: u32 = BackendSlots.default_entries() - 1;
/// See `lb_common::map_names::PAIR_STATS`.
#[map]
pub(crate) static LB_PAIRSTAT_V2: LruPerCpuHashMap<PairKey, u64> =
    LruPerCpuHashMap::pinned(Services.default_entries(), 0);
#[map]
pub(crate) static LB_REASON_V4: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);
#[map]
pub(crate) static LB_EVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(Event::COUNT, 0);
#[map]
pub(crate) static LB_NATEVENT_V2: PerCpuArray<u64> = PerCpuArray::pinned(NatEvent::COUNT, 0);
#[map]
pub(crate) static LB_TBLEVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(TableEvent::COUNT, 0);

// Tail calls.
/// The programs `lb_xdp_ingress` tail-calls, by `lb_common::prog_slot` (the agent fills it).
#[map]
pub(crate) static LB_PROGS_V3: ProgramArray = ProgramArray::pinned(prog_slot::COUNT, 0);
/// The programs `lb_tc_pod_in` tail-calls, by `lb_common::tc_prog_slot`.
#[map]
pub(crate) static LB_TCPROGS_V1: ProgramArray = ProgramArray::pinned(tc_prog_slot::COUNT, 0);
