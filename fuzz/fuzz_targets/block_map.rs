//! Fuzzes the block-map node decoder (`coffre_vault_store::blockmap`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::blockmap::fuzz_entry(data);
});
