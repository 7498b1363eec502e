//! Fuzzes the part listing of a segment in an object store
//! (`coffre_vault_store::store::parts`): names and sizes from the bucket.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::store::parts::fuzz_part_list(data);
});
