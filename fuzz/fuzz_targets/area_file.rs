//! Fuzzes the snapshot area's identity file and the vault's area list
//! (`coffre_snapshotter::area`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::area::fuzz_entry(data);
});
