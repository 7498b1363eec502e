//! Fuzzes the NBD server (`coffre export`'s protocol side,
//! `coffre_snapshotter::nbd::wire`) against a client that sends arbitrary
//! bytes: options, then requests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::nbd::wire::fuzz_server_entry(data);
});
