//! Fuzzes the NBD client (`coffre_snapshotter::nbd::wire`) against a
//! server that sends arbitrary bytes: handshake, block status and reads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::nbd::wire::fuzz_entry(data);
});
