//! Fuzzes a host's memory of an encrypted vault's sealed files
//! (`coffre_vault_store::format::generations`): it decides which files the
//! host refuses as rollbacks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::generations::fuzz_entry(data);
});
