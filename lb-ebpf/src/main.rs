//! The datapath: XDP translation of Service frontends to backends on the node's external
//! interface, and TC egress translation of the replies back to the frontend.
//!
//! Every packet the programs cannot prove is addressed to a frontend is passed untouched, bit
//! for bit, and counted by reason. A frontend packet that cannot be served (no backend, a
//! source outside the frontend's loadBalancerSourceRanges) is dropped and counted. See
//! `lb_common::reason`.
//!
//! A flow's backend comes from conntrack while its entry is valid (the rules are on
//! `lb_common::event`); a new flow gets, in this order: its client's fresh affinity entry
//! (sessionAffinity ClientIP), else the service's Maglev table entry of its flow hash (or a
//! random entry for selection `random`).
#![no_std]
#![no_main]

mod nat;
mod nat6;
mod pod;
mod sock;
mod v6;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action,
    },
    btf_maps::{Array as InnerArray, HashOfMaps},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{btf_map, classifier, map, xdp},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, lpm_trie::Key as LpmKey,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_F_REMOTE,
    BACKEND_TERMINATING, Backend4, Backend6, CT_F_CLOSING, CT_F_REMOTE, CT_FORWARD,
    CT_LAST_SEEN_GRANULARITY_NS, CT_REPLY, Ct4Key, Ct6Entry, Ct6Key, CtEntry, Frontend4, Frontend6,
    MAX_SERVICES, MaglevCell, PROTO_TCP, PROTO_UDP, RevNat4, RevNat6, SERVICE_F_RANDOM,
    SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS, Service, ServiceStats, SourceRange4,
    SourceRange6, backend_stats_slot, backend_stats_slots, capacity, csum, event, flow_hash,
    maglev, prefilter, prog_slot, reason, table_event, tc_prog_slot,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

#[map]
static LB_SVC4_V1: HashMap<Frontend4, Service> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
static LB_BACKEND4_V2: HashMap<u32, Backend4> = HashMap::pinned(capacity::BACKENDS, 0);
/// Service id (or id | `maglev::KEY_TABLE_B`, see `maglev::table_key`) -> a Maglev table
/// of the service. BTF-defined (map-of-maps needs the inner map's BTF);
/// the agent pins it by path like the others. See `maglev::INNER_MAP_FLAGS`.
#[btf_map]
static LB_MAGLEV_V2: HashOfMaps<
    u32,
    InnerArray<MaglevCell, 1, { maglev::INNER_MAP_FLAGS as usize }>,
    { capacity::SERVICES as usize },
> = HashOfMaps::new();
#[map]
static LB_CT4_V2: LruHashMap<Ct4Key, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);
#[map]
static LB_REVNAT4_V1: HashMap<u32, RevNat4> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
static LB_SVCSTAT_V1: PerCpuArray<ServiceStats> = PerCpuArray::pinned(MAX_SERVICES, 0);
#[map]
static LB_REASON_V3: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);
/// Indexed by `backend_stats_slot(id, LB_BESTAT_MASK)`; sized by the agent.
#[map]
static LB_BESTAT_V2: PerCpuArray<ServiceStats> =
    PerCpuArray::pinned(backend_stats_slots(capacity::BACKENDS), 0);
/// The size of [`LB_BESTAT_V2`] less one, set by the agent at load time
/// (`lb_common::BACKEND_STATS_MASK_GLOBAL`). Read-only: the verifier knows its value.
#[unsafe(no_mangle)]
static LB_BESTAT_MASK: u32 = backend_stats_slots(capacity::BACKENDS) - 1;
#[map]
static LB_EVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(event::COUNT, 0);
#[map]
static LB_TABLEEVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(table_event::COUNT, 0);
#[map]
static LB_AFFINITY4_V1: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(capacity::AFFINITY, 0);
#[map]
static LB_BEGEN_V1: Array<u32> = Array::pinned(1, 0);
/// See `lb_common::prefilter`. An array: the verifier inlines its lookups.
#[map]
static LB_PREFILTER4_V1: Array<u64> = Array::pinned(prefilter::WORDS, prefilter::MAP_FLAGS);
#[map]
static LB_SRCRANGE4_V1: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

