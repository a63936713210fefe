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

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action,
    },
    btf_maps::{Array as InnerArray, HashOfMaps},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{btf_map, classifier, map, xdp},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key as LpmKey},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4, CT_F_CLOSING,
    CT_FORWARD, CT_REPLY, Ct4Key, CtEntry, Frontend4, MAX_SERVICES, MaglevCell, PROTO_TCP,
    PROTO_UDP, RevNat4, SERVICE_F_RANDOM, SERVICE_F_SOURCE_RANGES, SOURCE_RANGE_ID_BITS, Service,
    ServiceStats, SourceRange4, capacity, csum, event, flow_hash, maglev, reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

#[map]
static LB_SVC4_V1: HashMap<Frontend4, Service> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
static LB_BACKEND4_V1: HashMap<u32, Backend4> = HashMap::pinned(capacity::BACKENDS, 0);
/// Service id (or id | `maglev::KEY_TABLE_B`, see `maglev::table_key`) -> a Maglev table
/// of the service. BTF-defined (map-of-maps needs the inner map's BTF);
/// the agent pins it by path like the others. See `maglev::INNER_MAP_FLAGS`.
#[btf_map]
static LB_MAGLEV_V1: HashOfMaps<
    u32,
    InnerArray<MaglevCell, 1, { maglev::INNER_MAP_FLAGS as usize }>,
    { capacity::SERVICES as usize },
> = HashOfMaps::new();
#[map]
static LB_CT4_V1: LruHashMap<Ct4Key, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);
#[map]
static LB_REVNAT4_V1: HashMap<u32, RevNat4> = HashMap::pinned(capacity::SERVICES, 0);
#[map]
static LB_SVCSTAT_V1: PerCpuArray<ServiceStats> = PerCpuArray::pinned(MAX_SERVICES, 0);
#[map]
static LB_REASON_V2: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);
#[map]
static LB_BESTAT_V1: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(capacity::BACKENDS, 0);
#[map]
static LB_EVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(event::COUNT, 0);
#[map]
static LB_AFFINITY4_V1: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(capacity::AFFINITY, 0);
#[map]
static LB_SRCRANGE4_V1: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(capacity::SOURCE_RANGES, 0);

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
enum Verdict {
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
fn count(reason: u32) {
    bump(&LB_REASON_V2, reason);
}

#[inline(always)]
fn note(event: u32) {
    bump(&LB_EVENT_V1, event);
}

/// A pointer to a `T` at `offset` in the XDP buffer, if the buffer holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The transport header fields the translation reads and writes. The pointers come from
/// the one bounds check of the header, so writing through them needs no other.
struct L4 {
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
struct Ipv4Packet {
    ip: *mut Ipv4Hdr,
    proto: u8,
    l4: L4,
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Result<Ipv4Packet, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Pass(reason::SHORT_ETHERNET))?;
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Verdict::Pass(reason::NOT_IPV4));
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
    let received = ctx.data_end() - ctx.data() - ETH_LEN;
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

/// A backend and its id.
#[derive(Clone, Copy)]
struct Chosen {
    id: u32,
    backend: Backend4,
}

#[inline(always)]
fn backend(id: u32) -> Option<Chosen> {
    let backend = *unsafe { LB_BACKEND4_V1.get(&id) }?;
    Some(Chosen { id, backend })
}

/// The Maglev table's choice: the entry of the flow hash, or a random entry for selection
/// `random` (so random selection is as balanced as the table).
#[inline(always)]
fn select_from_table(svc: &Service, key: &Ct4Key) -> Result<Chosen, Verdict> {
    const MISSING: Verdict = Verdict::Drop(reason::BACKEND_MISSING);
    let table =
        unsafe { LB_MAGLEV_V1.get(&maglev::table_key(svc.id, svc.flags)) }.ok_or(MISSING)?;
    let size = table.get(0).ok_or(MISSING)?[0];
    if size == 0 {
        return Err(MISSING);
    }
    let pick = if svc.flags & SERVICE_F_RANDOM != 0 {
        note(event::SELECT_RANDOM);
        unsafe { bpf_get_prandom_u32() }
    } else {
        note(event::SELECT_MAGLEV);
        flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto)
    };
    let (element, half) = maglev::position(pick % size);
    let cell = table.get(element).ok_or(MISSING)?;
    backend(cell[half & 1]).ok_or(MISSING)
}

/// The backend of a new flow: checks the source ranges, then the client's affinity, then
/// the Maglev table.
#[inline(always)]
fn select_backend(svc: &Service, key: &Ct4Key, now: u64) -> Result<Chosen, Verdict> {
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
    // sessionAffinity ClientIP: a fresh entry on an ACTIVE backend decides; it is refreshed
    // by every new flow of the client (as kube-proxy's `recent` match is), not per packet.
    let client = AffinityKey {
        service_id: svc.id,
        client: key.saddr,
    };
    let affinity = if svc.affinity_timeout_secs != 0 {
        LB_AFFINITY4_V1.get_ptr_mut(&client)
    } else {
        None
    };
    if let Some(entry) = affinity {
        let entry = unsafe { &mut *entry };
        let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
        if now.wrapping_sub(entry.last_used_ns) >= timeout_ns {
            note(event::AFFINITY_EXPIRED);
        } else {
            match backend(entry.backend_id) {
                Some(chosen) if chosen.backend.state == BACKEND_ACTIVE => {
                    entry.last_used_ns = now;
                    note(event::SELECT_AFFINITY);
                    return Ok(chosen);
                }
                _ => note(event::AFFINITY_NOT_ACTIVE),
            }
        }
    }
    let chosen = select_from_table(svc, key)?;
    if svc.affinity_timeout_secs != 0 {
        let fresh = AffinityEntry {
            backend_id: chosen.id,
            _pad: 0,
            last_used_ns: now,
        };
        match affinity {
            Some(entry) => unsafe { *entry = fresh },
            // Best effort: without an entry the client's next flow uses the table.
            None => drop(LB_AFFINITY4_V1.insert(&client, &fresh, BPF_ANY as u64)),
        }
    }
    Ok(chosen)
}

