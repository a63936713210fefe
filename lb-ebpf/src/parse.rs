//! Parsing of the packets the programs translate: an IPv4 header without options that is
//! not a fragment, or a fixed IPv6 header without extension headers, followed by a whole
//! TCP or UDP header; everything else is passed untouched, counted by `lb_common::Reason`.
//!
//! The two families keep their own parsers: each transport parse is inline in its own
//! function on purpose. Shared by both (a function called from the two), it made LLVM pack
//! the packet pointers so that the verifier rejected `lb_tc_pod_in` (R3 pointer
//! arithmetic with >>=).

use lb_common::{Addr6, PROTO_TCP, PROTO_UDP, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    frame::{Frame, ptr_at},
    headers::{ETH_LEN, ETH_P_IP, L4_OFF, L4_OFF6, ipv4, ipv6, l4},
    verdict::Verdict,
};

/// The transport header fields the translation reads and writes. The pointers come from
/// the one bounds check of the header, so writing through them needs no other.
pub(crate) struct L4 {
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// The destination port in the packet.
    pub(crate) dport_at: *mut u16,
    /// The checksum in the packet.
    pub(crate) check_at: *mut u16,
    /// TCP FIN or RST seen.
    pub(crate) closing: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub(crate) syn: bool,
}

/// A packet the programs translate: its IP header (`H`: [`Ipv4Hdr`] or [`Ipv6Hdr`]), the
/// transport protocol (TCP or UDP) and the transport header's fields.
pub(crate) struct Packet<H> {
    pub(crate) ip: *mut H,
    pub(crate) proto: u8,
    pub(crate) l4: L4,
}

/// An IPv4 header that is whole, has no options, is not a fragment, carries TCP or UDP with
/// its header present, and whose total length is consistent with the received bytes.
#[inline(always)]
pub(crate) fn parse_ipv4<C: Frame>(ctx: &C) -> Result<Packet<Ipv4Hdr>, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Pass(Reason::ShortEthernet))?;
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Verdict::Pass(Reason::NotIp));
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).ok_or(Verdict::Pass(Reason::ShortIpv4))?;
    let vihl = unsafe { (*ip).vihl };
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(Verdict::Pass(Reason::BadIpv4Header));
    }
    if vihl & 0x0f != 5 {
        return Err(Verdict::Pass(Reason::Ipv4Options));
    }
    let frags = u16::from_be_bytes(unsafe { (*ip).frags });
    if frags & 0x3fff != 0 {
        // MF set or a non-zero offset.
        return Err(Verdict::Pass(Reason::Ipv4Fragment));
    }
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let received = ctx.len() - ETH_LEN;
    let proto = unsafe { (*ip).proto };
    let l4_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        _ => return Err(Verdict::Pass(Reason::NotTcpUdp)),
    };
    if tot_len > received {
        return Err(Verdict::Pass(Reason::BadIpv4Length));
    }
    // The transport header, inline (see the module's doc).
    let short = Verdict::Pass(Reason::ShortL4);
    let l4 = if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF).ok_or(short)?;
        let flags = unsafe { *(tcp as *const u8).add(l4::TCP_FLAGS) };
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*tcp).source),
                dport: u16::from_ne_bytes((*tcp).dest),
                dport_at: core::ptr::addr_of_mut!((*tcp).dest).cast(),
                check_at: core::ptr::addr_of_mut!((*tcp).check).cast(),
                closing: flags & (l4::TCP_FIN | l4::TCP_RST) != 0,
                syn: flags & (l4::TCP_SYN | l4::TCP_ACK) == l4::TCP_SYN,
            }
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF).ok_or(short)?;
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*udp).src),
                dport: u16::from_ne_bytes((*udp).dst),
                dport_at: core::ptr::addr_of_mut!((*udp).dst).cast(),
                check_at: core::ptr::addr_of_mut!((*udp).check).cast(),
                closing: false,
                syn: false,
            }
        }
    };
    if tot_len < ipv4::LEN + l4_len {
        // The bytes are there, but the IP header says they are not part of the datagram.
        return Err(Verdict::Pass(Reason::BadIpv4Length));
    }
    Ok(Packet { ip, proto, l4 })
}

/// Whether `next` (an IPv6 next header value) is an extension header (IANA's "IPv6
/// Extension Header Types": hop-by-hop, routing, fragment, ESP, AH, destination options,
/// mobility, HIP, shim6, and the two experimental values).
#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// An IPv6 header (of a frame whose ethertype the caller checked) that is whole, is
/// followed directly by a TCP or UDP header that is present, and whose payload length is
/// consistent with the received bytes.
#[inline(always)]
pub(crate) fn parse_ipv6<C: Frame>(ctx: &C) -> Result<Packet<Ipv6Hdr>, Verdict> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).ok_or(Verdict::Pass(Reason::ShortIpv6))?;
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Verdict::Pass(Reason::BadIpv6Header));
    }
    let proto = unsafe { (*ip).next_hdr };
    let l4_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        next if is_extension(next) => return Err(Verdict::Pass(Reason::Ipv6Extension)),
        _ => return Err(Verdict::Pass(Reason::NotTcpUdp)),
    };
    let payload_len = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    if payload_len > ctx.len() - ETH_LEN - ipv6::LEN {
        return Err(Verdict::Pass(Reason::BadIpv6Length));
    }
    let l4 = parse_l4_6(ctx, proto)?;
    if payload_len < l4_len {
        // A jumbogram's 0 included: it would need a hop-by-hop header anyway.
        return Err(Verdict::Pass(Reason::BadIpv6Length));
    }
    if proto == PROTO_UDP && unsafe { *l4.check_at } == 0 {
        return Err(Verdict::Pass(Reason::Ipv6UdpZeroChecksum));
    }
    Ok(Packet { ip, proto, l4 })
}

/// The TCP (`proto` [`PROTO_TCP`]) or else UDP header after the IPv6 header, if the packet
/// holds it: IPv4's, which `parse_ipv4` keeps inline (see the module's doc).
#[inline(always)]
fn parse_l4_6<C: Frame>(ctx: &C, proto: u8) -> Result<L4, Verdict> {
    let short = Verdict::Pass(Reason::ShortL4);
    Ok(if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF6).ok_or(short)?;
        let flags = unsafe { *(tcp as *const u8).add(l4::TCP_FLAGS) };
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*tcp).source),
                dport: u16::from_ne_bytes((*tcp).dest),
                dport_at: core::ptr::addr_of_mut!((*tcp).dest).cast(),
                check_at: core::ptr::addr_of_mut!((*tcp).check).cast(),
                closing: flags & (l4::TCP_FIN | l4::TCP_RST) != 0,
                syn: flags & (l4::TCP_SYN | l4::TCP_ACK) == l4::TCP_SYN,
            }
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF6).ok_or(short)?;
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*udp).src),
                dport: u16::from_ne_bytes((*udp).dst),
                dport_at: core::ptr::addr_of_mut!((*udp).dst).cast(),
                check_at: core::ptr::addr_of_mut!((*udp).check).cast(),
                closing: false,
                syn: false,
            }
        }
    })
}

/// The IPv6 address at `at` in the packet (any alignment).
#[inline(always)]
pub(crate) fn read_addr6(at: *const [u8; 16]) -> Addr6 {
    // Word by word: read whole, LLVM copies the address with a call to `memmove`, a byte
    // loop the verifier walks at each call.
    let at = at.cast::<u32>();
    unsafe {
        [
            at.read_unaligned(),
            at.add(1).read_unaligned(),
            at.add(2).read_unaligned(),
            at.add(3).read_unaligned(),
        ]
    }
}
