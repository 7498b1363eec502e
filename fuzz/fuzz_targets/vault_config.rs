//! Fuzzes the vault config decoder (`coffre_vault_store::format::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::config::fuzz_entry(data);
});
