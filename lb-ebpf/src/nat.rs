//! Remote backends and ICMP errors.
//!
//! - Source NAT ([`forward`]): a flow whose backend is on another node
//!   (`BACKEND_F_REMOTE`) leaves with this node's address (the one the kernel's route to the
//!   backend prefers) and a port from the NAT table (`lb_common::nat`), so that the backend's
//!   replies come back here. The packet is sent on by XDP itself: the FIB lookup gives the
//!   interface and the MAC addresses (XDP_TX when it leaves by the interface it came in by,
//!   else a redirect). While the next hop's neighbour entry is unresolved the translated
//!   packet goes to the kernel, which forwards it and resolves the neighbour (its source is
//!   this node's own address: the agent sets `accept_local` on the interface for that).
//! - Replies ([`reply`]): a packet from a remote backend to a NAT port is translated back
//!   (destination: the client; source: the frontend) and sent towards the client the same
//!   way.
//! - ICMP errors (destination unreachable, time exceeded, parameter problem) quote the
//!   header of the packet they are about. One about a NATed flow arrives here ([`reply`]);
//!   one from a local backend leaves by TC egress ([`local_icmp`]). Both are rewritten so
//!   that the client sees an error about the packet it sent (to the frontend): the quoted
//!   header, the outer source when it is the backend, and every checksum. ICMPv6 errors from
//!   a local backend are v6.rs's (`local_icmp6`), counted here too.
//!
//! Counters: `lb_common::nat_event`.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC,
        BPF_NOEXIST, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    CT_REPLY, Ct4Key, NAT_F_CLOSING, NAT_IN, NAT_OUT, Nat4Entry, Nat4Key, PROTO_TCP, PROTO_UDP,
    capacity, csum, flow_hash, nat, nat_event, reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    EEXIST, ETH_LEN, ETH_P_IP, IPV4_LEN, L4, L4_OFF, LB_CT4_V2, LB_REVNAT4_V1, TCP_CHECK_OFF,
    UDP_CHECK_OFF, Verdict, bump, parse_ipv4, ptr_at,
};

#[map]
static LB_NAT4_V1: LruHashMap<Nat4Key, Nat4Entry> = LruHashMap::pinned(capacity::NAT, 0);
#[map]
static LB_NATEVENT_V1: PerCpuArray<u64> = PerCpuArray::pinned(nat_event::COUNT, 0);

pub(crate) const PROTO_ICMP: u8 = 1;
const AF_INET: u8 = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// Offsets in an ICMP error: its checksum, the quoted IPv4 header, the quoted ports.
const ICMP_CHECK_OFF: usize = L4_OFF + 2;
const INNER_IP_OFF: usize = L4_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + IPV4_LEN;
/// Offsets of fields inside an IPv4 header.
const IP_CHECK_OFF: usize = 10;
const IP_SADDR_OFF: usize = 12;
const IP_DADDR_OFF: usize = 16;

#[inline(always)]
pub(crate) fn note(event: u32) {
    bump(&LB_NATEVENT_V1, event);
}

/// Loads and stores at packet offsets: direct access in XDP, the skb helpers in TC, so that
/// the ICMP rewrite is written once.
pub(crate) trait Bytes {
    fn get<T: Copy>(&self, offset: usize) -> Option<T>;
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()>;
}

impl Bytes for XdpContext {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        ptr_at::<_, T>(self, offset).map(|p| unsafe { p.read_unaligned() })
    }

    #[inline(always)]
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        ptr_at::<_, T>(self, offset).map(|p| unsafe { p.write_unaligned(value) })
    }
}

impl Bytes for TcContext {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }

    #[inline(always)]
    fn set<T: Copy>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, &value, 0).ok()
    }
}

/// Where a packet goes next, from the kernel's FIB (`A`: the family's address).
pub(crate) struct Route<A> {
    pub(crate) ifindex: u32,
    pub(crate) smac: [u8; 6],
    pub(crate) dmac: [u8; 6],
    /// This node's preferred source address on the route.
    pub(crate) src: A,
    /// The next hop's MAC address is known.
    pub(crate) resolved: bool,
}

impl Route<()> {
    /// The route with its source address.
    #[inline(always)]
    pub(crate) fn with_src<A>(self, src: A) -> Route<A> {
        let Route {
            ifindex,
            smac,
            dmac,
            resolved,
            ..
        } = self;
        Route {
            ifindex,
            smac,
            dmac,
            src,
            resolved,
        }
    }
}

