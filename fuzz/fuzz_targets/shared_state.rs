//! Fuzzes the small files of shared vaults in object storage: a cache's
//! store pointer (`coffre_vault_store::format::remote`), writer leases, the GC
//! state and condemned lists (`coffre_vault_store::format::lease`), and chunk
//! lists (`coffre_vault_store::format::chunk_list`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::remote::fuzz_entry(data);
    coffre_vault_store::format::lease::fuzz_entry(data);
    coffre_vault_store::format::chunk_list::fuzz_entry(data);
});
