//! Rewrites of a TC program's packet (an skb) with the kernel's checksum helpers, which keep
//! the checksums right whatever the skb's checksum state is (CHECKSUM_PARTIAL from a pod, a
//! veth or a local sender included). An address is in the transport checksum's
//! pseudo-header, a 32-bit word at a time.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{Addr6, PROTO_TCP, PROTO_UDP, Reason};

use crate::{
    headers::{IP_CHECK_OFF, L4_OFF, L4_OFF6, l4},
    verdict::Verdict,
};

/// A rewrite failed (an skb helper refused).
pub(crate) const REWRITE_FAILED: Verdict = Verdict::Drop(Reason::ReplyRewriteFailed);

/// The checksum helpers' flag for UDP's "no checksum" zero (which a rewrite must keep, and
/// must not produce).
#[inline(always)]
pub(crate) fn l4_mangled(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// The offset of the transport checksum of an IPv4 packet of `proto` (TCP, else UDP), and
/// the checksum helpers' flag for UDP's "no checksum" zero.
#[inline(always)]
pub(crate) fn l4_checksum4(proto: u8) -> (usize, u64) {
    if proto == PROTO_TCP {
        (L4_OFF + l4::TCP_CHECK, 0)
    } else {
        (L4_OFF + l4::UDP_CHECK, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// The transport checksum's offset of an IPv6 packet whose next header is `proto` (TCP or
/// UDP), if it is one the programs translate.
#[inline(always)]
pub(crate) fn check_offset6(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(L4_OFF6 + l4::TCP_CHECK),
        PROTO_UDP => Some(L4_OFF6 + l4::UDP_CHECK),
        _ => None,
    }
}

/// Replaces the IPv4 address at `offset` (source or destination), with both checksums.
#[inline(always)]
pub(crate) fn set_addr4(
    ctx: &TcContext,
    offset: usize,
    old: u32,
    new: u32,
    proto: u8,
) -> Result<(), Verdict> {
    let (check_off, mangled) = l4_checksum4(proto);
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    ctx.l4_csum_replace(check_off, old as u64, new as u64, flags)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.store(offset, &new, 0).map_err(|_| REWRITE_FAILED)
}

/// Replaces the IPv6 address at `offset` (source or destination), with the transport
/// checksum at `check_off` (IPv6 has no header checksum).
#[inline(always)]
pub(crate) fn replace_addr6(
    ctx: &TcContext,
    offset: usize,
    old: Addr6,
    new: Addr6,
    check_off: usize,
    mangled: u64,
) -> Result<(), Verdict> {
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    for (old, new) in old.iter().zip(new.iter()) {
        ctx.l4_csum_replace(check_off, *old as u64, *new as u64, pseudo)
            .map_err(|_| REWRITE_FAILED)?;
    }
    ctx.store(offset, &new, 0).map_err(|_| REWRITE_FAILED)
}

/// Replaces the port at `offset`, with the transport checksum at `check_off`.
#[inline(always)]
pub(crate) fn replace_port(
    ctx: &TcContext,
    offset: usize,
    old: u16,
    new: u16,
    check_off: usize,
    mangled: u64,
) -> Result<(), Verdict> {
    ctx.l4_csum_replace(check_off, old as u64, new as u64, mangled | 2)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.store(offset, &new, 0).map_err(|_| REWRITE_FAILED)
}
