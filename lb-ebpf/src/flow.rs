//! Conntrack: a flow's backend from its forward entry while the entry vouches for it (the
//! backend generation it recorded is the current one), else by the rules of
//! `lb_common::Event` (the entry's backend kept, or a new selection), recorded in both
//! directions; and [`translation`], the lookups every translated packet goes through
//! (pre-filter, conntrack, frontend), for XDP and for the pod interfaces' TC program.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
    maps::LruHashMap,
};
use lb_common::{
    Addr6, BACKEND_ACTIVE, BACKEND_F_REMOTE, Backend4, Backend6, CT_F_CLOSING, CT_F_REMOTE,
    CT_FORWARD, CT_LAST_SEEN_GRANULARITY_NS, CT_REPLY, Ct4Key, Ct6Entry, Ct6Key, CtEntry, Event,
    Frontend4, Frontend6, Reason, RevNat6, Service, prefilter,
};

use crate::{
    counters::{count, count_packet},
    frame::Frame,
    maps::{
        LB_BEGEN_V1, LB_CT4_V2, LB_CT6_V1, LB_PREFILTER4_V1, LB_REVNAT6_V1, LB_SVC4_V1, LB_SVC6_V1,
    },
    parse::{Ipv4Packet, Ipv6Packet, L4, parse_ipv4, parse_ipv6, read_addr6},
    select::{Chosen, backend, backend_of, reselect_because, select_backend, select_backend6},
    verdict::Verdict,
};

/// `errno` of an insert whose key exists.
pub(crate) const EEXIST: i32 = 17;

/// The current backend generation (`lb_common::map_names::BACKEND_GEN`).
#[inline(always)]
pub(crate) fn backend_generation() -> u32 {
    LB_BEGEN_V1.get(0).copied().unwrap_or(0)
}

/// Writes a conntrack entry, counting it when the key is new.
#[inline(always)]
fn ct_write(key: &Ct4Key, entry: &CtEntry, exists: bool) -> bool {
    ct_write_in(&LB_CT4_V2, key, entry, exists)
}

