//! The backend of a new flow: the frontend's loadBalancerSourceRanges, then the client's
//! fresh affinity entry (sessionAffinity ClientIP), else the service's Maglev table entry
//! of the flow hash (or a random entry for selection `random`); and the rules by which a
//! known flow keeps its backend or selects again (documented on `lb_common::Event`). The
//! socket hooks select by the same rules.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::{LruHashMap, lpm_trie::Key as LpmKey},
};
use lb_common::{
    Affinity6Key, AffinityEntry, AffinityKey, BACKEND_ACTIVE, BACKEND_TERMINATING, Backend4,
    Backend6, Ct4Key, Ct6Key, Event, PROTO_UDP, Reason, SERVICE_F_RANDOM, SERVICE_F_SOURCE_RANGES,
    SOURCE_RANGE_ID_BITS, Service, SourceRange4, SourceRange6, TableEvent, flow_hash, flow_hash6,
    maglev,
};

use crate::{
    counters::count,
    maps::{
        LB_AFFINITY4_V1, LB_AFFINITY6_V1, LB_BACKEND4_V2, LB_BACKEND6_V1, LB_MAGLEV_V2,
        LB_SRCRANGE4_V1, LB_SRCRANGE6_V1,
    },
    verdict::Verdict,
};

/// A backends map's value: [`Backend4`] or [`Backend6`] (the families share backend ids
/// and the Maglev tables, so a table's ids are keys of its family's backends map).
pub(crate) trait BackendOf: Copy {
    /// The backend of `id` in this family's backends map.
    fn lookup(id: u32) -> Option<Self>;
    /// `BACKEND_ACTIVE`, ...
    fn state(&self) -> u8;
}

impl BackendOf for Backend4 {
    #[inline(always)]
    fn lookup(id: u32) -> Option<Self> {
        unsafe { LB_BACKEND4_V2.get(&id) }.copied()
    }
    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

impl BackendOf for Backend6 {
    #[inline(always)]
    fn lookup(id: u32) -> Option<Self> {
        unsafe { LB_BACKEND6_V1.get(&id) }.copied()
    }
    #[inline(always)]
    fn state(&self) -> u8 {
        self.state
    }
}

/// A backend and its id.
#[derive(Clone, Copy)]
pub(crate) struct Chosen<B = Backend4> {
    pub(crate) id: u32,
    pub(crate) backend: B,
}

#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<Chosen> {
    backend_of(id)
}

/// [`backend`] of either family.
#[inline(always)]
pub(crate) fn backend_of<B: BackendOf>(id: u32) -> Option<Chosen<B>> {
    let backend = B::lookup(id)?;
    Some(Chosen { id, backend })
}

/// The Maglev table's choice: the entry of the flow hash, or a random entry for selection
/// `random` (so random selection is as balanced as the table).
#[inline(always)]
fn select_from_table<B: BackendOf>(
    svc: &Service,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<B>, Verdict> {
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
    backend_of(cell[half & 1]).ok_or(MISSING)
}

/// The backend of a new flow: checks the source ranges, then the client's affinity, then
/// the Maglev table.
#[inline(always)]
pub(crate) fn select_backend(svc: &Service, key: &Ct4Key) -> Result<Chosen, Verdict> {
    if svc.backend_count == 0 {
        return Err(Verdict::Drop(Reason::NoBackend));
    }
    if svc.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let source = LpmKey::new(
            SOURCE_RANGE_ID_BITS + 32,
            SourceRange4 {
                service_id: svc.id,
                addr: key.saddr,
            },
        );
        if LB_SRCRANGE4_V1.get(&source).is_none() {
            return Err(Verdict::Drop(Reason::SourceRangeDenied));
        }
    }
    let client = AffinityKey {
        service_id: svc.id,
        client: key.saddr,
    };
    let affinity = (&LB_AFFINITY4_V1, TableEvent::AffinityInserts);
    select_with_affinity(svc, affinity, &client, || {
        flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto)
    })
}

/// The backend of a new IPv6 flow: the source ranges, then the client's affinity, then the
/// Maglev table (as [`select_backend`]).
#[inline(always)]
pub(crate) fn select_backend6(svc: &Service, key: &Ct6Key) -> Result<Chosen<Backend6>, Verdict> {
    if svc.backend_count == 0 {
        return Err(Verdict::Drop(Reason::NoBackend));
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
            return Err(Verdict::Drop(Reason::SourceRangeDenied));
        }
    }
    let client = Affinity6Key {
        service_id: svc.id,
        client: key.saddr,
    };
    let affinity = (&LB_AFFINITY6_V1, TableEvent::AffinityInserts);
    select_with_affinity(svc, affinity, &client, || {
        flow_hash6(key.saddr, key.daddr, key.sport, key.dport, key.proto)
    })
}

/// The client's affinity entry in `map` (under `client`), then the Maglev table entry of
/// `hash`; records the choice for the client when the service has affinity, counting a new
/// entry under `inserts`.
#[inline(always)]
pub(crate) fn select_with_affinity<K, B: BackendOf>(
    svc: &Service,
    (map, inserts): (&LruHashMap<K, AffinityEntry>, TableEvent),
    client: &K,
    hash: impl FnOnce() -> u32,
) -> Result<Chosen<B>, Verdict> {
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
            match backend_of::<B>(entry.backend_id) {
                Some(chosen) if chosen.backend.state() == BACKEND_ACTIVE => {
                    entry.last_used_ns = now;
                    count(Event::SelectAffinity);
                    return Ok(chosen);
                }
                _ => count(Event::AffinityNotActive),
            }
        }
    }
    let chosen = select_from_table(svc, hash)?;
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
                if map.insert(client, &fresh, BPF_ANY as u64).is_ok() {
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
pub(crate) fn reselect_because<B: BackendOf>(
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