/// The route of a packet from `src` to `dst` that arrived on this XDP interface, as the
/// kernel would forward it; `None` when it would not (no route, forwarding off, ...).
#[inline(always)]
fn route(ctx: &XdpContext, src: u32, dst: u32, proto: u8, flags: u32) -> Option<Route<u32>> {
    fib_route(ctx, AF_INET, proto, flags, |params| {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    })
    .map(|(route, params)| route.with_src(unsafe { params.__bindgen_anon_3.ipv4_src }))
}

/// The FIB lookup of either family: `set` writes the addresses into the parameters; the
/// route comes back with the parameters, whose source address the lookup may have filled.
/// `tot_len` stays 0: no MTU check (a packet that fit the way in fits a way out of the same
/// MTU).
#[inline(always)]
pub(crate) fn fib_route(
    ctx: &XdpContext,
    family: u8,
    proto: u8,
    flags: u32,
    set: impl FnOnce(&mut bpf_fib_lookup),
) -> Option<(Route<()>, bpf_fib_lookup)> {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = family;
    params.l4_protocol = proto;
    params.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    set(&mut params);
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    let rc = unsafe { fib_lookup(ctx.ctx.cast(), &mut params, size, flags) } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let route = Route {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
        src: (),
        resolved: rc == BPF_FIB_LKUP_RET_SUCCESS,
    };
    Some((route, params))
}

/// Sends a translated packet along `route`: new MAC addresses and TTL, then XDP_TX or a
/// redirect; unresolved, to the kernel as it is. A packet whose TTL runs out is dropped.
#[inline(always)]
fn send(ctx: &XdpContext, route: &Route<u32>) -> u32 {
    if !route.resolved {
        note(nat_event::NO_NEIGH);
        return xdp_action::XDP_PASS;
    }
    let Some(ip) = ptr_at::<_, Ipv4Hdr>(ctx, ETH_LEN) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return xdp_action::XDP_DROP;
        }
        // TTL and protocol are one 16-bit word of the header checksum.
        let old = u16::from_ne_bytes([ttl, (*ip).proto]);
        let new = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
        (*ip).ttl = ttl - 1;
        let check = core::ptr::addr_of_mut!((*ip).check) as *mut u16;
        *check = csum::replace2(*check, old, new);
    }
    transmit(ctx, route)
}

/// The last step of sending a resolved packet of either family along `route`: its MAC
/// addresses, then XDP_TX out of the interface it came in by, or a redirect.
#[inline(always)]
pub(crate) fn transmit<A>(ctx: &XdpContext, route: &Route<A>) -> u32 {
    let Some(eth) = ptr_at::<_, EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        (*eth).dst_addr = route.dmac;
        (*eth).src_addr = route.smac;
    }
    if route.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        note(nat_event::TX);
        xdp_action::XDP_TX
    } else {
        note(nat_event::REDIRECT);
        unsafe { bpf_redirect(route.ifindex, 0) as u32 }
    }
}

/// Replaces the source or destination address and port of the TCP/UDP packet, with
/// incremental checksums (a zero UDP checksum stays zero).
#[inline(always)]
fn rewrite<P: Bytes>(p: &P, proto: u8, dest: bool, addr: u32, port: u16) -> Option<()> {
    let (addr_off, port_off) = if dest {
        (ETH_LEN + IP_DADDR_OFF, L4_OFF + 2)
    } else {
        (ETH_LEN + IP_SADDR_OFF, L4_OFF)
    };
    let check_off = L4_OFF
        + if proto == PROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
    let old_addr: u32 = p.get(addr_off)?;
    let old_port: u16 = p.get(port_off)?;
    let ip_check: u16 = p.get(ETH_LEN + IP_CHECK_OFF)?;
    p.set(
        ETH_LEN + IP_CHECK_OFF,
        csum::replace4(ip_check, old_addr, addr),
    )?;
    let check: u16 = p.get(check_off)?;
    if proto == PROTO_TCP || check != 0 {
        let new = csum::replace4_2(check, old_addr, addr, old_port, port);
        let new = if proto == PROTO_UDP && new == 0 {
            0xffff
        } else {
            new
        };
        p.set(check_off, new)?;
    }
    p.set(addr_off, addr)?;
    p.set(port_off, port)
}

