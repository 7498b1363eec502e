//! Fuzzes the job record decoder (`coffre_vault_store::jobs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::jobs::fuzz_entry(data);
});