/// The programs `lb_xdp_ingress` tail-calls, by `lb_common::prog_slot` (the agent fills it).
#[map]
static LB_PROGS_V2: ProgramArray = ProgramArray::pinned(prog_slot::COUNT, 0);
/// The programs `lb_tc_pod_ingress` tail-calls, by `lb_common::tc_prog_slot`.
#[map]
static LB_TCPROGS_V1: ProgramArray = ProgramArray::pinned(tc_prog_slot::COUNT, 0);

// The IPv6 twins of the maps keyed by an address (`lb_common::v6`); the rest is shared.
// The IPv6 programs (v6.rs) read them, and so will the IPv6 socket hooks.
#[map]
pub(crate) static LB_SVC6_V1: HashMap<Frontend6, Service> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
pub(crate) static LB_BACKEND6_V1: HashMap<u32, Backend6> = HashMap::pinned(capacity::BACKENDS, 0);
#[map]
pub(crate) static LB_CT6_V1: LruHashMap<Ct6Key, Ct6Entry> =
    LruHashMap::pinned(capacity::CONNTRACK, 0);
#[map]
pub(crate) static LB_REVNAT6_V1: HashMap<u32, RevNat6> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
pub(crate) static LB_AFFINITY6_V1: LruHashMap<Affinity6Key, AffinityEntry> =
    LruHashMap::pinned(capacity::AFFINITY, 0);
#[map]
pub(crate) static LB_SRCRANGE6_V1: LpmTrie<SourceRange6, u8> =
    LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

const ETH_LEN: usize = EthHdr::LEN;
const IPV4_LEN: usize = Ipv4Hdr::LEN;
const L4_OFF: usize = ETH_LEN + IPV4_LEN;
const ETH_P_IP: u16 = 0x0800;
/// Offsets of fields inside the IPv4 header.
const IP_CHECK_OFF: usize = ETH_LEN + 10;
const IP_SADDR_OFF: usize = ETH_LEN + 12;
/// Offsets of the checksum inside the TCP and UDP headers.
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// The byte of the TCP header holding the flags.
const TCP_FLAGS_OFF: usize = 13;
const EEXIST: i32 = 17;

/// What becomes of a packet that is not translated.
#[derive(Clone, Copy)]
pub(crate) enum Verdict {
    /// Hand it to the kernel untouched.
    Pass(u32),
    /// Drop it.
    Drop(u32),
}

#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // Per-CPU: no other CPU writes this counter.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub(crate) fn count(reason: u32) {
    bump(&LB_REASON_V3, reason);
}

#[inline(always)]
pub(crate) fn note(event: u32) {
    bump(&LB_EVENT_V1, event);
}

