//! Fuzzes the snapshot file reader (`coffre_vault_store::snapfile`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::snapfile::fuzz_entry(data);
});