/// Writes an entry of conntrack `map` (either family's), counting it when the key is new.
#[inline(always)]
pub(crate) fn ct_write_in<K, V>(map: &LruHashMap<K, V>, key: &K, entry: &V, exists: bool) -> bool {
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
pub(crate) fn vouch(state: u8, generation: u32) -> u32 {
    if state == BACKEND_ACTIVE {
        generation
    } else {
        generation.wrapping_sub(1)
    }
}

/// Where a packet of a flow goes, and whose counters it adds to.
#[derive(Clone, Copy)]
pub(crate) struct Flow {
    pub(crate) service_id: u32,
    pub(crate) backend_id: u32,
    /// The backend's address and port, network byte order.
    pub(crate) addr: u32,
    pub(crate) port: u16,
    /// The flow's entries were written by this packet.
    pub(crate) new: bool,
    /// The backend is on another node: the packet is source-NATed and sent on (nat.rs).
    pub(crate) remote: bool,
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
fn established(entry: *mut CtEntry, l4: &L4) -> Option<Flow> {
    let entry = unsafe { &mut *entry };
    if entry.nat_addr == 0 || entry.backend_gen != backend_generation() {
        return None;
    }
    if l4.closing && entry.flags & CT_F_CLOSING == 0 {
        entry.flags |= CT_F_CLOSING;
    }
    let now = ct_now();
    if now.wrapping_sub(entry.last_seen_ns) >= CT_LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
    Some(Flow {
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        addr: entry.nat_addr,
        port: entry.nat_port,
        new: false,
        remote: entry.flags & CT_F_REMOTE != 0,
    })
}

/// The backend of this flow when its conntrack entry (`found`, if any) does not vouch for
/// it: the entry's backend if the rules keep it (the entry then records the backend and
/// the generation again), otherwise a new selection, recorded in both directions.
#[inline(always)]
fn flow_backend(
    svc: &Service,
    key: &Ct4Key,
    l4: &L4,
    found: Option<*mut CtEntry>,
) -> Result<Flow, Verdict> {
    let now = ct_now();
    // Read before the backend, so that a change after the read is seen by the next packet.
    let generation = backend_generation();
    let vouched = |b: &Backend4| vouch(b.state, generation);
    let reply_key = |b: &Backend4| Ct4Key {
        saddr: b.addr,
        daddr: key.saddr,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        dir: CT_REPLY,
        _pad: [0; 2],
    };
    let mut previous = None;
    if let Some(entry) = found {
        let entry = unsafe { &mut *entry };
        previous = backend(entry.backend_id);
        if entry.service_id == svc.id {
            match reselect_because(previous.as_ref(), key.proto, l4.syn) {
                None => {
                    entry.last_seen_ns = now;
                    if l4.closing {
                        entry.flags |= CT_F_CLOSING;
                    }
                    if let Some(chosen) = previous {
                        entry.backend_gen = vouched(&chosen.backend);
                        entry.nat_addr = chosen.backend.addr;
                        entry.nat_port = chosen.backend.port;
                        if l4.syn {
                            // A new connection on a known tuple: its replies need their
                            // entry, which may have been evicted or removed since (a pod's
                            // direct connection on the same tuple removes it).
                            let reply = CtEntry {
                                flags: 0,
                                backend_gen: 0,
                                nat_addr: key.daddr,
                                nat_port: key.dport,
                                ..*entry
                            };
                            ct_write(&reply_key(&chosen.backend), &reply, false);
                        }
                        let remote = chosen.backend.flags & BACKEND_F_REMOTE != 0;
                        if remote {
                            entry.flags |= CT_F_REMOTE;
                        }
                        return Ok(Flow {
                            service_id: svc.id,
                            backend_id: chosen.id,
                            addr: chosen.backend.addr,
                            port: chosen.backend.port,
                            new: false,
                            remote,
                        });
                    }
                }
                Some(why) => count(why),
            }
        }
    }
    let chosen = select_backend(svc, key)?;
    let remote = chosen.backend.flags & BACKEND_F_REMOTE != 0;
    let forward = CtEntry {
        backend_id: chosen.id,
        service_id: svc.id,
        last_seen_ns: now,
        flags: if l4.closing { CT_F_CLOSING } else { 0 } | if remote { CT_F_REMOTE } else { 0 },
        backend_gen: vouched(&chosen.backend),
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        _pad: 0,
    };
    let reply = CtEntry {
        flags: 0,
        backend_gen: 0,
        nat_addr: key.daddr,
        nat_port: key.dport,
        ..forward
    };
    // The reply entry first: a reply can only follow the forward packet.
    let written = ct_write(&reply_key(&chosen.backend), &reply, false)
        && ct_write(key, &forward, found.is_some());
    if !written {
        count(Reason::CtInsertFailed);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && (old.backend.addr, old.backend.port) != (chosen.backend.addr, chosen.backend.port)
        && LB_CT4_V2.remove(&reply_key(&old.backend)).is_ok()
    {
        count(Event::CtDeletes);
    }
    Ok(Flow {
        service_id: svc.id,
        backend_id: chosen.id,
        addr: chosen.backend.addr,
        port: chosen.backend.port,
        new: written,
        remote,
    })
}

/// A packet addressed to a frontend, and its flow's backend.
pub(crate) struct Translation {
    pub(crate) pkt: Ipv4Packet,
    /// The packet's forward conntrack key.
    pub(crate) key: Ct4Key,
    /// Where it goes.
    pub(crate) flow: Flow,
}

/// Parses the packet, looks its frontend up, and finds or selects its flow's backend.
#[inline(always)]
pub(crate) fn translation<C: Frame>(ctx: &C) -> Result<Translation, Verdict> {
    let pkt = parse_ipv4(ctx)?;
    let ip = pkt.ip;
    let daddr = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let key = Ct4Key {
        saddr: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        daddr,
        sport: pkt.l4.sport,
        dport: pkt.l4.dport,
        proto: pkt.proto,
        dir: CT_FORWARD,
        _pad: [0; 2],
    };
    // A destination whose bucket holds no frontend is not one: passed after an array read.
    // Every forward conntrack entry is keyed by its frontend, so none is skipped while its
    // frontend exists (and one of a deleted frontend passes untouched either way).
    let (word, bit) = prefilter::position(prefilter::bucket(daddr, pkt.l4.dport, pkt.proto));
    if LB_PREFILTER4_V1.get(word).is_none_or(|w| w & bit == 0) {
        return Err(Verdict::Pass(Reason::NotFrontend));
    }
    // Conntrack first: an established flow whose entry vouches for its backend needs no
    // other lookup (not even the frontend's: deleting one bumps the generation).
    let found = LB_CT4_V2.get_ptr_mut(&key);
    let flow = match found.and_then(|entry| established(entry, &pkt.l4)) {
        Some(flow) => flow,
        None => {
            let frontend = Frontend4 {
                addr: daddr,
                port: pkt.l4.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            let svc =
                *unsafe { LB_SVC4_V1.get(&frontend) }.ok_or(Verdict::Pass(Reason::NotFrontend))?;
            flow_backend(&svc, &key, &pkt.l4, found)?
        }
    };
    Ok(Translation { pkt, key, flow })
}

/// Counts a translated packet for its frontend and its backend.
#[inline(always)]
pub(crate) fn count_translated(flow: &Flow, bytes: u64) {
    count_packet(flow.service_id, flow.backend_id, bytes, flow.new);
}

/// Where a packet of an IPv6 flow goes, and whose counters it adds to.
#[derive(Clone, Copy)]
pub(crate) struct Flow6 {
    pub(crate) service_id: u32,
    pub(crate) backend_id: u32,
    /// The backend's address and port, network byte order.
    pub(crate) addr: Addr6,
    pub(crate) port: u16,
    /// The flow's entries were written by this packet.
    pub(crate) new: bool,
    /// The backend is on another node: the packet is source-NATed (nat.rs).
    pub(crate) remote: bool,
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
                Some(why) => count(why),
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
        count(Reason::CtInsertFailed);
    }
    // The flow's old reply entry would translate what the old backend still sends.
    if let Some(old) = previous
        && (old.backend.addr, old.backend.port) != (chosen.backend.addr, chosen.backend.port)
        && LB_CT6_V1.remove(&reply_key(&old.backend)).is_ok()
    {
        count(Event::CtDeletes);
    }
    Ok(Flow6::of(svc, &chosen, written))
}

/// An IPv6 packet addressed to a frontend, and its flow's backend.
pub(crate) struct Translation6 {
    pub(crate) pkt: Ipv6Packet,
    /// The packet's forward conntrack key.
    pub(crate) key: Ct6Key,
    /// Where it goes.
    pub(crate) flow: Flow6,
}

/// Parses the packet, looks its frontend up, and finds or selects its flow's backend (as
/// `translation` for IPv4): for XDP and for the pod interfaces' TC program.
#[inline(always)]
pub(crate) fn translation6<C: Frame>(ctx: &C) -> Result<Translation6, Verdict> {
    let pkt = parse_ipv6(ctx)?;
    let ip = pkt.ip;
    let daddr = read_addr6(unsafe { core::ptr::addr_of!((*ip).dst_addr) });
    let key = Ct6Key {
        saddr: read_addr6(unsafe { core::ptr::addr_of!((*ip).src_addr) }),
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
        return Err(Verdict::Pass(Reason::NotFrontend));
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
                *unsafe { LB_SVC6_V1.get(&frontend) }.ok_or(Verdict::Pass(Reason::NotFrontend))?;
            flow_backend6(&svc, &key, &pkt.l4, found)?
        }
    };
    Ok(Translation6 { pkt, key, flow })
}

/// The frontend a reply of the IPv6 flow of conntrack reply key `key` comes from: the
/// entry's, or the service's reverse NAT entry when the entry does not carry it.
/// [`Verdict::NotOurs`] when there is no entry: not a translated flow.
#[inline(always)]
pub(crate) fn reply_frontend6(key: &Ct6Key) -> Result<RevNat6, Verdict> {
    let entry = unsafe { LB_CT6_V1.get(key) }.ok_or(Verdict::NotOurs)?;
    if entry.nat_addr != [0; 4] {
        return Ok(RevNat6 {
            addr: entry.nat_addr,
            port: entry.nat_port,
            _pad: 0,
        });
    }
    Ok(*unsafe { LB_REVNAT6_V1.get(&entry.service_id) }
        .ok_or(Verdict::Pass(Reason::RevNatMissing))?)
}