/// A packet the programs read and write in place: an XDP buffer, or the linear part of an skb.
pub(crate) trait Frame {
    /// Address of the first byte.
    fn start(&self) -> usize;
    /// Address one past the last byte the program can address directly.
    fn end(&self) -> usize;
    /// Bytes in the packet (an skb's may be more than its linear part).
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

/// A pointer to a `T` at `offset` in the packet, if the packet holds all of it.
#[inline(always)]
fn ptr_at<C: Frame, T>(ctx: &C, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    if start + offset + core::mem::size_of::<T>() > ctx.end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The transport header fields the translation reads and writes. The pointers come from
/// the one bounds check of the header, so writing through them needs no other.
pub(crate) struct L4 {
    sport: u16,
    dport: u16,
    /// The destination port in the packet.
    dport_at: *mut u16,
    /// The checksum in the packet.
    check_at: *mut u16,
    /// TCP FIN or RST seen.
    closing: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    syn: bool,
}

/// An IPv4 header that is whole, has no options, is not a fragment, carries TCP or UDP with
/// its header present, and whose total length is consistent with the received bytes.
pub(crate) struct Ipv4Packet {
    ip: *mut Ipv4Hdr,
    proto: u8,
    l4: L4,
}

#[inline(always)]
pub(crate) fn parse_ipv4<C: Frame>(ctx: &C) -> Result<Ipv4Packet, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Pass(reason::SHORT_ETHERNET))?;
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Verdict::Pass(reason::NOT_IP));
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).ok_or(Verdict::Pass(reason::SHORT_IPV4))?;
    let vihl = unsafe { (*ip).vihl };
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(Verdict::Pass(reason::BAD_IPV4_HEADER));
    }
    if vihl & 0x0f != 5 {
        return Err(Verdict::Pass(reason::IPV4_OPTIONS));
    }
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    if frags & 0x3fff != 0 {
        // MF set or a non-zero offset.
        return Err(Verdict::Pass(reason::IPV4_FRAGMENT));
    }
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let received = ctx.len() - ETH_LEN;
    let proto = unsafe { (*ip).proto };
    let l4_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        _ => return Err(Verdict::Pass(reason::NOT_TCP_UDP)),
    };
    if tot_len > received {
        return Err(Verdict::Pass(reason::BAD_IPV4_LENGTH));
    }
    let short = Verdict::Pass(reason::SHORT_L4);
    let l4 = if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(short)?;
        let flags = unsafe { *(tcp as *const u8).add(TCP_FLAGS_OFF) };
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*tcp).source),
                dport: u16::from_ne_bytes((*tcp).dest),
                dport_at: core::ptr::addr_of_mut!((*tcp).dest).cast(),
                check_at: core::ptr::addr_of_mut!((*tcp).check).cast(),
                closing: flags & (TCP_FIN | TCP_RST) != 0,
                syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
            }
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(short)?;
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*udp).src),
                dport: u16::from_ne_bytes((*udp).dst),
                dport_at: core::ptr::addr_of_mut!((*udp).dst).cast(),
                check_at: core::ptr::addr_of_mut!((*udp).check).cast(),
                closing: false,
                syn: false,
            }
        }
    };
    if tot_len < IPV4_LEN + l4_len {
        // The bytes are there, but the IP header says they are not part of the datagram.
        return Err(Verdict::Pass(reason::BAD_IPV4_LENGTH));
    }
    Ok(Ipv4Packet { ip, proto, l4 })
}

/// A backends map's value: [`Backend4`] or [`Backend6`] (the families share backend ids
/// and the Maglev tables, so a table's ids are keys of its family's backends map).
pub(crate) trait BackendOf: Copy {
    /// The backend of `id` in this family's backends map.
    fn lookup(id: u32) -> Option<Self>;
    /// `BACKEND_ACTIVE`, ...
    fn state(&self) -> u8;
}

