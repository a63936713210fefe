//! Conntrack: a flow's backend from its forward entry while the entry vouches for it (the
//! backend generation it recorded is the current one), else by the rules of
//! `lb_common::Event` (the entry's backend kept, or a new selection), recorded in both
//! directions; and [`translation`], the lookups every translated packet goes through
//! (pre-filter, conntrack, frontend), for XDP and for the pod interfaces' TC program. All of
//! it is written once for both families.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_REMOTE, BackendValue, CT_F_CLOSING, CT_F_DSR, CT_F_REMOTE,
    CT_FORWARD, CT_LAST_SEEN_GRANULARITY_NS, CT_REPLY, CtValue, Event, FlowKey, Reason,
    SERVICE_F_DSR, Service, prefilter,
};

use crate::{
    counters::{count, count_packet},
    family::Datapath,
    frame::Frame,
    maps::{LB_BEGEN_V1, LB_PREFILTER_V1},
    parse::{L4, Packet},
    select::{Chosen, backend_of, reselect_because, select_backend},
    verdict::Verdict,
};

/// `errno` of an insert whose key exists.
pub(crate) const EEXIST: i32 = 17;

/// The current backend generation (`lb_common::map_names::BACKEND_GEN`).
#[inline(always)]
pub(crate) fn backend_generation() -> u32 {
    LB_BEGEN_V1.get(0).copied().unwrap_or(0)
}

/// Writes an entry of conntrack `map` (either family's), counting it when the key is new.
#[inline(always)]
pub(crate) fn ct_write<K, V>(map: &LruHashMap<K, V>, key: &K, entry: &V, exists: bool) -> bool {
    if !exists {
        match map.insert(key, entry, BPF_NOEXIST as u64) {
            Ok(()) => {
                count(Event::CtInserts);
                return true;
            }
            Err(e) if e != -EEXIST => return false,
            Err(_) => {}
        }
    }
    map.insert(key, entry, BPF_ANY as u64).is_ok()
}

/// The backend generation a conntrack entry records for a backend in `state`, read as
/// `generation`: only an ACTIVE backend is vouched for.
#[inline(always)]
fn vouch(state: u8, generation: u32) -> u32 {
    if state == BACKEND_ACTIVE {
        generation
    } else {
        generation.wrapping_sub(1)
    }
}

/// Where a packet of a flow goes (`A`: the family's address), and whose counters it adds
/// to.
#[derive(Clone, Copy)]
pub(crate) struct Flow<A> {
    pub(crate) service_id: u32,
    pub(crate) backend_id: u32,
    /// The backend's address and port, network byte order.
    pub(crate) addr: A,
    pub(crate) port: u16,
    /// The flow's entries were written by this packet.
    pub(crate) new: bool,
    /// The backend is on another node: the packet is source-NATed and sent on (nat.rs).
    pub(crate) remote: bool,
    /// With `remote`: by direct server return instead (dsr.rs), when it comes from outside
    /// (XDP).
    pub(crate) dsr: bool,
}

impl<A: Copy> Flow<A> {
    #[inline(always)]
    fn of<B: BackendValue<Addr = A>>(svc: &Service, chosen: &Chosen<B>, new: bool) -> Self {
        let (addr, port) = chosen.backend.target();
        let remote = chosen.backend.flags() & BACKEND_F_REMOTE != 0;
        Flow {
            service_id: svc.id,
            backend_id: chosen.id,
            addr,
            port,
            new,
            remote,
            dsr: remote && svc.flags & SERVICE_F_DSR != 0,
        }
    }

    /// Counts a translated packet of `bytes` for its frontend and its backend.
    #[inline(always)]
    pub(crate) fn count(&self, bytes: u64) {
        count_packet(self.service_id, self.backend_id, bytes, self.new);
    }
}

/// The conntrack clock: `last_seen_ns` is for ageing, so the coarse clock (one tick of
/// resolution, no clock source read) is enough.
#[inline(always)]
pub(crate) fn ct_now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The packet's flow from its forward conntrack entry alone, when the entry vouches for
/// its backend: the backend generation it recorded is the current one, so the backend was
/// ACTIVE then and no backend left ACTIVE and no frontend was deleted since (the agent
/// bumps the generation after either). An ACTIVE backend keeps every packet of its flows
/// (the rules on `lb_common::Event`), so nothing else needs to be read.
#[inline(always)]
fn established<F: Datapath>(entry: *mut F::CtEntry, l4: &L4) -> Option<Flow<F::Addr>> {
    let entry = unsafe { &mut *entry };
    if entry.nat().0 == F::UNSPECIFIED || *entry.backend_gen_mut() != backend_generation() {
        return None;
    }
    if l4.closing && *entry.flags_mut() & CT_F_CLOSING == 0 {
        *entry.flags_mut() |= CT_F_CLOSING;
    }
    let now = ct_now();
    let last_seen = entry.last_seen_ns_mut();
    if now.wrapping_sub(*last_seen) >= CT_LAST_SEEN_GRANULARITY_NS {
        *last_seen = now;
    }
    let (addr, port) = entry.nat();
    let flags = *entry.flags_mut();
    Some(Flow {
        service_id: entry.service_id(),
        backend_id: entry.backend_id(),
        addr,
        port,
        new: false,
        remote: flags & CT_F_REMOTE != 0,
        dsr: flags & CT_F_DSR != 0,
    })
}

