//! Builds the eBPF programs (lb-ebpf, for bpfel-unknown-none with the nightly toolchain named
//! in `lb-ebpf/toolchain`, and bpf-linker) so that `lb` embeds them and needs no object file
//! at run time.
//!
//! The nightly is pinned: bpf-linker reads the LLVM bitcode rustc writes, so rustc's LLVM
//! must be the one bpf-linker was built with (LLVM 22, Debian's llvm-22-dev). A floating
//! `nightly` moved to LLVM 23 and every link failed with "Invalid record".
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(include_str!("../lb-ebpf/toolchain").trim()),
    )
}