impl BackendOf for Backend4 {
    #[inline(always)]
    fn lookup(id: u32) -> Option<Self> {
        unsafe { LB_BACKEND4_V2.get(&id) }.copied()
    }
    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

impl BackendOf for Backend6 {
    #[inline(always)]
    fn lookup(id: u32) -> Option<Self> {
        unsafe { LB_BACKEND6_V1.get(&id) }.copied()
    }
    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

/// A backend and its id.
#[derive(Clone, Copy)]
pub(crate) struct Chosen<B = Backend4> {
    id: u32,
    backend: B,
}

#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<Chosen> {
    backend_of(id)
}

/// [`backend`] of either family.
#[inline(always)]
pub(crate) fn backend_of<B: BackendOf>(id: u32) -> Option<Chosen<B>> {
    let backend = B::lookup(id)?;
    Some(Chosen { id, backend })
}

/// The Maglev table's choice: the entry of the flow hash, or a random entry for selection
/// `random` (so random selection is as balanced as the table).
#[inline(always)]
fn select_from_table<B: BackendOf>(
    svc: &Service,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<B>, Verdict> {
    const MISSING: Verdict = Verdict::Drop(reason::BACKEND_MISSING);
    let table =
        unsafe { LB_MAGLEV_V2.get(&maglev::table_key(svc.id, svc.flags)) }.ok_or(MISSING)?;
    let size = table.get(0).ok_or(MISSING)?[0];
    if size == 0 {
        return Err(MISSING);
    }
    let pick = if svc.flags & SERVICE_F_RANDOM != 0 {
        note(event::SELECT_RANDOM);
        unsafe { bpf_get_prandom_u32() }
    } else {
        note(event::SELECT_MAGLEV);
        hash()
    };
    let (element, half) = maglev::position(pick % size);
    let cell = table.get(element).ok_or(MISSING)?;
    backend_of(cell[half & 1]).ok_or(MISSING)
}

/// The backend of a new flow: checks the source ranges, then the client's affinity, then
/// the Maglev table.
#[inline(always)]
fn select_backend(svc: &Service, key: &Ct4Key) -> Result<Chosen, Verdict> {
    if svc.backend_count == 0 {
        return Err(Verdict::Drop(reason::NO_BACKEND));
    }
    if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let source = LpmKey::new(
            SOURCE_RANGE_ID_BITS + 32,
            SourceRange4 {
                service_id: svc.id,
                addr: key.saddr,
            },
        );
        if LB_SRCRANGE4_V1.get(&source).is_none() {
            return Err(Verdict::Drop(reason::SOURCE_RANGE_DENIED));
        }
    }
    let client = AffinityKey {
        service_id: svc.id,
        client: key.saddr,
    };
    let affinity = (&LB_AFFINITY4_V1, table_event::AFFINITY_INSERTS);
    select_with_affinity(svc, affinity, &client, || {
        flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto)
    })
}

