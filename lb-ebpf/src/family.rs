//! The datapath's side of an address family: to what `lb_common::Family` names (the key and
//! value types of each map with a twin per family) [`Datapath`] adds what only the programs
//! have: which map holds each, the family's parser and header layout, and the few
//! operations its headers do differently (IPv4 has a header checksum and a TTL, IPv6 a hop
//! limit and addresses of four words). The paths written once over `F: Datapath`
//! (selection, conntrack, translation, replies, source NAT, the pod interfaces' rules, the
//! socket hooks) are `#[inline(always)]`, so each compiles to one body per family, as the
//! twins written by hand did.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, bpf_fib_lookup},
    maps::{HashMap, LpmTrie, LruHashMap},
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr6, AffinityEntry, Family, PROTO_TCP, PROTO_UDP, Service, V4, V6, addr6, csum};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    frame::{Bytes, Frame, ptr_at},
    headers::{
        ETH_LEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF, L4_OFF,
        L4_OFF6,
    },
    maps::{
        LB_AFFINITY4_V1, LB_AFFINITY6_V1, LB_BACKEND4_V2, LB_BACKEND6_V1, LB_CT4_V2, LB_CT6_V1,
        LB_NAT4_V1, LB_NAT6_V1, LB_REVNAT4_V1, LB_REVNAT6_V1, LB_SOCK4_V1, LB_SOCK6_V1,
        LB_SRCRANGE4_V1, LB_SRCRANGE6_V1, LB_SVC4_V1, LB_SVC6_V1,
    },
    parse::{Packet, parse_ipv4, parse_ipv6, read_addr6},
    skb::REWRITE_FAILED,
    verdict::Verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// An address family as the programs see it.
pub(crate) trait Datapath: Family {
    /// The IP header.
    type Header: Copy;
    /// Frame offset of the transport header.
    const L4_OFF: usize;
    /// Frame offset of the source address.
    const SADDR_OFF: usize;
    /// Frame offset of the destination address.
    const DADDR_OFF: usize;
    /// The address family of a FIB lookup.
    const AF: u8;

    /// `LB_SVC4_V1`, `LB_SVC6_V1`.
    fn services() -> &'static HashMap<Self::Frontend, Service>;
    /// `LB_BACKEND4_V2`, `LB_BACKEND6_V1`.
    fn backends() -> &'static HashMap<u32, Self::Backend>;
    /// `LB_CT4_V2`, `LB_CT6_V1`.
    fn conntrack() -> &'static LruHashMap<Self::CtKey, Self::CtEntry>;
    /// `LB_REVNAT4_V1`, `LB_REVNAT6_V1`.
    fn reverse_nat() -> &'static HashMap<u32, Self::RevNat>;
    /// `LB_AFFINITY4_V1`, `LB_AFFINITY6_V1`.
    fn affinity() -> &'static LruHashMap<Self::AffinityKey, AffinityEntry>;
    /// `LB_SRCRANGE4_V1`, `LB_SRCRANGE6_V1`.
    fn source_ranges() -> &'static LpmTrie<Self::SourceRange, u8>;
    /// `LB_NAT4_V1`, `LB_NAT6_V1`.
    fn nat() -> &'static LruHashMap<Self::NatKey, Self::NatEntry>;
    /// `LB_SOCK4_V1`, `LB_SOCK6_V1`.
    fn sockets() -> &'static LruHashMap<Self::SockKey, Self::SockEntry>;

