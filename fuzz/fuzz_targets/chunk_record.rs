//! Fuzzes the chunk record decoder (`coffre_vault_store::record`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::record::fuzz_entry(data);
});
