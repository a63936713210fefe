//! IPv6 remote backends: `lb_xdp_nat6`, the source NAT of nat.rs for `lb_xdp_ingress6`,
//! which tail-calls it (slot `lb_common::prog_slot::XDP_NAT6`) with the packet's flow in
//! `LB_NAT6PEND_V1` (`lb_common::Nat6Pending`): inline, the NAT would take
//! `lb_xdp_ingress6` past the 512 bytes of stack. The IPv6 NAT table (`lb_common::Nat6Key`)
//! has IPv4's port allocation, timeouts and counters (`lb_common::nat`,
//! `lb_common::nat_event`; the table logic is nat.rs's, generic over the key).
//!
//! - [`forward`]: a flow whose backend is on another node leaves with this node's address
//!   (the one the kernel's IPv6 route to the backend prefers) and a NAT port, sent on by XDP
//!   after a FIB lookup (to the kernel while the neighbour is unresolved).
//! - [`reply`]: a packet from a remote backend to a NAT port is translated back (destination:
//!   the client; source: the frontend) and sent towards the client.
//! - [`icmp`]: an ICMPv6 error (destination unreachable, packet too big, time exceeded,
//!   parameter problem) about a NATed flow, rewritten to be about the packet the client
//!   sent (to the frontend) and sent to the client. ICMPv6's checksum covers a
//!   pseudo-header: the outer addresses are in it too. It is `lb_xdp_icmp6`, a program of
//!   its own (slot `lb_common::prog_slot::XDP_ICMP6`), for the stack.
//!
//! IPv6 has no header checksum: every address and port change is in the TCP or UDP checksum
//! (pseudo-header). The hop limit goes down by one, as the kernel's forwarding would do.

use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_SRC, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Addr6, Ct6Key, NAT_F_CLOSING, NAT_IN, NAT_OUT, NAT6_FORWARD, NAT6_REPLY, Nat6Entry, Nat6Key,
    Nat6Pending, PROTO_TCP, PROTO_UDP, capacity, csum, flow_hash6, nat, nat_event, prog_slot,
    reason,
};
use network_types::ip::Ipv6Hdr;

use crate::{
    ETH_LEN, LB_PROGS_V2, TCP_CHECK_OFF, UDP_CHECK_OFF, count,
    nat::{
        Bytes, NatEntry, NatFlow, NatKey, Route, fib_route, nat_port, nat_table, note, reply_entry,
        transmit,
    },
    ptr_at,
    v6::{L4_OFF6, parse_ipv6},
};

#[map]
static LB_NAT6_V1: LruHashMap<Nat6Key, Nat6Entry> = LruHashMap::pinned(capacity::NAT, 0);
#[map]
static LB_NAT6PEND_V1: PerCpuArray<Nat6Pending> = PerCpuArray::pinned(1, 0);

nat_table!(Nat6Key, Nat6Entry, Addr6, LB_NAT6_V1);

const AF_INET6: u8 = 10;
pub(crate) const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem.
pub(crate) const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
/// Offsets in an ICMPv6 error: its checksum, the quoted IPv6 header, the quoted ports.
const ICMP_CHECK_OFF: usize = L4_OFF6 + 2;
const INNER_IP_OFF: usize = L4_OFF6 + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + Ipv6Hdr::LEN;
/// Offsets of the addresses in the frame.
const SADDR_OFF: usize = ETH_LEN + 8;
const DADDR_OFF: usize = ETH_LEN + 24;

/// The IPv6 route of a packet from `src` to `dst` that arrived on this XDP interface, as
/// the kernel would forward it; `None` when it would not.
#[inline(always)]
fn route(ctx: &XdpContext, src: Addr6, dst: Addr6, proto: u8, flags: u32) -> Option<Route<Addr6>> {
    fib_route(ctx, AF_INET6, proto, flags, |params| {
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    })
    .map(|(route, params)| route.with_src(unsafe { params.__bindgen_anon_3.ipv6_src }))
}

/// Sends a translated IPv6 packet along `route`: one hop less, new MAC addresses, XDP_TX or
/// a redirect; unresolved, to the kernel as it is. One whose hop limit runs out is dropped.
#[inline(always)]
fn send(ctx: &XdpContext, route: &Route<Addr6>) -> u32 {
    if !route.resolved {
        note(nat_event::NO_NEIGH);
        return xdp_action::XDP_PASS;
    }
    let Some(ip) = ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        let hops = (*ip).hop_limit;
        if hops <= 1 {
            return xdp_action::XDP_DROP;
        }
        (*ip).hop_limit = hops - 1;
    }
    transmit(ctx, route)
}

