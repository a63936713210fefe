//! XDP on the node's external interface: packets addressed to a frontend are translated to
//! their flow's backend (destination address and port, with incremental checksums) and
//! passed to the kernel, or, for a backend on another node, source-NATed and sent on
//! (nat.rs), or carried there by direct server return (dsr.rs). Packets that are not for a
//! frontend may be a direct server return carrier (dsr.rs), a remote backend's reply to a
//! NAT port (nat.rs) or an ICMP error about a NATed flow (icmp.rs); everything else passes
//! untouched, counted by reason.
//!
//! IPv6 frames go from `lb_xdp_ingress` to `lb_xdp_ingress6` by a tail call (through
//! `LB_PROGS_V3`, slot `lb_common::prog_slot::XDP_INGRESS6`), which hands a flow to a remote
//! backend to `lb_xdp_nat6` (`lb_xdp_dsr6` for direct server return, dsr.rs) and an ICMPv6
//! error to `lb_xdp_icmp6` by further tail calls:
//! each program has its own 512 bytes of stack, which one program holding all of it would
//! pass. Only a fixed IPv6 header followed directly by TCP or UDP is translated (parse.rs).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    Addr6, CT_FORWARD, Ct4Key, Ct6Key, CtValue, FlowKey, NAT6_DECAP, NAT6_DSR, NAT6_FORWARD,
    NAT6_REPLY, PROTO_UDP, Reason, V4, V6, dsr, nat, prog_slot,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    dsr::{decap, encap},
    family::Datapath,
    flow::{Translation, to_backend, translation},
    frame::ptr_at,
    headers::{ETH_LEN, ETH_P_IPV6, IPV6_NEXT_HDR_OFF, L4_OFF, L4_OFF6, PROTO_ICMPV6, ipv4, l4},
    icmp::{ICMPV6_ERRORS, nat_error4, nat_error6},
    maps::{LB_NAT6PEND_V1, LB_PROGS_V3},
    nat::{forward, reply},
    reject::{reject4, reject6},
    verdict::Verdict,
};

/// `lb_xdp_ingress`: an IPv4 packet to a frontend translated; anything else handed on to
/// whichever program or function it may concern.
#[inline(always)]
pub(crate) fn try_ingress(ctx: &XdpContext) -> Result<u32, Verdict> {
    let why = match translate4(ctx) {
        Err(Verdict::Pass(why)) => why,
        // No endpoint anywhere: kube-proxy's REJECT (reject.rs).
        Err(Verdict::Drop(Reason::Rejected)) => return reject4(ctx),
        done => return done,
    };
    match why {
        // Not IPv4: the IPv6 program's, through a tail call.
        Reason::NotIp => dispatch6(ctx),
        // Maybe a direct server return carrier (dsr.rs), for `lb_xdp_dsr4`: UDP to its
        // port, two loads to tell, as this is the path of most of a node's traffic.
        Reason::NotFrontend
            if ctx_u8(ctx, ETH_LEN + ipv4::PROTO) == Some(PROTO_UDP)
                && ptr_at::<_, u16>(ctx, L4_OFF + l4::DPORT)
                    .is_some_and(|dport| unsafe { *dport } == dsr::PORT.to_be()) =>
        {
            unsafe { LB_PROGS_V3.tail_call(ctx, prog_slot::XDP_DSR4) };
            Err(Verdict::Pass(Reason::Nat6ProgramMissing))
        }
        // Maybe a remote backend's reply (nat.rs).
        Reason::NotFrontend => reply::<V4>(ctx).ok_or(Verdict::Pass(why)),
        // Maybe an ICMP error about a NATed flow (icmp.rs).
        Reason::NotTcpUdp => nat_error4(ctx).ok_or(Verdict::Pass(why)),
        _ => Err(Verdict::Pass(why)),
    }
}

#[inline(always)]
fn translate4(ctx: &XdpContext) -> Result<u32, Verdict> {
    // Traffic from outside: an externalTrafficPolicy Local frontend keeps its local backends.
    let t = translation::<V4, _>(ctx, false)?;
    // A backend on another node by direct server return: carried there by `lb_xdp_dsr4`
    // (dsr.rs), its own program so that the carrier's code and stack weigh on no other
    // path of this one (inline, a packet to no frontend cost 10-15 ns more).
    if t.flow.dsr {
        t.flow.count((ctx.data_end() - ctx.data()) as u64);
        unsafe { LB_PROGS_V3.tail_call(ctx, prog_slot::XDP_DSR4) };
        return Err(Verdict::Drop(Reason::Nat6ProgramMissing));
    }
    rewrite_destination::<V4>(ctx, &t);
    // A backend on another node: source NAT, and sent on by XDP (nat.rs).
    if t.flow.remote {
        return Ok(forward::<V4>(
            ctx,
            &t.key,
            t.pkt.l4.closing,
            t.flow.addr,
            t.flow.port,
        ));
    }
    Ok(xdp_action::XDP_PASS)
}

