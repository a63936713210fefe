//! The eBPF object is linked by bpf-linker; say so clearly when it is missing.
fn main() {
    if which::which("bpf-linker").is_err() {
        println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` (it installs it)"
        );
    }
    println!("cargo:rerun-if-env-changed=PATH");
}