/// A NAT table's key (IPv4's or IPv6's), with its map and entry.
pub(crate) trait NatKey: Copy + 'static {
    type Entry: NatEntry;
    fn map() -> &'static LruHashMap<Self, Self::Entry>;
    fn proto(&self) -> u8;
    fn set_dport(&mut self, port: u16);
}

/// A NAT table's entry (IPv4's or IPv6's).
pub(crate) trait NatEntry: Copy {
    type Addr: Copy + PartialEq;
    /// `addr` and `port`.
    fn own(&self) -> (Self::Addr, u16);
    /// `peer_addr` and `peer_port`.
    fn peer(&self) -> (Self::Addr, u16);
    fn flags_mut(&mut self) -> &mut u16;
    fn last_seen_mut(&mut self) -> &mut u64;
    fn set_port(&mut self, port: u16);
}

macro_rules! nat_table {
    ($key:ty, $entry:ty, $addr:ty, $map:expr) => {
        impl NatKey for $key {
            type Entry = $entry;
            #[inline(always)]
            fn map() -> &'static LruHashMap<Self, Self::Entry> {
                &$map
            }
            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }
            #[inline(always)]
            fn set_dport(&mut self, port: u16) {
                self.dport = port;
            }
        }
        impl NatEntry for $entry {
            type Addr = $addr;
            #[inline(always)]
            fn own(&self) -> ($addr, u16) {
                (self.addr, self.port)
            }
            #[inline(always)]
            fn peer(&self) -> ($addr, u16) {
                (self.peer_addr, self.peer_port)
            }
            #[inline(always)]
            fn flags_mut(&mut self) -> &mut u16 {
                &mut self.flags
            }
            #[inline(always)]
            fn last_seen_mut(&mut self) -> &mut u64 {
                &mut self.last_seen_ns
            }
            #[inline(always)]
            fn set_port(&mut self, port: u16) {
                self.port = port;
            }
        }
    };
}
pub(crate) use nat_table;

nat_table!(Nat4Key, Nat4Entry, u32, LB_NAT4_V1);

/// The NAT port of a new flow: the first free one (or expired) of its tries. Writes the
/// [`NAT_IN`] entry; `None` when every try is taken.
#[inline(never)]
fn allocate<K: NatKey>(in_key: &mut K, value: &K::Entry, hash: u32) -> Option<u16> {
    let map = K::map();
    for i in 0..nat::TRIES {
        let port = nat::port(hash, i).to_be();
        in_key.set_dport(port);
        match map.insert(&*in_key, value, BPF_NOEXIST as u64) {
            Ok(()) => {
                note(nat_event::ALLOCATED);
                return Some(port);
            }
            Err(e) if e != -EEXIST => return None,
            Err(_) => {}
        }
        if let Some(old) = map.get_ptr_mut(&*in_key) {
            let old = unsafe { &mut *old };
            let mut value = *value;
            if nat::expired(
                in_key.proto(),
                *old.flags_mut(),
                *old.last_seen_mut(),
                *value.last_seen_mut(),
            ) {
                *old = value;
                note(nat_event::ALLOCATED);
                note(nat_event::REUSED_EXPIRED);
                return Some(port);
            }
        }
        note(nat_event::PORT_TAKEN);
    }
    None
}

/// A flow to NAT, as [`nat_port`] needs it: its two keys (`in_key`'s port is filled in),
/// the [`NAT_IN`] entry it would write, and its [`NAT_OUT`] entry without the port.
pub(crate) struct NatFlow<K: NatKey> {
    pub(crate) out_key: K,
    pub(crate) in_key: K,
    pub(crate) in_value: K::Entry,
    pub(crate) out_value: K::Entry,
    /// `NAT_F_*` bits this packet adds.
    pub(crate) flags: u16,
    pub(crate) now: u64,
}

