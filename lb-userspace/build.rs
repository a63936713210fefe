//! Builds the eBPF programs (lb-ebpf, for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker) so that `lb` embeds them and needs no object file at run time.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
