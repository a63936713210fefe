//! ICMP and ICMPv6 errors about translated flows. An error quotes the header of the packet
//! it is about; one about a flow the client sent to a frontend quotes the translated packet,
//! which the client would not recognise. Rewritten, the client sees an error about the
//! packet it sent (to the frontend): the quoted header and ports, the outer source when it is
//! the backend (the backend itself reports; a router on the way keeps its address), and
//! every checksum.
//!
//! - About a flow this node source-NATed, arriving from the remote backend's side (XDP):
//!   [`nat_error4`] (`lb_xdp_ingress`), [`nat_error6`] (`lb_xdp_icmp6`, tail-called by
//!   `lb_xdp_ingress6`: a program of its own, for the stack); sent on to the client.
//! - From a local backend, leaving by TC egress (the external interface's program, and the
//!   pod interfaces' through it): [`local_icmp`], [`local_icmp6`].
//!
//! ICMP has no pseudo-header; ICMPv6's checksum covers one, so the outer addresses are in
//! it too. Counters: `lb_common::NatEvent`.

use aya_ebpf::{
    bindings::xdp_action,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Addr6, CT_REPLY, Ct4Key, Ct6Key, NAT_IN, Nat4Key, Nat6Key, NatEvent, PROTO_TCP, PROTO_UDP,
    Reason, V4, V6, addr6, csum,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    counters::count,
    flow::reply_frontend,
    frame::{Bytes, ptr_at},
    headers::{
        ETH_LEN, ETH_P_IP, ETH_TYPE_OFF, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPV6_DADDR_OFF,
        IPV6_SADDR_OFF, L4_OFF, L4_OFF6, PROTO_ICMP, PROTO_ICMPV6, icmp, ipv4, ipv6, l4,
    },
    maps::{LB_CT4_V2, LB_NAT4_V1, LB_NAT6_V1, LB_REVNAT4_V1},
    route::{route, send},
    verdict::Verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem.
pub(crate) const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;

/// Offsets in an ICMP error: its checksum, the quoted IPv4 header, the quoted ports.
const ICMP_CHECK_OFF: usize = L4_OFF + icmp::CHECK;
const INNER_IP_OFF: usize = L4_OFF + icmp::QUOTE;
const INNER_L4_OFF: usize = INNER_IP_OFF + ipv4::LEN;
/// Offsets in an ICMPv6 error: its checksum, the quoted IPv6 header, its destination, the
/// quoted ports.
const ICMPV6_CHECK_OFF: usize = L4_OFF6 + icmp::CHECK;
const INNER6_OFF: usize = L4_OFF6 + icmp::QUOTE;
const INNER6_DADDR_OFF: usize = INNER6_OFF + ipv6::DADDR;
const INNER6_L4_OFF: usize = INNER6_OFF + ipv6::LEN;

const REWRITE_FAILED: Verdict = Verdict::Drop(Reason::ReplyRewriteFailed);

/// An ICMP error about a flow this node NATed (an IPv4 packet that is neither TCP nor UDP):
/// rewritten to be about the packet the client sent (to the frontend) and sent to the
/// client. `None`: not one.
#[inline(always)]
pub(crate) fn nat_error4(ctx: &XdpContext) -> Option<u32> {
    let error = icmp_error(ctx)?;
    // The quoted packet went from this node's NAT address and port to the backend.
    let key = Nat4Key {
        saddr: error.inner_daddr,
        daddr: error.inner_saddr,
        sport: error.inner_dport,
        dport: error.inner_sport,
        proto: error.inner_proto,
        dir: NAT_IN,
        _pad: [0; 2],
    };
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, a copy of the key: 12 more instructions (maps.rs)"
    )]
    let entry = unsafe { *LB_NAT4_V1.get(&key)? };
    let Some(route) = route::<V4>(ctx, entry.peer_addr, entry.addr, PROTO_ICMP, 0) else {
        count(NatEvent::NoRoute);
        return Some(xdp_action::XDP_DROP);
    };
    let edit = IcmpEdit {
        outer_daddr: entry.addr,
        inner_saddr: entry.addr,
        inner_sport: entry.port,
        inner_daddr: entry.peer_addr,
        inner_dport: entry.peer_port,
    };
    if edit.apply(ctx, &error).is_none() {
        return Some(xdp_action::XDP_DROP);
    }
    count(NatEvent::IcmpNat);
    Some(send::<V4>(ctx, &route))
}