/// The NAT port of `flow` (network byte order): the one it holds if its [`NAT_IN`] entry
/// still names it, else a new one (`hash`: the flow's); `None` (counted) when no port is
/// free.
#[inline(always)]
pub(crate) fn nat_port<K: NatKey>(
    flow: &mut NatFlow<K>,
    hash: impl FnOnce() -> u32,
) -> Option<u16> {
    let map = K::map();
    let (now, flags, in_value) = (flow.now, flow.flags, flow.in_value);
    // The flow's port, if it still has one: its NAT_IN entry must still name this client
    // and frontend (an expired entry may have been taken over by another flow).
    let mut port = None;
    if let Some(out) = map.get_ptr_mut(&flow.out_key) {
        let out = unsafe { &mut *out };
        if out.own().0 == flow.out_value.own().0 && out.peer() == flow.out_value.peer() {
            let held = out.own().1;
            flow.in_key.set_dport(held);
            match map.get_ptr_mut(&flow.in_key) {
                Some(entry) => {
                    let entry = unsafe { &mut *entry };
                    if (entry.own(), entry.peer()) == (in_value.own(), in_value.peer()) {
                        *entry.last_seen_mut() = now;
                        *entry.flags_mut() |= flags;
                        port = Some(held);
                    } else {
                        note(nat_event::PORT_LOST);
                    }
                }
                // Evicted: take the port again if it is still free.
                None => {
                    if map
                        .insert(&flow.in_key, &in_value, BPF_NOEXIST as u64)
                        .is_ok()
                    {
                        port = Some(held);
                    } else {
                        note(nat_event::PORT_LOST);
                    }
                }
            }
            if port.is_some() {
                *out.last_seen_mut() = now;
                *out.flags_mut() |= flags;
            }
        }
    }
    if port.is_some() {
        return port;
    }
    let Some(port) = allocate(&mut flow.in_key, &in_value, hash()) else {
        note(nat_event::EXHAUSTED);
        return None;
    };
    let mut out = flow.out_value;
    out.set_port(port);
    if map.insert(&flow.out_key, &out, BPF_ANY as u64).is_err() {
        // The reply entry stands; this flow allocates again on its next packet.
        bump(&crate::LB_REASON_V3, reason::CT_INSERT_FAILED);
    }
    Some(port)
}

/// A reply's [`NAT_IN`] entry, refreshed (`closing`: the packet is a FIN or RST).
#[inline(always)]
pub(crate) fn reply_entry<K: NatKey>(key: &K, closing: bool) -> Option<K::Entry> {
    let entry = unsafe { &mut *K::map().get_ptr_mut(key)? };
    *entry.last_seen_mut() = unsafe { bpf_ktime_get_ns() };
    if closing {
        *entry.flags_mut() |= NAT_F_CLOSING;
    }
    Some(*entry)
}

/// Source NAT and forwarding of a packet of `key`'s flow (the forward conntrack key: client
/// and frontend) whose destination was just rewritten to a remote backend.
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    key: &Ct4Key,
    l4: &L4,
    backend_addr: u32,
    backend_port: u16,
) -> u32 {
    let Some(route) = route(ctx, key.saddr, backend_addr, key.proto, BPF_FIB_LOOKUP_SRC) else {
        note(nat_event::NO_ROUTE);
        return xdp_action::XDP_DROP;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = if l4.closing { NAT_F_CLOSING } else { 0 };
    let mut flow = NatFlow {
        out_key: Nat4Key {
            saddr: key.saddr,
            daddr: key.daddr,
            sport: key.sport,
            dport: key.dport,
            proto: key.proto,
            dir: NAT_OUT,
            _pad: [0; 2],
        },
        in_key: Nat4Key {
            saddr: backend_addr,
            daddr: route.src,
            sport: backend_port,
            dport: 0,
            proto: key.proto,
            dir: NAT_IN,
            _pad: [0; 2],
        },
        in_value: Nat4Entry {
            addr: key.saddr,
            port: key.sport,
            flags,
            peer_addr: key.daddr,
            peer_port: key.dport,
            _pad: 0,
            last_seen_ns: now,
        },
        out_value: Nat4Entry {
            addr: route.src,
            port: 0,
            flags,
            peer_addr: backend_addr,
            peer_port: backend_port,
            _pad: 0,
            last_seen_ns: now,
        },
        flags,
        now,
    };
    let hash = || flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto);
    let Some(port) = nat_port(&mut flow, hash) else {
        return xdp_action::XDP_DROP;
    };
    if rewrite(ctx, key.proto, false, route.src, port).is_none() {
        return xdp_action::XDP_DROP;
    }
    send(ctx, &route)
}