    /// The family's parser (each has its own: see parse.rs).
    fn parse<C: Frame>(ctx: &C) -> Result<Packet<Self::Header>, Verdict>;
    /// The source address of a header in the packet (any alignment).
    fn saddr(ip: *const Self::Header) -> Self::Addr;
    /// The destination address of a header in the packet.
    fn daddr(ip: *const Self::Header) -> Self::Addr;
    /// The source address of a copy of a header (on the stack, aligned).
    fn copy_saddr(ip: &Self::Header) -> Self::Addr;
    /// The destination address of a copy of a header.
    fn copy_daddr(ip: &Self::Header) -> Self::Addr;
    /// A header's transport protocol (IPv6: its next header).
    fn proto(ip: &Self::Header) -> u8;
    /// Writes a parsed header's destination address (`old` before), and its checksum.
    fn set_daddr(ip: *mut Self::Header, old: Self::Addr, new: Self::Addr);
    /// Writes a header's source address (`old` before), and its checksum.
    fn set_saddr(ip: *mut Self::Header, old: Self::Addr, new: Self::Addr);
    /// The transport checksum `check` of a `proto` packet after an address in its
    /// pseudo-header and a port changed. IPv4's UDP "no checksum" zero stays zero; a UDP
    /// checksum that comes out as 0 is sent as all ones (RFC 768, RFC 8200 8.1).
    fn l4_checksum(
        proto: u8,
        check: u16,
        old_addr: Self::Addr,
        new_addr: Self::Addr,
        old_port: u16,
        new_port: u16,
    ) -> u16;
    /// The header checksum after an address changed from `old` to `new` (IPv6 has none).
    fn set_ip_checksum<P: Bytes>(p: &P, old: Self::Addr, new: Self::Addr) -> Option<()>;
    /// Whether a copy of the IP header (as TC programs read it) has a shape the programs
    /// translate (IPv4: no options, not a fragment; IPv6: version 6). TC programs keep the
    /// copy and read its fields where they use them: read at once and held in registers
    /// across the helper calls that follow, they doubled the verifier's states in
    /// `lb_tc_pod_in`.
    fn plain(ip: &Self::Header) -> bool;
    /// TC: replaces the address at `offset` (`old`) with `new`, with the transport checksum
    /// at `check_off` (`mangled`: UDP's flag, `skb::l4_mangled`) and the header's.
    fn skb_set_addr(
        ctx: &TcContext,
        offset: usize,
        old: Self::Addr,
        new: Self::Addr,
        check_off: usize,
        mangled: u64,
    ) -> Result<(), Verdict>;
    /// TC: the transport checksum at `check_off` after the address `old` in its
    /// pseudo-header became `new`, with one call of the kernel's helper (`mangled`: UDP's
    /// flag, `skb::l4_mangled`); the address itself is not written.
    fn skb_pseudo_csum(
        ctx: &TcContext,
        check_off: usize,
        old: Self::Addr,
        new: Self::Addr,
        mangled: u64,
    ) -> Result<(), Verdict>;
    /// Writes a FIB lookup's addresses.
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: Self::Addr, dst: Self::Addr);
    /// A FIB lookup's source address.
    fn fib_src(params: &bpf_fib_lookup) -> Self::Addr;
    /// XDP: one hop less (IPv4's TTL, with the header checksum; IPv6's hop limit), as the
    /// kernel's forwarding does; `false` when it runs out.
    fn hop(ctx: &XdpContext) -> bool;
}

impl Datapath for V4 {
    type Header = Ipv4Hdr;
    const L4_OFF: usize = L4_OFF;
    const SADDR_OFF: usize = IP_SADDR_OFF;
    const DADDR_OFF: usize = IP_DADDR_OFF;
    const AF: u8 = AF_INET;

