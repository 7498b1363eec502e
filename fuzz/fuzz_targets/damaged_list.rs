//! Fuzzes the list of unrecoverable chunks (`coffre_vault_store::format::damaged`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::damaged::fuzz_entry(data);
});
