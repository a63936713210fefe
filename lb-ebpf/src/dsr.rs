//! Direct server return (`lb_common::SERVICE_F_DSR`), both families, in XDP.
//!
//! - [`encap`]: a packet of a flow from outside whose backend is on another node is
//!   translated to its backend (as for a local backend) and wrapped in a carrier
//!   (`lb_common::dsr`: Geneve over UDP, addressed to the backend itself, with an option
//!   naming the frontend the client addressed), then sent on by XDP (route.rs). Nothing is
//!   source-NATed: the backend sees the client's address, and this node sees no reply.
//! - [`decap`]: a carrier arriving at the backend's node is unwrapped; the flow's conntrack
//!   reply entry (the frontend as the replies' source) is recorded, and the packet goes on
//!   to the backend through the kernel. Its replies then leave as any local backend's do:
//!   rewritten by the TC egress program of the external interface, or of the pod's
//!   interface, which sends them straight to the client.
//!
//! A packet that the carrier would make larger than the route's MTU is answered with ICMP
//! fragmentation needed (ICMPv6 packet too big) and the size left for it (reject.rs), from
//! the frontend, so that the client's path MTU discovery sends smaller ones; an IPv4 packet
//! that may be fragmented is dropped (XDP cannot fragment), counted.
//!
//! IPv6's run in `lb_xdp_nat6` (ingress.rs hands them over), as its source NAT does.

use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_SRC, xdp_action},
    helpers::generated::{bpf_check_mtu, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    CT_F_DSR, CT_LAST_SEEN_GRANULARITY_NS, CT_REPLY, CtValue, FlowKey, NatEvent, PROTO_UDP, V4, V6,
    csum, dsr,
};

use crate::{
    counters::count,
    family::Datapath,
    flow::{ct_now, ct_write, to_backend},
    frame::{Bytes, ptr_at},
    headers::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, ipv4, l4},
    reject::{too_big4, too_big6},
    route::{route, send},
    verdict::Verdict,
};

/// Hop limit (TTL) of the carrier's outer header.
const HOP_LIMIT: u8 = 64;
/// IPv4's don't fragment bit, in the header's flags and fragment offset word.
const IP_DF: u16 = 0x4000;

/// What the carrier is in each family: the outer IP header's length and how it is written,
/// and how a packet too large for it is answered.
pub(crate) trait Carrier: Datapath {
    /// The ethertype of the family.
    const ETHER_TYPE: u16;
    /// The outer IP header's length.
    const IP_LEN: usize;
    /// The frontend address's length in the option.
    const ADDR_LEN: usize;
    /// Everything the carrier adds before the carried IP header.
    const OVERHEAD: usize = dsr::overhead(Self::IP_LEN, Self::ADDR_LEN);
    /// Frame offset of the outer UDP header.
    const UDP_OFF: usize = ETH_LEN + Self::IP_LEN;
    /// Frame offset of the Geneve header.
    const GENEVE_OFF: usize = Self::UDP_OFF + 8;
    /// Frame offset of the option's data: the frontend's port, 2 bytes 0, its address.
    const DATA_OFF: usize = Self::GENEVE_OFF + dsr::GENEVE_LEN + 4;

    /// Writes the outer IP header (from `src` to `dst`, `payload` bytes after it; `hash`:
    /// the flow's).
    fn write_outer(
        ctx: &XdpContext,
        src: Self::Addr,
        dst: Self::Addr,
        payload: u16,
        hash: u32,
    ) -> Option<()>;
    /// The outer UDP checksum, once every header is written (`udp_len`: UDP's length).
    fn udp_checksum(ctx: &XdpContext, udp_len: u16) -> Option<u16>;
    /// Answers the untouched packet in `ctx`, too large by the carrier for a route of MTU
    /// `mtu`.
    fn too_big(ctx: &XdpContext, mtu: u32) -> Result<u32, Verdict>;
}

