//! kube-proxy's REJECT, in XDP: a new flow to a frontend whose Service has no usable
//! endpoint anywhere (`lb_common::SERVICE_F_REJECT`) is answered with ICMP destination
//! unreachable, port unreachable (ICMPv6 destination unreachable, port unreachable), so that
//! a TCP client's connect fails with ECONNREFUSED at once and a UDP client's next receive
//! does too, in place of a silent drop.
//!
//! The frame is turned into the reply in place, with nothing copied to the stack (the IPv6
//! program's is nearly full): the head grows by the new IP and ICMP headers, which puts the
//! original IP header where the reply quotes it; the tail is cut after the quote (that
//! header and the first 8 bytes of the transport header; RFC 792 and RFC 4443 3.1 ask no
//! more); the Ethernet addresses are swapped; the reply comes from the frontend's address
//! and leaves by the interface the packet came in by (XDP_TX). The frame is the one the parser accepted: an IPv4 header
//! without options, or a fixed IPv6 header, then TCP or UDP, untouched so far.
//!
//! The same reply, with another type and the MTU, answers a packet of a direct server
//! return flow that its carrier would make too large for the route ([`too_big4`],
//! [`too_big6`]: ICMP fragmentation needed, ICMPv6 packet too big; dsr.rs), so that the
//! client's path MTU discovery sends smaller ones.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::Reason;

use crate::{
    counters::count,
    frame::ptr_at,
    headers::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, PROTO_ICMP, PROTO_ICMPV6},
    verdict::Verdict,
};

/// What the reply's ICMP message quotes of the transport header.
const QUOTED_L4: usize = 8;
/// Hop limit of the replies (Linux's default TTL).
const HOP_LIMIT: u8 = 64;
/// ICMP destination unreachable, port unreachable.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// ICMPv6 destination unreachable, port unreachable.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// ICMP destination unreachable, fragmentation needed (RFC 1191: the next hop's MTU in the
/// header's last two bytes).
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 packet too big (RFC 4443 3.2: the MTU in the header's last four bytes).
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// A frame that could not be turned into a reply is dropped, counted alike.
const DROP: Verdict = Verdict::Drop(Reason::Rejected);

/// The reply's layout: Ethernet, the IP header (`IP` bytes), the ICMP header, the quote
/// (the original IP header and [`QUOTED_L4`] bytes).
const fn reply_len(ip: usize) -> usize {
    ETH_LEN + ip + 8 + ip + QUOTED_L4
}

/// The one's-complement sum of the big-endian 16-bit words of `frame[from..to]`, added to
/// `acc`.
#[inline(always)]
fn sum<const N: usize>(frame: &[u8; N], from: usize, to: usize, mut acc: u32) -> u32 {
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        acc += u32::from(u16::from_be_bytes([frame[i], frame[i + 1]]));
        i += 2;
    }
    acc
}

/// Writes the Internet checksum of a sum at `frame[at..at + 2]`.
#[inline(always)]
fn put_checksum<const N: usize>(frame: &mut [u8; N], at: usize, acc: u32) {
    let check = (!lb_common::csum::fold(u64::from(acc))).to_be_bytes();
    frame[at] = check[0];
    frame[at + 1] = check[1];
}

/// Grows the frame's head by the new IP and ICMP headers (`ip + 8` bytes) and cuts it to
/// the reply's length; then writes the Ethernet header back to the sender (the original
/// one, now at offset `ip + 8`, read first) and the ICMP header's type, code and last four
/// bytes (`rest`). The quote is in place.
#[inline(always)]
#[expect(
    clippy::mut_from_ref,
    reason = "the frame is the packet's memory, which ctx only points to (as ptr_at)"
)]
#[expect(
    clippy::manual_memcpy,
    clippy::needless_range_loop,
    reason = "byte loops over packet memory: what the verifier was shown to accept here"
)]
fn reshape<const N: usize>(
    ctx: &XdpContext,
    ip: usize,
    ether_type: u16,
    (kind, code): (u8, u8),
    rest: [u8; 4],
) -> Result<&mut [u8; N], Verdict> {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((ip + 8) as i32)) } != 0 {
        return Err(DROP);
    }
    let now = ctx.data_end() - ctx.data();
    if now > N && unsafe { bpf_xdp_adjust_tail(ctx.ctx, N as i32 - now as i32) } != 0 {
        return Err(DROP);
    }
    let frame = unsafe { &mut *ptr_at::<_, [u8; N]>(ctx, 0).ok_or(DROP)? };
    let old = ip + 8;
    let mut mac = [0u8; 12];
    for i in 0..12 {
        mac[i] = frame[old + i];
    }
    for i in 0..6 {
        frame[i] = mac[6 + i];
        frame[6 + i] = mac[i];
    }
    let t = ether_type.to_be_bytes();
    frame[12] = t[0];
    frame[13] = t[1];
    // Zero the new headers (the original Ethernet header's tail lies in them).
    for i in ETH_LEN..ETH_LEN + ip + 8 {
        frame[i] = 0;
    }
    frame[ETH_LEN + ip] = kind;
    frame[ETH_LEN + ip + 1] = code;
    for i in 0..4 {
        frame[ETH_LEN + ip + 4 + i] = rest[i];
    }
    Ok(frame)
}