/// An ICMP error about a TCP or UDP packet, as far as it is read.
struct IcmpError {
    outer_saddr: u32,
    outer_daddr: u32,
    inner_saddr: u32,
    inner_daddr: u32,
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

/// The ICMP error in this IPv4 packet (no options outside or inside, not a fragment), if
/// it is one that quotes a TCP or UDP header.
#[inline(always)]
fn icmp_error<P: Bytes>(p: &P) -> Option<IcmpError> {
    let ether_type: u16 = p.get(ETH_TYPE_OFF)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = p.get(ETH_LEN)?;
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 || ip.proto != PROTO_ICMP {
        return None;
    }
    let icmp_type: u8 = p.get(L4_OFF)?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
    ) {
        return None;
    }
    let inner: Ipv4Hdr = p.get(INNER_IP_OFF)?;
    if inner.vihl != 0x45 || !matches!(inner.proto, PROTO_TCP | PROTO_UDP) {
        return None;
    }
    let ports: [u16; 2] = p.get(INNER_L4_OFF)?;
    Some(IcmpError {
        outer_saddr: u32::from_ne_bytes(ip.src_addr),
        outer_daddr: u32::from_ne_bytes(ip.dst_addr),
        inner_saddr: u32::from_ne_bytes(inner.src_addr),
        inner_daddr: u32::from_ne_bytes(inner.dst_addr),
        inner_sport: ports[0],
        inner_dport: ports[1],
        inner_proto: inner.proto,
    })
}

/// The new addresses and ports of an ICMP error about a translated flow. The outer source
/// becomes the frontend when it is the backend (the backend itself reports); a router on the
/// way keeps its address.
struct IcmpEdit {
    outer_daddr: u32,
    inner_saddr: u32,
    inner_sport: u16,
    inner_daddr: u32,
    inner_dport: u16,
}

impl IcmpEdit {
    #[inline(always)]
    fn apply<P: Bytes>(&self, p: &P, error: &IcmpError) -> Option<()> {
        let outer_saddr = if error.outer_saddr == error.inner_daddr {
            self.inner_daddr
        } else {
            error.outer_saddr
        };
        // The quoted header and its checksums; every change also changes the ICMP checksum,
        // which covers the quote (ICMP has no pseudo-header).
        let mut icmp: u16 = p.get(ICMP_CHECK_OFF)?;
        let inner_check_off = INNER_IP_OFF + ipv4::CHECK;
        let old_check: u16 = p.get(inner_check_off)?;
        let mut check = csum::replace4(old_check, error.inner_saddr, self.inner_saddr);
        check = csum::replace4(check, error.inner_daddr, self.inner_daddr);
        icmp = csum::replace4(icmp, error.inner_saddr, self.inner_saddr);
        icmp = csum::replace4(icmp, error.inner_daddr, self.inner_daddr);
        icmp = csum::replace2(icmp, old_check, check);
        icmp = csum::replace2(icmp, error.inner_sport, self.inner_sport);
        icmp = csum::replace2(icmp, error.inner_dport, self.inner_dport);
        p.set(inner_check_off, check)?;
        p.set(INNER_IP_OFF + ipv4::SADDR, self.inner_saddr)?;
        p.set(INNER_IP_OFF + ipv4::DADDR, self.inner_daddr)?;
        p.set(INNER_L4_OFF, [self.inner_sport, self.inner_dport])?;
        // The quoted transport checksum, when the quote reaches it.
        let l4_check_off = INNER_L4_OFF + l4::check(error.inner_proto);
        if let Some(old) = p.get::<u16>(l4_check_off)
            && (error.inner_proto == PROTO_TCP || old != 0)
        {
            let mut new = csum::replace4_2(
                old,
                error.inner_saddr,
                self.inner_saddr,
                error.inner_sport,
                self.inner_sport,
            );
            new = csum::replace4_2(
                new,
                error.inner_daddr,
                self.inner_daddr,
                error.inner_dport,
                self.inner_dport,
            );
            if error.inner_proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp = csum::replace2(icmp, old, new);
            p.set(l4_check_off, new)?;
        }
        p.set(ICMP_CHECK_OFF, icmp)?;
        // The outer header.
        let ip_check: u16 = p.get(IP_CHECK_OFF)?;
        let mut ip_check = csum::replace4(ip_check, error.outer_saddr, outer_saddr);
        ip_check = csum::replace4(ip_check, error.outer_daddr, self.outer_daddr);
        p.set(IP_CHECK_OFF, ip_check)?;
        p.set(IP_SADDR_OFF, outer_saddr)?;
        p.set(IP_DADDR_OFF, self.outer_daddr)
    }
}