/// The one's-complement sum of `N` big-endian 16-bit words at frame offset `at`.
#[inline(always)]
fn sum_words<const N: usize>(ctx: &XdpContext, at: usize) -> Option<u32> {
    let words = unsafe { &*ptr_at::<_, [u16; N]>(ctx, at)? };
    let mut acc = 0u32;
    for w in words {
        acc += u32::from(u16::from_be(*w));
    }
    Some(acc)
}

impl Carrier for V4 {
    const ETHER_TYPE: u16 = ETH_P_IP;
    const IP_LEN: usize = ipv4::LEN;
    const ADDR_LEN: usize = 4;

    #[inline(always)]
    fn write_outer(ctx: &XdpContext, src: u32, dst: u32, payload: u16, _hash: u32) -> Option<()> {
        let total = (Self::IP_LEN as u16 + payload).to_be_bytes();
        let df = IP_DF.to_be_bytes();
        let header: [u8; 12] = [
            0x45, 0, total[0], total[1], 0, 0, df[0], df[1], HOP_LIMIT, PROTO_UDP, 0, 0,
        ];
        ctx.set(ETH_LEN, header)?;
        ctx.set(ETH_LEN + ipv4::SADDR, src)?;
        ctx.set(ETH_LEN + ipv4::DADDR, dst)?;
        let sum = sum_words::<10>(ctx, ETH_LEN)?;
        ctx.set(ETH_LEN + ipv4::CHECK, (!csum::fold(u64::from(sum))).to_be())
    }

    /// None: a UDP checksum is optional over IPv4 (RFC 768; RFC 8926 3.4 for Geneve).
    #[inline(always)]
    fn udp_checksum(_ctx: &XdpContext, _udp_len: u16) -> Option<u16> {
        Some(0)
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, mtu: u32) -> Result<u32, Verdict> {
        let Some(frags) = ctx.get::<u16>(ETH_LEN + 6) else {
            return Ok(xdp_action::XDP_DROP);
        };
        if u16::from_be(frags) & IP_DF == 0 {
            return Ok(xdp_action::XDP_DROP);
        }
        too_big4(ctx, mtu as u16)
    }
}

impl Carrier for V6 {
    const ETHER_TYPE: u16 = ETH_P_IPV6;
    const IP_LEN: usize = 40;
    const ADDR_LEN: usize = 16;

    #[inline(always)]
    fn write_outer(
        ctx: &XdpContext,
        src: lb_common::Addr6,
        dst: lb_common::Addr6,
        payload: u16,
        hash: u32,
    ) -> Option<()> {
        // Version 6, traffic class 0, the flow label from the flow hash (for ECMP).
        let first = (6u32 << 28) | (hash & 0xf_ffff);
        ctx.set(ETH_LEN, first.to_be())?;
        let rest: [u8; 4] = {
            let len = payload.to_be_bytes();
            [len[0], len[1], PROTO_UDP, HOP_LIMIT]
        };
        ctx.set(ETH_LEN + 4, rest)?;
        ctx.set(ETH_LEN + 8, src)?;
        ctx.set(ETH_LEN + 24, dst)
    }

