//! Fuzzes the pack reader of the snapshot area (`coffre_snapshotter::pack`):
//! header, then records in order.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::pack::fuzz_entry(data);
});