/// Answers the IPv4 packet in `ctx` with ICMP port unreachable; counted.
#[inline(always)]
pub(crate) fn reject4(ctx: &XdpContext) -> Result<u32, Verdict> {
    answer4(ctx, (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH), [0; 4])?;
    count(Reason::Rejected);
    Ok(xdp_action::XDP_TX)
}

/// Answers the IPv4 packet in `ctx` with ICMP fragmentation needed, the next hop's MTU
/// `mtu` (the caller counts it).
#[inline(always)]
pub(crate) fn too_big4(ctx: &XdpContext, mtu: u16) -> Result<u32, Verdict> {
    let mtu = mtu.to_be_bytes();
    answer4(
        ctx,
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED),
        [0, 0, mtu[0], mtu[1]],
    )?;
    Ok(xdp_action::XDP_TX)
}

/// Turns the IPv4 packet in `ctx` into an ICMP error about it (type and code, the header's
/// last four bytes), from its destination to its source.
#[inline(always)]
fn answer4(ctx: &XdpContext, kind: (u8, u8), rest: [u8; 4]) -> Result<(), Verdict> {
    const IP: usize = 20;
    const LEN: usize = reply_len(IP);
    const QUOTE: usize = ETH_LEN + IP + 8;
    let f = reshape::<LEN>(ctx, IP, ETH_P_IP, kind, rest)?;
    let total = ((LEN - ETH_LEN) as u16).to_be_bytes();
    f[ETH_LEN] = 0x45;
    f[ETH_LEN + 2] = total[0];
    f[ETH_LEN + 3] = total[1];
    f[ETH_LEN + 8] = HOP_LIMIT;
    f[ETH_LEN + 9] = PROTO_ICMP;
    for i in 0..4 {
        // From the frontend (the quoted packet's destination) to its source.
        f[ETH_LEN + 12 + i] = f[QUOTE + 16 + i];
        f[ETH_LEN + 16 + i] = f[QUOTE + 12 + i];
    }
    put_checksum(f, ETH_LEN + 10, sum(f, ETH_LEN, ETH_LEN + IP, 0));
    put_checksum(f, ETH_LEN + IP + 2, sum(f, ETH_LEN + IP, LEN, 0));
    Ok(())
}

/// Answers the IPv6 packet in `ctx` with ICMPv6 port unreachable; counted.
#[inline(always)]
pub(crate) fn reject6(ctx: &XdpContext) -> Result<u32, Verdict> {
    answer6(ctx, (ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH), [0; 4])?;
    count(Reason::Rejected);
    Ok(xdp_action::XDP_TX)
}

/// Answers the IPv6 packet in `ctx` with ICMPv6 packet too big, the MTU `mtu` (the caller
/// counts it).
#[inline(always)]
pub(crate) fn too_big6(ctx: &XdpContext, mtu: u32) -> Result<u32, Verdict> {
    answer6(ctx, (ICMPV6_PKT_TOOBIG, 0), mtu.to_be_bytes())?;
    Ok(xdp_action::XDP_TX)
}

/// Turns the IPv6 packet in `ctx` into an ICMPv6 error about it (type and code, the
/// header's last four bytes), from its destination to its source.
#[inline(always)]
fn answer6(ctx: &XdpContext, kind: (u8, u8), rest: [u8; 4]) -> Result<(), Verdict> {
    const IP: usize = 40;
    const LEN: usize = reply_len(IP);
    const QUOTE: usize = ETH_LEN + IP + 8;
    const PAYLOAD: usize = LEN - ETH_LEN - IP;
    let f = reshape::<LEN>(ctx, IP, ETH_P_IPV6, kind, rest)?;
    let payload = (PAYLOAD as u16).to_be_bytes();
    f[ETH_LEN] = 0x60;
    f[ETH_LEN + 4] = payload[0];
    f[ETH_LEN + 5] = payload[1];
    f[ETH_LEN + 6] = PROTO_ICMPV6;
    f[ETH_LEN + 7] = HOP_LIMIT;
    for i in 0..16 {
        f[ETH_LEN + 8 + i] = f[QUOTE + 24 + i];
        f[ETH_LEN + 24 + i] = f[QUOTE + 8 + i];
    }
    // The pseudo-header (the addresses, the upper-layer length, the next header), then
    // the message.
    let pseudo = sum(f, ETH_LEN + 8, ETH_LEN + IP, 0) + PAYLOAD as u32 + u32::from(PROTO_ICMPV6);
    put_checksum(f, ETH_LEN + IP + 2, sum(f, ETH_LEN + IP, LEN, pseudo));
    Ok(())
}
