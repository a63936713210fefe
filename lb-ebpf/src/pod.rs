//! TC ingress on the pods' host-side interfaces: east-west translation of the packets the
//! socket hooks did not see (a process outside the hooked cgroup, a pod with its own
//! network stack), by the same rules as XDP on the external interface.
//!
//! A packet a pod sends is, in this order: the reply of a translated flow (its source is a
//! backend of a conntrack reply entry: rewritten to come from the frontend, as the external
//! interface's TC egress does), or addressed to a frontend (translated to a backend as XDP
//! does, with the skb checksum helpers because a pod's packets are often CHECKSUM_PARTIAL),
//! or neither (passed untouched).
//!
//! IPv6 frames go on to `lb_tc_pod_ingress6` by a tail call, which applies the same rules
//! with the IPv6 maps: with them, the IPv4 program was over the stack limit.
//!
//! Hairpin: a pod whose flow to a frontend was given the pod itself as its backend would
//! receive a packet from its own address, which it drops. Such packets get
//! [`HAIRPIN_ADDR`] as their source; the pod's replies to it get the pod's address back as
//! their destination before the reverse translation.

use aya_ebpf::programs::TcContext;
use lb_common::{
    CT_REPLY, Ct4Key, Ct6Key, Event, HAIRPIN_ADDR, HAIRPIN_ADDR6, PROTO_TCP, PROTO_UDP, Reason,
    addr6, tc_prog_slot,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    counters::{count, count_packet},
    egress::{try_egress4, try_egress6},
    flow::{Translation6, count_translated, translation, translation6},
    frame::ptr_at,
    headers::{
        ETH_LEN, ETH_P_IPV6, IP_DADDR_OFF, IP_SADDR_OFF, IPV6_DADDR_OFF, IPV6_NEXT_HDR_OFF,
        IPV6_SADDR_OFF, L4_OFF, L4_OFF6, PROTO_ICMPV6, l4,
    },
    maps::{LB_CT4_V2, LB_CT6_V1, LB_TCPROGS_V1},
    skb::{
        REWRITE_FAILED, check_offset6, l4_checksum4, l4_mangled, replace_addr6, replace_port,
        set_addr4,
    },
    verdict::Verdict,
};

/// Called by `lb_tc_pod_ingress` first: an IPv6 frame goes on to `lb_tc_pod_ingress6` (the
/// tail call does not return); while that program's slot is empty it is passed, counted.
/// (The IPv4 program holds no IPv6 code: with it, it was over the stack limit.)
#[inline(always)]
fn dispatch6(ctx: &TcContext) -> Result<(), Verdict> {
    let ipv6 = ptr_at::<_, EthHdr>(ctx, 0)
        .is_some_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV6);
    if ipv6 {
        let _ = unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::POD_INGRESS6) };
        return Err(Verdict::Pass(Reason::Ipv6ProgramMissing));
    }
    Ok(())
}

/// A hairpinned pod's reply to [`HAIRPIN_ADDR`] goes to the pod's own address again, which
/// makes it the reply conntrack knows.
#[inline(always)]
fn unhairpin(ctx: &TcContext) -> Result<(), Verdict> {
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_LEN) else {
        return Ok(());
    };
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    let plain = ip.vihl == 0x45 && u16::from_be_bytes(ip.frags) & 0x3fff == 0;
    if daddr != HAIRPIN_ADDR || !plain || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP) {
        return Ok(());
    }
    set_addr4(
        ctx,
        IP_DADDR_OFF,
        daddr,
        u32::from_ne_bytes(ip.src_addr),
        ip.proto,
    )
}

/// A TCP SYN from a pod opens a new connection on its tuple. A reply entry an earlier
/// translated flow left for the same tuple (the pod's source port reused for a connection
/// straight to that backend, e.g. one the socket hooks translated) would rewrite the new
/// connection's replies: it goes.
#[inline(always)]
fn forget_stale_reply(ctx: &TcContext) {
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_LEN) else {
        return;
    };
    if ip.vihl != 0x45 || ip.proto != PROTO_TCP || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return;
    }
    let (Ok(ports), Ok(flags)) = (
        ctx.load::<[u16; 2]>(L4_OFF),
        ctx.load::<u8>(L4_OFF + l4::TCP_FLAGS),
    ) else {
        return;
    };
    if flags & (l4::TCP_SYN | l4::TCP_ACK) != l4::TCP_SYN {
        return;
    }
    let reply = Ct4Key {
        saddr: u32::from_ne_bytes(ip.dst_addr),
        daddr: u32::from_ne_bytes(ip.src_addr),
        sport: ports[1],
        dport: ports[0],
        proto: PROTO_TCP,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    if LB_CT4_V2.remove(&reply).is_ok() {
        count(Event::CtDeletes);
    }
}