/// Packets that are not for a frontend: a remote backend's reply to a NAT port, or an ICMP
/// error about such a flow, translated back and sent to the client. `None`: not ours.
#[inline(always)]
pub(crate) fn reply(ctx: &XdpContext, why: u32) -> Option<u32> {
    match why {
        reason::NOT_FRONTEND => {
            let pkt = parse_ipv4(ctx).ok()?;
            // Only ports of the NAT range are ever allocated: every other packet that is not
            // for a frontend (most of a node's traffic) passes without a NAT lookup.
            if !(nat::PORT_MIN..=nat::PORT_MAX).contains(&u16::from_be(pkt.l4.dport)) {
                return None;
            }
            let ip = pkt.ip;
            let key = Nat4Key {
                saddr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
                daddr: u32::from_ne_bytes(unsafe { (*ip).dst_addr }),
                sport: pkt.l4.sport,
                dport: pkt.l4.dport,
                proto: pkt.proto,
                dir: NAT_IN,
                _pad: [0; 2],
            };
            let entry = reply_entry(&key, pkt.l4.closing)?;
            let Some(route) = route(ctx, entry.peer_addr, entry.addr, key.proto, 0) else {
                note(nat_event::NO_ROUTE);
                return Some(xdp_action::XDP_DROP);
            };
            if rewrite(ctx, key.proto, true, entry.addr, entry.port).is_none()
                || rewrite(ctx, key.proto, false, entry.peer_addr, entry.peer_port).is_none()
            {
                return Some(xdp_action::XDP_DROP);
            }
            note(nat_event::REPLIES);
            Some(send(ctx, &route))
        }
        reason::NOT_TCP_UDP => {
            let error = icmp_error(ctx)?;
            // The quoted packet went from this node's NAT address and port to the backend.
            let key = Nat4Key {
                saddr: error.inner_daddr,
                daddr: error.inner_saddr,
                sport: error.inner_dport,
                dport: error.inner_sport,
                proto: error.inner_proto,
                dir: NAT_IN,
                _pad: [0; 2],
            };
            let entry = unsafe { *LB_NAT4_V1.get(&key)? };
            let Some(route) = route(ctx, entry.peer_addr, entry.addr, PROTO_ICMP, 0) else {
                note(nat_event::NO_ROUTE);
                return Some(xdp_action::XDP_DROP);
            };
            let edit = IcmpEdit {
                outer_daddr: entry.addr,
                inner_saddr: entry.addr,
                inner_sport: entry.port,
                inner_daddr: entry.peer_addr,
                inner_dport: entry.peer_port,
            };
            if edit.apply(ctx, &error).is_none() {
                return Some(xdp_action::XDP_DROP);
            }
            note(nat_event::ICMP_NAT);
            Some(send(ctx, &route))
        }
        _ => None,
    }
}

/// An ICMP error about a TCP or UDP packet, as far as it is read.
struct IcmpError {
    outer_saddr: u32,
    outer_daddr: u32,
    inner_saddr: u32,
    inner_daddr: u32,
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

/// The ICMP error in this IPv4 packet (no options outside or inside, not a fragment), if
/// it is one that quotes a TCP or UDP header.
#[inline(always)]
fn icmp_error<P: Bytes>(p: &P) -> Option<IcmpError> {
    let ether_type: u16 = p.get(12)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = p.get(ETH_LEN)?;
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 || ip.proto != PROTO_ICMP {
        return None;
    }
    let icmp_type: u8 = p.get(L4_OFF)?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
    ) {
        return None;
    }
    let inner: Ipv4Hdr = p.get(INNER_IP_OFF)?;
    if inner.vihl != 0x45 || !matches!(inner.proto, PROTO_TCP | PROTO_UDP) {
        return None;
    }
    let ports: [u16; 2] = p.get(INNER_L4_OFF)?;
    Some(IcmpError {
        outer_saddr: u32::from_ne_bytes(ip.src_addr),
        outer_daddr: u32::from_ne_bytes(ip.dst_addr),
        inner_saddr: u32::from_ne_bytes(inner.src_addr),
        inner_daddr: u32::from_ne_bytes(inner.dst_addr),
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto: inner.proto,
    })
}

/// The new addresses and ports of an ICMP error about a translated flow. The outer source
/// becomes the frontend when it is the backend (the backend itself reports); a router on the
/// way keeps its address.
struct IcmpEdit {
    outer_daddr: u32,
    inner_saddr: u32,
    inner_sport: u16,
    inner_daddr: u32,
    inner_dport: u16,
}

