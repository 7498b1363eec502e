//! Fuzzes the changed-block list parser (`coffre_snapshotter::cbt::list`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::cbt::list::fuzz_entry(data);
});
