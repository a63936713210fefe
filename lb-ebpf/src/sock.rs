//! Socket-level translation (east-west): cgroup sock_addr hooks that hand a socket a
//! backend's address when it addresses a frontend, so that its packets go to the backend
//! untranslated (no per-packet cost), and that show the frontend again where the
//! application can see the peer (recvmsg, getpeername).
//!
//! Every frontend is translated here, ClusterIPs and, as kube-proxy does for the node's own
//! processes and pods, NodePorts on the node's addresses, LoadBalancer and external
//! addresses: a host process's packets to the node's own address never reach XDP, and a
//! pod's reply rewritten to come from the node's address would enter the host as a martian.
//! The exception is a frontend with [`SERVICE_F_SOURCE_RANGES`] (loadBalancerSourceRanges),
//! which keeps the per-packet path (XDP, and the pod interfaces' TC program), where the
//! source ranges are applied.
//!
//! The clients here are all on this node: a NodePort, LoadBalancer or external address of a
//! Service with externalTrafficPolicy Local gets every endpoint its cluster IP gets, as
//! kube-proxy's "short-circuit" rules give this node's pods and processes
//! (`select::short_circuit`); the socket still shows the address it addressed.
//!
//! A socket's backend for a frontend is chosen by the same rules as a new flow in XDP
//! (`select_with_affinity`: the client's affinity entry, else the Maglev table) with two
//! differences the socket imposes:
//! - there is no source port (nor, before the connect, a source address): the flow hash is
//!   taken over the socket cookie and the frontend, so each socket is a flow, the same socket
//!   always hashes alike, and Maglev's minimal disruption holds per socket;
//! - the affinity client is the socket's network namespace (its cookie), which for a pod is
//!   the pod and for host-network processes is the node.
//!
//! Per socket, [`map_names::SOCKETS`](lb_common::map_names::SOCKETS) (IPv6:
//! [`map_names::SOCKETS6`](lb_common::map_names::SOCKETS6)) keeps the backend of each
//! frontend it addressed (a UDP socket sending datagrams keeps its backend by the conntrack
//! rules of `lb_common::Event`) and the frontend each backend stands for (for recvmsg and
//! getpeername).
//!
//! The IPv6 hooks apply the same rules through the same code (generic over the family), with the
//! IPv6 maps; the affinity map, keyed by service id and network namespace, is shared. An
//! IPv6 socket addressing an IPv4 frontend by its IPv4-mapped address (`::ffff:a.b.c.d`) is
//! translated through the IPv4 maps at connect() (the kernel runs connect6, not connect4,
//! for it), and shown the mapped frontend at recvmsg6/getpeername6. Its datagrams sent to a
//! mapped address need nothing here: the kernel hands them to the IPv4 path, whose sendmsg4
//! hook translates them.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Addr6, BackendValue, CT_FORWARD, CT_REPLY, PROTO_TCP, PROTO_UDP, Reason,
    SERVICE_F_SOURCE_RANGES, Service, SockAffinityKey, TableEvent, V4, V6, flow_hash,
};

use crate::{
    counters::{count, count_socket_flow},
    family::Datapath,
    maps::LB_SOCKAFF4_V1,
    select::{
        Chosen, backend_of, no_backend, reselect_because, select_with_affinity, short_circuit,
    },
    verdict::Verdict,
};

/// Return value of a sock_addr program: go on with the call.
const PROCEED: i32 = 1;
/// Return value of a sock_addr program: fail the call (with the errno set by
/// `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const SOCK_DGRAM: u32 = 2;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as it sits in memory.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The transport protocol of the socket, if it is one the frontends have.
#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        p if p == PROTO_TCP as u32 => Some(PROTO_TCP),
        p if p == PROTO_UDP as u32 => Some(PROTO_UDP),
        _ => None,
    }
}