impl IcmpEdit {
    #[inline(always)]
    fn apply<P: Bytes>(&self, p: &P, error: &IcmpError) -> Option<()> {
        let outer_saddr = if error.outer_saddr == error.inner_daddr {
            self.inner_daddr
        } else {
            error.outer_saddr
        };
        // The quoted header and its checksums; every change also changes the ICMP checksum,
        // which covers the quote (ICMP has no pseudo-header).
        let mut icmp: u16 = p.get(ICMP_CHECK_OFF)?;
        let inner_check_off = INNER_IP_OFF + IP_CHECK_OFF;
        let old_check: u16 = p.get(inner_check_off)?;
        let mut check = csum::replace4(old_check, error.inner_saddr, self.inner_saddr);
        check = csum::replace4(check, error.inner_daddr, self.inner_daddr);
        icmp = csum::replace4(icmp, error.inner_saddr, self.inner_saddr);
        icmp = csum::replace4(icmp, error.inner_daddr, self.inner_daddr);
        icmp = csum::replace2(icmp, old_check, check);
        icmp = csum::replace2(icmp, error.inner_sport, self.inner_sport);
        icmp = csum::replace2(icmp, error.inner_dport, self.inner_dport);
        p.set(inner_check_off, check)?;
        p.set(INNER_IP_OFF + IP_SADDR_OFF, self.inner_saddr)?;
        p.set(INNER_IP_OFF + IP_DADDR_OFF, self.inner_daddr)?;
        p.set(INNER_L4_OFF, [self.inner_sport, self.inner_dport])?;
        // The quoted transport checksum, when the quote reaches it.
        let l4_check_off = INNER_L4_OFF
            + if error.inner_proto == PROTO_TCP {
                TCP_CHECK_OFF
            } else {
                UDP_CHECK_OFF
            };
        if let Some(old) = p.get::<u16>(l4_check_off)
            && (error.inner_proto == PROTO_TCP || old != 0)
        {
            let mut new = csum::replace4_2(
                old,
                error.inner_saddr,
                self.inner_saddr,
                error.inner_sport,
                self.inner_sport,
            );
            new = csum::replace4_2(
                new,
                error.inner_daddr,
                self.inner_daddr,
                error.inner_dport,
                self.inner_dport,
            );
            if error.inner_proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp = csum::replace2(icmp, old, new);
            p.set(l4_check_off, new)?;
        }
        p.set(ICMP_CHECK_OFF, icmp)?;
        // The outer header.
        let ip_check: u16 = p.get(ETH_LEN + IP_CHECK_OFF)?;
        let mut ip_check = csum::replace4(ip_check, error.outer_saddr, outer_saddr);
        ip_check = csum::replace4(ip_check, error.outer_daddr, self.outer_daddr);
        p.set(ETH_LEN + IP_CHECK_OFF, ip_check)?;
        p.set(ETH_LEN + IP_SADDR_OFF, outer_saddr)?;
        p.set(ETH_LEN + IP_DADDR_OFF, self.outer_daddr)
    }
}

/// TC egress: an ICMP error from a local backend (or a hop towards it) about a flow it got
/// from a frontend, rewritten to be about the frontend. `Err(NOT_OURS)`-style pass when it
/// is not one.
#[inline(always)]
pub(crate) fn local_icmp(ctx: &TcContext) -> Result<(), Verdict> {
    const NOT_OURS: Verdict = Verdict::Pass(u32::MAX);
    let error = icmp_error(ctx).ok_or(NOT_OURS)?;
    // The quoted packet went from the client to the backend: its reply key.
    let key = Ct4Key {
        saddr: error.inner_daddr,
        daddr: error.inner_saddr,
        sport: error.inner_dport,
        dport: error.inner_sport,
        proto: error.inner_proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let entry = unsafe { LB_CT4_V2.get(&key) }.ok_or(NOT_OURS)?;
    let frontend = *unsafe { LB_REVNAT4_V1.get(&entry.service_id) }
        .ok_or(Verdict::Pass(reason::REV_NAT_MISSING))?;
    let edit = IcmpEdit {
        outer_daddr: error.outer_daddr,
        inner_saddr: error.inner_saddr,
        inner_sport: error.inner_sport,
        inner_daddr: frontend.addr,
        inner_dport: frontend.port,
    };
    edit.apply(ctx, &error)
        .ok_or(Verdict::Drop(reason::REPLY_REWRITE_FAILED))?;
    note(nat_event::ICMP_LOCAL);
    Ok(())
}