#[inline(always)]
pub(crate) fn try_pod_ingress(ctx: &TcContext) -> Result<(), Verdict> {
    // IPv6: `lb_tc_pod_ingress6`'s, through a tail call that does not return.
    dispatch6(ctx)?;
    unhairpin(ctx)?;
    match try_egress4(ctx) {
        // Not a reply.
        Err(Verdict::NotOurs) => {}
        replied => return replied,
    }
    forget_stale_reply(ctx);
    // The headers the parser reads must be in the linear part; a shorter packet fails the
    // parse's bounds checks and is passed, counted.
    let _ = ctx.pull_data((L4_OFF + TcpHdr::LEN) as u32);
    let t = translation(ctx)?;
    let (pkt, key, backend) = (&t.pkt, &t.key, &t.flow);
    let (check_off, mangled) = l4_checksum4(pkt.proto);
    set_addr4(ctx, IP_DADDR_OFF, key.daddr, backend.addr, pkt.proto)?;
    ctx.l4_csum_replace(
        check_off,
        pkt.l4.dport as u64,
        backend.port as u64,
        mangled | 2,
    )
    .map_err(|_| REWRITE_FAILED)?;
    ctx.store(L4_OFF + l4::DPORT, &backend.port, 0)
        .map_err(|_| REWRITE_FAILED)?;
    if backend.addr == key.saddr {
        set_addr4(ctx, IP_SADDR_OFF, key.saddr, HAIRPIN_ADDR, pkt.proto)?;
    }
    count_translated(&t.flow, ctx.len() as u64);
    Ok(())
}

/// A hairpinned pod's reply to [`HAIRPIN_ADDR6`] goes to the pod's own address again,
/// which makes it the reply conntrack knows (as [`unhairpin`] for IPv4).
#[inline(always)]
fn unhairpin6(ctx: &TcContext) -> Result<(), Verdict> {
    let Ok(ip) = ctx.load::<Ipv6Hdr>(ETH_LEN) else {
        return Ok(());
    };
    let daddr = addr6(ip.dst_addr);
    let Some(check_off) = check_offset6(ip.next_hdr) else {
        return Ok(());
    };
    if daddr != HAIRPIN_ADDR6 || ip.vcf[0] >> 4 != 6 {
        return Ok(());
    }
    let saddr = addr6(ip.src_addr);
    replace_addr6(
        ctx,
        IPV6_DADDR_OFF,
        daddr,
        saddr,
        check_off,
        l4_mangled(ip.next_hdr),
    )
}

/// A TCP SYN from a pod opens a new connection on its tuple: a reply entry an earlier
/// translated flow left for the same tuple goes (as [`forget_stale_reply`] for IPv4).
#[inline(always)]
fn forget_stale_reply6(ctx: &TcContext) {
    let Ok(ip) = ctx.load::<Ipv6Hdr>(ETH_LEN) else {
        return;
    };
    if ip.next_hdr != PROTO_TCP {
        return;
    }
    let (Ok(ports), Ok(flags)) = (
        ctx.load::<[u16; 2]>(L4_OFF6),
        ctx.load::<u8>(L4_OFF6 + l4::TCP_FLAGS),
    ) else {
        return;
    };
    if flags & (l4::TCP_SYN | l4::TCP_ACK) != l4::TCP_SYN {
        return;
    }
    let reply = Ct6Key {
        saddr: addr6(ip.dst_addr),
        daddr: addr6(ip.src_addr),
        sport: ports[1],
        dport: ports[0],
        proto: PROTO_TCP,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    if LB_CT6_V1.remove(&reply).is_ok() {
        count(Event::CtDeletes);
    }
}

/// `lb_tc_pod_ingress`'s rules for an IPv6 frame: the reply of a translated flow (after
/// undoing a hairpin), else a packet to a frontend, translated with the skb helpers (a
/// pod's packets are often CHECKSUM_PARTIAL), else passed.
#[inline(always)]
pub(crate) fn try_pod_ingress6(ctx: &TcContext) -> Result<(), Verdict> {
    // An ICMPv6 error (from a backend pod about a flow a frontend gave it) is
    // `lb_tc_egress`'s to rewrite, by a tail call: with that code this program is over the
    // stack limit.
    if ctx.load::<u8>(IPV6_NEXT_HDR_OFF) == Ok(PROTO_ICMPV6) {
        let _ = unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::EGRESS) };
        return Err(Verdict::Pass(Reason::Ipv6ProgramMissing));
    }
    unhairpin6(ctx)?;
    match try_egress6(ctx, false) {
        // Not a reply.
        Err(Verdict::NotOurs) => {}
        replied => return replied,
    }
    forget_stale_reply6(ctx);
    // The headers the parser reads must be in the linear part; a shorter packet fails the
    // parse's bounds checks and is passed, counted.
    let _ = ctx.pull_data((L4_OFF6 + TcpHdr::LEN) as u32);
    let Translation6 { pkt, key, flow } = translation6(ctx)?;
    // The packet pointers are not used past the first helper call, which invalidates them.
    let (proto, dport) = (pkt.proto, pkt.l4.dport);
    let check_off = check_offset6(proto).ok_or(REWRITE_FAILED)?;
    let mangled = l4_mangled(proto);
    replace_addr6(
        ctx,
        IPV6_DADDR_OFF,
        key.daddr,
        flow.addr,
        check_off,
        mangled,
    )?;
    replace_port(
        ctx,
        L4_OFF6 + l4::DPORT,
        dport,
        flow.port,
        check_off,
        mangled,
    )?;
    if flow.addr == key.saddr {
        replace_addr6(
            ctx,
            IPV6_SADDR_OFF,
            key.saddr,
            HAIRPIN_ADDR6,
            check_off,
            mangled,
        )?;
    }
    count_packet(flow.service_id, flow.backend_id, ctx.len() as u64, flow.new);
    Ok(())
}