/// Replaces the source or destination address and port of the TCP/UDP packet, with an
/// incremental transport checksum.
#[inline(always)]
fn rewrite<P: Bytes>(p: &P, proto: u8, dest: bool, addr: Addr6, port: u16) -> Option<()> {
    let (addr_off, port_off) = if dest {
        (DADDR_OFF, L4_OFF6 + 2)
    } else {
        (SADDR_OFF, L4_OFF6)
    };
    let check_off = L4_OFF6
        + if proto == PROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
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

/// Hands the packet to `lb_xdp_nat6` (`kind`: [`NAT6_FORWARD`], with `key`'s flow and its
/// remote backend; [`NAT6_REPLY`]); the tail call does not return. When it does (the slot
/// is empty), the packet is dropped ([`NAT6_FORWARD`]: its destination is rewritten) or
/// passed, and counted.
#[inline(always)]
pub(crate) fn hand_over(
    ctx: &XdpContext,
    kind: u8,
    key: &Ct6Key,
    closing: bool,
    backend_addr: Addr6,
    backend_port: u16,
) -> u32 {
    if let Some(pending) = LB_NAT6PEND_V1.get_ptr_mut(0) {
        unsafe {
            (*pending).kind = kind;
            if kind == NAT6_FORWARD {
                (*pending).key = *key;
                (*pending).backend_addr = backend_addr;
                (*pending).backend_port = backend_port;
                (*pending).closing = closing as u8;
            }
            let _ = LB_PROGS_V2.tail_call(ctx, prog_slot::XDP_NAT6);
        }
    }
    count(reason::NAT6_PROGRAM_MISSING);
    if kind == NAT6_FORWARD {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// XDP for IPv6 remote backends, tail-called by `lb_xdp_ingress6` (see [`hand_over`]).
#[xdp]
pub fn lb_xdp_nat6(ctx: XdpContext) -> u32 {
    let Some(pending) = LB_NAT6PEND_V1.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    let kind = unsafe { (*pending).kind };
    // Read once: a later packet on this CPU writes it again.
    unsafe { (*pending).kind = 0 };
    match kind {
        NAT6_FORWARD => {
            let p = unsafe { &*pending };
            forward(&ctx, &p.key, p.closing != 0, p.backend_addr, p.backend_port)
        }
        NAT6_REPLY => match reply(&ctx) {
            Some(action) => action,
            None => {
                count(reason::NOT_FRONTEND);
                xdp_action::XDP_PASS
            }
        },
        _ => xdp_action::XDP_PASS,
    }
}

/// Source NAT and forwarding of a packet of `key`'s flow (client and frontend) whose
/// destination was just rewritten to the remote IPv6 backend.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    key: &Ct6Key,
    closing: bool,
    backend_addr: Addr6,
    backend_port: u16,
) -> u32 {
    let Some(route) = route(ctx, key.saddr, backend_addr, key.proto, BPF_FIB_LOOKUP_SRC) else {
        note(nat_event::NO_ROUTE);
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
    if rewrite(ctx, key.proto, false, route.src, port).is_none() {
        return xdp_action::XDP_DROP;
    }
    send(ctx, &route)
}

/// An IPv6 packet that is not for a frontend: a remote backend's reply to a NAT port,
/// translated back and sent to the client. `None`: not ours.
#[inline(always)]
fn reply(ctx: &XdpContext) -> Option<u32> {
    let pkt = parse_ipv6(ctx).ok()?;
    // Only ports of the NAT range are ever allocated (as for IPv4).
    if !(nat::PORT_MIN..=nat::PORT_MAX).contains(&u16::from_be(pkt.l4.dport)) {
        return None;
    }
    let key = Nat6Key {
        saddr: ctx.get(SADDR_OFF)?,
        daddr: ctx.get(DADDR_OFF)?,
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

/// Tail-calls `lb_xdp_icmp6` for an ICMPv6 error; when the call returns (the slot is
/// empty), the packet is passed and counted.
#[inline(always)]
pub(crate) fn icmp_hand_over(ctx: &XdpContext) -> u32 {
    let _ = unsafe { LB_PROGS_V2.tail_call(ctx, prog_slot::XDP_ICMP6) };
    count(reason::NAT6_PROGRAM_MISSING);
    xdp_action::XDP_PASS
}

/// XDP for ICMPv6 errors (destination unreachable, packet too big, time exceeded,
/// parameter problem), tail-called by `lb_xdp_ingress6`: see [`icmp`].
#[xdp]
pub fn lb_xdp_icmp6(ctx: XdpContext) -> u32 {
    match icmp(&ctx) {
        Some(action) => action,
        None => {
            count(reason::NOT_TCP_UDP);
            xdp_action::XDP_PASS
        }
    }
}

/// An ICMPv6 error about a flow this node NATed, translated back for the client and sent
/// to it. `None`: not one. Read through packet pointers, not copies: the stack is tight.
#[inline(always)]
fn icmp(ctx: &XdpContext) -> Option<u32> {
    let ip = ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN)?;
    let inner = ptr_at::<_, Ipv6Hdr>(ctx, INNER_IP_OFF)?;
    let icmp_type: u8 = ctx.get(L4_OFF6)?;
    let (outer_next, proto) = unsafe { ((*ip).next_hdr, (*inner).next_hdr) };
    if outer_next != PROTO_ICMPV6
        || !ICMPV6_ERRORS.contains(&icmp_type)
        || !matches!(proto, PROTO_TCP | PROTO_UDP)
    {
        return None;
    }
    let ports: [u16; 2] = ctx.get(INNER_L4_OFF)?;
    let inner_saddr: Addr6 = ctx.get(INNER_IP_OFF + 8)?;
    let inner_daddr: Addr6 = ctx.get(INNER_IP_OFF + 24)?;
    // The quoted packet went from this node's NAT address and port to the backend.
    let key = Nat6Key {
        saddr: inner_daddr,
        daddr: inner_saddr,
        sport: ports[1],
        dport: ports[0],
        proto,
        dir: NAT_IN,
        _pad: [0; 2],
    };
    let entry = LB_NAT6_V1.get_ptr(&key)?;
    let (client, client_port, frontend, frontend_port) = unsafe {
        (
            (*entry).addr,
            (*entry).port,
            (*entry).peer_addr,
            (*entry).peer_port,
        )
    };
    let mut check: u16 = ctx.get(ICMP_CHECK_OFF)?;
    // The quoted transport checksum, when the quote reaches it.
    let l4_check_off = INNER_L4_OFF
        + if proto == PROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
    if let Some(old) = ctx.get::<u16>(l4_check_off)
        && (proto == PROTO_TCP || old != 0)
    {
        let mut new = csum::replace16_2(old, inner_saddr, client, ports[0], client_port);
        new = csum::replace16_2(new, inner_daddr, frontend, ports[1], frontend_port);
        if proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        check = csum::replace2(check, old, new);
        ctx.set(l4_check_off, new)?;
    }
    // The quote (ICMPv6's checksum covers it), then the outer addresses (in its
    // pseudo-header). The outer source becomes the frontend when it is the backend (the
    // backend itself reports); a router on the way keeps its address.
    check = csum::replace16_2(check, inner_saddr, client, ports[0], client_port);
    check = csum::replace16_2(check, inner_daddr, frontend, ports[1], frontend_port);
    ctx.set(INNER_IP_OFF + 8, client)?;
    ctx.set(INNER_IP_OFF + 24, frontend)?;
    ctx.set(INNER_L4_OFF, [client_port, frontend_port])?;
    let outer_saddr: Addr6 = ctx.get(SADDR_OFF)?;
    if outer_saddr == inner_daddr {
        check = csum::replace16(check, outer_saddr, frontend);
        ctx.set(SADDR_OFF, frontend)?;
    }
    let outer_daddr: Addr6 = ctx.get(DADDR_OFF)?;
    check = csum::replace16(check, outer_daddr, client);
    ctx.set(DADDR_OFF, client)?;
    ctx.set(ICMP_CHECK_OFF, check)?;
    let Some(route) = route(ctx, frontend, client, PROTO_ICMPV6, 0) else {
        note(nat_event::NO_ROUTE);
        return Some(xdp_action::XDP_DROP);
    };
    note(nat_event::ICMP_NAT);
    Some(send(ctx, &route))
}