/// Translates a packet addressed to a frontend (`t`: its translation): destination address
/// and port rewritten to its flow's backend, with incremental checksums; counted.
#[inline(always)]
fn rewrite_destination<F: Datapath>(ctx: &XdpContext, t: &Translation<F>) {
    to_backend::<F>(&t.pkt, t.key.daddr(), t.flow.addr, t.flow.port);
    t.flow.count((ctx.data_end() - ctx.data()) as u64);
}

/// A frame that is not IPv4: an IPv6 frame goes on to `lb_xdp_ingress6` (the tail call
/// does not return); anything else, or an IPv6 frame while that program's slot is empty, is
/// passed and counted.
#[inline(always)]
fn dispatch6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let ipv6 = ptr_at::<_, EthHdr>(ctx, 0)
        .is_some_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV6);
    if !ipv6 {
        return Err(Verdict::Pass(Reason::NotIp));
    }
    unsafe { LB_PROGS_V3.tail_call(ctx, prog_slot::XDP_INGRESS6) };
    Err(Verdict::Pass(Reason::Ipv6ProgramMissing))
}

/// `lb_xdp_ingress6`: an IPv6 packet to a frontend translated; a remote backend's reply and
/// an ICMPv6 error handed on to their programs.
#[inline(always)]
pub(crate) fn try_ingress6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let why = match translate6(ctx) {
        Err(Verdict::Pass(why)) => why,
        Err(Verdict::Drop(Reason::Rejected)) => return reject6(ctx),
        done => return done,
    };
    match why {
        // Maybe a remote backend's reply to a NAT port (nat.rs): only ports of the NAT range
        // are ever allocated.
        Reason::NotFrontend
            if ptr_at::<_, u16>(ctx, L4_OFF6 + l4::DPORT).is_some_and(|dport| {
                let dport = u16::from_be(unsafe { *dport });
                (nat::PORT_MIN..=nat::PORT_MAX).contains(&dport)
            }) =>
        {
            hand_over(ctx, NAT6_REPLY, &NO_FLOW, false, [0; 4], 0)
        }
        // Maybe a direct server return carrier (dsr.rs).
        Reason::NotFrontend
            if ctx_u8(ctx, IPV6_NEXT_HDR_OFF) == Some(PROTO_UDP)
                && ptr_at::<_, u16>(ctx, L4_OFF6 + l4::DPORT)
                    .is_some_and(|dport| unsafe { *dport } == dsr::PORT.to_be()) =>
        {
            hand_over(ctx, NAT6_DECAP, &NO_FLOW, false, [0; 4], 0)
        }
        // An ICMPv6 error, maybe about a NATed flow (icmp.rs).
        Reason::NotTcpUdp
            if ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN)
                .is_some_and(|ip| unsafe { (*ip).next_hdr } == PROTO_ICMPV6)
                && ptr_at::<_, u8>(ctx, L4_OFF6)
                    .is_some_and(|t| ICMPV6_ERRORS.contains(unsafe { &*t })) =>
        {
            unsafe { LB_PROGS_V3.tail_call(ctx, prog_slot::XDP_ICMP6) };
            Err(Verdict::Pass(Reason::Nat6ProgramMissing))
        }
        _ => Err(Verdict::Pass(why)),
    }
}

/// The key [`hand_over`] is given for a packet without a flow.
const NO_FLOW: Ct6Key = Ct6Key {
    saddr: [0; 4],
    daddr: [0; 4],
    sport: 0,
    dport: 0,
    proto: 0,
    dir: 0,
    _pad: [0; 2],
};

/// The byte at frame offset `at`.
#[inline(always)]
fn ctx_u8(ctx: &XdpContext, at: usize) -> Option<u8> {
    ptr_at::<_, u8>(ctx, at).map(|b| unsafe { *b })
}

#[inline(always)]
fn translate6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let t = translation::<V6, _>(ctx, false)?;
    // A backend on another node by direct server return: carried there, in
    // `lb_xdp_nat6` (dsr.rs).
    if t.flow.dsr {
        t.flow.count((ctx.data_end() - ctx.data()) as u64);
        let (closing, addr, port) = (t.pkt.l4.closing, t.flow.addr, t.flow.port);
        return hand_over(ctx, NAT6_DSR, &t.key, closing, addr, port);
    }
    rewrite_destination::<V6>(ctx, &t);
    // A backend on another node: source NAT and sent on by XDP, in `lb_xdp_nat6`.
    if t.flow.remote {
        let (closing, addr, port) = (t.pkt.l4.closing, t.flow.addr, t.flow.port);
        return hand_over(ctx, NAT6_FORWARD, &t.key, closing, addr, port);
    }
    Ok(xdp_action::XDP_PASS)
}

