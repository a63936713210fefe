//! Socket-level translation (east-west): cgroup sock_addr hooks that hand a socket a
//! backend's address when it addresses a ClusterIP frontend, so that its packets go to the
//! backend untranslated (no per-packet cost), and that show the frontend again where the
//! application can see the peer (recvmsg, getpeername).
//!
//! Only frontends without [`SERVICE_F_EXTERNAL`] (ClusterIPs) are translated here: NodePort,
//! LoadBalancer and external addresses keep the per-packet path (XDP, and the pod interfaces'
//! TC program), which applies their source ranges and traffic policies.
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
//! Per socket, [`map_names::SOCKETS`](lb_common::map_names::SOCKETS) keeps the backend of each
//! frontend it addressed (a UDP socket sending datagrams keeps its backend by the conntrack
//! rules of `lb_common::event`) and the frontend each backend stands for (for recvmsg and
//! getpeername).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use lb_common::{
    AffinityEntry, CT_FORWARD, CT_REPLY, Frontend4, PROTO_TCP, PROTO_UDP, SERVICE_F_EXTERNAL,
    Service, SockAffinityKey, SockEntry, SockKey, capacity, flow_hash, reason, table_event,
};

use crate::{
    Chosen, LB_SVC4_V1, LB_SVCSTAT_V1, Verdict, backend, count, note, reselect_because,
    select_with_affinity,
};

#[map]
static LB_SOCK4_V1: LruHashMap<SockKey, SockEntry> = LruHashMap::pinned(capacity::SOCKETS, 0);
#[map]
static LB_SOCKAFF4_V1: LruHashMap<SockAffinityKey, AffinityEntry> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

/// Return value of a sock_addr program: go on with the call.
const PROCEED: i32 = 1;
/// Return value of a sock_addr program: fail the call (with the errno set by
/// `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const SOCK_DGRAM: u32 = 2;

/// The transport protocol of the socket, if it is one the frontends have.
#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        p if p == PROTO_TCP as u32 => Some(PROTO_TCP),
        p if p == PROTO_UDP as u32 => Some(PROTO_UDP),
        _ => None,
    }
}

/// The backend of `frontend` for this socket: the one it already has while the conntrack
/// rules keep it, otherwise a new choice, recorded in both directions.
#[inline(always)]
fn socket_backend(
    ctx: &SockAddrContext,
    svc: &Service,
    frontend: &Frontend4,
    connect: bool,
) -> Result<Chosen, Verdict> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward = SockKey {
        cookie,
        addr: frontend.addr,
        port: frontend.port,
        proto: frontend.proto,
        dir: CT_FORWARD,
    };
    if let Some(entry) = unsafe { LB_SOCK4_V1.get(&forward) }
        && entry.service_id == svc.id
    {
        let previous = backend(entry.backend_id);
        // A TCP connect is a new connection (a SYN); a datagram, or a UDP connect, goes on
        // with the socket's flow.
        match reselect_because(
            previous.as_ref(),
            frontend.proto,
            connect && frontend.proto == PROTO_TCP,
        ) {
            None => {
                if let Some(chosen) = previous {
                    return Ok(chosen);
                }
            }
            Some(why) => note(why),
        }
    }
    if svc.backend_count == 0 {
        return Err(Verdict::Drop(reason::NO_BACKEND));
    }
    let client = SockAffinityKey {
        service_id: svc.id,
        _pad: 0,
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    let affinity = (&LB_SOCKAFF4_V1, table_event::SOCK_AFFINITY_INSERTS);
    let chosen: Chosen = select_with_affinity(svc, affinity, &client, || {
        let folded = (cookie as u32) ^ ((cookie >> 32) as u32);
        flow_hash(folded, frontend.addr, 0, frontend.port, frontend.proto)
    })?;
    let reply = SockKey {
        cookie,
        addr: chosen.backend.addr,
        port: chosen.backend.port,
        proto: frontend.proto,
        dir: CT_REPLY,
    };
    let entry = SockEntry {
        backend_id: chosen.id,
        service_id: svc.id,
        addr: frontend.addr,
        port: frontend.port,
        _pad: 0,
    };
    let written = LB_SOCK4_V1.insert(&reply, &entry, BPF_ANY as u64).is_ok()
        && LB_SOCK4_V1
            .insert(
                &forward,
                &SockEntry {
                    addr: chosen.backend.addr,
                    port: chosen.backend.port,
                    ..entry
                },
                BPF_ANY as u64,
            )
            .is_ok();
    if !written {
        count(reason::CT_INSERT_FAILED);
    }
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(svc.id) {
        // Per-CPU. The socket path translates no packets: only its flows are counted.
        unsafe { (*stats).new_flows += 1 };
    }
    Ok(chosen)
}

/// Rewrites the destination of a connect() or sendmsg() addressed to a ClusterIP frontend.
#[inline(always)]
fn forward(ctx: &SockAddrContext, connect: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    let frontend = Frontend4 {
        addr: sa.user_ip4,
        // The port sits in the first two bytes of the 32-bit field, in network byte order.
        port: sa.user_port as u16,
        proto,
        _pad: 0,
    };
    let Some(svc) = (unsafe { LB_SVC4_V1.get(&frontend) }).copied() else {
        return PROCEED;
    };
    if svc.flags & SERVICE_F_EXTERNAL != 0 {
        return PROCEED;
    }
    match socket_backend(ctx, &svc, &frontend, connect) {
        Ok(chosen) => {
            sa.user_ip4 = chosen.backend.addr;
            sa.user_port = chosen.backend.port as u32;
            PROCEED
        }
        Err(Verdict::Pass(why)) => {
            count(why);
            PROCEED
        }
        Err(Verdict::Drop(why)) => {
            // kube-proxy rejects a Service without endpoints: the caller sees ECONNREFUSED.
            count(why);
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

/// Shows the frontend instead of a backend this socket was given in its place.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else {
        return PROCEED;
    };
    let key = SockKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
        dir: CT_REPLY,
    };
    if let Some(entry) = unsafe { LB_SOCK4_V1.get(&key) } {
        sa.user_ip4 = entry.addr;
        sa.user_port = entry.port as u32;
    }
    PROCEED
}

/// connect() of TCP and UDP sockets.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

/// sendto()/sendmsg() with an address, on UDP sockets.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    if unsafe { (*ctx.sock_addr).type_ } != SOCK_DGRAM {
        return PROCEED;
    }
    forward(&ctx, false)
}

/// recvfrom()/recvmsg() with an address, on UDP sockets.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

/// getpeername().
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}
