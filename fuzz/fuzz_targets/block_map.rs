//! Fuzzes the block-map node decoder (`coffre_vault_store::format::blockmap`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::blockmap::fuzz_entry(data);
});
