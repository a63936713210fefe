//! The programs' counters: why packets were passed or dropped (`lb_common::Reason`), flow
//! decisions (`lb_common::Event`), NAT and forwarding (`lb_common::NatEvent`), LRU inserts
//! (`lb_common::TableEvent`), each frontend's and backend's packets, and each pair's flows.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::PerCpuArray};
use lb_common::{Event, NatEvent, PairKey, Reason, ServiceStats, TableEvent, backend_stats_slot};

use crate::maps::{
    LB_BESTAT_MASK, LB_BESTAT_V2, LB_EVENT_V1, LB_NATEVENT_V2, LB_PAIRSTAT_V2, LB_REASON_V4,
    LB_SVCSTAT_V1, LB_TBLEVENT_V1,
};

/// A counter of one of the per-CPU counter arrays: its array, and its index there.
pub(crate) trait Counter: Copy {
    fn array() -> &'static PerCpuArray<u64>;
    fn index(self) -> u32;
}

macro_rules! counter {
    ($counter:ty, $array:expr) => {
        impl Counter for $counter {
            #[inline(always)]
            fn array() -> &'static PerCpuArray<u64> {
                &$array
            }
            #[inline(always)]
            fn index(self) -> u32 {
                self as u32
            }
        }
    };
}

counter!(Reason, LB_REASON_V4);
counter!(Event, LB_EVENT_V1);
counter!(NatEvent, LB_NATEVENT_V2);
counter!(TableEvent, LB_TBLEVENT_V1);

/// Adds one to `counter`.
#[inline(always)]
pub(crate) fn count<C: Counter>(counter: C) {
    if let Some(value) = C::array().get_ptr_mut(counter.index()) {
        // Per-CPU: no other CPU writes this counter.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn add_stats(stats: *mut ServiceStats, bytes: u64, new: bool) {
    // Per-CPU: no other CPU writes these counters.
    unsafe {
        (*stats).packets += 1;
        (*stats).bytes += bytes;
        if new {
            (*stats).new_flows += 1;
        }
    }
}

/// Counts a translated packet of either family for its frontend and its backend, and a new
/// flow (`new`: the packet created the flow's entries) also for the pair.
#[inline(always)]
pub(crate) fn count_packet(service_id: u32, backend_id: u32, bytes: u64, new: bool) {
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(service_id) {
        add_stats(stats, bytes, new);
    }
    // A volatile read: the value is the loader's, not this constant initialiser.
    let mask = unsafe { core::ptr::read_volatile(&LB_BESTAT_MASK) };
    if let Some(stats) = LB_BESTAT_V2.get_ptr_mut(backend_stats_slot(backend_id, mask)) {
        add_stats(stats, bytes, new);
    }
    if new {
        count_pair_flow(PairKey {
            service_id,
            backend_id,
        });
    }
}

/// Counts a flow for a (frontend, backend) pair, adding the pair's entry on its first flow:
/// only when a flow is created, so that an established flow's packets look up no hash map.
/// Per-CPU: an insert writes this CPU's value (the others start at zero).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "kept borrowed as written: the by-value cost is not measured yet (maps.rs's rule)"
)]
fn count_pair_flow(key: PairKey) {
    if let Some(flows) = LB_PAIRSTAT_V2.get_ptr_mut(&key) {
        // Per-CPU: no other CPU writes this value.
        unsafe { *flows += 1 };
        return;
    }
    // BPF_NOEXIST: another CPU that added the pair meanwhile keeps its value; this flow
    // then counts in the entry it added.
    if LB_PAIRSTAT_V2.insert(&key, &1, BPF_NOEXIST as u64).is_err()
        && let Some(flows) = LB_PAIRSTAT_V2.get_ptr_mut(&key)
    {
        unsafe { *flows += 1 };
    }
}

/// Counts a new flow of the socket hooks for its frontend: they translate no packets.
#[inline(always)]
pub(crate) fn count_socket_flow(service_id: u32) {
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(service_id) {
        // Per-CPU.
        unsafe { (*stats).new_flows += 1 };
    }
}
