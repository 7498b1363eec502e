//! Fuzzes the job record decoder (`coffre_vault_store::format::job`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::job::fuzz_entry(data);
});
