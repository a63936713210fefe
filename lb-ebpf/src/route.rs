//! Sending a translated packet on by XDP, as the kernel would forward it: the FIB lookup
//! gives the interface and the MAC addresses (XDP_TX when it leaves by the interface it came
//! in by, else a redirect). While the next hop's neighbour entry is unresolved the packet
//! goes to the kernel, which forwards it and resolves the neighbour (its source is this
//! node's own address: the agent sets `accept_local` on the interface for that).

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Addr6, NatEvent, csum};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{counters::count, frame::ptr_at, headers::ETH_LEN};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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
    fn with_src<A>(self, src: A) -> Route<A> {
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
pub(crate) fn route4(
    ctx: &XdpContext,
    src: u32,
    dst: u32,
    proto: u8,
    flags: u32,
) -> Option<Route<u32>> {
    fib_route(ctx, AF_INET, proto, flags, |params| {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    })
    .map(|(route, params)| route.with_src(unsafe { params.__bindgen_anon_3.ipv4_src }))
}

/// The IPv6 route of a packet from `src` to `dst` that arrived on this XDP interface, as
/// the kernel would forward it; `None` when it would not.
#[inline(always)]
pub(crate) fn route6(
    ctx: &XdpContext,
    src: Addr6,
    dst: Addr6,
    proto: u8,
    flags: u32,
) -> Option<Route<Addr6>> {
    fib_route(ctx, AF_INET6, proto, flags, |params| {
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    })
    .map(|(route, params)| route.with_src(unsafe { params.__bindgen_anon_3.ipv6_src }))
}

/// The FIB lookup of either family: `set` writes the addresses into the parameters; the
/// route comes back with the parameters, whose source address the lookup may have filled.
/// `tot_len` stays 0: no MTU check (a packet that fit the way in fits a way out of the same
/// MTU).
#[inline(always)]
fn fib_route(
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

/// Sends a translated IPv4 packet along `route`: new MAC addresses and TTL, then XDP_TX or
/// a redirect; unresolved, to the kernel as it is. A packet whose TTL runs out is dropped.
#[inline(always)]
pub(crate) fn send4(ctx: &XdpContext, route: &Route<u32>) -> u32 {
    if !route.resolved {
        count(NatEvent::NoNeigh);
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

/// Sends a translated IPv6 packet along `route`: one hop less, new MAC addresses, XDP_TX or
/// a redirect; unresolved, to the kernel as it is. One whose hop limit runs out is dropped.
#[inline(always)]
pub(crate) fn send6(ctx: &XdpContext, route: &Route<Addr6>) -> u32 {
    if !route.resolved {
        count(NatEvent::NoNeigh);
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

/// The last step of sending a resolved packet of either family along `route`: its MAC
/// addresses, then XDP_TX out of the interface it came in by, or a redirect.
#[inline(always)]
fn transmit<A>(ctx: &XdpContext, route: &Route<A>) -> u32 {
    let Some(eth) = ptr_at::<_, EthHdr>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    unsafe {
        (*eth).dst_addr = route.dmac;
        (*eth).src_addr = route.smac;
    }
    if route.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        count(NatEvent::Tx);
        xdp_action::XDP_TX
    } else {
        count(NatEvent::Redirect);
        unsafe { bpf_redirect(route.ifindex, 0) as u32 }
    }
}
