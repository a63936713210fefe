//! The datapath's entry points: XDP translation of Service frontends to backends on the
//! node's external interface, TC egress translation of the replies back to the frontend,
//! the pods' host-side interfaces' TC programs, and the cgroup socket hooks. Each is thin:
//! the work is in the modules, by concern.
//!
//! Every packet the programs cannot prove is addressed to a frontend is passed untouched, bit
//! for bit, and counted by reason. A frontend packet that cannot be served (no backend, a
//! source outside the frontend's loadBalancerSourceRanges) is dropped and counted. See
//! `lb_common::Reason`.
//!
//! A flow's backend comes from conntrack while its entry is valid (the rules are on
//! `lb_common::Event`); a new flow gets, in this order: its client's fresh affinity entry
//! (sessionAffinity ClientIP), else the service's Maglev table entry of its flow hash (or a
//! random entry for selection `random`).
//!
//! The modules, each depending only on those listed before it:
//! - `headers`: the header layout; `maps`: every map; `counters`; `verdict`: what becomes
//!   of a packet that is not translated; `frame`: packet access;
//! - `parse`: the packets the programs translate; `skb`: TC rewrites with the checksum
//!   helpers; `family`: what differs between IPv4 and IPv6 (the paths below are written
//!   once, generic over the family);
//! - `select`: the backend of a new flow; `flow`: conntrack, and the lookups of a packet to
//!   a frontend; `route`: sending on by XDP; `nat`: source NAT for remote backends; `icmp`:
//!   ICMP errors about translated flows;
//! - `reject`: ICMP port unreachable for a Service without endpoints (XDP); `dsr`: direct
//!   server return's carrier, sent and received (XDP);
//! - `ingress` (XDP), `egress` (TC), `pod` (the pods' interfaces, TC), `sock` (the socket
//!   hooks).
#![no_std]
#![no_main]

mod counters;
mod dsr;
mod egress;
mod family;
mod flow;
mod frame;
mod headers;
mod icmp;
mod ingress;
mod maps;
mod nat;
mod parse;
mod pod;
mod reject;
mod route;
mod select;
mod skb;
mod sock;
mod verdict;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// XDP on the node's external interface: translates packets addressed to a frontend.
#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    match ingress::try_ingress(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// XDP for the IPv6 frames of the external interface, tail-called by `lb_xdp_ingress`:
/// translates packets addressed to an IPv6 frontend.
#[xdp]
pub fn lb_xdp_ingress6(ctx: XdpContext) -> u32 {
    match ingress::try_ingress6(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// XDP for IPv6 remote backends, tail-called by `lb_xdp_ingress6`: source NAT, and the
/// replies translated back.
#[xdp]
pub fn lb_xdp_nat6(ctx: XdpContext) -> u32 {
    match ingress::try_nat6(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// XDP for IPv4 direct server return, tail-called by `lb_xdp_ingress`: a carrier to this
/// node unwrapped, or a packet of a flow to a remote backend sent in a carrier (dsr.rs).
#[xdp]
pub fn lb_xdp_dsr4(ctx: XdpContext) -> u32 {
    match ingress::try_dsr4(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// XDP for IPv6 direct server return, tail-called by `lb_xdp_ingress6`: a packet of a flow
/// to a remote backend sent in a carrier, or a carrier to this node unwrapped (dsr.rs).
#[xdp]
pub fn lb_xdp_dsr6(ctx: XdpContext) -> u32 {
    match ingress::try_dsr6(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// XDP for ICMPv6 errors (destination unreachable, packet too big, time exceeded,
/// parameter problem), tail-called by `lb_xdp_ingress6`: those about a NATed flow are
/// translated back for the client.
#[xdp]
pub fn lb_xdp_icmp6(ctx: XdpContext) -> u32 {
    match ingress::try_icmp6(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.xdp(),
    }
}

/// TC egress on the node's external interface: replies from a backend leave as if they came
/// from the frontend the client addressed.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    match egress::try_egress(&ctx) {
        Ok(()) => TC_ACT_OK,
        Err(verdict) => verdict.tc(),
    }
}

/// TC ingress on a pod's host-side interface.
#[classifier]
pub fn lb_tc_pod_in(ctx: TcContext) -> i32 {
    match pod::try_pod_ingress(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.tc(),
    }
}

/// TC for the IPv6 frames of a pod's host-side interface, tail-called by
/// `lb_tc_pod_in`.
#[classifier]
pub fn lb_tc_pod_in6(ctx: TcContext) -> i32 {
    match pod::try_pod_ingress6(&ctx) {
        Ok(action) => action,
        Err(verdict) => verdict.tc(),
    }
}

/// connect() of TCP and UDP sockets.
#[cgroup_sock_addr(connect4)]
pub fn lb_sk_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

/// sendto()/sendmsg() with an address, on UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sk_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

/// recvfrom()/recvmsg() with an address, on UDP sockets.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sk_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// getpeername().
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sk_peername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// connect() of IPv6 TCP and UDP sockets.
#[cgroup_sock_addr(connect6)]
pub fn lb_sk_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect6(&ctx)
}

/// sendto()/sendmsg() with an IPv6 address, on UDP sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sk_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg6(&ctx)
}

/// recvfrom()/recvmsg() on IPv6 UDP sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sk_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// getpeername() of IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn lb_sk_peername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