/// The backend of a frontend (`addr`, `port`, `proto`) for this socket: the one it already
/// has while the conntrack rules keep it, otherwise a new choice, recorded in both
/// directions.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, copies of `forward`: 6 more instructions (IPv4), 16 (IPv6); of `reply`: \
              523 to 2826 more verified (maps.rs)"
)]
fn socket_backend<F: Datapath>(
    ctx: &SockAddrContext,
    svc: &Service,
    (addr, port, proto): (F::Addr, u16, u8),
    connect: bool,
) -> Result<Chosen<F::Backend>, Verdict> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward = F::sock_key(cookie, addr, port, proto, CT_FORWARD);
    if let Some(entry) = unsafe { F::sockets().get(&forward) } {
        let (backend_id, service_id, _, _) = F::sock_entry_fields(entry);
        if service_id == svc.id {
            let previous = backend_of::<F>(backend_id);
            // A TCP connect is a new connection (a SYN); a datagram, or a UDP connect, goes
            // on with the socket's flow.
            match reselect_because(previous.as_ref(), proto, connect && proto == PROTO_TCP) {
                None => {
                    if let Some(chosen) = previous {
                        return Ok(chosen);
                    }
                }
                Some(why) => count(why),
            }
        }
    }
    // Every client here is on this node: a short-circuited frontend (externalTrafficPolicy
    // Local) selects from its cluster frontend; the socket's entries stay the frontend's.
    let table = short_circuit::<F>(svc, proto);
    if table.backend_count == 0 {
        return Err(Verdict::Drop(no_backend(&table)));
    }
    let client = SockAffinityKey {
        service_id: svc.id,
        _pad: 0,
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    let affinity = (&LB_SOCKAFF4_V1, TableEvent::SockAffinityInserts);
    let chosen: Chosen<F::Backend> =
        select_with_affinity::<F, _>(&table, affinity, &client, || {
            let folded = (cookie as u32) ^ ((cookie >> 32) as u32);
            flow_hash(folded, F::fold(addr), 0, port, proto)
        })?;
    let (backend_addr, backend_port) = chosen.backend.target();
    let reply = F::sock_key(cookie, backend_addr, backend_port, proto, CT_REPLY);
    let sockets = F::sockets();
    let written = sockets
        .insert(
            &reply,
            F::sock_entry(chosen.id, svc.id, addr, port),
            BPF_ANY as u64,
        )
        .is_ok()
        && sockets
            .insert(
                &forward,
                F::sock_entry(chosen.id, svc.id, backend_addr, backend_port),
                BPF_ANY as u64,
            )
            .is_ok();
    if !written {
        count(Reason::CtInsertFailed);
    }
    // The socket path translates no packets: only its flows are counted.
    count_socket_flow(svc.id);
    Ok(chosen)
}

/// What becomes of an address a connect() or sendmsg() gave.
enum Forward<A> {
    /// Not a frontend, or one the socket path passes: leave it.
    Untouched,
    /// Use this backend address and port instead.
    To(A, u16),
    /// Fail the call with ECONNREFUSED.
    Refuse,
}

/// The destination a connect() or sendmsg() to (`addr`, `port`, `proto`) goes to.
#[inline(always)]
fn forward<F: Datapath>(
    ctx: &SockAddrContext,
    (addr, port, proto): (F::Addr, u16, u8),
    connect: bool,
) -> Forward<F::Addr> {
    let Some(&svc) = (unsafe { F::services().get(F::frontend(addr, port, proto)) }) else {
        return Forward::Untouched;
    };
    if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        return Forward::Untouched;
    }
    match socket_backend::<F>(ctx, &svc, (addr, port, proto), connect) {
        Ok(chosen) => {
            let (addr, port) = chosen.backend.target();
            Forward::To(addr, port)
        }
        Err(Verdict::Pass(why)) => {
            count(why);
            Forward::Untouched
        }
        Err(Verdict::NotOurs) => Forward::Untouched,
        Err(Verdict::Drop(why)) => {
            // kube-proxy rejects a Service without endpoints: the caller sees ECONNREFUSED.
            count(why);
            Forward::Refuse
        }
    }
}

/// The program's return value for a call that must fail with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// The frontend a backend (`addr`, `port`) this socket was given stands for.
#[inline(always)]
fn frontend_of<F: Datapath>(
    ctx: &SockAddrContext,
    (addr, port, proto): (F::Addr, u16, u8),
) -> Option<(F::Addr, u16)> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = F::sock_key(cookie, addr, port, proto, CT_REPLY);
    let entry = unsafe { F::sockets().get(key) }?;
    let (_, _, addr, port) = F::sock_entry_fields(entry);
    Some((addr, port))
}

/// Rewrites the destination of an IPv4 connect() or sendmsg() addressed to a frontend.
#[inline(always)]
fn forward4(ctx: &SockAddrContext, connect: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    // The port sits in the first two bytes of the 32-bit field, in network byte order.
    match forward::<V4>(ctx, (sa.user_ip4, sa.user_port as u16, proto), connect) {
        Forward::Untouched => PROCEED,
        Forward::To(addr, port) => {
            sa.user_ip4 = addr;
            sa.user_port = port as u32;
            PROCEED
        }
        Forward::Refuse => refuse(),
    }
}

