//! Fuzzes the snapshot manifest reader (`coffre_snapshotter::manifest`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::manifest::fuzz_entry(data);
});
