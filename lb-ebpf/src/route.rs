//! Sending a translated packet on by XDP, as the kernel would forward it: the FIB lookup
//! gives the interface and the MAC addresses (XDP_TX when it leaves by the interface it came
//! in by, else a redirect). While the next hop's neighbour entry is unresolved the packet
//! goes to the kernel, which forwards it and resolves the neighbour (its source is this
//! node's own address: the agent sets `accept_local` on the interface for that, when it can).
//!
//! And on TC, [`redirect_reply`]: a reply a pod's interface translated is sent out of the
//! interface of the route to the client by the kernel's neighbour code, not handed to the
//! host's IP stack from the pod's side (a bridge such as the bridge CNI's `cni0`), where a
//! reply that now comes from the node's own address (a NodePort's) is dropped as a martian
//! source, and one from a ClusterIP fails a strict reverse-path filter. Both families; the
//! lookup's parameters are in a per-CPU map value (`LB_FIBSCR_V1`), not on the stack, which
//! in IPv6's pod program has no room for them.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, generated::bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use lb_common::NatEvent;
use network_types::eth::EthHdr;

use crate::{
    counters::count, family::Datapath, frame::ptr_at, headers::ETH_LEN, maps::LB_FIBSCR_V1,
};

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

/// The route of a packet from `src` to `dst` that arrived on this XDP interface, as the
/// kernel would forward it; `None` when it would not (no route, forwarding off, ...). The
/// route's source address is the one the lookup chose with `BPF_FIB_LOOKUP_SRC` in
/// `flags`, else `src`.
#[inline(always)]
pub(crate) fn route<F: Datapath>(
    ctx: &XdpContext,
    src: F::Addr,
    dst: F::Addr,
    proto: u8,
    flags: u32,
) -> Option<Route<F::Addr>> {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = F::AF;
    params.l4_protocol = proto;
    params.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    F::set_fib_addrs(&mut params, src, dst);
    let resolved = fib_lookup_in(ctx, &mut params, flags)?;
    Some(Route {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
        src: F::fib_src(&params),
        resolved,
    })
}

/// The FIB lookup (`params` filled in and written back by the kernel). `tot_len` stays 0:
/// no MTU check (a packet that fit the way in fits a way out of the same MTU). Whether the
/// next hop's MAC address is known; `None` when the kernel would not forward the packet.
#[inline(always)]
fn fib_lookup_in(ctx: &XdpContext, params: &mut bpf_fib_lookup, flags: u32) -> Option<bool> {
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    let rc = unsafe { fib_lookup(ctx.ctx.cast(), params, size, flags) } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    Some(rc == BPF_FIB_LKUP_RET_SUCCESS)
}

/// Sends a translated packet along `route`: one hop less (`Datapath::hop`), new MAC
/// addresses, then XDP_TX or a redirect; unresolved, to the kernel as it is. A packet whose
/// TTL or hop limit runs out is dropped.
#[inline(always)]
pub(crate) fn send<F: Datapath>(ctx: &XdpContext, route: &Route<F::Addr>) -> u32 {
    if !route.resolved {
        count(NatEvent::NoNeigh);
        return xdp_action::XDP_PASS;
    }
    if !F::hop(ctx) {
        return xdp_action::XDP_DROP;
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

/// TC, a pod's interface: a reply just translated (to come from its frontend) leaves by the
/// interface of the kernel's route to its destination, through `bpf_redirect_neigh` (which
/// fills in the MAC addresses and resolves the next hop when needed), so that it never
/// enters the host's IP stack on the pods' side (see the [module](self)). `TC_ACT_OK` (the
/// kernel forwards it, as before) when the kernel would not forward it: no route, a local
/// destination, forwarding off.
#[inline(always)]
pub(crate) fn redirect_reply<F: Datapath>(ctx: &TcContext) -> i32 {
    const _: () = assert!(
        core::mem::size_of::<bpf_fib_lookup>() == core::mem::size_of::<lb_common::FibScratch>()
            && core::mem::align_of::<bpf_fib_lookup>()
                <= core::mem::align_of::<lb_common::FibScratch>()
    );
    let Ok(ip) = ctx.load::<F::Header>(ETH_LEN) else {
        return TC_ACT_OK;
    };
    // The parameters live in a per-CPU map value, not on the stack: IPv6's pod program
    // has no room for them there.
    let Some(scratch) = LB_FIBSCR_V1.get_ptr_mut(0) else {
        return TC_ACT_OK;
    };
    // SAFETY: this CPU's value of a per-CPU array (no other writer during this run), as
    // large as `bpf_fib_lookup` and aligned for it (asserted above); zeroed before use.
    let params = unsafe {
        let params = scratch.cast::<bpf_fib_lookup>();
        params.write_bytes(0, 1);
        &mut *params
    };
    params.family = F::AF;
    params.l4_protocol = F::proto(&ip);
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    F::set_fib_addrs(params, F::copy_saddr(&ip), F::copy_daddr(&ip));
    let size = core::mem::size_of::<bpf_fib_lookup>() as i32;
    let rc = unsafe { fib_lookup(ctx.as_ptr(), params, size, 0) } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return TC_ACT_OK;
    }
    count(NatEvent::Redirect);
    unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