/// TC egress: an ICMP error from a local backend (or a hop towards it) about a flow it got
/// from a frontend, rewritten to be about the frontend. [`Verdict::NotOurs`] when it is not
/// one.
#[inline(always)]
pub(crate) fn local_icmp(ctx: &TcContext) -> Result<(), Verdict> {
    let error = icmp_error(ctx).ok_or(Verdict::NotOurs)?;
    // The quoted packet went from the client to the backend: its reply key.
    let key = Ct4Key {
        saddr: error.inner_daddr,
        daddr: error.inner_saddr,
        sport: error.inner_dport,
        dport: error.inner_sport,
        proto: error.inner_proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, a copy of the key: 7 more instructions (maps.rs)"
    )]
    let entry = unsafe { LB_CT4_V2.get(&key) }.ok_or(Verdict::NotOurs)?;
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, a copy of the id out of the map value: 4 more instructions (maps.rs)"
    )]
    let frontend = *unsafe { LB_REVNAT4_V1.get(&entry.service_id) }
        .ok_or(Verdict::Pass(Reason::RevNatMissing))?;
    let edit = IcmpEdit {
        outer_daddr: error.outer_daddr,
        inner_saddr: error.inner_saddr,
        inner_sport: error.inner_sport,
        inner_daddr: frontend.addr,
        inner_dport: frontend.port,
    };
    edit.apply(ctx, &error)
        .ok_or(Verdict::Drop(Reason::ReplyRewriteFailed))?;
    count(NatEvent::IcmpLocal);
    Ok(())
}

