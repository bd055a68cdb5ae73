//! Embeds the eBPF object that `cargo xtask build-ebpf` builds. Without it
//! the daemon cannot work, so the build stops here with the command to run.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=KPR_EBPF_OBJECT");
    let object = match std::env::var_os("KPR_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/bpfel-unknown-none/release/proxy-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} is not built.\nRun `cargo xtask build-ebpf` first (or `cargo xtask setup` on a new machine).\n\n",
            object.display()
        );
    }
    let object = object.canonicalize().expect("the object exists");
    println!("cargo:rustc-env=KPR_EBPF_OBJECT_PATH={}", object.display());
}
