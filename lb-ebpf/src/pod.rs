//! TC ingress on the pods' host-side interfaces: east-west translation of the packets the
//! socket hooks did not see (a process outside the hooked cgroup, a pod with its own
//! network stack), by the same rules as XDP on the external interface.
//!
//! A packet a pod sends is, in this order: the reply of a translated flow (its source is a
//! backend of a conntrack reply entry: rewritten to come from the frontend, as the external
//! interface's TC egress does, then sent out of the interface of the route to the client,
//! `route::redirect_reply`: from the pod's side, the host would drop a reply from its own
//! address as a martian), or addressed to a frontend (translated to a backend as XDP
//! does, with the skb checksum helpers because a pod's packets are often CHECKSUM_PARTIAL),
//! or neither (passed untouched). A pod's new flow to an externalTrafficPolicy Local
//! frontend selects from its Service's cluster frontend (`select::short_circuit`), as
//! kube-proxy's "short-circuit pod traffic" rule does.
//!
//! The rules are written once for both families; IPv6 frames go on to
//! `lb_tc_pod_in6` by a tail call, which applies them with the IPv6 maps (with the
//! IPv6 code in it, the IPv4 program was over the stack limit).
//!
//! Hairpin: a pod whose flow to a frontend was given the pod itself as its backend would
//! receive a packet from its own address, which it drops. Such packets get
//! `lb_common::HAIRPIN_ADDR` (`HAIRPIN_ADDR6`) as their source; the pod's replies to it get
//! the pod's address back as their destination before the reverse translation.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{CT_REPLY, Event, FlowKey, PROTO_TCP, Reason, V4, V6, tc_prog_slot};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    counters::count,
    egress::{try_egress4, try_egress6},
    family::Datapath,
    flow::{Translation, translation},
    frame::ptr_at,
    headers::{ETH_LEN, ETH_P_IPV6, IPV6_NEXT_HDR_OFF, PROTO_ICMPV6, l4},
    maps::LB_TCPROGS_V1,
    route::redirect_reply,
    skb::{Pull, l4_check_off, l4_mangled, replace_port},
    verdict::Verdict,
};

/// `lb_tc_pod_in`: IPv4. IPv6 frames go on to `lb_tc_pod_in6` (the tail call does
/// not return); while that program's slot is empty they are passed, counted. (The IPv4
/// program holds no IPv6 code: with it, it was over the stack limit.)
#[inline(always)]
pub(crate) fn try_pod_ingress(ctx: &TcContext) -> Result<i32, Verdict> {
    let ipv6 = ptr_at::<_, EthHdr>(ctx, 0)
        .is_some_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV6);
    if ipv6 {
        unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::POD_INGRESS6) };
        return Err(Verdict::Pass(Reason::Ipv6ProgramMissing));
    }
    pod_ingress::<V4>(ctx, |ctx| try_egress4(ctx, Pull::Done))
}

/// `lb_tc_pod_in6`: an IPv6 frame.
#[inline(always)]
pub(crate) fn try_pod_ingress6(ctx: &TcContext) -> Result<i32, Verdict> {
    // An ICMPv6 error (from a backend pod about a flow a frontend gave it) is
    // `lb_tc_egress`'s to rewrite, by a tail call: with that code this program is over the
    // stack limit.
    if ctx.load::<u8>(IPV6_NEXT_HDR_OFF) == Ok(PROTO_ICMPV6) {
        unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::EGRESS) };
        return Err(Verdict::Pass(Reason::Ipv6ProgramMissing));
    }
    pod_ingress::<V6>(ctx, |ctx| try_egress6(ctx, false, Pull::Done))
}

