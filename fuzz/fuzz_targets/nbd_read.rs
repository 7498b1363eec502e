//! Fuzzes the check of an NBD read's structured reply
//! (`coffre_snapshotter::nbd::wire::decode_read_reply`): a reply that does
//! not cover exactly the bytes asked for is refused, never read as zeros.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::nbd::wire::fuzz_read_entry(data);
});
