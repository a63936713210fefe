//! The backend of a new flow: the frontend's loadBalancerSourceRanges, then the client's
//! fresh affinity entry (sessionAffinity ClientIP), else the service's Maglev table entry
//! of the flow hash (or a random entry for selection `random`); and the rules by which a
//! known flow keeps its backend or selects again (documented on `lb_common::Event`). The
//! socket hooks select by the same rules.
//!
//! Short-circuit: a client on this node (a pod, a host process) addressing an external
//! frontend with `SERVICE_F_SHORT_CIRCUIT` (externalTrafficPolicy Local) selects from its
//! Service's cluster frontend ([`short_circuit`]), as kube-proxy's "short-circuit pod
//! traffic" and "route LOCAL traffic" rules send it to the cluster chain; the flow stays the
//! frontend's (counted, affinity and conntrack under its id, replies from its address).

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::{LruHashMap, lpm_trie::Key as LpmKey},
};
use lb_common::{
    AffinityEntry, BACKEND_ACTIVE, BACKEND_TERMINATING, BackendValue, Event, FlowKey, PROTO_UDP,
    Reason, SERVICE_F_RANDOM, SERVICE_F_REJECT, SERVICE_F_SHORT_CIRCUIT, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, Service, TableEvent, maglev,
};

use crate::{
    counters::count,
    family::Datapath,
    maps::{LB_MAGLEV_V2, LB_SHORTCIRC_V1},
    verdict::Verdict,
};

/// A backend and its id.
#[derive(Clone, Copy)]
pub(crate) struct Chosen<B> {
    pub(crate) id: u32,
    pub(crate) backend: B,
}

/// Backend `id` of family `F` (the families share backend ids and the Maglev tables, so a
/// table's ids are keys of its family's backends map).
#[inline(always)]
pub(crate) fn backend_of<F: Datapath>(id: u32) -> Option<Chosen<F::Backend>> {
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the verifier walks 291 more instructions of lb_tc_pod_in (maps.rs)"
    )]
    let backend = *unsafe { F::backends().get(&id) }?;
    Some(Chosen { id, backend })
}

/// The Maglev table's choice: the entry of the flow hash, or a random entry for selection
/// `random` (so random selection is as balanced as the table).
#[inline(always)]
fn select_from_table<F: Datapath>(
    svc: &Service,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<F::Backend>, Verdict> {
    const MISSING: Verdict = Verdict::Drop(Reason::BackendMissing);
    let table =
        unsafe { LB_MAGLEV_V2.get(&maglev::table_key(svc.id, svc.flags)) }.ok_or(MISSING)?;
    let size = table.get(0).ok_or(MISSING)?[0];
    if size == 0 {
        return Err(MISSING);
    }
    let pick = if svc.flags & SERVICE_F_RANDOM != 0 {
        count(Event::SelectRandom);
        unsafe { bpf_get_prandom_u32() }
    } else {
        count(Event::SelectMaglev);
        hash()
    };
    let (element, half) = maglev::position(pick % size);
    let cell = table.get(element).ok_or(MISSING)?;
    backend_of::<F>(cell[half & 1]).ok_or(MISSING)
}

/// The service entry whose backends a client on this node gets through frontend `svc`
/// (protocol `proto`): for a frontend with `SERVICE_F_SHORT_CIRCUIT`, its Service's cluster
/// frontend (`lb_common::map_names::SHORT_CIRCUIT` names its id, its reverse NAT entry its
/// address); `svc` itself for any other frontend, and when the cluster frontend is not
/// there (being written or removed: the frontend's own, local, backends then, as before).
#[inline(always)]
pub(crate) fn short_circuit<F: Datapath>(svc: &Service, proto: u8) -> Service {
    if svc.flags & SERVICE_F_SHORT_CIRCUIT == 0 {
        return *svc;
    }
    let Some(&cluster_id) = (unsafe { LB_SHORTCIRC_V1.get(svc.id) }) else {
        return *svc;
    };
    let Some(rev_nat) = (unsafe { F::reverse_nat().get(cluster_id) }) else {
        return *svc;
    };
    let (addr, port) = F::rev_nat_target(rev_nat);
    match unsafe { F::services().get(F::frontend(addr, port, proto)) } {
        // The id checked: an entry names the frontend that holds the id now.
        Some(cluster) if cluster.id == cluster_id => *cluster,
        _ => *svc,
    }
}

/// Why a frontend without backends takes no new flow: no endpoint anywhere (rejected), or
/// none here.
#[inline(always)]
pub(crate) fn no_backend(svc: &Service) -> Reason {
    if svc.flags & SERVICE_F_REJECT != 0 {
        Reason::Rejected
    } else {
        Reason::NoBackend
    }
}

/// The backend of a new flow (`key`: its forward conntrack key) to frontend `svc`: checks
/// the source ranges, then the client's affinity, then the Maglev table; of the cluster
/// frontend when the client is on this node (`local`, the pod interfaces) and `svc` is
/// short-circuited ([`short_circuit`]).
#[inline(always)]
pub(crate) fn select_backend<F: Datapath>(
    svc: &Service,
    key: &F::CtKey,
    local: bool,
) -> Result<Chosen<F::Backend>, Verdict> {
    let table = if local {
        short_circuit::<F>(svc, key.proto())
    } else {
        *svc
    };
    if table.backend_count == 0 {
        return Err(Verdict::Drop(no_backend(&table)));
    }
    if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let source = LpmKey::new(
            SOURCE_RANGE_ID_BITS + F::ADDR_BITS,
            F::source_range(svc.id, key.saddr()),
        );
        if F::source_ranges().get(&source).is_none() {
            return Err(Verdict::Drop(Reason::SourceRangeDenied));
        }
    }
    let client = F::affinity_key(svc.id, key.saddr());
    let affinity = (F::affinity(), TableEvent::AffinityInserts);
    select_with_affinity::<F, _>(&table, affinity, &client, || F::key_hash(key))
}

