//! Fuzzes a live restore's run file (`coffre_vault_store::format::live_run`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::live_run::fuzz_entry(data);
});