/// The rules for a packet a pod sends, either family: the reply of a translated flow (by
/// `reply`, after undoing a hairpin; then redirected towards the client), else a packet to
/// a frontend, translated with the skb helpers (a pod's packets are often
/// CHECKSUM_PARTIAL), else passed. The TC action.
#[inline(always)]
fn pod_ingress<F: Datapath>(
    ctx: &TcContext,
    reply: impl FnOnce(&TcContext) -> Result<(), Verdict>,
) -> Result<i32, Verdict> {
    // The headers the parser and `reply` read in place must be in the linear part; a
    // shorter packet fails their bounds checks and is passed, counted.
    let _ = ctx.pull_data((F::L4_OFF + TcpHdr::LEN) as u32);
    unhairpin::<F>(ctx)?;
    match reply(ctx) {
        Ok(()) => return Ok(redirect_reply::<F>(ctx)),
        // Not a reply.
        Err(Verdict::NotOurs) => {}
        Err(verdict) => return Err(verdict),
    }
    forget_stale_reply::<F>(ctx);
    // A pod on this node: short-circuited frontends use their cluster frontend's backends.
    let Translation { pkt, key, flow } = translation::<F, _>(ctx, true)?;
    // The packet pointers are not used past the first helper call, which invalidates them.
    let (proto, dport) = (pkt.proto, pkt.l4.dport);
    let check_off = F::L4_OFF + l4::check(proto);
    let mangled = l4_mangled(proto);
    F::skb_set_addr(
        ctx,
        F::DADDR_OFF,
        key.daddr(),
        flow.addr,
        check_off,
        mangled,
    )?;
    replace_port(
        ctx,
        F::L4_OFF + l4::DPORT,
        dport,
        flow.port,
        check_off,
        mangled,
    )?;
    if flow.addr == key.saddr() {
        F::skb_set_addr(
            ctx,
            F::SADDR_OFF,
            key.saddr(),
            F::HAIRPIN,
            check_off,
            mangled,
        )?;
    }
    flow.count(ctx.len() as u64);
    Ok(TC_ACT_OK)
}

/// A hairpinned pod's reply to the hairpin address (`HAIRPIN_ADDR`, `HAIRPIN_ADDR6`) goes
/// to the pod's own address again, which makes it the reply conntrack knows.
#[inline(always)]
fn unhairpin<F: Datapath>(ctx: &TcContext) -> Result<(), Verdict> {
    let Ok(ip) = ctx.load::<F::Header>(ETH_LEN) else {
        return Ok(());
    };
    if !F::plain(&ip) {
        return Ok(());
    }
    let daddr = F::copy_daddr(&ip);
    if daddr != F::HAIRPIN {
        return Ok(());
    }
    let proto = F::proto(&ip);
    let Some(check_off) = l4_check_off(F::L4_OFF, proto) else {
        return Ok(());
    };
    let mangled = l4_mangled(proto);
    F::skb_set_addr(
        ctx,
        F::DADDR_OFF,
        daddr,
        F::copy_saddr(&ip),
        check_off,
        mangled,
    )
}

/// A TCP SYN from a pod opens a new connection on its tuple. A reply entry an earlier
/// translated flow left for the same tuple (the pod's source port reused for a connection
/// straight to that backend, e.g. one the socket hooks translated) would rewrite the new
/// connection's replies: it goes.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the verifier walks 10 more instructions of lb_tc_pod_in6 (maps.rs)"
)]
fn forget_stale_reply<F: Datapath>(ctx: &TcContext) {
    let Ok(ip) = ctx.load::<F::Header>(ETH_LEN) else {
        return;
    };
    if !F::plain(&ip) || F::proto(&ip) != PROTO_TCP {
        return;
    }
    let (Ok(ports), Ok(flags)) = (
        ctx.load::<[u16; 2]>(F::L4_OFF),
        ctx.load::<u8>(F::L4_OFF + l4::TCP_FLAGS),
    ) else {
        return;
    };
    if flags & (l4::TCP_SYN | l4::TCP_ACK) != l4::TCP_SYN {
        return;
    }
    let (saddr, daddr) = (F::copy_saddr(&ip), F::copy_daddr(&ip));
    let reply = F::CtKey::new(daddr, saddr, ports[1], ports[0], PROTO_TCP, CT_REPLY);
    if F::conntrack().remove(&reply).is_ok() {
        count(Event::CtDeletes);
    }
}
