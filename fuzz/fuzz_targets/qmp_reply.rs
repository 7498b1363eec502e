//! Fuzzes the QEMU monitor and guest-agent decoders
//! (`coffre_snapshotter::vm`): arbitrary bytes read as their JSON lines.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = coffre_snapshotter::vm::fuzz_entry(data);
});
