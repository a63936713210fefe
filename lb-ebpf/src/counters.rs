//! The programs' counters: why packets were passed or dropped (`lb_common::reason`), flow
//! decisions (`lb_common::event`), NAT and forwarding (`lb_common::nat_event`), LRU inserts
//! (`lb_common::table_event`), and each frontend's and backend's packets.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{ServiceStats, backend_stats_slot};

use crate::maps::{
    LB_BESTAT_MASK, LB_BESTAT_V2, LB_EVENT_V1, LB_NATEVENT_V1, LB_REASON_V3, LB_SVCSTAT_V1,
    LB_TABLEEVENT_V1,
};

#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // Per-CPU: no other CPU writes this counter.
        unsafe { *counter += 1 };
    }
}

/// Counts a packet under `lb_common::reason` `reason`.
#[inline(always)]
pub(crate) fn count(reason: u32) {
    bump(&LB_REASON_V3, reason);
}

/// Counts `lb_common::event` `event`.
#[inline(always)]
pub(crate) fn note(event: u32) {
    bump(&LB_EVENT_V1, event);
}

/// Counts `lb_common::nat_event` `event`.
#[inline(always)]
pub(crate) fn note_nat(event: u32) {
    bump(&LB_NATEVENT_V1, event);
}

/// Counts `lb_common::table_event` `event`.
#[inline(always)]
pub(crate) fn note_table(event: u32) {
    bump(&LB_TABLEEVENT_V1, event);
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

/// Counts a translated packet of either family for its frontend and its backend (`new`:
/// the packet created the flow's entries).
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
}

/// Counts a new flow of the socket hooks for its frontend: they translate no packets.
#[inline(always)]
pub(crate) fn count_socket_flow(service_id: u32) {
    if let Some(stats) = LB_SVCSTAT_V1.get_ptr_mut(service_id) {
        // Per-CPU.
        unsafe { (*stats).new_flows += 1 };
    }
}
