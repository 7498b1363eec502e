//! Fuzzes a live restore's hold record (`coffre_vault_store::format::hold`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::hold::fuzz_entry(data);
});
