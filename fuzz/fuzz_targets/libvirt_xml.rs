//! Fuzzes the readers of what libvirt prints
//! (`coffre_snapshotter::vm::libvirt::xml`): arbitrary bytes read as a
//! domain's XML, a backup job's and a checkpoint's.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = coffre_snapshotter::vm::libvirt::xml::fuzz_entry(data);
});
