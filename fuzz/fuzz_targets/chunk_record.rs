//! Fuzzes the chunk record decoder (`coffre_vault_store::format::record`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::record::fuzz_entry(data);
});
