//! TC egress on the node's external interface: the replies of translated flows leave as if
//! they came from the frontend the client addressed, by the flow's conntrack reply entry
//! (and ICMP errors about such flows, icmp.rs). Everything else is not ours: passed
//! untouched and uncounted, as it is all the node's other traffic. The pod interfaces'
//! program (pod.rs) applies the same rules to what pods send.

use aya_ebpf::programs::TcContext;
use lb_common::{CT_REPLY, FlowKey, V4, V6};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    family::Datapath,
    flow::reply_frontend,
    headers::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, PROTO_ICMP, PROTO_ICMPV6, l4},
    icmp::{local_icmp, local_icmp6},
    skb::{l4_check_off, l4_mangled, replace_port},
    verdict::Verdict,
};

/// TC egress of either family.
#[inline(always)]
pub(crate) fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF).map_err(|_| Verdict::NotOurs)?;
    if u16::from_be(ether_type) == ETH_P_IPV6 {
        return try_egress6(ctx, true);
    }
    try_egress4(ctx)
}

/// TC egress of an IPv4 frame (anything else is [`Verdict::NotOurs`]): the pod interfaces'
/// program calls it alone, its IPv6 frames going to their own program.
#[inline(always)]
pub(crate) fn try_egress4(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF).map_err(|_| Verdict::NotOurs)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return Err(Verdict::NotOurs);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| Verdict::NotOurs)?;
    // Only the shapes that ingress translates can be replies of a translated flow.
    if !V4::plain(&ip) {
        return Err(Verdict::NotOurs);
    }
    if ip.proto == PROTO_ICMP {
        // An ICMP error from a local backend about a translated flow (icmp.rs).
        return local_icmp(ctx);
    }
    reply::<V4>(ctx, V4::copy_saddr(&ip), V4::copy_daddr(&ip), ip.proto)
}

/// TC egress of an IPv6 frame ([`try_egress`] calls it): a reply of a translated flow; with
/// `icmp`, also an ICMPv6 error about such a flow ([`local_icmp6`]).
#[inline(always)]
pub(crate) fn try_egress6(ctx: &TcContext, icmp: bool) -> Result<(), Verdict> {
    let ip: Ipv6Hdr = ctx.load(ETH_LEN).map_err(|_| Verdict::NotOurs)?;
    if !V6::plain(&ip) {
        return Err(Verdict::NotOurs);
    }
    if icmp && ip.next_hdr == PROTO_ICMPV6 {
        return local_icmp6(ctx, V6::copy_saddr(&ip));
    }
    reply::<V6>(ctx, V6::copy_saddr(&ip), V6::copy_daddr(&ip), ip.next_hdr)
}

/// A reply of a translated flow (its addresses and protocol) leaves as if it came from the
/// frontend, by the flow's conntrack reply entry: source address and port rewritten with
/// the skb helpers. [`Verdict::NotOurs`] when it is not one.
#[inline(always)]
fn reply<F: Datapath>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    proto: u8,
) -> Result<(), Verdict> {
    let check_off = l4_check_off(F::L4_OFF, proto).ok_or(Verdict::NotOurs)?;
    let ports: [u16; 2] = ctx.load(F::L4_OFF).map_err(|_| Verdict::NotOurs)?;
    let key = F::CtKey::new(saddr, daddr, ports[0], ports[1], proto, CT_REPLY);
    let (addr, port) = reply_frontend::<F>(&key)?;
    let mangled = l4_mangled(proto);
    F::skb_set_addr(ctx, F::SADDR_OFF, saddr, addr, check_off, mangled)?;
    replace_port(
        ctx,
        F::L4_OFF + l4::SPORT,
        ports[0],
        port,
        check_off,
        mangled,
    )
}
