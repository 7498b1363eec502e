//! Fuzzes the NBD URI parser (`coffre_snapshotter::nbd::NbdUri::parse`):
//! a URI comes from the command line, and back from an item's source in
//! the catalog, which a shared vault's other hosts can write.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_snapshotter::nbd::fuzz_uri_entry(data);
});