/// TC egress: an ICMPv6 error from a local backend (or a hop towards it) about a flow it
/// got from a frontend, rewritten to be about the packet the client sent (as
/// [`local_icmp`] for IPv4): the quoted destination address and port become the
/// frontend's (and the quoted transport checksum with them), the outer source becomes the
/// frontend when it is the backend, and the ICMPv6 checksum, which covers the outer
/// addresses (pseudo-header) and the quote, follows every change. [`Verdict::NotOurs`] when it
/// is not one.
#[inline(always)]
pub(crate) fn local_icmp6(ctx: &TcContext, outer_saddr: Addr6) -> Result<(), Verdict> {
    let icmp_type: u8 = ctx.load(L4_OFF6).map_err(|_| Verdict::NotOurs)?;
    if !ICMPV6_ERRORS.contains(&icmp_type) {
        return Err(Verdict::NotOurs);
    }
    let inner: Ipv6Hdr = ctx.load(INNER6_OFF).map_err(|_| Verdict::NotOurs)?;
    let proto = inner.next_hdr;
    let inner_check_off = match proto {
        PROTO_TCP => INNER6_L4_OFF + l4::TCP_CHECK,
        PROTO_UDP => INNER6_L4_OFF + l4::UDP_CHECK,
        _ => return Err(Verdict::NotOurs),
    };
    if inner.vcf[0] >> 4 != 6 {
        return Err(Verdict::NotOurs);
    }
    let ports: [u16; 2] = ctx.load(INNER6_L4_OFF).map_err(|_| Verdict::NotOurs)?;
    let (client, backend) = (addr6(inner.src_addr), addr6(inner.dst_addr));
    // The quoted packet went from the client to the backend: its reply key.
    let key = Ct6Key {
        saddr: backend,
        daddr: client,
        sport: ports[1],
        dport: ports[0],
        proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let (frontend, frontend_port) = reply_frontend::<V6>(&key)?;
    let mut icmp: u16 = ctx.load(ICMPV6_CHECK_OFF).map_err(|_| REWRITE_FAILED)?;
    // The quoted transport checksum, when the quote reaches it (the error is not
    // CHECKSUM_PARTIAL: the kernel computes an ICMPv6 error's checksum whole).
    if let Ok(old) = ctx.load::<u16>(inner_check_off)
        && (proto == PROTO_TCP || old != 0)
    {
        let mut new = csum::replace16_2(old, backend, frontend, ports[1], frontend_port);
        if proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        icmp = csum::replace2(icmp, old, new);
        ctx.store(inner_check_off, &new, 0)
            .map_err(|_| REWRITE_FAILED)?;
    }
    icmp = csum::replace16_2(icmp, backend, frontend, ports[1], frontend_port);
    ctx.store(INNER6_DADDR_OFF, &frontend, 0)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.store(INNER6_L4_OFF + l4::DPORT, &frontend_port, 0)
        .map_err(|_| REWRITE_FAILED)?;
    // The backend itself reports: the error comes from the frontend. A router on the way
    // keeps its address.
    if outer_saddr == backend {
        icmp = csum::replace16(icmp, backend, frontend);
        ctx.store(IPV6_SADDR_OFF, &frontend, 0)
            .map_err(|_| REWRITE_FAILED)?;
    }
    ctx.store(ICMPV6_CHECK_OFF, &icmp, 0)
        .map_err(|_| REWRITE_FAILED)?;
    count(NatEvent::IcmpLocal);
    Ok(())
}

/// An ICMPv6 error about a flow this node NATed, translated back for the client and sent
/// to it. `None`: not one. Read through packet pointers, not copies: the stack is tight.
#[inline(always)]
pub(crate) fn nat_error6(ctx: &XdpContext) -> Option<u32> {
    let ip = ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN)?;
    let inner = ptr_at::<_, Ipv6Hdr>(ctx, INNER6_OFF)?;
    let icmp_type: u8 = ctx.get(L4_OFF6)?;
    let (outer_next, proto) = unsafe { ((*ip).next_hdr, (*inner).next_hdr) };
    if outer_next != PROTO_ICMPV6
        || !ICMPV6_ERRORS.contains(&icmp_type)
        || !matches!(proto, PROTO_TCP | PROTO_UDP)
    {
        return None;
    }
    let ports: [u16; 2] = ctx.get(INNER6_L4_OFF)?;
    let inner_saddr: Addr6 = ctx.get(INNER6_OFF + ipv6::SADDR)?;
    let inner_daddr: Addr6 = ctx.get(INNER6_OFF + ipv6::DADDR)?;
    // The quoted packet went from this node's NAT address and port to the backend.
    let key = Nat6Key {
        saddr: inner_daddr,
        daddr: inner_saddr,
        sport: ports[1],
        dport: ports[0],
        proto,
        dir: NAT_IN,
        _pad: [0; 2],
    };
    let entry = LB_NAT6_V1.get_ptr(key)?;
    let (client, client_port, frontend, frontend_port) = unsafe {
        (
            (*entry).addr,
            (*entry).port,
            (*entry).peer_addr,
            (*entry).peer_port,
        )
    };
    let mut check: u16 = ctx.get(ICMPV6_CHECK_OFF)?;
    // The quoted transport checksum, when the quote reaches it.
    let l4_check_off = INNER6_L4_OFF + l4::check(proto);
    if let Some(old) = ctx.get::<u16>(l4_check_off)
        && (proto == PROTO_TCP || old != 0)
    {
        let mut new = csum::replace16_2(old, inner_saddr, client, ports[0], client_port);
        new = csum::replace16_2(new, inner_daddr, frontend, ports[1], frontend_port);
        if proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        check = csum::replace2(check, old, new);
        ctx.set(l4_check_off, new)?;
    }
    // The quote (ICMPv6's checksum covers it), then the outer addresses (in its
    // pseudo-header). The outer source becomes the frontend when it is the backend (the
    // backend itself reports); a router on the way keeps its address.
    check = csum::replace16_2(check, inner_saddr, client, ports[0], client_port);
    check = csum::replace16_2(check, inner_daddr, frontend, ports[1], frontend_port);
    ctx.set(INNER6_OFF + ipv6::SADDR, client)?;
    ctx.set(INNER6_OFF + ipv6::DADDR, frontend)?;
    ctx.set(INNER6_L4_OFF, [client_port, frontend_port])?;
    let outer_saddr: Addr6 = ctx.get(IPV6_SADDR_OFF)?;
    if outer_saddr == inner_daddr {
        check = csum::replace16(check, outer_saddr, frontend);
        ctx.set(IPV6_SADDR_OFF, frontend)?;
    }
    let outer_daddr: Addr6 = ctx.get(IPV6_DADDR_OFF)?;
    check = csum::replace16(check, outer_daddr, client);
    ctx.set(IPV6_DADDR_OFF, client)?;
    ctx.set(ICMPV6_CHECK_OFF, check)?;
    let Some(route) = route::<V6>(ctx, frontend, client, PROTO_ICMPV6, 0) else {
        count(NatEvent::NoRoute);
        return Some(xdp_action::XDP_DROP);
    };
    count(NatEvent::IcmpNat);
    Some(send::<V6>(ctx, &route))
}
