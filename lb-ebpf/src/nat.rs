//! Remote backends: source NAT, both families.
//!
//! - [`forward4`], [`forward6`]: a flow whose backend is on another node
//!   (`BACKEND_F_REMOTE`) leaves with this node's address (the one the kernel's route to the
//!   backend prefers) and a port from the NAT table (`lb_common::nat`), so that the backend's
//!   replies come back here. The packet is sent on by XDP itself (route.rs).
//! - [`reply4`], [`reply6`]: a packet from a remote backend to a NAT port is translated back
//!   (destination: the client; source: the frontend) and sent towards the client the same
//!   way.
//!
//! The table logic (port allocation, timeouts, the two directions of `lb_common::Nat4Key`)
//! is written once, generic over the key ([`NatKey`]). IPv6's runs in `lb_xdp_nat6`, which
//! `lb_xdp_ingress6` tail-calls (ingress.rs): inline, the NAT would take `lb_xdp_ingress6`
//! past the 512 bytes of stack. IPv6 has no header checksum: every address and port change
//! is in the TCP or UDP checksum (pseudo-header).
//!
//! ICMP errors about NATed flows are icmp.rs's. Counters: `lb_common::NatEvent`.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{
    Addr6, Ct4Key, Ct6Key, NAT_F_CLOSING, NAT_IN, NAT_OUT, Nat4Entry, Nat4Key, Nat6Entry, Nat6Key,
    NatEvent, PROTO_TCP, PROTO_UDP, Reason, csum, flow_hash, flow_hash6, nat,
};