/// The client's affinity entry in `map` (under `client`), then the Maglev table entry of
/// `hash`; records the choice for the client when the service has affinity, counting a new
/// entry under `inserts` (a [`table_event`]).
#[inline(always)]
pub(crate) fn select_with_affinity<K, B: BackendOf>(
    svc: &Service,
    (map, inserts): (&LruHashMap<K, AffinityEntry>, u32),
    client: &K,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<B>, Verdict> {
    // sessionAffinity ClientIP: a fresh entry on an ACTIVE backend decides; it is refreshed
    // by every new flow of the client (as kube-proxy's `recent` match is), not per packet.
    let affinity = if svc.affinity_timeout_secs != 0 {
        map.get_ptr_mut(client)
    } else {
        None
    };
    // The affinity timeout is the user's, in seconds: the precise clock, read only then.
    let now = if svc.affinity_timeout_secs != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if let Some(entry) = affinity {
        let entry = unsafe { &mut *entry };
        let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
        if now.wrapping_sub(entry.last_used_ns) >= timeout_ns {
            note(event::AFFINITY_EXPIRED);
        } else {
            match backend_of::<B>(entry.backend_id) {
                Some(chosen) if chosen.backend.state() == BACKEND_ACTIVE => {
                    entry.last_used_ns = now;
                    note(event::SELECT_AFFINITY);
                    return Ok(chosen);
                }
                _ => note(event::AFFINITY_NOT_ACTIVE),
            }
        }
    }
    let chosen = select_from_table(svc, hash)?;
    if svc.affinity_timeout_secs != 0 {
        let fresh = AffinityEntry {
            backend_id: chosen.id,
            _pad: 0,
            last_used_ns: now,
        };
        match affinity {
            Some(entry) => unsafe { *entry = fresh },
            // Best effort: without an entry the client's next flow uses the table.
            None => {
                if map.insert(client, &fresh, BPF_ANY as u64).is_ok() {
                    bump(&LB_TABLEEVENT_V1, inserts);
                }
            }
        }
    }
    Ok(chosen)
}

/// What a conntrack hit does with its flow: `None` keeps the backend, `Some(event)` selects
/// again for that reason. The rules are documented on `lb_common::event`.
#[inline(always)]
pub(crate) fn reselect_because<B: BackendOf>(
    backend: Option<&Chosen<B>>,
    proto: u8,
    syn: bool,
) -> Option<u32> {
    let Some(chosen) = backend else {
        return Some(if proto == PROTO_UDP {
            event::RESELECT_UDP
        } else if syn {
            event::RESELECT_SYN
        } else {
            event::RESELECT_GONE
        });
    };
    match chosen.backend.state() {
        BACKEND_ACTIVE => None,
        _ if syn => Some(event::RESELECT_SYN),
        BACKEND_TERMINATING => None,
        // REMOVED (and any state this program does not know, treated alike).
        _ if proto == PROTO_UDP => Some(event::RESELECT_UDP),
        _ => {
            note(event::DRAIN_REMOVED);
            None
        }
    }
}

/// The current backend generation (`lb_common::map_names::BACKEND_GEN`).
#[inline(always)]
pub(crate) fn backend_generation() -> u32 {
    LB_BEGEN_V1.get(0).copied().unwrap_or(0)
}

/// Writes a conntrack entry, counting it when the key is new.
#[inline(always)]
fn ct_write(key: &Ct4Key, entry: &CtEntry, exists: bool) -> bool {
    ct_write_in(&LB_CT4_V2, key, entry, exists)
}

/// Writes an entry of conntrack `map` (either family's), counting it when the key is new.
#[inline(always)]
pub(crate) fn ct_write_in<K, V>(map: &LruHashMap<K, V>, key: &K, entry: &V, exists: bool) -> bool {
    if !exists {
        match map.insert(key, entry, BPF_NOEXIST as u64) {
            Ok(()) => {
                note(event::CT_INSERTS);
                return true;
            }
            Err(e) if e != -EEXIST => return false,
            Err(_) => {}
        }
    }
    map.insert(key, entry, BPF_ANY as u64).is_ok()
}

/// The backend generation a conntrack entry records for a backend in `state`, read as
/// `generation`: only an ACTIVE backend is vouched for.
#[inline(always)]
pub(crate) fn vouch(state: u8, generation: u32) -> u32 {
    if state == BACKEND_ACTIVE {
        generation
    } else {
        generation.wrapping_sub(1)
    }
}

/// Where a packet of a flow goes, and whose counters it adds to.
#[derive(Clone, Copy)]
pub(crate) struct Flow {
    service_id: u32,
    backend_id: u32,
    /// The backend's address and port, network byte order.
    addr: u32,
    port: u16,
    /// The flow's entries were written by this packet.
    new: bool,
    /// The backend is on another node: the packet is source-NATed and sent on (nat.rs).
    remote: bool,
}

/// The conntrack clock: `last_seen_ns` is for ageing, so the coarse clock (one tick of
/// resolution, no clock source read) is enough.
#[inline(always)]
pub(crate) fn ct_now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The packet's flow from its forward conntrack entry alone, when the entry vouches for
/// its backend: the backend generation it recorded is the current one, so the backend was
/// ACTIVE then and no backend left ACTIVE and no frontend was deleted since (the agent
/// bumps the generation after either). An ACTIVE backend keeps every packet of its flows
/// (the rules on `lb_common::event`), so nothing else needs to be read.
#[inline(always)]
fn established(entry: *mut CtEntry, l4: &L4) -> Option<Flow> {
    let entry = unsafe { &mut *entry };
    if entry.nat_addr == 0 || entry.backend_gen != backend_generation() {
        return None;
    }
    if l4.closing && entry.flags & CT_F_CLOSING == 0 {
        entry.flags |= CT_F_CLOSING;
    }
    let now = ct_now();
    if now.wrapping_sub(entry.last_seen_ns) >= CT_LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
    Some(Flow {
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        addr: entry.nat_addr,
        port: entry.nat_port,
        new: false,
        remote: entry.flags & CT_F_REMOTE != 0,
    })
}

/// The backend of this flow when its conntrack entry (`found`, if any) does not vouch for
/// it: the entry's backend if the rules keep it (the entry then records the backend and
/// the generation again), otherwise a new selection, recorded in both directions.
#[inline(always)]
fn flow_backend(
    svc: &Service,
    key: &Ct4Key,
    l4: &L4,
    found: Option<*mut CtEntry>,
) -> Result<Flow, Verdict> {
    let now = ct_now();
    // Read before the backend, so that a change after the read is seen by the next packet.
    let generation = backend_generation();
    let vouched = |b: &Backend4| vouch(b.state, generation);
    let reply_key = |b: &Backend4| Ct4Key {
        saddr: b.addr,
        daddr: key.saddr,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let mut previous = None;
    if let Some(entry) = found {
        let entry = unsafe { &mut *entry };
        previous = backend(entry.backend_id);
        if entry.service_id == svc.id {
            match reselect_because(previous.as_ref(), key.proto, l4.syn) {
                None => {
                    entry.last_seen_ns = now;
                    if l4.closing {
                        entry.flags |= CT_F_CLOSING;
                    }
                    if let Some(chosen) = previous {
                        entry.backend_gen = vouched(&chosen.backend);
                        entry.nat_addr = chosen.backend.addr;
                        entry.nat_port = chosen.backend.port;
                        if l4.syn {
                            // A new connection on a known tuple: its replies need their
                            // entry, which may have been evicted or removed since (a pod's
                            // direct connection on the same tuple removes it).
                            let reply = CtEntry {
                                flags: 0,
                                backend_gen: 0,
                                nat_addr: key.daddr,
                                nat_port: key.dport,
                                ..*entry
                            };
                            ct_write(&reply_key(&chosen.backend), &reply, false);
                        }
                        let remote = chosen.backend.flags & BACKEND_F_REMOTE != 0;
                        if remote {
                            entry.flags |= CT_F_REMOTE;
                        }
                        return Ok(Flow {
                            service_id: svc.id,
                            backend_id: chosen.id,
                            addr: chosen.backend.addr,
                            port: chosen.backend.port,
                            new: false,
                            remote,
                        });
                    }
                }
                Some(why) => note(why),
            }
        }
    }
    let chosen = select_backend(svc, key)?;
    let remote = chosen.backend.flags & BACKEND_F_REMOTE != 0;
    let forward = CtEntry {
        backend_id: chosen.id,
        service_id: svc.id,
        last_seen_ns: now,
        flags: if l4.closing { CT_F_CLOSING } else { 0 } | if remote { CT_F_REMOTE } else { 0 },
        backend_gen: vouched(&chosen.backend),
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        _pad: 0,
    };
    let reply = CtEntry {
        flags: 0,
        backend_gen: 0,
        nat_addr: key.daddr,
        nat_port: key.dport,
        ..forward
    };
    // The reply entry first: a reply can only follow the forward packet.
    let written = ct_write(&reply_key(&chosen.backend), &reply, false)
        && ct_write(key, &forward, found.is_some());
    if !written {
        count(reason::CT_INSERT_FAILED);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && (old.backend.addr, old.backend.port) != (chosen.backend.addr, chosen.backend.port)
        && LB_CT4_V2.remove(&reply_key(&old.backend)).is_ok()
    {
        note(event::CT_DELETES);
    }
    Ok(Flow {
        service_id: svc.id,
        backend_id: chosen.id,
        addr: chosen.backend.addr,
        port: chosen.backend.port,
        new: written,
        remote,
    })
}

#[inline(always)]
fn add_stats(stats: *mut ServiceStats, bytes: u64, new: bool) {
    // Per-CPU: no other CPU writes these counters.
    unsafe {
        (*stats).packets += 1;
        (*stats).bytes += bytes;
        if new {
            (*stats).new_flows += 1;
        }
    }
}

/// A packet addressed to a frontend, and its flow's backend.
pub(crate) struct Translation {
    pub(crate) pkt: Ipv4Packet,
    /// The packet's forward conntrack key.
    pub(crate) key: Ct4Key,
    /// Where it goes.
    pub(crate) flow: Flow,
}

/// Parses the packet, looks its frontend up, and finds or selects its flow's backend.
#[inline(always)]
pub(crate) fn translation<C: Frame>(ctx: &C) -> Result<Translation, Verdict> {
    let pkt = parse_ipv4(ctx)?;
    let ip = pkt.ip;
    let daddr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let key = Ct4Key {
        saddr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        daddr,
        sport: pkt.l4.sport,
        dport: pkt.l4.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // A destination whose bucket holds no frontend is not one: passed after an array read.
    // Every forward conntrack entry is keyed by its frontend, so none is skipped while its
    // frontend exists (and one of a deleted frontend passes untouched either way).
    let (word, bit) = prefilter::position(prefilter::bucket(daddr, pkt.l4.dport, pkt.proto));
    if LB_PREFILTER4_V1.get(word).is_none_or(|w| w & bit == 0) {
        return Err(Verdict::Pass(reason::NOT_FRONTEND));
    }
    // Conntrack first: an established flow whose entry vouches for its backend needs no
    // other lookup (not even the frontend's: deleting one bumps the generation).
    let found = LB_CT4_V2.get_ptr_mut(&key);
    let flow = match found.and_then(|entry| established(entry, &pkt.l4)) {
        Some(flow) => flow,
        None => {
            let frontend = Frontend4 {
                addr: daddr,
                port: pkt.l4.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            let svc =
                *unsafe { LB_SVC4_V1.get(&frontend) }.ok_or(Verdict::Pass(reason::NOT_FRONTEND))?;
            flow_backend(&svc, &key, &pkt.l4, found)?
        }
    };
    Ok(Translation { pkt, key, flow })
}

/// Counts a translated packet for its frontend and its backend.
#[inline(always)]
pub(crate) fn count_translated(flow: &Flow, bytes: u64) {
    count_packet(flow.service_id, flow.backend_id, bytes, flow.new);
}

/// Counts a translated packet of either family for its frontend and its backend (`new`:
/// the packet created the flow's entries).
#[inline(always)]
pub(crate) fn count_packet(service_id: u32, backend_id: u32, bytes: u64, new: bool) {
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(service_id) {
        add_stats(stats, bytes, new);
    }
    // A volatile read: the value is the loader's, not this constant initialiser.
    let mask = unsafe { core::ptr::read_volatile(&LB_BESTAT_MASK) };
    if let Some(stats) = LB_BESTAT_V2.get_ptr_mut(backend_stats_slot(backend_id, mask)) {
        add_stats(stats, bytes, new);
    }
}

#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<u32, Verdict> {
    let Translation { pkt, key, flow } = translation(ctx)?;
    let (ip, daddr) = (pkt.ip, key.daddr);

    // Rewrite destination address and port, with incremental checksums.
    unsafe {
        (*ip).dst_addr = flow.addr.to_ne_bytes();
        let ip_check = &mut *(core::ptr::addr_of_mut!((*ip).check) as *mut u16);
        *ip_check = csum::replace4(*ip_check, daddr, flow.addr);
    }
    let (check, dport) = (pkt.l4.check_at, pkt.l4.dport_at);
    unsafe {
        *dport = flow.port;
        let old = *check;
        if pkt.proto == PROTO_TCP || old != 0 {
            let new = csum::replace4_2(old, daddr, flow.addr, pkt.l4.dport, flow.port);
            // A UDP checksum that comes out as 0 is sent as all ones (RFC 768).
            *check = if pkt.proto == PROTO_UDP && new == 0 {
                0xffff
            } else {
                new
            };
        }
    }
    count_translated(&flow, (ctx.data_end() - ctx.data()) as u64);
    // A backend on another node: source NAT, and sent on by XDP (nat.rs).
    if flow.remote {
        return Ok(nat::forward(ctx, &key, &pkt.l4, flow.addr, flow.port));
    }
    Ok(xdp_action::XDP_PASS)
}

/// XDP on the node's external interface: translates packets addressed to a frontend.
#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(Verdict::Pass(reason)) => {
            // Not IPv4: the IPv6 program's (v6.rs), through a tail call.
            if reason == reason::NOT_IP {
                return v6::dispatch(&ctx);
            }
            // A remote backend's reply, or an ICMP error about a NATed flow (nat.rs).
            if let Some(action) = nat::reply(&ctx, reason) {
                return action;
            }
            count(reason);
            xdp_action::XDP_PASS
        }
        Err(Verdict::Drop(reason)) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// [`Verdict::Pass`] of a packet that is not a reply of a translated flow: not counted, on
/// egress that is all the node's other traffic.
pub(crate) const NOT_OURS: Verdict = Verdict::Pass(u32::MAX);

/// TC egress of either family.
#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(12).map_err(|_| NOT_OURS)?;
    if u16::from_be(ether_type) == v6::ETH_P_IPV6 {
        return v6::try_egress6(ctx, true);
    }
    try_egress4(ctx)
}

/// TC egress of an IPv4 frame (anything else is `NOT_OURS`): the pod interfaces' program
/// calls it alone, its IPv6 frames going to their own program.
#[inline(always)]
pub(crate) fn try_egress4(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(12).map_err(|_| NOT_OURS)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return Err(NOT_OURS);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| NOT_OURS)?;
    // Only the shapes that ingress translates can be replies of a translated flow.
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(NOT_OURS);
    }
    let check_off = match ip.proto {
        PROTO_TCP => L4_OFF + TCP_CHECK_OFF,
        PROTO_UDP => L4_OFF + UDP_CHECK_OFF,
        // An ICMP error from a local backend about a translated flow (nat.rs).
        nat::PROTO_ICMP => return nat::local_icmp(ctx),
        _ => return Err(NOT_OURS),
    };
    let ports: [u16; 2] = ctx.load(L4_OFF).map_err(|_| NOT_OURS)?;
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let key = Ct4Key {
        saddr,
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let entry = unsafe { LB_CT4_V2.get(&key) }.ok_or(NOT_OURS)?;
    // The entry carries the frontend; one migrated from V1 does not.
    let frontend = if entry.nat_addr != 0 {
        RevNat4 {
            addr: entry.nat_addr,
            port: entry.nat_port,
            _pad: 0,
        }
    } else {
        *unsafe { LB_REVNAT4_V1.get(&entry.service_id) }
            .ok_or(Verdict::Pass(reason::REV_NAT_MISSING))?
    };

    // The skb helpers keep the checksums right whatever the skb's checksum state is
    // (CHECKSUM_PARTIAL from a local or veth sender included).
    let mangled = if ip.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    const FAILED: Verdict = Verdict::Drop(reason::REPLY_REWRITE_FAILED);
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    ctx.l4_csum_replace(check_off, saddr as u64, frontend.addr as u64, pseudo | 4)
        .map_err(|_| FAILED)?;
    ctx.l4_csum_replace(
        check_off,
        ports[0] as u64,
        frontend.port as u64,
        mangled | 2,
    )
    .map_err(|_| FAILED)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, saddr as u64, frontend.addr as u64, 4)
        .map_err(|_| FAILED)?;
    ctx.store(IP_SADDR_OFF, &frontend.addr, 0)
        .map_err(|_| FAILED)?;
    ctx.store(L4_OFF, &frontend.port, 0).map_err(|_| FAILED)?;
    Ok(())
}

/// TC egress on the node's external interface: replies from a backend leave as if they came
/// from the frontend the client addressed.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc_action(try_egress(&ctx))
}

/// The TC action of a verdict, counting its reason ([`NOT_OURS`] is not counted).
#[inline(always)]
pub(crate) fn tc_action(result: Result<(), Verdict>) -> i32 {
    match result {
        Ok(()) => TC_ACT_OK as i32,
        Err(Verdict::Pass(reason)) => {
            if reason != u32::MAX {
                count(reason);
            }
            TC_ACT_OK as i32
        }
        Err(Verdict::Drop(reason)) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
