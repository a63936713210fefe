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
//! IPv6 frames go on to `lb_tc_pod_ingress6` (v6.rs) by a tail call, which applies the same
//! rules with the IPv6 maps: the IPv4 path is written on its own.
//!
//! Hairpin: a pod whose flow to a frontend was given the pod itself as its backend would
//! receive a packet from its own address, which it drops. Such packets get
//! [`HAIRPIN_ADDR`] as their source; the pod's replies to it get the pod's address back as
//! their destination before the reverse translation.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{CT_REPLY, Ct4Key, HAIRPIN_ADDR, PROTO_TCP, PROTO_UDP, event, reason};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    ETH_LEN, IP_CHECK_OFF, IP_SADDR_OFF, L4_OFF, LB_CT4_V2, TCP_ACK, TCP_CHECK_OFF, TCP_FLAGS_OFF,
    TCP_SYN, UDP_CHECK_OFF, Verdict, count_translated, note, tc_action, translation, try_egress4,
    v6,
};

/// Offset of the destination address in the IPv4 header.
const IP_DADDR_OFF: usize = ETH_LEN + 16;
const FAILED: Verdict = Verdict::Drop(reason::REPLY_REWRITE_FAILED);

/// The offset of the transport checksum, and the checksum helpers' flag for UDP's "no
/// checksum" zero.
#[inline(always)]
fn l4_checksum(proto: u8) -> (usize, u64) {
    if proto == PROTO_TCP {
        (L4_OFF + TCP_CHECK_OFF, 0)
    } else {
        (L4_OFF + UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// Replaces the IPv4 address at `offset` (source or destination), with both checksums.
#[inline(always)]
fn set_addr(ctx: &TcContext, offset: usize, old: u32, new: u32, proto: u8) -> Result<(), Verdict> {
    let (check_off, mangled) = l4_checksum(proto);
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    ctx.l4_csum_replace(check_off, old as u64, new as u64, flags)
        .map_err(|_| FAILED)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)
        .map_err(|_| FAILED)?;
    ctx.store(offset, &new, 0).map_err(|_| FAILED)
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
    set_addr(
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
        ctx.load::<u8>(L4_OFF + TCP_FLAGS_OFF),
    ) else {
        return;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
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
        note(event::CT_DELETES);
    }
}

#[inline(always)]
fn try_pod_ingress(ctx: &TcContext) -> Result<(), Verdict> {
    // IPv6: `lb_tc_pod_ingress6`'s (v6.rs), through a tail call that does not return.
    v6::dispatch_pod(ctx)?;
    unhairpin(ctx)?;
    match try_egress4(ctx) {
        // `NOT_OURS`: not a reply.
        Err(Verdict::Pass(u32::MAX)) => {}
        replied => return replied,
    }
    forget_stale_reply(ctx);
    // The headers the parser reads must be in the linear part; a shorter packet fails the
    // parse's bounds checks and is passed, counted.
    let _ = ctx.pull_data((L4_OFF + TcpHdr::LEN) as u32);
    let t = translation(ctx)?;
    let (pkt, key, backend) = (&t.pkt, &t.key, &t.flow);
    let (check_off, mangled) = l4_checksum(pkt.proto);
    set_addr(ctx, IP_DADDR_OFF, key.daddr, backend.addr, pkt.proto)?;
    ctx.l4_csum_replace(
        check_off,
        pkt.l4.dport as u64,
        backend.port as u64,
        mangled | 2,
    )
    .map_err(|_| FAILED)?;
    ctx.store(L4_OFF + 2, &backend.port, 0)
        .map_err(|_| FAILED)?;
    if backend.addr == key.saddr {
        set_addr(ctx, IP_SADDR_OFF, key.saddr, HAIRPIN_ADDR, pkt.proto)?;
    }
    count_translated(&t.flow, ctx.len() as u64);
    Ok(())
}

/// TC ingress on a pod's host-side interface.
#[classifier]
pub fn lb_tc_pod_ingress(ctx: TcContext) -> i32 {
    tc_action(try_pod_ingress(&ctx))
}
