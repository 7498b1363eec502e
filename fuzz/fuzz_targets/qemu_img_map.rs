//! Fuzzes the reading of `qemu-img map --output=json`
//! (`coffre_snapshotter::vm::stream::allocated`), which decides whether a
//! live restore's target holds the point before its hold goes: arbitrary
//! bytes read as its lines.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = coffre_snapshotter::vm::stream::fuzz_map_lines(data);
});