    /// Mandatory over IPv6, computed without reading the carried payload (the kernel's
    /// "local checksum offload"): the carried packet's transport checksum is valid, so its
    /// transport segment sums to the complement of its pseudo-header; what is summed here
    /// is the outer pseudo-header and every header.
    #[inline(always)]
    fn udp_checksum(ctx: &XdpContext, udp_len: u16) -> Option<u16> {
        const INNER: usize = ETH_LEN + <V6 as Carrier>::OVERHEAD;
        // Outer pseudo-header: the addresses (in the outer header), the length, UDP.
        let mut acc =
            sum_words::<16>(ctx, ETH_LEN + 8)? + u32::from(udp_len) + u32::from(PROTO_UDP);
        // UDP, Geneve and the option (checksum still 0).
        const _: () = assert!(<V6 as Carrier>::OVERHEAD - 40 == 40);
        acc += sum_words::<20>(ctx, Self::UDP_OFF)?;
        // The carried IP header, and its transport segment: the complement of its
        // pseudo-header (addresses, payload length, next header).
        acc += sum_words::<20>(ctx, INNER)?;
        let inner: [u8; 8] = ctx.get(INNER)?;
        let pseudo = sum_words::<16>(ctx, INNER + 8)?
            + u32::from(u16::from_be_bytes([inner[4], inner[5]]))
            + u32::from(inner[6]);
        acc += u32::from(!csum::fold(u64::from(pseudo)));
        let check = !csum::fold(u64::from(acc));
        Some(if check == 0 { 0xffff } else { check })
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, mtu: u32) -> Result<u32, Verdict> {
        too_big6(ctx, mtu)
    }
}

/// Sends the packet in `ctx`, of the flow of forward conntrack key `key` (client, frontend;
/// the packet untouched so far), to its remote backend (address and port, network byte
/// order) in a carrier. The XDP action; counted.
#[inline(always)]
pub(crate) fn encap<F: Carrier>(
    ctx: &XdpContext,
    key: &F::CtKey,
    backend_addr: F::Addr,
    backend_port: u16,
) -> Result<u32, Verdict> {
    let Some(route) = route::<F>(
        ctx,
        key.saddr(),
        backend_addr,
        key.proto(),
        BPF_FIB_LOOKUP_SRC,
    ) else {
        count(NatEvent::NoRoute);
        return Ok(xdp_action::XDP_DROP);
    };
    // The device's MTU against the frame (without its Ethernet header) and the carrier.
    let mut mtu: u32 = 0;
    let rc = unsafe {
        bpf_check_mtu(
            ctx.ctx.cast(),
            route.ifindex,
            &mut mtu,
            F::OVERHEAD as i32,
            0,
        )
    };
    if rc != 0 {
        count(NatEvent::DsrTooBig);
        return F::too_big(ctx, mtu.saturating_sub(F::OVERHEAD as u32));
    }
    // The translation: to the backend, as for a local one.
    let pkt = F::parse(ctx)?;
    let (frontend, frontend_port) = (key.daddr(), key.dport());
    to_backend::<F>(&pkt, frontend, backend_addr, backend_port);
    let carried = (ctx.data_end() - ctx.data() - ETH_LEN) as u16;
    let hash = F::key_hash(key);
    // The Ethernet addresses move with the head: a packet handed to the kernel (its next
    // hop unresolved) keeps the ones it came with.
    let Some(macs) = ctx.get::<[u8; 12]>(0) else {
        return Ok(xdp_action::XDP_DROP);
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(F::OVERHEAD as i32)) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    let wrap = || -> Option<()> {
        ctx.set(0, macs)?;
        ctx.set(12, F::ETHER_TYPE.to_be())?;
        let udp_len = (F::OVERHEAD - F::IP_LEN) as u16 + carried;
        F::write_outer(ctx, route.src, backend_addr, udp_len, hash)?;
        let (sport, dport, len) = (
            dsr::source_port(hash).to_be(),
            dsr::PORT.to_be(),
            udp_len.to_be(),
        );
        ctx.set(F::UDP_OFF, [sport, dport, len, 0])?;
        let ether = F::ETHER_TYPE.to_be_bytes();
        let class = dsr::OPT_CLASS.to_be_bytes();
        let geneve: [u8; 12] = [
            dsr::opt_words(F::ADDR_LEN),
            dsr::FLAGS_CRITICAL,
            ether[0],
            ether[1],
            0,
            0,
            0,
            0,
            class[0],
            class[1],
            dsr::OPT_TYPE,
            (dsr::opt_data_len(F::ADDR_LEN) / 4) as u8,
        ];
        ctx.set(F::GENEVE_OFF, geneve)?;
        ctx.set(F::DATA_OFF, [frontend_port, 0])?;
        ctx.set(F::DATA_OFF + 4, frontend)?;
        let check = F::udp_checksum(ctx, udp_len)?;
        ctx.set(F::UDP_OFF + l4::UDP_CHECK, check.to_be())
    };
    if wrap().is_none() {
        return Ok(xdp_action::XDP_DROP);
    }
    count(NatEvent::DsrSent);
    Ok(send::<F>(ctx, &route))
}

