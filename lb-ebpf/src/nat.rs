//! Remote backends: source NAT, both families.
//!
//! - [`forward`]: a flow whose backend is on another node
//!   (`BACKEND_F_REMOTE`) leaves with this node's address (the one the kernel's route to the
//!   backend prefers) and a port from the NAT table (`lb_common::nat`), so that the backend's
//!   replies come back here. The packet is sent on by XDP itself (route.rs).
//! - [`reply`]: a packet from a remote backend to a NAT port is translated back
//!   (destination: the client; source: the frontend) and sent towards the client the same
//!   way.
//!
//! All of it is written once for both families (the table logic: port allocation,
//! timeouts, the two directions of `lb_common::Nat4Key`). IPv6's runs in `lb_xdp_nat6`, which
//! `lb_xdp_ingress6` tail-calls (ingress.rs): inline, the NAT would take `lb_xdp_ingress6`
//! past the 512 bytes of stack. IPv6 has no header checksum: every address and port change
//! is in the TCP or UDP checksum (pseudo-header).
//!
//! ICMP errors about NATed flows are icmp.rs's. Counters: `lb_common::NatEvent`.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{FlowKey, NAT_F_CLOSING, NAT_IN, NAT_OUT, NatEvent, NatValue, Reason, nat};

use crate::{
    counters::count,
    family::Datapath,
    flow::EEXIST,
    frame::Bytes,
    headers::l4,
    route::{route, send},
};

/// The NAT port of a new flow: the first free one (or expired) of its tries. Writes the
/// [`NAT_IN`] entry; `None` when every try is taken.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, a copy of the key for each helper: 68 more instructions (maps.rs)"
)]
fn allocate<F: Datapath>(in_key: &mut F::NatKey, value: &F::NatEntry, hash: u32) -> Option<u16> {
    let map = F::nat();
    for i in 0..nat::TRIES {
        let port = nat::port(hash, i).to_be();
        in_key.set_dport(port);
        match map.insert(&*in_key, value, BPF_NOEXIST as u64) {
            Ok(()) => {
                count(NatEvent::Allocated);
                return Some(port);
            }
            Err(e) if e != -EEXIST => return None,
            Err(_) => {}
        }
        if let Some(old) = map.get_ptr_mut(&*in_key) {
            let old = unsafe { &mut *old };
            let mut value = *value;
            if nat::expired(
                in_key.proto(),
                *old.flags_mut(),
                *old.last_seen_mut(),
                *value.last_seen_mut(),
            ) {
                *old = value;
                count(NatEvent::Allocated);
                count(NatEvent::ReusedExpired);
                return Some(port);
            }
        }
        count(NatEvent::PortTaken);
    }
    None
}

/// A flow to NAT, as [`nat_port`] needs it: its two keys (`in_key`'s port is filled in),
/// the [`NAT_IN`] entry it would write, and its [`NAT_OUT`] entry without the port.
struct NatFlow<F: Datapath> {
    out_key: F::NatKey,
    in_key: F::NatKey,
    in_value: F::NatEntry,
    out_value: F::NatEntry,
    /// `NAT_F_*` bits this packet adds.
    flags: u16,
    now: u64,
}

/// The NAT port of `flow` (network byte order): the one it holds if its [`NAT_IN`] entry
/// still names it, else a new one (`hash`: the flow's); `None` (counted) when no port is
/// free.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, copies of the flow's keys and values: 187 more instructions (maps.rs)"
)]
fn nat_port<F: Datapath>(flow: &mut NatFlow<F>, hash: impl FnOnce() -> u32) -> Option<u16> {
    let map = F::nat();
    let (now, flags, in_value) = (flow.now, flow.flags, flow.in_value);
    // The flow's port, if it still has one: its NAT_IN entry must still name this client
    // and frontend (an expired entry may have been taken over by another flow).
    let mut port = None;
    if let Some(out) = map.get_ptr_mut(&flow.out_key) {
        let out = unsafe { &mut *out };
        if out.own().0 == flow.out_value.own().0 && out.peer() == flow.out_value.peer() {
            let held = out.own().1;
            flow.in_key.set_dport(held);
            match map.get_ptr_mut(&flow.in_key) {
                Some(entry) => {
                    let entry = unsafe { &mut *entry };
                    if (entry.own(), entry.peer()) == (in_value.own(), in_value.peer()) {
                        *entry.last_seen_mut() = now;
                        *entry.flags_mut() |= flags;
                        port = Some(held);
                    } else {
                        count(NatEvent::PortLost);
                    }
                }
                // Evicted: take the port again if it is still free.
                None => {
                    if map
                        .insert(&flow.in_key, &in_value, BPF_NOEXIST as u64)
                        .is_ok()
                    {
                        port = Some(held);
                    } else {
                        count(NatEvent::PortLost);
                    }
                }
            }
            if port.is_some() {
                *out.last_seen_mut() = now;
                *out.flags_mut() |= flags;
            }
        }
    }
    if port.is_some() {
        return port;
    }
    let Some(port) = allocate::<F>(&mut flow.in_key, &in_value, hash()) else {
        count(NatEvent::Exhausted);
        return None;
    };
    let mut out = flow.out_value;
    out.set_port(port);
    if map.insert(&flow.out_key, &out, BPF_ANY as u64).is_err() {
        // The reply entry stands; this flow allocates again on its next packet.
        count(Reason::CtInsertFailed);
    }
    Some(port)
}

