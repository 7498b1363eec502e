//! Fuzzes the vault config decoder (`coffre_vault_store::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::config::fuzz_entry(data);
});