    #[inline(always)]
    fn services() -> &'static HashMap<Self::Frontend, Service> {
        &LB_SVC4_V1
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Self::Backend> {
        &LB_BACKEND4_V2
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Self::CtKey, Self::CtEntry> {
        &LB_CT4_V2
    }
    #[inline(always)]
    fn reverse_nat() -> &'static HashMap<u32, Self::RevNat> {
        &LB_REVNAT4_V1
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<Self::AffinityKey, AffinityEntry> {
        &LB_AFFINITY4_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<Self::SourceRange, u8> {
        &LB_SRCRANGE4_V1
    }
    #[inline(always)]
    fn nat() -> &'static LruHashMap<Self::NatKey, Self::NatEntry> {
        &LB_NAT4_V1
    }
    #[inline(always)]
    fn sockets() -> &'static LruHashMap<Self::SockKey, Self::SockEntry> {
        &LB_SOCK4_V1
    }

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C) -> Result<Packet<Ipv4Hdr>, Verdict> {
        parse_ipv4(ctx)
    }
    #[inline(always)]
    fn saddr(ip: *const Ipv4Hdr) -> u32 {
        u32::from_ne_bytes(unsafe { (*ip).src_addr })
    }
    #[inline(always)]
    fn daddr(ip: *const Ipv4Hdr) -> u32 {
        u32::from_ne_bytes(unsafe { (*ip).dst_addr })
    }
    #[inline(always)]
    fn copy_saddr(ip: &Ipv4Hdr) -> u32 {
        u32::from_ne_bytes(ip.src_addr)
    }
    #[inline(always)]
    fn copy_daddr(ip: &Ipv4Hdr) -> u32 {
        u32::from_ne_bytes(ip.dst_addr)
    }
    #[inline(always)]
    fn proto(ip: &Ipv4Hdr) -> u8 {
        ip.proto
    }
    #[inline(always)]
    fn set_daddr(ip: *mut Ipv4Hdr, old: u32, new: u32) {
        unsafe {
            (*ip).dst_addr = new.to_ne_bytes();
            let check = &mut *(core::ptr::addr_of_mut!((*ip).check) as *mut u16);
            *check = csum::replace4(*check, old, new);
        }
    }
    #[inline(always)]
    fn set_saddr(ip: *mut Ipv4Hdr, old: u32, new: u32) {
        unsafe {
            (*ip).src_addr = new.to_ne_bytes();
            let check = &mut *(core::ptr::addr_of_mut!((*ip).check) as *mut u16);
            *check = csum::replace4(*check, old, new);
        }
    }
    #[inline(always)]
    fn l4_checksum(
        proto: u8,
        check: u16,
        old_addr: u32,
        new_addr: u32,
        old_port: u16,
        new_port: u16,
    ) -> u16 {
        if proto == PROTO_TCP || check != 0 {
            let new = csum::replace4_2(check, old_addr, new_addr, old_port, new_port);
            if proto == PROTO_UDP && new == 0 {
                0xffff
            } else {
                new
            }
        } else {
            check
        }
    }
    #[inline(always)]
    fn set_ip_checksum<P: Bytes>(p: &P, old: u32, new: u32) -> Option<()> {
        let check: u16 = p.get(IP_CHECK_OFF)?;
        p.set(IP_CHECK_OFF, csum::replace4(check, old, new))
    }
    #[inline(always)]
    fn plain(ip: &Ipv4Hdr) -> bool {
        ip.vihl == 0x45 && u16::from_be_bytes(ip.frags) & 0x3fff == 0
    }
    #[inline(always)]
    fn skb_set_addr(
        ctx: &TcContext,
        offset: usize,
        old: u32,
        new: u32,
        check_off: usize,
        mangled: u64,
    ) -> Result<(), Verdict> {
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        ctx.l4_csum_replace(check_off, old as u64, new as u64, flags)
            .map_err(|_| REWRITE_FAILED)?;
        ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 4)
            .map_err(|_| REWRITE_FAILED)?;
        ctx.store(offset, &new, 0).map_err(|_| REWRITE_FAILED)
    }
    #[inline(always)]
    fn skb_pseudo_csum(
        ctx: &TcContext,
        check_off: usize,
        old: u32,
        new: u32,
        mangled: u64,
    ) -> Result<(), Verdict> {
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        ctx.l4_csum_replace(check_off, old as u64, new as u64, flags)
            .map_err(|_| REWRITE_FAILED)
    }
    #[inline(always)]
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: u32, dst: u32) {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }
    #[inline(always)]
    fn fib_src(params: &bpf_fib_lookup) -> u32 {
        unsafe { params.__bindgen_anon_3.ipv4_src }
    }
    #[inline(always)]
    fn hop(ctx: &XdpContext) -> bool {
        let Some(ip) = ptr_at::<_, Ipv4Hdr>(ctx, ETH_LEN) else {
            return false;
        };
        unsafe {
            let ttl = (*ip).ttl;
            if ttl <= 1 {
                return false;
            }
            // TTL and protocol are one 16-bit word of the header checksum.
            let old = u16::from_ne_bytes([ttl, (*ip).proto]);
            let new = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
            (*ip).ttl = ttl - 1;
            let check = core::ptr::addr_of_mut!((*ip).check) as *mut u16;
            *check = csum::replace2(*check, old, new);
        }
        true
    }
}

impl Datapath for V6 {
    type Header = Ipv6Hdr;
    const L4_OFF: usize = L4_OFF6;
    const SADDR_OFF: usize = IPV6_SADDR_OFF;
    const DADDR_OFF: usize = IPV6_DADDR_OFF;
    const AF: u8 = AF_INET6;

    #[inline(always)]
    fn services() -> &'static HashMap<Self::Frontend, Service> {
        &LB_SVC6_V1
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, Self::Backend> {
        &LB_BACKEND6_V1
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Self::CtKey, Self::CtEntry> {
        &LB_CT6_V1
    }
    #[inline(always)]
    fn reverse_nat() -> &'static HashMap<u32, Self::RevNat> {
        &LB_REVNAT6_V1
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<Self::AffinityKey, AffinityEntry> {
        &LB_AFFINITY6_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<Self::SourceRange, u8> {
        &LB_SRCRANGE6_V1
    }
    #[inline(always)]
    fn nat() -> &'static LruHashMap<Self::NatKey, Self::NatEntry> {
        &LB_NAT6_V1
    }
    #[inline(always)]
    fn sockets() -> &'static LruHashMap<Self::SockKey, Self::SockEntry> {
        &LB_SOCK6_V1
    }