use crate::{
    counters::count,
    flow::EEXIST,
    frame::Bytes,
    headers::{
        IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF, L4_OFF, L4_OFF6,
        l4,
    },
    maps::{LB_NAT4_V1, LB_NAT6_V1},
    parse::{L4, parse_ipv4, parse_ipv6},
    route::{route4, route6, send4, send6},
};

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
nat_table!(Nat4Key, Nat4Entry, u32, LB_NAT4_V1);
nat_table!(Nat6Key, Nat6Entry, Addr6, LB_NAT6_V1);

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
                count(NatEvent::Allocated);
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
                count(NatEvent::Allocated);
                count(NatEvent::ReusedExpired);
                return Some(port);
            }
        }
        count(NatEvent::PortTaken);
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
                        count(NatEvent::PortLost);
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
                        count(NatEvent::PortLost);
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
        count(NatEvent::Exhausted);
        return None;
    };
    let mut out = flow.out_value;
    out.set_port(port);
    if map.insert(&flow.out_key, &out, BPF_ANY as u64).is_err() {
        // The reply entry stands; this flow allocates again on its next packet.
        count(Reason::CtInsertFailed);
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
pub(crate) fn forward4(
    ctx: &XdpContext,
    key: &Ct4Key,
    l4: &L4,
    backend_addr: u32,
    backend_port: u16,
) -> u32 {
    let Some(route) = route4(ctx, key.saddr, backend_addr, key.proto, BPF_FIB_LOOKUP_SRC) else {
        count(NatEvent::NoRoute);
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
    if rewrite4(ctx, key.proto, false, route.src, port).is_none() {
        return xdp_action::XDP_DROP;
    }
    send4(ctx, &route)
}

/// A packet that is not for a frontend: a remote backend's reply to a NAT port, translated
/// back (destination: the client; source: the frontend) and sent to the client. `None`: not
/// ours.
#[inline(always)]
pub(crate) fn reply4(ctx: &XdpContext) -> Option<u32> {
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
    let Some(route) = route4(ctx, entry.peer_addr, entry.addr, key.proto, 0) else {
        count(NatEvent::NoRoute);
        return Some(xdp_action::XDP_DROP);
    };
    if rewrite4(ctx, key.proto, true, entry.addr, entry.port).is_none()
        || rewrite4(ctx, key.proto, false, entry.peer_addr, entry.peer_port).is_none()
    {
        return Some(xdp_action::XDP_DROP);
    }
    count(NatEvent::Replies);
    Some(send4(ctx, &route))
}

/// Source NAT and forwarding of a packet of `key`'s flow (client and frontend) whose
/// destination was just rewritten to the remote IPv6 backend.
#[inline(always)]
pub(crate) fn forward6(
    ctx: &XdpContext,
    key: &Ct6Key,
    closing: bool,
    backend_addr: Addr6,
    backend_port: u16,
) -> u32 {
    let Some(route) = route6(ctx, key.saddr, backend_addr, key.proto, BPF_FIB_LOOKUP_SRC) else {
        count(NatEvent::NoRoute);
        return xdp_action::XDP_DROP;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = if closing { NAT_F_CLOSING } else { 0 };
    let mut flow = NatFlow {
        out_key: Nat6Key {
            saddr: key.saddr,
            daddr: key.daddr,
            sport: key.sport,
            dport: key.dport,
            proto: key.proto,
            dir: NAT_OUT,
            _pad: [0; 2],
        },
        in_key: Nat6Key {
            saddr: backend_addr,
            daddr: route.src,
            sport: backend_port,
            dport: 0,
            proto: key.proto,
            dir: NAT_IN,
            _pad: [0; 2],
        },
        in_value: Nat6Entry {
            addr: key.saddr,
            port: key.sport,
            flags,
            peer_addr: key.daddr,
            peer_port: key.dport,
            _pad: 0,
            last_seen_ns: now,
        },
        out_value: Nat6Entry {
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
    let hash = || flow_hash6(key.saddr, key.daddr, key.sport, key.dport, key.proto);
    let Some(port) = nat_port(&mut flow, hash) else {
        return xdp_action::XDP_DROP;
    };
    if rewrite6(ctx, key.proto, false, route.src, port).is_none() {
        return xdp_action::XDP_DROP;
    }
    send6(ctx, &route)
}

/// An IPv6 packet that is not for a frontend: a remote backend's reply to a NAT port,
/// translated back and sent to the client. `None`: not ours.
#[inline(always)]
pub(crate) fn reply6(ctx: &XdpContext) -> Option<u32> {
    let pkt = parse_ipv6(ctx).ok()?;
    // Only ports of the NAT range are ever allocated (as for IPv4).
    if !(nat::PORT_MIN..=nat::PORT_MAX).contains(&u16::from_be(pkt.l4.dport)) {
        return None;
    }
    let key = Nat6Key {
        saddr: ctx.get(IPV6_SADDR_OFF)?,
        daddr: ctx.get(IPV6_DADDR_OFF)?,
        sport: pkt.l4.sport,
        dport: pkt.l4.dport,
        proto: pkt.proto,
        dir: NAT_IN,
        _pad: [0; 2],
    };
    let entry = reply_entry(&key, pkt.l4.closing)?;
    let Some(route) = route6(ctx, entry.peer_addr, entry.addr, key.proto, 0) else {
        count(NatEvent::NoRoute);
        return Some(xdp_action::XDP_DROP);
    };
    if rewrite6(ctx, key.proto, true, entry.addr, entry.port).is_none()
        || rewrite6(ctx, key.proto, false, entry.peer_addr, entry.peer_port).is_none()
    {
        return Some(xdp_action::XDP_DROP);
    }
    count(NatEvent::Replies);
    Some(send6(ctx, &route))
}

/// Replaces the source or destination address and port of the TCP/UDP packet, with
/// incremental checksums (a zero UDP checksum stays zero).
#[inline(always)]
fn rewrite4<P: Bytes>(p: &P, proto: u8, dest: bool, addr: u32, port: u16) -> Option<()> {
    let (addr_off, port_off) = if dest {
        (IP_DADDR_OFF, L4_OFF + l4::DPORT)
    } else {
        (IP_SADDR_OFF, L4_OFF + l4::SPORT)
    };
    let check_off = L4_OFF + l4::check(proto);
    let old_addr: u32 = p.get(addr_off)?;
    let old_port: u16 = p.get(port_off)?;
    let ip_check: u16 = p.get(IP_CHECK_OFF)?;
    p.set(IP_CHECK_OFF, csum::replace4(ip_check, old_addr, addr))?;
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

/// Replaces the source or destination address and port of the TCP/UDP packet, with an
/// incremental transport checksum.
#[inline(always)]
fn rewrite6<P: Bytes>(p: &P, proto: u8, dest: bool, addr: Addr6, port: u16) -> Option<()> {
    let (addr_off, port_off) = if dest {
        (IPV6_DADDR_OFF, L4_OFF6 + l4::DPORT)
    } else {
        (IPV6_SADDR_OFF, L4_OFF6 + l4::SPORT)
    };
    let check_off = L4_OFF6 + l4::check(proto);
    let old_addr: Addr6 = p.get(addr_off)?;
    let old_port: u16 = p.get(port_off)?;
    let check: u16 = p.get(check_off)?;
    let new = csum::replace16_2(check, old_addr, addr, old_port, port);
    // A UDP checksum that comes out as 0 is sent as all ones (RFC 8200 8.1).
    let new = if proto == PROTO_UDP && new == 0 {
        0xffff
    } else {
        new
    };
    p.set(check_off, new)?;
    p.set(addr_off, addr)?;
    p.set(port_off, port)
}