/// What a conntrack hit does with its flow: `None` keeps the backend, `Some(event)` selects
/// again for that reason. The rules are documented on `lb_common::event`.
#[inline(always)]
fn reselect_because(backend: Option<&Chosen>, proto: u8, syn: bool) -> Option<u32> {
    let Some(chosen) = backend else {
        return Some(if proto == PROTO_UDP {
            event::RESELECT_UDP
        } else if syn {
            event::RESELECT_SYN
        } else {
            event::RESELECT_GONE
        });
    };
    match chosen.backend.state {
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

/// Writes a conntrack entry, counting it when the key is new.
#[inline(always)]
fn ct_write(key: &Ct4Key, entry: &CtEntry, exists: bool) -> bool {
    if !exists {
        match LB_CT4_V1.insert(key, entry, BPF_NOEXIST as u64) {
            Ok(()) => {
                note(event::CT_INSERTS);
                return true;
            }
            Err(e) if e != -EEXIST => return false,
            Err(_) => {}
        }
    }
    LB_CT4_V1.insert(key, entry, BPF_ANY as u64).is_ok()
}

/// The backend of this flow: the conntrack entry's when it is still valid, otherwise a new
/// selection, recorded in both directions. `true` when the flow is new (its entries written).
#[inline(always)]
fn flow_backend(svc: &Service, key: &Ct4Key, l4: &L4) -> Result<(Chosen, bool), Verdict> {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut exists = false;
    let mut previous = None;
    if let Some(entry) = LB_CT4_V1.get_ptr_mut(key) {
        let entry = unsafe { &mut *entry };
        exists = true;
        previous = backend(entry.backend_id);
        if entry.service_id == svc.id {
            match reselect_because(previous.as_ref(), key.proto, l4.syn) {
                None => {
                    entry.last_seen_ns = now;
                    if l4.closing {
                        entry.flags |= CT_F_CLOSING;
                    }
                    if let Some(chosen) = previous {
                        return Ok((chosen, false));
                    }
                }
                Some(why) => note(why),
            }
        }
    }
    let chosen = select_backend(svc, key, now)?;
    let forward = CtEntry {
        backend_id: chosen.id,
        service_id: svc.id,
        last_seen_ns: now,
        flags: if l4.closing { CT_F_CLOSING } else { 0 },
        _pad: 0,
    };
    let reply_key = |b: &Backend4| Ct4Key {
        saddr: b.addr,
        daddr: key.saddr,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let reply = CtEntry {
        flags: 0,
        ..forward
    };
    // The reply entry first: a reply can only follow the forward packet.
    let written =
        ct_write(&reply_key(&chosen.backend), &reply, false) && ct_write(key, &forward, exists);
    if !written {
        count(reason::CT_INSERT_FAILED);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && (old.backend.addr, old.backend.port) != (chosen.backend.addr, chosen.backend.port)
        && LB_CT4_V1.remove(&reply_key(&old.backend)).is_ok()
    {
        note(event::CT_DELETES);
    }
    Ok((chosen, written))
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

#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<(), Verdict> {
    let pkt = parse_ipv4(ctx)?;
    let ip = pkt.ip;
    let daddr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let frontend = Frontend4 {
        addr: daddr,
        port: pkt.l4.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    let svc = *unsafe { LB_SVC4_V1.get(&frontend) }.ok_or(Verdict::Pass(reason::NOT_FRONTEND))?;
    let key = Ct4Key {
        saddr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        daddr,
        sport: pkt.l4.sport,
        dport: pkt.l4.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    let (chosen, new) = flow_backend(&svc, &key, &pkt.l4)?;
    let backend = chosen.backend;

    // Rewrite destination address and port, with incremental checksums.
    unsafe {
        (*ip).dst_addr = backend.addr.to_ne_bytes();
        let ip_check = &mut *(core::ptr::addr_of_mut!((*ip).check) as *mut u16);
        *ip_check = csum::replace4(*ip_check, daddr, backend.addr);
    }
    let (check, dport) = (pkt.l4.check_at, pkt.l4.dport_at);
    unsafe {
        *dport = backend.port;
        let old = *check;
        if pkt.proto == PROTO_TCP || old != 0 {
            let new = csum::replace4_2(old, daddr, backend.addr, pkt.l4.dport, backend.port);
            // A UDP checksum that comes out as 0 is sent as all ones (RFC 768).
            *check = if pkt.proto == PROTO_UDP && new == 0 {
                0xffff
            } else {
                new
            };
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(svc.id) {
        add_stats(stats, bytes, new);
    }
    if let Some(stats) = LB_BESTAT_V1.get_ptr_mut(&chosen.id) {
        add_stats(stats, bytes, new);
    }
    Ok(())
}

/// XDP on the node's external interface: translates packets addressed to a frontend.
#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(Verdict::Pass(reason)) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        Err(Verdict::Drop(reason)) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    // Anything that is not a reply of a translated flow is not counted: on egress that is
    // all the node's other traffic.
    const NOT_OURS: Verdict = Verdict::Pass(u32::MAX);
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
    let entry = unsafe { LB_CT4_V1.get(&key) }.ok_or(NOT_OURS)?;
    let frontend = *unsafe { LB_REVNAT4_V1.get(&entry.service_id) }
        .ok_or(Verdict::Pass(reason::REV_NAT_MISSING))?;

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
    match try_egress(&ctx) {
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
