//! The IPv6 datapath, north-south: `lb_xdp_ingress6`, which `lb_xdp_ingress` tail-calls for
//! the IPv6 frames of the external interface (through `LB_PROGS_V2`, slot
//! `lb_common::prog_slot::XDP_INGRESS6`), and the reverse translation of IPv6 replies in
//! `lb_tc_egress` ([`try_egress6`]).
//!
//! The rules are IPv4's (main.rs), with the IPv6 maps (`lb_common::v6`): conntrack first,
//! vouched by the backend generation; a new flow gets its client's fresh affinity entry, else
//! the Maglev table entry of its flow hash. The IPv4 path is written on its own, not made
//! generic over the family: what is shared is the selection (generic over the backend type).
//!
//! Only a fixed header followed directly by TCP or UDP is translated. An extension header
//! (a fragment header included) is passed untouched and counted; so is a UDP datagram with
//! checksum 0, which IPv6 forbids. A flow to a remote backend is source-NATed and sent on
//! by XDP (nat6.rs), and the remote backend's replies are translated back there.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, xdp_action},
    macros::{classifier, xdp},
    maps::lpm_trie::Key as LpmKey,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Addr6, Affinity6Key, BACKEND_F_REMOTE, Backend6, CT_F_CLOSING, CT_F_REMOTE, CT_FORWARD,
    CT_LAST_SEEN_GRANULARITY_NS, CT_REPLY, Ct6Entry, Ct6Key, Frontend6, HAIRPIN_ADDR6,
    NAT6_FORWARD, NAT6_REPLY, PROTO_TCP, PROTO_UDP, RevNat6, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, Service, SourceRange6, addr6, csum, event, flow_hash6, nat, nat_event,
    prefilter, prog_slot, reason, table_event, tc_prog_slot,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    Chosen, ETH_LEN, Frame, L4, LB_AFFINITY6_V1, LB_CT6_V1, LB_PREFILTER4_V1, LB_PROGS_V2,
    LB_REVNAT6_V1, LB_SRCRANGE6_V1, LB_SVC6_V1, LB_TCPROGS_V1, NOT_OURS, TCP_ACK, TCP_CHECK_OFF,
    TCP_FIN, TCP_FLAGS_OFF, TCP_RST, TCP_SYN, UDP_CHECK_OFF, Verdict, backend_generation,
    backend_of, count, count_packet, ct_now, ct_write_in, nat6,
    nat6::{ICMPV6_ERRORS, PROTO_ICMPV6},
    note, ptr_at, reselect_because, select_with_affinity, tc_action, vouch,
};

pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_LEN: usize = Ipv6Hdr::LEN;
pub(crate) const L4_OFF6: usize = ETH_LEN + IPV6_LEN;
/// Offsets of the source and destination addresses in the IPv6 header.
const IPV6_SADDR_OFF: usize = ETH_LEN + 8;
const IPV6_DADDR_OFF: usize = ETH_LEN + 24;

/// Called by `lb_xdp_ingress` for a frame that is not IPv4: an IPv6 frame goes on to
/// `lb_xdp_ingress6` (the tail call does not return); anything else, or an IPv6 frame
/// while that program's slot is empty, is passed and counted.
#[inline(always)]
pub(crate) fn dispatch(ctx: &XdpContext) -> u32 {
    let ipv6 = ptr_at::<_, EthHdr>(ctx, 0)
        .is_some_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV6);
    if !ipv6 {
        count(reason::NOT_IP);
        return xdp_action::XDP_PASS;
    }
    unsafe { LB_PROGS_V2.tail_call(ctx, prog_slot::XDP_INGRESS6) };
    count(reason::IPV6_PROGRAM_MISSING);
    xdp_action::XDP_PASS
}