/// The client's affinity entry in `map` (under `client`), then the entry of `hash` in the
/// Maglev table of `svc` (the frontend's, or the one it is short-circuited to); records the
/// choice for the client when the service has affinity, counting a new entry under
/// `inserts`.
#[inline(always)]
pub(crate) fn select_with_affinity<F: Datapath, K>(
    svc: &Service,
    (map, inserts): (&LruHashMap<K, AffinityEntry>, TableEvent),
    client: &K,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<F::Backend>, Verdict> {
    // sessionAffinity ClientIP: a fresh entry on an ACTIVE backend decides; it is refreshed
    // by every new flow of the client (as kube-proxy's `recent` match is), not per packet.
    let affinity = if svc.affinity_timeout_secs != 0 {
        map.get_ptr_mut(client)
    } else {
        None
    };
    // The affinity timeout is the user's, in seconds: the precise clock, read only then.
    let now = if svc.affinity_timeout_secs != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if let Some(entry) = affinity {
        let entry = unsafe { &mut *entry };
        let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
        if now.wrapping_sub(entry.last_used_ns) >= timeout_ns {
            count(Event::AffinityExpired);
        } else {
            match backend_of::<F>(entry.backend_id) {
                Some(chosen) if chosen.backend.state() == BACKEND_ACTIVE => {
                    entry.last_used_ns = now;
                    count(Event::SelectAffinity);
                    return Ok(chosen);
                }
                _ => count(Event::AffinityNotActive),
            }
        }
    }
    let chosen = select_from_table::<F>(svc, hash)?;
    if svc.affinity_timeout_secs != 0 {
        let fresh = AffinityEntry {
            backend_id: chosen.id,
            _pad: 0,
            last_used_ns: now,
        };
        match affinity {
            Some(entry) => unsafe { *entry = fresh },
            // Best effort: without an entry the client's next flow uses the table.
            None => {
                if map.insert(client, fresh, BPF_ANY as u64).is_ok() {
                    count(inserts);
                }
            }
        }
    }
    Ok(chosen)
}

/// What a conntrack hit does with its flow: `None` keeps the backend, `Some(event)` selects
/// again for that reason. The rules are documented on `lb_common::Event`.
#[inline(always)]
pub(crate) fn reselect_because<B: BackendValue>(
    backend: Option<&Chosen<B>>,
    proto: u8,
    syn: bool,
) -> Option<Event> {
    let Some(chosen) = backend else {
        return Some(if proto == PROTO_UDP {
            Event::ReselectUdp
        } else if syn {
            Event::ReselectSyn
        } else {
            Event::ReselectGone
        });
    };
    match chosen.backend.state() {
        BACKEND_ACTIVE => None,
        _ if syn => Some(Event::ReselectSyn),
        BACKEND_TERMINATING => None,
        // REMOVED (and any state this program does not know, treated alike).
        _ if proto == PROTO_UDP => Some(Event::ReselectUdp),
        _ => {
            count(Event::DrainRemoved);
            None
        }
    }
}
