//! The header layout the programs read and write, defined once: each field's offset inside
//! its header, and the frame offsets built from them (a frame starts with its Ethernet
//! header; the programs handle no VLAN tags and no IPv4 options, so every header after
//! Ethernet is at a fixed offset).

use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

/// Length of the Ethernet header: the offset of the IP header.
pub(crate) const ETH_LEN: usize = EthHdr::LEN;
/// Offset of the ethertype in the frame.
pub(crate) const ETH_TYPE_OFF: usize = 12;
/// Ethertype of IPv4.
pub(crate) const ETH_P_IP: u16 = 0x0800;
/// Ethertype of IPv6.
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;

/// IP protocol numbers the programs handle besides TCP and UDP (`lb_common::PROTO_*`).
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// Offsets inside an IPv4 header without options.
pub(crate) mod ipv4 {
    /// Length of the header: the offset of the transport header.
    pub(crate) const LEN: usize = super::Ipv4Hdr::LEN;
    /// The transport protocol.
    pub(crate) const PROTO: usize = 9;
    /// The header checksum.
    pub(crate) const CHECK: usize = 10;
    /// The source address.
    pub(crate) const SADDR: usize = 12;
    /// The destination address.
    pub(crate) const DADDR: usize = 16;
}

/// Offsets inside the fixed IPv6 header.
pub(crate) mod ipv6 {
    /// Length of the header: the offset of the transport header (no extension headers).
    pub(crate) const LEN: usize = super::Ipv6Hdr::LEN;
    /// The next header (the transport protocol).
    pub(crate) const NEXT_HDR: usize = 6;
    /// The source address.
    pub(crate) const SADDR: usize = 8;
    /// The destination address.
    pub(crate) const DADDR: usize = 24;
}

/// Offsets inside a TCP or UDP header, and TCP's flags.
pub(crate) mod l4 {
    /// The source port (the destination port follows it).
    pub(crate) const SPORT: usize = 0;
    /// The destination port.
    pub(crate) const DPORT: usize = 2;
    /// TCP's checksum.
    pub(crate) const TCP_CHECK: usize = 16;
    /// The byte of the TCP header holding the flags.
    pub(crate) const TCP_FLAGS: usize = 13;
    /// UDP's checksum.
    pub(crate) const UDP_CHECK: usize = 6;
    pub(crate) const TCP_FIN: u8 = 0x01;
    pub(crate) const TCP_SYN: u8 = 0x02;
    pub(crate) const TCP_RST: u8 = 0x04;
    pub(crate) const TCP_ACK: u8 = 0x10;

    /// The checksum's offset in the transport header of `proto` (TCP, else UDP).
    #[inline(always)]
    pub(crate) const fn check(proto: u8) -> usize {
        if proto == lb_common::PROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        }
    }
}

/// Offsets inside an ICMP or ICMPv6 error message.
pub(crate) mod icmp {
    /// The checksum.
    pub(crate) const CHECK: usize = 2;
    /// The quoted packet's IP header (after type, code, checksum and four unused bytes).
    pub(crate) const QUOTE: usize = 8;
}

// Frame offsets of an IPv4 packet.
/// The IPv4 header checksum.
pub(crate) const IP_CHECK_OFF: usize = ETH_LEN + ipv4::CHECK;
/// The IPv4 source address.
pub(crate) const IP_SADDR_OFF: usize = ETH_LEN + ipv4::SADDR;
/// The IPv4 destination address.
pub(crate) const IP_DADDR_OFF: usize = ETH_LEN + ipv4::DADDR;
/// The transport header after an IPv4 header.
pub(crate) const L4_OFF: usize = ETH_LEN + ipv4::LEN;

// Frame offsets of an IPv6 packet.
/// The IPv6 next header.
pub(crate) const IPV6_NEXT_HDR_OFF: usize = ETH_LEN + ipv6::NEXT_HDR;
/// The IPv6 source address.
pub(crate) const IPV6_SADDR_OFF: usize = ETH_LEN + ipv6::SADDR;
/// The IPv6 destination address.
pub(crate) const IPV6_DADDR_OFF: usize = ETH_LEN + ipv6::DADDR;
/// The transport header after the fixed IPv6 header.
pub(crate) const L4_OFF6: usize = ETH_LEN + ipv6::LEN;
