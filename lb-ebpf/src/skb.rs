//! Rewrites of a TC program's packet (an skb) with the kernel's checksum helpers, which keep
//! the checksums right whatever the skb's checksum state is (CHECKSUM_PARTIAL from a pod, a
//! veth or a local sender included). An address is in the transport checksum's
//! pseudo-header, a 32-bit word at a time (`Datapath::skb_set_addr`), or all of it at once
//! (`Datapath::skb_pseudo_csum`); and [`linear`], for the programs that read and write the
//! headers in place.

use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, programs::TcContext};
use lb_common::{PROTO_TCP, PROTO_UDP, Reason};

use crate::{headers::l4, verdict::Verdict};

/// A rewrite failed (an skb helper refused).
pub(crate) const REWRITE_FAILED: Verdict = Verdict::Drop(Reason::ReplyRewriteFailed);

/// How the headers a TC program reads in place get into the skb's linear part.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pull {
    /// Pulled in (`bpf_skb_pull_data`) when the packet holds them but the linear part does
    /// not: headers split across fragments are rare, and the stack pulls them in anyway.
    Missing,
    /// The caller pulled them in already: only checked. (A pull on some paths only splits
    /// the verifier's states in two for all the code that follows.)
    Done,
}

/// Whether the first `len` bytes of the packet are in the skb's linear part, where the
/// program reads and writes them in place (`pull`: see [`Pull`]). `false` when the packet
/// is shorter.
#[inline(always)]
pub(crate) fn linear(ctx: &TcContext, len: usize, pull: Pull) -> bool {
    ctx.data() + len <= ctx.data_end()
        || (pull == Pull::Missing && ctx.len() as usize >= len && ctx.pull_data(len as u32).is_ok())
}

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

/// The frame offset of the checksum of a TCP or UDP header (`proto`) at `l4_off`; `None`
/// for any other protocol.
#[inline(always)]
pub(crate) fn l4_check_off(l4_off: usize, proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(l4_off + l4::TCP_CHECK),
        PROTO_UDP => Some(l4_off + l4::UDP_CHECK),
        _ => None,
    }
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
