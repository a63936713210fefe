//! TC egress on the node's external interface: the replies of translated flows leave as if
//! they came from the frontend the client addressed, by the flow's conntrack reply entry
//! (and ICMP errors about such flows, icmp.rs). Everything else is not ours: passed
//! untouched and uncounted, as it is all the node's other traffic. The pod interfaces'
//! program (pod.rs) applies the same rules to what pods send.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{CT_REPLY, Ct4Key, Ct6Key, PROTO_TCP, PROTO_UDP, Reason, RevNat4, addr6};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    flow::reply_frontend6,
    headers::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, IP_CHECK_OFF, IP_SADDR_OFF, IPV6_SADDR_OFF,
        L4_OFF, L4_OFF6, PROTO_ICMP, PROTO_ICMPV6, l4,
    },
    icmp::{local_icmp, local_icmp6},
    maps::{LB_CT4_V2, LB_REVNAT4_V1},
    skb::{REWRITE_FAILED, check_offset6, l4_mangled, replace_addr6, replace_port},
    verdict::Verdict,
};

/// TC egress of either family.
#[inline(always)]
pub(crate) fn try_egress(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF).map_err(|_| Verdict::NotOurs)?;
    if u16::from_be(ether_type) == ETH_P_IPV6 {
        return try_egress6(ctx, true);
    }
    try_egress4(ctx)
}

/// TC egress of an IPv4 frame (anything else is [`Verdict::NotOurs`]): the pod interfaces'
/// program calls it alone, its IPv6 frames going to their own program.
#[inline(always)]
pub(crate) fn try_egress4(ctx: &TcContext) -> Result<(), Verdict> {
    let ether_type: u16 = ctx.load(ETH_TYPE_OFF).map_err(|_| Verdict::NotOurs)?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return Err(Verdict::NotOurs);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_LEN).map_err(|_| Verdict::NotOurs)?;
    // Only the shapes that ingress translates can be replies of a translated flow.
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Verdict::NotOurs);
    }
    let check_off = match ip.proto {
        PROTO_TCP => L4_OFF + l4::TCP_CHECK,
        PROTO_UDP => L4_OFF + l4::UDP_CHECK,
        // An ICMP error from a local backend about a translated flow (icmp.rs).
        PROTO_ICMP => return local_icmp(ctx),
        _ => return Err(Verdict::NotOurs),
    };
    let ports: [u16; 2] = ctx.load(L4_OFF).map_err(|_| Verdict::NotOurs)?;
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let key = Ct4Key {
        saddr,
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: ports[0],
        dport: ports[1],
        proto: ip.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let entry = unsafe { LB_CT4_V2.get(&key) }.ok_or(Verdict::NotOurs)?;
    // The entry carries the frontend; one migrated from V1 does not.
    let frontend = if entry.nat_addr != 0 {
        RevNat4 {
            addr: entry.nat_addr,
            port: entry.nat_port,
            _pad: 0,
        }
    } else {
        *unsafe { LB_REVNAT4_V1.get(&entry.service_id) }
            .ok_or(Verdict::Pass(Reason::RevNatMissing))?
    };

    // The skb helpers keep the checksums right whatever the skb's checksum state is
    // (CHECKSUM_PARTIAL from a local or veth sender included).
    let mangled = if ip.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    ctx.l4_csum_replace(check_off, saddr as u64, frontend.addr as u64, pseudo | 4)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.l4_csum_replace(
        check_off,
        ports[0] as u64,
        frontend.port as u64,
        mangled | 2,
    )
    .map_err(|_| REWRITE_FAILED)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, saddr as u64, frontend.addr as u64, 4)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.store(IP_SADDR_OFF, &frontend.addr, 0)
        .map_err(|_| REWRITE_FAILED)?;
    ctx.store(L4_OFF, &frontend.port, 0)
        .map_err(|_| REWRITE_FAILED)?;
    Ok(())
}

/// TC egress of an IPv6 frame ([`try_egress`] calls it): a reply of a translated flow leaves
/// as if it came from the frontend, by the flow's conntrack reply entry; with `icmp`, so
/// does an ICMPv6 error about such a flow ([`local_icmp6`]).
#[inline(always)]
pub(crate) fn try_egress6(ctx: &TcContext, icmp: bool) -> Result<(), Verdict> {
    let ip: Ipv6Hdr = ctx.load(ETH_LEN).map_err(|_| Verdict::NotOurs)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::NotOurs);
    }
    if icmp && ip.next_hdr == PROTO_ICMPV6 {
        return local_icmp6(ctx, &ip);
    }
    // Only the shapes that ingress translates can be replies of a translated flow.
    let check_off = check_offset6(ip.next_hdr).ok_or(Verdict::NotOurs)?;
    let ports: [u16; 2] = ctx.load(L4_OFF6).map_err(|_| Verdict::NotOurs)?;
    let saddr = addr6(ip.src_addr);
    let key = Ct6Key {
        saddr,
        daddr: addr6(ip.dst_addr),
        sport: ports[0],
        dport: ports[1],
        proto: ip.next_hdr,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let frontend = reply_frontend6(&key)?;
    let mangled = l4_mangled(ip.next_hdr);
    replace_addr6(
        ctx,
        IPV6_SADDR_OFF,
        saddr,
        frontend.addr,
        check_off,
        mangled,
    )?;
    replace_port(ctx, L4_OFF6, ports[0], frontend.port, check_off, mangled)
}