/// The backend of this flow (`key`: its forward conntrack key) when its conntrack entry
/// (`found`, if any) does not vouch for it: the entry's backend if the rules keep it (the
/// entry then records the backend and the generation again), otherwise a new selection,
/// recorded in both directions (`local`: the client is on this node, see
/// `select::short_circuit`).
#[inline(always)]
fn flow_backend<F: Datapath>(
    svc: &Service,
    key: &F::CtKey,
    l4: &L4,
    found: Option<*mut F::CtEntry>,
    local: bool,
) -> Result<Flow<F::Addr>, Verdict> {
    let now = ct_now();
    // Read before the backend, so that a change after the read is seen by the next packet.
    let generation = backend_generation();
    let vouched = |b: &F::Backend| vouch(b.state(), generation);
    let reply_key = |b: &F::Backend| {
        let (addr, port) = b.target();
        F::CtKey::new(addr, key.saddr(), port, key.sport(), key.proto(), CT_REPLY)
    };
    // The entry's backend, all zero (id 0 is no backend's) when there is none: a defined
    // value either way. As an `Option` set only when found, LLVM once spilled the undefined
    // fields of `None` in the pod interfaces' IPv6 program, which the verifier refuses to
    // read ("R1 !read_ok").
    let mut known = Chosen {
        id: 0,
        backend: F::Backend::NONE,
    };
    if let Some(entry) = found
        && let Some(chosen) = backend_of::<F>(unsafe { (*entry).backend_id() })
    {
        known = chosen;
    }
    let previous = (known.id != 0).then_some(known);
    if let Some(entry) = found {
        let entry = unsafe { &mut *entry };
        if entry.service_id() == svc.id {
            match reselect_because(previous.as_ref(), key.proto(), l4.syn) {
                None => {
                    if let Some(chosen) = previous {
                        *entry.last_seen_ns_mut() = now;
                        let flags = entry.flags_mut();
                        if l4.closing {
                            *flags |= CT_F_CLOSING;
                        }
                        if chosen.backend.flags() & BACKEND_F_REMOTE != 0 {
                            *flags |= CT_F_REMOTE;
                        }
                        if remote_dsr(svc, &chosen.backend, local) {
                            *flags |= CT_F_DSR;
                        }
                        *entry.backend_gen_mut() = vouched(&chosen.backend);
                        let (addr, port) = chosen.backend.target();
                        entry.set_nat(addr, port);
                        // A direct server return flow's replies never come here.
                        if l4.syn && !(remote_dsr(svc, &chosen.backend, local)) {
                            // A new connection on a known tuple: its replies need their
                            // entry, which may have been evicted or removed since (a pod's
                            // direct connection on the same tuple removes it).
                            let reply = F::CtEntry::new(
                                chosen.id,
                                svc.id,
                                now,
                                0,
                                0,
                                key.daddr(),
                                key.dport(),
                            );
                            ct_write(F::conntrack(), &reply_key(&chosen.backend), &reply, false);
                        }
                        return Ok(Flow::of(svc, &chosen, false));
                    }
                }
                Some(why) => count(why),
            }
        }
    }
    let chosen = select_backend::<F>(svc, key, local)?;
    let remote = chosen.backend.flags() & BACKEND_F_REMOTE != 0;
    let dsr = remote_dsr(svc, &chosen.backend, local);
    let (addr, port) = chosen.backend.target();
    let forward = F::CtEntry::new(
        chosen.id,
        svc.id,
        now,
        if l4.closing { CT_F_CLOSING } else { 0 }
            | if remote { CT_F_REMOTE } else { 0 }
            | if dsr { CT_F_DSR } else { 0 },
        vouched(&chosen.backend),
        addr,
        port,
    );
    let reply = F::CtEntry::new(chosen.id, svc.id, now, 0, 0, key.daddr(), key.dport());
    // The reply entry first: a reply can only follow the forward packet. A direct server
    // return flow's replies go from the backend's node to the client: no reply entry here.
    let written = (dsr || ct_write(F::conntrack(), &reply_key(&chosen.backend), &reply, false))
        && ct_write(F::conntrack(), key, &forward, found.is_some());
    if !written {
        count(Reason::CtInsertFailed);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && old.backend.target() != (addr, port)
        && F::conntrack().remove(reply_key(&old.backend)).is_ok()
    {
        count(Event::CtDeletes);
    }
    Ok(Flow::of(svc, &chosen, written))
}

/// Whether a flow of frontend `svc` to `backend` goes by direct server return: a client
/// from outside (not `local`) and a remote backend of a frontend with `SERVICE_F_DSR`.
#[inline(always)]
fn remote_dsr<B: BackendValue>(svc: &Service, backend: &B, local: bool) -> bool {
    !local && backend.flags() & BACKEND_F_REMOTE != 0 && svc.flags & SERVICE_F_DSR != 0
}

/// Rewrites the destination of `pkt`, a packet to `frontend` (its port is the packet's), to
/// a backend (address and port, network byte order), with incremental checksums: XDP's
/// translation, and the packet a direct server return carrier carries.
#[inline(always)]
pub(crate) fn to_backend<F: Datapath>(
    pkt: &Packet<F::Header>,
    frontend: F::Addr,
    addr: F::Addr,
    port: u16,
) {
    F::set_daddr(pkt.ip, frontend, addr);
    unsafe {
        *pkt.l4.dport_at = port;
        *pkt.l4.check_at = F::l4_checksum(
            pkt.proto,
            *pkt.l4.check_at,
            frontend,
            addr,
            pkt.l4.dport,
            port,
        );
    }
}

/// A packet addressed to a frontend, and its flow's backend.
pub(crate) struct Translation<F: Datapath> {
    pub(crate) pkt: Packet<F::Header>,
    /// The packet's forward conntrack key.
    pub(crate) key: F::CtKey,
    /// Where it goes.
    pub(crate) flow: Flow<F::Addr>,
}

/// Parses the packet, looks its frontend up, and finds or selects its flow's backend: for
/// XDP and for the pod interfaces' TC program (`local`: its clients are this node's pods,
/// whose flows to a short-circuited frontend use the cluster frontend's backends).
#[inline(always)]
pub(crate) fn translation<F: Datapath, C: Frame>(
    ctx: &C,
    local: bool,
) -> Result<Translation<F>, Verdict> {
    let pkt = F::parse(ctx)?;
    let daddr = F::daddr(pkt.ip);
    let key = F::CtKey::new(
        F::saddr(pkt.ip),
        daddr,
        pkt.l4.sport,
        pkt.l4.dport,
        pkt.proto,
        CT_FORWARD,
    );
    // A destination whose bucket holds no frontend is not one: passed after an array read.
    // Every forward conntrack entry is keyed by its frontend, so none is skipped while its
    // frontend exists (and one of a deleted frontend passes untouched either way). The
    // bitmap is shared by both families (`prefilter::bucket6`).
    let (word, bit) = prefilter::position(F::prefilter_bucket(daddr, pkt.l4.dport, pkt.proto));
    if LB_PREFILTER_V1.get(word).is_none_or(|w| w & bit == 0) {
        return Err(Verdict::Pass(Reason::NotFrontend));
    }
    // Conntrack first: an established flow whose entry vouches for its backend needs no
    // other lookup (not even the frontend's: deleting one bumps the generation).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, a copy of the key: 23 more instructions in XDP, 32 in TC (maps.rs)"
    )]
    let found = F::conntrack().get_ptr_mut(&key);
    let flow = match found.and_then(|entry| established::<F>(entry, &pkt.l4)) {
        Some(flow) => flow,
        None => {
            let frontend = F::frontend(daddr, pkt.l4.dport, pkt.proto);
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "by value, lb_tc_pod_in: 5 more instructions, 23 more verified (maps.rs)"
            )]
            let svc = *unsafe { F::services().get(&frontend) }
                .ok_or(Verdict::Pass(Reason::NotFrontend))?;
            flow_backend::<F>(&svc, &key, &pkt.l4, found, local)?
        }
    };
    Ok(Translation { pkt, key, flow })
}

/// The frontend (address, port) a reply of the flow of conntrack reply key `key` comes
/// from: the entry's, or the service's reverse NAT entry when the entry does not carry it
/// (one migrated from V1). [`Verdict::NotOurs`] when there is no entry: not a translated
/// flow.
#[inline(always)]
pub(crate) fn reply_frontend<F: Datapath>(key: &F::CtKey) -> Result<(F::Addr, u16), Verdict> {
    let entry = unsafe { F::conntrack().get(key) }.ok_or(Verdict::NotOurs)?;
    let (addr, port) = entry.nat();
    if addr != F::UNSPECIFIED {
        return Ok((addr, port));
    }
    let rev_nat = unsafe { F::reverse_nat().get(entry.service_id()) }
        .ok_or(Verdict::Pass(Reason::RevNatMissing))?;
    Ok(F::rev_nat_target(rev_nat))
}
