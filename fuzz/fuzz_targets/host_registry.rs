//! Fuzzes the host registry's codec (`coffre_vault_store::format::host_registry`):
//! it says which hooks a host runs and which images it backs up.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::host_registry::fuzz_entry(data);
});