/// An IPv6 header that is whole, is followed directly by a TCP or UDP header that is
/// present, and whose payload length is consistent with the received bytes.
pub(crate) struct Ipv6Packet {
    pub(crate) ip: *mut Ipv6Hdr,
    pub(crate) proto: u8,
    pub(crate) l4: L4,
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

#[inline(always)]
pub(crate) fn parse_ipv6<C: Frame>(ctx: &C) -> Result<Ipv6Packet, Verdict> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).ok_or(Verdict::Pass(reason::SHORT_IPV6))?;
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Verdict::Pass(reason::BAD_IPV6_HEADER));
    }
    let proto = unsafe { (*ip).next_hdr };
    let l4_len = match proto {
        PROTO_TCP => TcpHdr::LEN,
        PROTO_UDP => UdpHdr::LEN,
        next if is_extension(next) => return Err(Verdict::Pass(reason::IPV6_EXTENSION)),
        _ => return Err(Verdict::Pass(reason::NOT_TCP_UDP)),
    };
    let payload_len = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    if payload_len > ctx.len() - ETH_LEN - IPV6_LEN {
        return Err(Verdict::Pass(reason::BAD_IPV6_LENGTH));
    }
    let l4 = parse_l4(ctx, proto)?;
    if payload_len < l4_len {
        // A jumbogram's 0 included: it would need a hop-by-hop header anyway.
        return Err(Verdict::Pass(reason::BAD_IPV6_LENGTH));
    }
    if proto == PROTO_UDP && unsafe { *l4.check_at } == 0 {
        return Err(Verdict::Pass(reason::IPV6_UDP_ZERO_CHECKSUM));
    }
    Ok(Ipv6Packet { ip, proto, l4 })
}

