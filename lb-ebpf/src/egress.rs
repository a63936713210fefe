//! TC egress on the node's external interface: the replies of translated flows leave as if
//! they came from the frontend the client addressed, by the flow's conntrack reply entry
//! (and ICMP errors about such flows, icmp.rs). The headers are read and written in place,
//! in the skb's linear part (`skb::linear`). Everything else is not ours: passed
//! untouched and uncounted, as it is all the node's other traffic. The pod interfaces'
//! program (pod.rs) applies the same rules to what pods send.

use aya_ebpf::programs::TcContext;
use lb_common::{CT_REPLY, FlowKey, V4, V6};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    family::Datapath,
    flow::reply_frontend,
    frame::ptr_at,
    headers::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, L4_OFF, L4_OFF6, PROTO_ICMP, PROTO_ICMPV6, l4,
    },
    icmp::{local_icmp, local_icmp6},
    skb::{Pull, REWRITE_FAILED, l4_check_off, l4_mangled, linear},
    verdict::Verdict,
};

/// TC egress of either family.
#[inline(always)]
pub(crate) fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    if linear(ctx, ETH_LEN, Pull::Missing) && ether_type(ctx) == Some(ETH_P_IPV6) {
        return try_egress6(ctx, true, Pull::Missing);
    }
    try_egress4(ctx, Pull::Missing)
}

/// The frame's ethertype, host order, when its linear part holds it.
#[inline(always)]
fn ether_type(ctx: &TcContext) -> Option<u16> {
    ptr_at::<_, u16>(ctx, ETH_TYPE_OFF).map(|t| u16::from_be(unsafe { *t }))
}

/// TC egress of an IPv4 frame (anything else is [`Verdict::NotOurs`]): the pod interfaces'
/// program calls it alone, its IPv6 frames going to their own program. `pull`: how its
/// headers get into the linear part.
#[inline(always)]
pub(crate) fn try_egress4(ctx: &TcContext, pull: Pull) -> Result<(), Verdict> {
    // The transport ports included (a shorter frame is no reply of a translated flow, nor
    // an ICMP error about one).
    if !linear(ctx, L4_OFF + 4, pull) || ether_type(ctx) != Some(ETH_P_IP) {
        return Err(Verdict::NotOurs);
    }
    let ip: Ipv4Hdr = unsafe { *ptr_at(ctx, ETH_LEN).ok_or(Verdict::NotOurs)? };
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
/// `icmp`, also an ICMPv6 error about such a flow ([`local_icmp6`]). `pull`: how its headers
/// get into the linear part.
#[inline(always)]
pub(crate) fn try_egress6(ctx: &TcContext, icmp: bool, pull: Pull) -> Result<(), Verdict> {
    if !linear(ctx, L4_OFF6 + 4, pull) {
        return Err(Verdict::NotOurs);
    }
    let ip = ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN).ok_or(Verdict::NotOurs)?;
    if !V6::plain(unsafe { &*ip }) {
        return Err(Verdict::NotOurs);
    }
    let (saddr, proto) = (V6::saddr(ip), unsafe { (*ip).next_hdr });
    if icmp && proto == PROTO_ICMPV6 {
        return local_icmp6(ctx, saddr);
    }
    reply::<V6>(ctx, saddr, V6::daddr(ip), proto)
}

/// A reply of a translated flow (its addresses and protocol; the skb's linear part holds
/// its ports) leaves as if it came from the frontend, by the flow's conntrack reply entry.
/// [`Verdict::NotOurs`] when it is not one.
///
/// The source address and port (and IPv4's header checksum, which is never offloaded) are
/// written in place; the transport checksum by the kernel's helper, twice (the address in
/// the pseudo-header, then the port): only the helper knows the skb's checksum state, and
/// under CHECKSUM_PARTIAL (what a pod or a local sender hands over) the checksum field holds
/// the pseudo-header's sum alone, which an address change enters with the other sign and a
/// port change not at all.
#[inline(always)]
fn reply<F: Datapath>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    proto: u8,
) -> Result<(), Verdict> {
    let check_off = l4_check_off(F::L4_OFF, proto).ok_or(Verdict::NotOurs)?;
    let ports: [u16; 2] = unsafe { *ptr_at(ctx, F::L4_OFF).ok_or(Verdict::NotOurs)? };
    let key = F::CtKey::new(saddr, daddr, ports[0], ports[1], proto, CT_REPLY);
    let (addr, port) = reply_frontend::<F>(&key)?;
    let ip = ptr_at::<_, F::Header>(ctx, ETH_LEN).ok_or(Verdict::NotOurs)?;
    let sport = ptr_at::<_, u16>(ctx, F::L4_OFF + l4::SPORT).ok_or(Verdict::NotOurs)?;
    F::set_saddr(ip, saddr, addr);
    unsafe { *sport = port };
    let mangled = l4_mangled(proto);
    F::skb_pseudo_csum(ctx, check_off, saddr, addr, mangled)?;
    ctx.l4_csum_replace(check_off, ports[0] as u64, port as u64, mangled | 2)
        .map_err(|_| REWRITE_FAILED)
}