/// Hands the packet to `lb_xdp_nat6` (`kind`: [`NAT6_FORWARD`], with `key`'s flow and its
/// remote backend; [`NAT6_REPLY`]) or `lb_xdp_dsr6` ([`NAT6_DSR`], as [`NAT6_FORWARD`];
/// [`NAT6_DECAP`]) through `LB_NAT6PEND_V1` (the two programs run one after the other on
/// one CPU); the tail call does not return. When it does (the slot is empty), the packet is
/// dropped ([`NAT6_FORWARD`], [`NAT6_DSR`]: a flow's packet) or passed, and counted.
#[inline(always)]
fn hand_over(
    ctx: &XdpContext,
    kind: u8,
    key: &Ct6Key,
    closing: bool,
    backend_addr: Addr6,
    backend_port: u16,
) -> Result<u32, Verdict> {
    if let Some(pending) = LB_NAT6PEND_V1.get_ptr_mut(0) {
        unsafe {
            (*pending).kind = kind;
            if kind == NAT6_FORWARD || kind == NAT6_DSR {
                (*pending).key = *key;
                (*pending).backend_addr = backend_addr;
                (*pending).backend_port = backend_port;
                (*pending).closing = closing as u8;
            }
            let slot = if kind == NAT6_DSR || kind == NAT6_DECAP {
                prog_slot::XDP_DSR6
            } else {
                prog_slot::XDP_NAT6
            };
            LB_PROGS_V3.tail_call(ctx, slot);
        }
    }
    Err(if kind == NAT6_FORWARD || kind == NAT6_DSR {
        Verdict::Drop(Reason::Nat6ProgramMissing)
    } else {
        Verdict::Pass(Reason::Nat6ProgramMissing)
    })
}

/// `lb_xdp_nat6`: what `lb_xdp_ingress6` handed over (see [`hand_over`]).
#[inline(always)]
pub(crate) fn try_nat6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let Some(pending) = LB_NAT6PEND_V1.get_ptr_mut(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let kind = unsafe { (*pending).kind };
    // Read once: a later packet on this CPU writes it again.
    unsafe { (*pending).kind = 0 };
    match kind {
        NAT6_FORWARD => {
            let p = unsafe { &*pending };
            // `closing` is 0 or 1 (`hand_over`), taken as a `bool` as it is: a comparison
            // (`!= 0`) is a branch in BPF, which split the verifier's states in two, each
            // exploring the NAT port allocation's loop.
            // SAFETY: masked to 0 or 1, both valid `bool`s.
            #[allow(clippy::transmute_int_to_bool)] // Its `!= 0` is the branch avoided here.
            let closing = unsafe { core::mem::transmute::<u8, bool>(p.closing & 1) };
            Ok(forward::<V6>(
                ctx,
                &p.key,
                closing,
                p.backend_addr,
                p.backend_port,
            ))
        }
        NAT6_REPLY => reply::<V6>(ctx).ok_or(Verdict::Pass(Reason::NotFrontend)),
        _ => Ok(xdp_action::XDP_PASS),
    }
}

/// `lb_xdp_dsr4`: an IPv4 packet `lb_xdp_ingress` found to be a direct server return
/// carrier to this node (UDP to its port), unwrapped; else a packet of a direct server
/// return flow, carried to its backend, which its forward conntrack entry names (the
/// translation has just written or checked it).
#[inline(always)]
pub(crate) fn try_dsr4(ctx: &XdpContext) -> Result<u32, Verdict> {
    let pkt = V4::parse(ctx)?;
    if pkt.proto == PROTO_UDP && pkt.l4.dport == dsr::PORT.to_be() {
        return decap::<V4>(ctx).ok_or(Verdict::Pass(Reason::NotFrontend));
    }
    let key = Ct4Key::new(
        V4::saddr(pkt.ip),
        V4::daddr(pkt.ip),
        pkt.l4.sport,
        pkt.l4.dport,
        pkt.proto,
        CT_FORWARD,
    );
    let (addr, port) = unsafe { V4::conntrack().get(key) }
        .map(|entry| entry.nat())
        .ok_or(Verdict::Drop(Reason::CtInsertFailed))?;
    encap::<V4>(ctx, &key, addr, port)
}

/// `lb_xdp_dsr6`: what `lb_xdp_ingress6` handed over for direct server return (see
/// [`hand_over`]): a flow's packet to carry to its remote backend, or a carrier to unwrap.
#[inline(always)]
pub(crate) fn try_dsr6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let Some(pending) = LB_NAT6PEND_V1.get_ptr_mut(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let kind = unsafe { (*pending).kind };
    // Read once: a later packet on this CPU writes it again.
    unsafe { (*pending).kind = 0 };
    match kind {
        NAT6_DSR => {
            let p = unsafe { &*pending };
            encap::<V6>(ctx, &p.key, p.backend_addr, p.backend_port)
        }
        NAT6_DECAP => decap::<V6>(ctx).ok_or(Verdict::Pass(Reason::NotFrontend)),
        _ => Ok(xdp_action::XDP_PASS),
    }
}

/// `lb_xdp_icmp6`: an ICMPv6 error `lb_xdp_ingress6` handed over, maybe about a NATed flow.
#[inline(always)]
pub(crate) fn try_icmp6(ctx: &XdpContext) -> Result<u32, Verdict> {
    nat_error6(ctx).ok_or(Verdict::Pass(Reason::NotTcpUdp))
}