/// A reply's [`NAT_IN`] entry, refreshed (`closing`: the packet is a FIN or RST).
#[inline(always)]
fn reply_entry<F: Datapath>(key: &F::NatKey, closing: bool) -> Option<F::NatEntry> {
    let entry = unsafe { &mut *F::nat().get_ptr_mut(key)? };
    *entry.last_seen_mut() = unsafe { bpf_ktime_get_ns() };
    if closing {
        *entry.flags_mut() |= NAT_F_CLOSING;
    }
    Some(*entry)
}

/// Source NAT and forwarding of a packet of `key`'s flow (the forward conntrack key: client
/// and frontend) whose destination was just rewritten to a remote backend (`closing`: the
/// packet is a TCP FIN or RST).
#[inline(always)]
pub(crate) fn forward<F: Datapath>(
    ctx: &XdpContext,
    key: &F::CtKey,
    closing: bool,
    backend_addr: F::Addr,
    backend_port: u16,
) -> u32 {
    // The key's fields are read where they are used: held in locals across the calls,
    // IPv6's addresses took `lb_xdp_nat6` past the 512 bytes of stack.
    let Some(route) = route::<F>(
        ctx,
        key.saddr(),
        backend_addr,
        key.proto(),
        BPF_FIB_LOOKUP_SRC,
    ) else {
        count(NatEvent::NoRoute);
        return xdp_action::XDP_DROP;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = if closing { NAT_F_CLOSING } else { 0 };
    let mut flow = NatFlow::<F> {
        out_key: F::NatKey::new(
            key.saddr(),
            key.daddr(),
            key.sport(),
            key.dport(),
            key.proto(),
            NAT_OUT,
        ),
        in_key: F::NatKey::new(
            backend_addr,
            route.src,
            backend_port,
            0,
            key.proto(),
            NAT_IN,
        ),
        in_value: F::NatEntry::new(
            key.saddr(),
            key.sport(),
            flags,
            key.daddr(),
            key.dport(),
            now,
        ),
        out_value: F::NatEntry::new(route.src, 0, flags, backend_addr, backend_port, now),
        flags,
        now,
    };
    let hash = || F::key_hash(key);
    let Some(port) = nat_port(&mut flow, hash) else {
        return xdp_action::XDP_DROP;
    };
    if rewrite::<F, _>(ctx, key.proto(), false, route.src, port).is_none() {
        return xdp_action::XDP_DROP;
    }
    send::<F>(ctx, &route)
}

/// A packet that is not for a frontend: a remote backend's reply to a NAT port, translated
/// back (destination: the client; source: the frontend) and sent to the client. `None`: not
/// ours.
#[inline(always)]
pub(crate) fn reply<F: Datapath>(ctx: &XdpContext) -> Option<u32> {
    let pkt = F::parse(ctx).ok()?;
    // Only ports of the NAT range are ever allocated: every other packet that is not for a
    // frontend (most of a node's traffic) passes without a NAT lookup.
    if !(nat::PORT_MIN..=nat::PORT_MAX).contains(&u16::from_be(pkt.l4.dport)) {
        return None;
    }
    let proto = pkt.proto;
    let key = F::NatKey::new(
        F::saddr(pkt.ip),
        F::daddr(pkt.ip),
        pkt.l4.sport,
        pkt.l4.dport,
        proto,
        NAT_IN,
    );
    let entry = reply_entry::<F>(&key, pkt.l4.closing)?;
    let ((client, client_port), (frontend, frontend_port)) = (entry.own(), entry.peer());
    let Some(route) = route::<F>(ctx, frontend, client, proto, 0) else {
        count(NatEvent::NoRoute);
        return Some(xdp_action::XDP_DROP);
    };
    if rewrite::<F, _>(ctx, proto, true, client, client_port).is_none()
        || rewrite::<F, _>(ctx, proto, false, frontend, frontend_port).is_none()
    {
        return Some(xdp_action::XDP_DROP);
    }
    count(NatEvent::Replies);
    Some(send::<F>(ctx, &route))
}

/// Replaces the source or destination (`dest`) address and port of the TCP/UDP packet,
/// with incremental checksums (the header's, IPv4 has one; the transport's).
#[inline(always)]
fn rewrite<F: Datapath, P: Bytes>(
    p: &P,
    proto: u8,
    dest: bool,
    addr: F::Addr,
    port: u16,
) -> Option<()> {
    let (addr_off, port_off) = if dest {
        (F::DADDR_OFF, F::L4_OFF + l4::DPORT)
    } else {
        (F::SADDR_OFF, F::L4_OFF + l4::SPORT)
    };
    let check_off = F::L4_OFF + l4::check(proto);
    let old_addr: F::Addr = p.get(addr_off)?;
    let old_port: u16 = p.get(port_off)?;
    F::set_ip_checksum(p, old_addr, addr)?;
    let check: u16 = p.get(check_off)?;
    p.set(
        check_off,
        F::l4_checksum(proto, check, old_addr, addr, old_port, port),
    )?;
    p.set(addr_off, addr)?;
    p.set(port_off, port)
}
