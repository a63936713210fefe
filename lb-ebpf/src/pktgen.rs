//! The benchmark's packet generator (see `lb_common::pktgen`): not part of the datapath,
//! embedded beside it for `cargo xtask bench`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    PROTO_TCP,
    pktgen::{
        DPORT_OFF, FRAME_LEN, IP_OFF, PktgenConfig, PktgenStats, SPORT_OFF, TCP_CHECK_OFF,
        UDP_CHECK_OFF, sport_check,
    },
};

#[map]
static LB_PKTGEN_CFG: Array<PktgenConfig> = Array::with_max_entries(1, 0);
#[map]
static LB_PKTGEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LB_PKTGEN_STATS: PerCpuArray<PktgenStats> = PerCpuArray::with_max_entries(1, 0);

/// Counts the frame; an expected one becomes the next client frame, sent into the node.
#[xdp]
pub fn lb_pktgen_xdp(ctx: XdpContext) -> u32 {
    let (Some(cfg), Some(stats), Some(seq)) = (
        LB_PKTGEN_CFG.get(0),
        LB_PKTGEN_STATS.get_ptr_mut(0),
        LB_PKTGEN_SEQ.get_ptr_mut(0),
    ) else {
        return xdp_action::XDP_DROP;
    };
    let start = ctx.data();
    // SAFETY: `stats` and `seq` are this CPU's values of per-CPU arrays (no other writer);
    // every packet access below lies within the FRAME_LEN bytes checked against data_end.
    unsafe {
        if start + FRAME_LEN > ctx.data_end() {
            (*stats).other += 1;
            return xdp_action::XDP_DROP;
        }
        let byte = |at: usize| *((start + at) as *const u8);
        let word = |at: usize| ((start + at) as *const u16).read_unaligned();
        let daddr = ((start + IP_OFF + 16) as *const u32).read_unaligned();
        let expected = u16::from_be(word(12)) == 0x0800
            && byte(IP_OFF) == 0x45
            && byte(IP_OFF + 9) == cfg.proto
            && daddr == cfg.expect_daddr
            && word(DPORT_OFF) == cfg.expect_dport;
        if !expected {
            (*stats).other += 1;
            return xdp_action::XDP_DROP;
        }
        (*stats).matched += 1;
        (*stats).last_saddr = ((start + IP_OFF + 12) as *const u32).read_unaligned();
        (*stats).last_sport = word(SPORT_OFF);
        let flows = u64::from(cfg.flows);
        if cfg.active == 0 || flows == 0 {
            (*stats).drained += 1;
            return xdp_action::XDP_DROP;
        }

        // The next flow's frame, over whatever the node made of this one.
        let n = *seq;
        *seq = n + 1;
        let flow = (n % flows) as u16;
        core::ptr::copy_nonoverlapping(cfg.frame.as_ptr(), start as *mut u8, FRAME_LEN);
        let sport = u16::from_be(cfg.sport).wrapping_add(flow).to_be();
        ((start + SPORT_OFF) as *mut u16).write_unaligned(sport);
        let check_at = if cfg.proto == PROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
        let check = (start + check_at) as *mut u16;
        check.write_unaligned(sport_check(
            cfg.proto,
            check.read_unaligned(),
            cfg.sport,
            sport,
        ));
        // A redirect even to the receiving interface (not XDP_TX): a veth wakes its peer
        // for frames sent with XDP_TX only when the peer runs an XDP program, for
        // redirected ones always.
        bpf_redirect(cfg.tx_ifindex, 0) as u32
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
