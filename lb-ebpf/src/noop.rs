//! Programs that do nothing: the floor that `cargo xtask bench` measures the real programs
//! against (the cost of running any XDP or TC program through BPF_PROG_TEST_RUN).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Passes every packet untouched.
#[xdp]
pub fn lb_noop_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Passes every packet untouched.
#[classifier]
pub fn lb_noop_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
