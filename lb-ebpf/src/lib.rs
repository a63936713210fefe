//! This library target exists so that lb-userspace can list lb-ebpf as a build-dependency
//! (cargo then rebuilds the embedded object when the programs change). The programs are in
//! the binary target, `src/main.rs`.
#![no_std]