/// A packet to this node that is not for a frontend, maybe a carrier: unwrapped, its flow's
/// reply entry recorded, and passed on to the backend. `None`: not a carrier (passed as
/// it is).
#[inline(always)]
pub(crate) fn decap<F: Carrier>(ctx: &XdpContext) -> Option<u32> {
    let outer = F::parse(ctx).ok()?;
    if outer.proto != PROTO_UDP || outer.l4.dport != dsr::PORT.to_be() {
        return None;
    }
    let to = F::daddr(outer.ip);
    // Geneve version 0 with our one critical option, carrying the family's IP.
    let geneve: [u8; 12] = ctx.get(F::GENEVE_OFF)?;
    let ether = F::ETHER_TYPE.to_be_bytes();
    let class = dsr::OPT_CLASS.to_be_bytes();
    if geneve[0] != dsr::opt_words(F::ADDR_LEN)
        || geneve[1] != dsr::FLAGS_CRITICAL
        || (geneve[2], geneve[3]) != (ether[0], ether[1])
        || (geneve[8], geneve[9]) != (class[0], class[1])
        || geneve[10] != dsr::OPT_TYPE
        || geneve[11] & 0x1f != (dsr::opt_data_len(F::ADDR_LEN) / 4) as u8
    {
        return None;
    }
    let frontend_port: u16 = ctx.get(F::DATA_OFF)?;
    let frontend: F::Addr = ctx.get(F::DATA_OFF + 4)?;
    let macs: [u8; 12] = ctx.get(0)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, F::OVERHEAD as i32) } != 0 {
        return Some(xdp_action::XDP_DROP);
    }
    let invalid = || {
        count(NatEvent::DsrInvalid);
        Some(xdp_action::XDP_DROP)
    };
    if ctx.set(0, macs).is_none() || ctx.set(12, F::ETHER_TYPE.to_be()).is_none() {
        return invalid();
    }
    let Ok(inner) = F::parse(ctx) else {
        return invalid();
    };
    let backend = F::daddr(inner.ip);
    if backend != to {
        return invalid();
    }
    let key = F::CtKey::new(
        backend,
        F::saddr(inner.ip),
        inner.l4.dport,
        inner.l4.sport,
        inner.proto,
        CT_REPLY,
    );
    record_reply::<F>(&key, frontend, frontend_port);
    count(NatEvent::DsrReceived);
    Some(xdp_action::XDP_PASS)
}

/// The reply entry of a carried flow (`key`: backend to client): its replies come from the
/// frontend. Refreshed when it is already there (at most once per
/// `CT_LAST_SEEN_GRANULARITY_NS`), else written.
#[inline(always)]
fn record_reply<F: Carrier>(key: &F::CtKey, frontend: F::Addr, port: u16) {
    let now = ct_now();
    let found = F::conntrack().get_ptr_mut(key);
    if let Some(entry) = found {
        let entry = unsafe { &mut *entry };
        if entry.nat() == (frontend, port) {
            let last_seen = entry.last_seen_ns_mut();
            if now.wrapping_sub(*last_seen) >= CT_LAST_SEEN_GRANULARITY_NS {
                *last_seen = now;
            }
            return;
        }
    }
    let entry = F::CtEntry::new(0, 0, now, CT_F_DSR, 0, frontend, port);
    ct_write(F::conntrack(), key, &entry, found.is_some());
}