/// The TCP (`proto` [`PROTO_TCP`]) or else UDP header after the IPv6 header, if the packet
/// holds it. The same as IPv4's, which `parse_ipv4` keeps inline on purpose: shared, it made
/// LLVM pack the packet pointers so that the verifier rejected `lb_tc_pod_ingress`.
#[inline(always)]
fn parse_l4<C: Frame>(ctx: &C, proto: u8) -> Result<L4, Verdict> {
    let short = Verdict::Pass(reason::SHORT_L4);
    Ok(if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF6).ok_or(short)?;
        let flags = unsafe { *(tcp as *const u8).add(TCP_FLAGS_OFF) };
        unsafe {
            L4 {
                sport: u16::from_ne_bytes((*tcp).source),
                dport: u16::from_ne_bytes((*tcp).dest),
                dport_at: core::ptr::addr_of_mut!((*tcp).dest).cast(),
                check_at: core::ptr::addr_of_mut!((*tcp).check).cast(),
                closing: flags & (TCP_FIN | TCP_RST) != 0,
                syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
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

/// The address at `at` in the packet (any alignment).
#[inline(always)]
fn read_addr(at: *const [u8; 16]) -> Addr6 {
    unsafe { core::ptr::read_unaligned(at.cast::<Addr6>()) }
}

/// Where a packet of an IPv6 flow goes, and whose counters it adds to.
#[derive(Clone, Copy)]
struct Flow6 {
    service_id: u32,
    backend_id: u32,
    /// The backend's address and port, network byte order.
    addr: Addr6,
    port: u16,
    /// The flow's entries were written by this packet.
    new: bool,
    /// The backend is on another node: the packet is source-NATed (nat6.rs).
    remote: bool,
}

impl Flow6 {
    #[inline(always)]
    fn of(svc: &Service, chosen: &Chosen<Backend6>, new: bool) -> Self {
        Flow6 {
            service_id: svc.id,
            backend_id: chosen.id,
            addr: chosen.backend.addr,
            port: chosen.backend.port,
            new,
            remote: chosen.backend.flags & BACKEND_F_REMOTE != 0,
        }
    }
}

/// Writes an IPv6 conntrack entry, counting it when the key is new.
#[inline(always)]
fn ct_write6(key: &Ct6Key, entry: &Ct6Entry, exists: bool) -> bool {
    ct_write_in(&LB_CT6_V1, key, entry, exists)
}

/// The flow from its forward entry alone, when the entry vouches for its backend (as
/// `established` for IPv4).
#[inline(always)]
fn established6(entry: *mut Ct6Entry, l4: &L4) -> Option<Flow6> {
    let entry = unsafe { &mut *entry };
    if entry.nat_addr == [0; 4] || entry.backend_gen != backend_generation() {
        return None;
    }
    if l4.closing && entry.flags & CT_F_CLOSING == 0 {
        entry.flags |= CT_F_CLOSING;
    }
    let now = ct_now();
    if now.wrapping_sub(entry.last_seen_ns) >= CT_LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
    Some(Flow6 {
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        addr: entry.nat_addr,
        port: entry.nat_port,
        new: false,
        remote: entry.flags & CT_F_REMOTE != 0,
    })
}

/// The backend of a new IPv6 flow: the source ranges, then the client's affinity, then the
/// Maglev table (as `select_backend`).
#[inline(always)]
fn select_backend6(svc: &Service, key: &Ct6Key) -> Result<Chosen<Backend6>, Verdict> {
    if svc.backend_count == 0 {
        return Err(Verdict::Drop(reason::NO_BACKEND));
    }
    if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let source = LpmKey::new(
            SOURCE_RANGE_ID_BITS + 128,
            SourceRange6 {
                service_id: svc.id,
                addr: key.saddr,
            },
        );
        if LB_SRCRANGE6_V1.get(&source).is_none() {
            return Err(Verdict::Drop(reason::SOURCE_RANGE_DENIED));
        }
    }
    let client = Affinity6Key {
        service_id: svc.id,
        client: key.saddr,
    };
    let affinity = (&LB_AFFINITY6_V1, table_event::AFFINITY_INSERTS);
    select_with_affinity(svc, affinity, &client, || {
        flow_hash6(key.saddr, key.daddr, key.sport, key.dport, key.proto)
    })
}

/// The backend of this IPv6 flow when its entry (`found`, if any) does not vouch for it
/// (as `flow_backend`): the entry's backend if the rules keep it, else a new selection,
/// recorded in both directions.
#[inline(always)]
fn flow_backend6(
    svc: &Service,
    key: &Ct6Key,
    l4: &L4,
    found: Option<*mut Ct6Entry>,
) -> Result<Flow6, Verdict> {
    let now = ct_now();
    // Read before the backend, so that a change after the read is seen by the next packet.
    let generation = backend_generation();
    let vouched = |b: &Backend6| vouch(b.state, generation);
    let reply_key = |b: &Backend6| Ct6Key {
        saddr: b.addr,
        daddr: key.saddr,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    // The entry's backend, all zero (id 0 is no backend's) when there is none: a defined
    // value either way. As an `Option` set only when found, LLVM spilled the undefined
    // fields of `None` in the pod interfaces' program, which the verifier refuses to read
    // ("R1 !read_ok").
    let mut known = Chosen {
        id: 0,
        backend: Backend6::new([0; 16], 0, 0, 0),
    };
    if let Some(entry) = found
        && let Some(chosen) = backend_of::<Backend6>(unsafe { (*entry).backend_id })
    {
        known = chosen;
    }
    let previous = (known.id != 0).then_some(known);
    if let Some(entry) = found {
        let entry = unsafe { &mut *entry };
        if entry.service_id == svc.id {
            match reselect_because(previous.as_ref(), key.proto, l4.syn) {
                None => {
                    if let Some(chosen) = previous {
                        entry.last_seen_ns = now;
                        if l4.closing {
                            entry.flags |= CT_F_CLOSING;
                        }
                        if chosen.backend.flags & BACKEND_F_REMOTE != 0 {
                            entry.flags |= CT_F_REMOTE;
                        }
                        entry.backend_gen = vouched(&chosen.backend);
                        entry.nat_addr = chosen.backend.addr;
                        entry.nat_port = chosen.backend.port;
                        if l4.syn {
                            // A new connection on a known tuple: its replies need their
                            // entry again (it may have been evicted or removed since).
                            let reply = Ct6Entry {
                                flags: 0,
                                backend_gen: 0,
                                nat_addr: key.daddr,
                                nat_port: key.dport,
                                ..*entry
                            };
                            ct_write6(&reply_key(&chosen.backend), &reply, false);
                        }
                        return Ok(Flow6::of(svc, &chosen, false));
                    }
                }
                Some(why) => note(why),
            }
        }
    }
    let chosen = select_backend6(svc, key)?;
    let remote = chosen.backend.flags & BACKEND_F_REMOTE != 0;
    let forward = Ct6Entry {
        backend_id: chosen.id,
        service_id: svc.id,
        last_seen_ns: now,
        flags: if l4.closing { CT_F_CLOSING } else { 0 } | if remote { CT_F_REMOTE } else { 0 },
        backend_gen: vouched(&chosen.backend),
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        _pad: [0; 3],
    };
    let reply = Ct6Entry {
        flags: 0,
        backend_gen: 0,
        nat_addr: key.daddr,
        nat_port: key.dport,
        ..forward
    };
    // The reply entry first: a reply can only follow the forward packet.
    let written = ct_write6(&reply_key(&chosen.backend), &reply, false)
        && ct_write6(key, &forward, found.is_some());
    if !written {
        count(reason::CT_INSERT_FAILED);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && (old.backend.addr, old.backend.port) != (chosen.backend.addr, chosen.backend.port)
        && LB_CT6_V1.remove(&reply_key(&old.backend)).is_ok()
    {
        note(event::CT_DELETES);
    }
    Ok(Flow6::of(svc, &chosen, written))
}

/// An IPv6 packet addressed to a frontend, and its flow's backend.
struct Translation6 {
    pkt: Ipv6Packet,
    /// The packet's forward conntrack key.
    key: Ct6Key,
    /// Where it goes.
    flow: Flow6,
}

/// Parses the packet, looks its frontend up, and finds or selects its flow's backend (as
/// `translation` for IPv4): for XDP and for the pod interfaces' TC program.
#[inline(always)]
fn translation6<C: Frame>(ctx: &C) -> Result<Translation6, Verdict> {
    let pkt = parse_ipv6(ctx)?;
    let ip = pkt.ip;
    let daddr = read_addr(unsafe { core::ptr::addr_of!((*ip).dst_addr) });
    let key = Ct6Key {
        saddr: read_addr(unsafe { core::ptr::addr_of!((*ip).src_addr) }),
        daddr,
        sport: pkt.l4.sport,
        dport: pkt.l4.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // The pre-filter bitmap is shared with IPv4 (`prefilter::bucket6`).
    let (word, bit) = prefilter::position(prefilter::bucket6(daddr, pkt.l4.dport, pkt.proto));
    if LB_PREFILTER4_V1.get(word).is_none_or(|w| w & bit == 0) {
        return Err(Verdict::Pass(reason::NOT_FRONTEND));
    }
    let found = LB_CT6_V1.get_ptr_mut(&key);
    let flow = match found.and_then(|entry| established6(entry, &pkt.l4)) {
        Some(flow) => flow,
        None => {
            let frontend = Frontend6 {
                addr: daddr,
                port: pkt.l4.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            let svc =
                *unsafe { LB_SVC6_V1.get(&frontend) }.ok_or(Verdict::Pass(reason::NOT_FRONTEND))?;
            flow_backend6(&svc, &key, &pkt.l4, found)?
        }
    };
    Ok(Translation6 { pkt, key, flow })
}

#[inline(always)]
fn try_ingress6(ctx: &XdpContext) -> Result<u32, Verdict> {
    let Translation6 { pkt, key, flow } = translation6(ctx)?;
    let (ip, daddr) = (pkt.ip, key.daddr);

    // Rewrite destination address and port; the transport checksum covers the address
    // (pseudo-header). IPv6 has no header checksum.
    unsafe {
        core::ptr::write_unaligned(
            core::ptr::addr_of_mut!((*ip).dst_addr).cast::<Addr6>(),
            flow.addr,
        );
    }
    let (check, dport) = (pkt.l4.check_at, pkt.l4.dport_at);
    unsafe {
        *dport = flow.port;
        let new = csum::replace16_2(*check, daddr, flow.addr, pkt.l4.dport, flow.port);
        // A UDP checksum that comes out as 0 is sent as all ones (RFC 8200 8.1).
        *check = if pkt.proto == PROTO_UDP && new == 0 {
            0xffff
        } else {
            new
        };
    }
    count_packet(
        flow.service_id,
        flow.backend_id,
        (ctx.data_end() - ctx.data()) as u64,
        flow.new,
    );
    // A backend on another node: source NAT, and sent on by XDP (nat6.rs).
    if flow.remote {
        let (closing, addr, port) = (pkt.l4.closing, flow.addr, flow.port);
        return Ok(nat6::hand_over(
            ctx,
            NAT6_FORWARD,
            &key,
            closing,
            addr,
            port,
        ));
    }
    Ok(xdp_action::XDP_PASS)
}

/// XDP for the IPv6 frames of the external interface, tail-called by `lb_xdp_ingress`:
/// translates packets addressed to an IPv6 frontend.
#[xdp]
pub fn lb_xdp_ingress6(ctx: XdpContext) -> u32 {
    match try_ingress6(&ctx) {
        Ok(action) => action,
        Err(Verdict::Pass(reason)) => {
            // Maybe a remote backend's reply to a NAT port (nat6.rs): only ports of the NAT
            // range are ever allocated.
            // An ICMPv6 error, maybe about a NATed flow (nat6.rs).
            let kind = match reason {
                reason::NOT_FRONTEND
                    if ptr_at::<_, u16>(&ctx, L4_OFF6 + 2).is_some_and(|dport| {
                        let dport = u16::from_be(unsafe { *dport });
                        (nat::PORT_MIN..=nat::PORT_MAX).contains(&dport)
                    }) =>
                {
                    NAT6_REPLY
                }
                reason::NOT_TCP_UDP
                    if ptr_at::<_, Ipv6Hdr>(&ctx, ETH_LEN)
                        .is_some_and(|ip| unsafe { (*ip).next_hdr } == nat6::PROTO_ICMPV6)
                        && ptr_at::<_, u8>(&ctx, L4_OFF6)
                            .is_some_and(|t| nat6::ICMPV6_ERRORS.contains(unsafe { &*t })) =>
                {
                    return nat6::icmp_hand_over(&ctx);
                }
                _ => 0,
            };
            if kind != 0 {
                let none = Ct6Key {
                    saddr: [0; 4],
                    daddr: [0; 4],
                    sport: 0,
                    dport: 0,
                    proto: 0,
                    dir: 0,
                    _pad: [0; 2],
                };
                return nat6::hand_over(&ctx, kind, &none, false, [0; 4], 0);
            }
            count(reason);
            xdp_action::XDP_PASS
        }
        Err(Verdict::Drop(reason)) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// TC egress of an IPv6 frame (`try_egress` calls it): a reply of a translated flow leaves
/// as if it came from the frontend, by the flow's conntrack reply entry; with `icmp`, so
/// does an ICMPv6 error about such a flow ([`local_icmp6`]).
#[inline(always)]
pub(crate) fn try_egress6(ctx: &TcContext, icmp: bool) -> Result<(), Verdict> {
    let ip: Ipv6Hdr = ctx.load(ETH_LEN).map_err(|_| NOT_OURS)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(NOT_OURS);
    }
    if icmp && ip.next_hdr == PROTO_ICMPV6 {
        return local_icmp6(ctx, &ip);
    }
    // Only the shapes that ingress translates can be replies of a translated flow.
    let check_off = check_offset(ip.next_hdr).ok_or(NOT_OURS)?;
    let ports: [u16; 2] = ctx.load(L4_OFF6).map_err(|_| NOT_OURS)?;
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
    let frontend = reply_frontend(&key)?;
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

const FAILED: Verdict = Verdict::Drop(reason::REPLY_REWRITE_FAILED);

/// The frontend a reply of the flow of conntrack reply key `key` comes from: the entry's,
/// or the service's reverse NAT entry when the entry does not carry it. `NOT_OURS` when
/// there is no entry: not a translated flow.
#[inline(always)]
fn reply_frontend(key: &Ct6Key) -> Result<RevNat6, Verdict> {
    let entry = unsafe { LB_CT6_V1.get(key) }.ok_or(NOT_OURS)?;
    if entry.nat_addr != [0; 4] {
        return Ok(RevNat6 {
            addr: entry.nat_addr,
            port: entry.nat_port,
            _pad: 0,
        });
    }
    Ok(*unsafe { LB_REVNAT6_V1.get(&entry.service_id) }
        .ok_or(Verdict::Pass(reason::REV_NAT_MISSING))?)
}

/// Offsets in an ICMPv6 error: its checksum, the quoted IPv6 header, the quoted ports.
const ICMPV6_CHECK_OFF: usize = L4_OFF6 + 2;
const INNER6_OFF: usize = L4_OFF6 + 8;
const INNER6_DADDR_OFF: usize = INNER6_OFF + 24;
const INNER6_L4_OFF: usize = INNER6_OFF + IPV6_LEN;

/// TC egress: an ICMPv6 error from a local backend (or a hop towards it) about a flow it
/// got from a frontend, rewritten to be about the packet the client sent (as
/// `nat::local_icmp` for IPv4): the quoted destination address and port become the
/// frontend's (and the quoted transport checksum with them), the outer source becomes the
/// frontend when it is the backend, and the ICMPv6 checksum, which covers the outer
/// addresses (pseudo-header) and the quote, follows every change. `NOT_OURS` when it is
/// not one.
#[inline(always)]
fn local_icmp6(ctx: &TcContext, outer: &Ipv6Hdr) -> Result<(), Verdict> {
    let icmp_type: u8 = ctx.load(L4_OFF6).map_err(|_| NOT_OURS)?;
    if !ICMPV6_ERRORS.contains(&icmp_type) {
        return Err(NOT_OURS);
    }
    let inner: Ipv6Hdr = ctx.load(INNER6_OFF).map_err(|_| NOT_OURS)?;
    let proto = inner.next_hdr;
    let inner_check_off = match proto {
        PROTO_TCP => INNER6_L4_OFF + TCP_CHECK_OFF,
        PROTO_UDP => INNER6_L4_OFF + UDP_CHECK_OFF,
        _ => return Err(NOT_OURS),
    };
    if inner.vcf[0] >> 4 != 6 {
        return Err(NOT_OURS);
    }
    let ports: [u16; 2] = ctx.load(INNER6_L4_OFF).map_err(|_| NOT_OURS)?;
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
    let frontend = reply_frontend(&key)?;
    let mut icmp: u16 = ctx.load(ICMPV6_CHECK_OFF).map_err(|_| FAILED)?;
    // The quoted transport checksum, when the quote reaches it (the error is not
    // CHECKSUM_PARTIAL: the kernel computes an ICMPv6 error's checksum whole).
    if let Ok(old) = ctx.load::<u16>(inner_check_off)
        && (proto == PROTO_TCP || old != 0)
    {
        let mut new = csum::replace16_2(old, backend, frontend.addr, ports[1], frontend.port);
        if proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        icmp = csum::replace2(icmp, old, new);
        ctx.store(inner_check_off, &new, 0).map_err(|_| FAILED)?;
    }
    icmp = csum::replace16_2(icmp, backend, frontend.addr, ports[1], frontend.port);
    ctx.store(INNER6_DADDR_OFF, &frontend.addr, 0)
        .map_err(|_| FAILED)?;
    ctx.store(INNER6_L4_OFF + 2, &frontend.port, 0)
        .map_err(|_| FAILED)?;
    // The backend itself reports: the error comes from the frontend. A router on the way
    // keeps its address.
    if addr6(outer.src_addr) == backend {
        icmp = csum::replace16(icmp, backend, frontend.addr);
        ctx.store(IPV6_SADDR_OFF, &frontend.addr, 0)
            .map_err(|_| FAILED)?;
    }
    ctx.store(ICMPV6_CHECK_OFF, &icmp, 0).map_err(|_| FAILED)?;
    crate::nat::note(nat_event::ICMP_LOCAL);
    Ok(())
}

/// The checksum helpers' flag for UDP's "no checksum" zero (which an IPv6 packet the
/// programs translate never has, but a rewrite must not produce).
#[inline(always)]
fn l4_mangled(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Replaces the IPv6 address at `offset` (source or destination) of an skb. The skb
/// helpers keep the transport checksum at `check_off` right whatever the skb's checksum
/// state is (CHECKSUM_PARTIAL from a pod or a local sender included): the address is in
/// the pseudo-header, one 32-bit word at a time.
#[inline(always)]
fn replace_addr6(
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
            .map_err(|_| FAILED)?;
    }
    ctx.store(offset, &new, 0).map_err(|_| FAILED)
}

/// Replaces the port at `offset` of an skb, with the transport checksum at `check_off`.
#[inline(always)]
fn replace_port(
    ctx: &TcContext,
    offset: usize,
    old: u16,
    new: u16,
    check_off: usize,
    mangled: u64,
) -> Result<(), Verdict> {
    ctx.l4_csum_replace(check_off, old as u64, new as u64, mangled | 2)
        .map_err(|_| FAILED)?;
    ctx.store(offset, &new, 0).map_err(|_| FAILED)
}

/// Called by `lb_tc_pod_ingress` first: an IPv6 frame goes on to `lb_tc_pod_ingress6` (the
/// tail call does not return); while that program's slot is empty it is passed, counted.
/// (The IPv4 program holds no IPv6 code: with it, it was over the stack limit.)
#[inline(always)]
pub(crate) fn dispatch_pod(ctx: &TcContext) -> Result<(), Verdict> {
    let ipv6 = ptr_at::<_, EthHdr>(ctx, 0)
        .is_some_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IPV6);
    if ipv6 {
        let _ = unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::POD_INGRESS6) };
        return Err(Verdict::Pass(reason::IPV6_PROGRAM_MISSING));
    }
    Ok(())
}

/// The transport checksum's offset of an IPv6 packet whose next header is `proto` (TCP or
/// UDP), if it is one the programs translate.
#[inline(always)]
fn check_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(L4_OFF6 + TCP_CHECK_OFF),
        PROTO_UDP => Some(L4_OFF6 + UDP_CHECK_OFF),
        _ => None,
    }
}

/// A hairpinned pod's reply to [`HAIRPIN_ADDR6`] goes to the pod's own address again,
/// which makes it the reply conntrack knows (as `unhairpin` for IPv4).
#[inline(always)]
fn unhairpin6(ctx: &TcContext) -> Result<(), Verdict> {
    let Ok(ip) = ctx.load::<Ipv6Hdr>(ETH_LEN) else {
        return Ok(());
    };
    let daddr = addr6(ip.dst_addr);
    let Some(check_off) = check_offset(ip.next_hdr) else {
        return Ok(());
    };
    if daddr != HAIRPIN_ADDR6 || ip.vcf[0] >> 4 != 6 {
        return Ok(());
    }
    let saddr = addr6(ip.src_addr);
    replace_addr6(
        ctx,
        IPV6_DADDR_OFF,
        daddr,
        saddr,
        check_off,
        l4_mangled(ip.next_hdr),
    )
}

/// A TCP SYN from a pod opens a new connection on its tuple: a reply entry an earlier
/// translated flow left for the same tuple goes (as `forget_stale_reply` for IPv4).
#[inline(always)]
fn forget_stale_reply6(ctx: &TcContext) {
    let Ok(ip) = ctx.load::<Ipv6Hdr>(ETH_LEN) else {
        return;
    };
    if ip.next_hdr != PROTO_TCP {
        return;
    }
    let (Ok(ports), Ok(flags)) = (
        ctx.load::<[u16; 2]>(L4_OFF6),
        ctx.load::<u8>(L4_OFF6 + TCP_FLAGS_OFF),
    ) else {
        return;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let reply = Ct6Key {
        saddr: addr6(ip.dst_addr),
        daddr: addr6(ip.src_addr),
        sport: ports[1],
        dport: ports[0],
        proto: PROTO_TCP,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    if LB_CT6_V1.remove(&reply).is_ok() {
        note(event::CT_DELETES);
    }
}

/// `lb_tc_pod_ingress`'s rules for an IPv6 frame: the reply of a translated flow (after
/// undoing a hairpin), else a packet to a frontend, translated with the skb helpers (a
/// pod's packets are often CHECKSUM_PARTIAL), else passed.
#[inline(always)]
fn try_pod_ingress6(ctx: &TcContext) -> Result<(), Verdict> {
    // An ICMPv6 error (from a backend pod about a flow a frontend gave it) is
    // `lb_tc_egress`'s to rewrite, by a tail call: with that code this program is over the
    // stack limit.
    if ctx.load::<u8>(ETH_LEN + 6) == Ok(PROTO_ICMPV6) {
        let _ = unsafe { LB_TCPROGS_V1.tail_call(ctx, tc_prog_slot::EGRESS) };
        return Err(Verdict::Pass(reason::IPV6_PROGRAM_MISSING));
    }
    unhairpin6(ctx)?;
    match try_egress6(ctx, false) {
        // `NOT_OURS`: not a reply.
        Err(Verdict::Pass(u32::MAX)) => {}
        replied => return replied,
    }
    forget_stale_reply6(ctx);
    // The headers the parser reads must be in the linear part; a shorter packet fails the
    // parse's bounds checks and is passed, counted.
    let _ = ctx.pull_data((L4_OFF6 + TcpHdr::LEN) as u32);
    let Translation6 { pkt, key, flow } = translation6(ctx)?;
    // The packet pointers are not used past the first helper call, which invalidates them.
    let (proto, dport) = (pkt.proto, pkt.l4.dport);
    let check_off = check_offset(proto).ok_or(FAILED)?;
    let mangled = l4_mangled(proto);
    replace_addr6(
        ctx,
        IPV6_DADDR_OFF,
        key.daddr,
        flow.addr,
        check_off,
        mangled,
    )?;
    replace_port(ctx, L4_OFF6 + 2, dport, flow.port, check_off, mangled)?;
    if flow.addr == key.saddr {
        replace_addr6(
            ctx,
            IPV6_SADDR_OFF,
            key.saddr,
            HAIRPIN_ADDR6,
            check_off,
            mangled,
        )?;
    }
    count_packet(flow.service_id, flow.backend_id, ctx.len() as u64, flow.new);
    Ok(())
}

/// TC for the IPv6 frames of a pod's host-side interface, tail-called by
/// `lb_tc_pod_ingress`.
#[classifier]
pub fn lb_tc_pod_ingress6(ctx: TcContext) -> i32 {
    tc_action(try_pod_ingress6(&ctx))
}