    #[inline(always)]
    fn parse<C: Frame>(ctx: &C) -> Result<Packet<Ipv6Hdr>, Verdict> {
        parse_ipv6(ctx)
    }
    #[inline(always)]
    fn saddr(ip: *const Ipv6Hdr) -> Addr6 {
        read_addr6(unsafe { core::ptr::addr_of!((*ip).src_addr) })
    }
    #[inline(always)]
    fn daddr(ip: *const Ipv6Hdr) -> Addr6 {
        read_addr6(unsafe { core::ptr::addr_of!((*ip).dst_addr) })
    }
    #[inline(always)]
    fn copy_saddr(ip: &Ipv6Hdr) -> Addr6 {
        addr6(ip.src_addr)
    }
    #[inline(always)]
    fn copy_daddr(ip: &Ipv6Hdr) -> Addr6 {
        addr6(ip.dst_addr)
    }
    #[inline(always)]
    fn proto(ip: &Ipv6Hdr) -> u8 {
        ip.next_hdr
    }
    #[inline(always)]
    fn set_daddr(ip: *mut Ipv6Hdr, _old: Addr6, new: Addr6) {
        unsafe {
            core::ptr::write_unaligned(
                core::ptr::addr_of_mut!((*ip).dst_addr).cast::<Addr6>(),
                new,
            );
        }
    }
    #[inline(always)]
    fn set_saddr(ip: *mut Ipv6Hdr, _old: Addr6, new: Addr6) {
        unsafe {
            core::ptr::write_unaligned(
                core::ptr::addr_of_mut!((*ip).src_addr).cast::<Addr6>(),
                new,
            );
        }
    }
    #[inline(always)]
    fn l4_checksum(
        proto: u8,
        check: u16,
        old_addr: Addr6,
        new_addr: Addr6,
        old_port: u16,
        new_port: u16,
    ) -> u16 {
        // IPv6 has no "no checksum" zero for UDP (the parser passes such a datagram).
        let new = csum::replace16_2(check, old_addr, new_addr, old_port, new_port);
        if proto == PROTO_UDP && new == 0 {
            0xffff
        } else {
            new
        }
    }
    #[inline(always)]
    fn set_ip_checksum<P: Bytes>(_p: &P, _old: Addr6, _new: Addr6) -> Option<()> {
        Some(())
    }
    #[inline(always)]
    fn plain(ip: &Ipv6Hdr) -> bool {
        ip.vcf[0] >> 4 == 6
    }
    #[inline(always)]
    fn skb_set_addr(
        ctx: &TcContext,
        offset: usize,
        old: Addr6,
        new: Addr6,
        check_off: usize,
        mangled: u64,
    ) -> Result<(), Verdict> {
        // No header checksum: the address is only in the transport checksum's
        // pseudo-header, a word at a time.
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        for (old, new) in old.iter().zip(new.iter()) {
            ctx.l4_csum_replace(check_off, *old as u64, *new as u64, pseudo)
                .map_err(|_| REWRITE_FAILED)?;
        }
        ctx.store(offset, &new, 0).map_err(|_| REWRITE_FAILED)
    }
    #[inline(always)]
    fn skb_pseudo_csum(
        ctx: &TcContext,
        check_off: usize,
        old: Addr6,
        new: Addr6,
        mangled: u64,
    ) -> Result<(), Verdict> {
        // The helper's "by difference" form (size 0, `from` 0): the whole address at once,
        // its difference summed here as `bpf_csum_diff` would.
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled;
        ctx.l4_csum_replace(check_off, 0, csum::diff16(old, new) as u64, flags)
            .map_err(|_| REWRITE_FAILED)
    }
    #[inline(always)]
    fn set_fib_addrs(params: &mut bpf_fib_lookup, src: Addr6, dst: Addr6) {
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }
    #[inline(always)]
    fn fib_src(params: &bpf_fib_lookup) -> Addr6 {
        unsafe { params.__bindgen_anon_3.ipv6_src }
    }
    #[inline(always)]
    fn hop(ctx: &XdpContext) -> bool {
        let Some(ip) = ptr_at::<_, Ipv6Hdr>(ctx, ETH_LEN) else {
            return false;
        };
        unsafe {
            let hops = (*ip).hop_limit;
            if hops <= 1 {
                return false;
            }
            (*ip).hop_limit = hops - 1;
        }
        true
    }
}
