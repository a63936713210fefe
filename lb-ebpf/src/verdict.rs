//! What becomes of a packet the programs do not translate, and the action it gives.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action};

use lb_common::Reason;

use crate::counters::count;

/// What becomes of a packet that is not translated.
#[derive(Clone, Copy)]
pub(crate) enum Verdict {
    /// Hand it to the kernel untouched, counted under this reason.
    Pass(Reason),
    /// Drop it, counted under this reason.
    Drop(Reason),
    /// Hand it to the kernel untouched, uncounted: a packet no program of ours is about (on
    /// TC egress, that is all the node's other traffic).
    NotOurs,
}

impl Verdict {
    /// The XDP action of the verdict, counted.
    #[inline(always)]
    pub(crate) fn xdp(self) -> u32 {
        match self {
            Verdict::Pass(reason) => {
                count(reason);
                xdp_action::XDP_PASS
            }
            Verdict::Drop(reason) => {
                count(reason);
                xdp_action::XDP_DROP
            }
            Verdict::NotOurs => xdp_action::XDP_PASS,
        }
    }

    /// The TC action of the verdict, counted.
    #[inline(always)]
    pub(crate) fn tc(self) -> i32 {
        match self {
            Verdict::Pass(reason) => {
                count(reason);
                TC_ACT_OK
            }
            Verdict::Drop(reason) => {
                count(reason);
                TC_ACT_SHOT
            }
            Verdict::NotOurs => TC_ACT_OK,
        }
    }
}
