//! Fuzzes the catalog files every copy holds (`coffre_vault_store::format::catalog_files`): point manifest, item, policy, copy identity.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::catalog_files::fuzz_entry(data);
});