/// Shows the frontend instead of a backend this IPv4 socket was given in its place.
#[inline(always)]
pub(crate) fn reverse4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    if let Some((addr, port)) = frontend_of::<V4>(ctx, (sa.user_ip4, sa.user_port as u16, proto)) {
        sa.user_ip4 = addr;
        sa.user_port = port as u32;
    }
    PROCEED
}

/// The IPv6 address of the call, read word by word (the context allows 32-bit loads).
#[inline(always)]
fn user_ip6(sa: &bpf_sock_addr) -> Addr6 {
    let words = &sa.user_ip6;
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

/// Writes the IPv6 address of the call, word by word.
#[inline(always)]
fn set_user_ip6(sa: &mut bpf_sock_addr, addr: Addr6) {
    let words = &mut sa.user_ip6;
    unsafe {
        core::ptr::write_volatile(&mut words[0], addr[0]);
        core::ptr::write_volatile(&mut words[1], addr[1]);
        core::ptr::write_volatile(&mut words[2], addr[2]);
        core::ptr::write_volatile(&mut words[3], addr[3]);
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 address.
#[inline(always)]
fn mapped_v4(addr: &Addr6) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED).then_some(addr[3])
}

/// [`forward4`] for IPv6 sockets: an IPv6 frontend through the IPv6 maps, and at connect()
/// an IPv4-mapped one through the IPv4 maps (the backend is given as an IPv4-mapped address
/// too). sendmsg6 never sees a mapped address: the kernel sends those datagrams on the IPv4
/// path, through sendmsg4.
#[inline(always)]
fn forward6(ctx: &SockAddrContext, connect: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    let addr = user_ip6(sa);
    let port = sa.user_port as u16;
    if let Some(v4) = mapped_v4(&addr).filter(|_| connect) {
        return match forward::<V4>(ctx, (v4, port, proto), connect) {
            Forward::Untouched => PROCEED,
            Forward::To(addr, port) => {
                unsafe { core::ptr::write_volatile(&mut sa.user_ip6[3], addr) };
                sa.user_port = port as u32;
                PROCEED
            }
            Forward::Refuse => refuse(),
        };
    }
    match forward::<V6>(ctx, (addr, port, proto), connect) {
        Forward::Untouched => PROCEED,
        Forward::To(addr, port) => {
            set_user_ip6(sa, addr);
            sa.user_port = port as u32;
            PROCEED
        }
        Forward::Refuse => refuse(),
    }
}

/// [`reverse4`] for IPv6 sockets (IPv4-mapped backends through the IPv4 map).
#[inline(always)]
pub(crate) fn reverse6(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    let addr = user_ip6(sa);
    let port = sa.user_port as u16;
    if let Some(v4) = mapped_v4(&addr) {
        if let Some((addr, port)) = frontend_of::<V4>(ctx, (v4, port, proto)) {
            unsafe { core::ptr::write_volatile(&mut sa.user_ip6[3], addr) };
            sa.user_port = port as u32;
        }
    } else if let Some((addr, port)) = frontend_of::<V6>(ctx, (addr, port, proto)) {
        set_user_ip6(sa, addr);
        sa.user_port = port as u32;
    }
    PROCEED
}

/// Whether the socket of a sendmsg() is a datagram socket (the only kind whose sendmsg
/// names a destination the hooks translate).
#[inline(always)]
fn datagram(ctx: &SockAddrContext) -> bool {
    let type_ = unsafe { (*ctx.sock_addr).type_ };
    type_ == SOCK_DGRAM
}

/// connect4: a TCP or UDP socket connecting to a frontend connects to a backend.
#[inline(always)]
pub(crate) fn connect4(ctx: &SockAddrContext) -> i32 {
    forward4(ctx, true)
}

/// sendmsg4: a UDP datagram sent to a frontend goes to a backend.
#[inline(always)]
pub(crate) fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    if !datagram(ctx) {
        return PROCEED;
    }
    forward4(ctx, false)
}

/// connect6: [`connect4`] for IPv6 sockets.
#[inline(always)]
pub(crate) fn connect6(ctx: &SockAddrContext) -> i32 {
    forward6(ctx, true)
}

/// sendmsg6: [`sendmsg4`] for IPv6 sockets.
#[inline(always)]
pub(crate) fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    if !datagram(ctx) {
        return PROCEED;
    }
    forward6(ctx, false)
}
