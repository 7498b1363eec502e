//! Fuzzes the sealed catalog file of an encrypted vault
//! (`coffre_vault_store::format::sealed_file`): arbitrary bytes opened as
//! a sealed point manifest with a fixed test key, and what opens decoded
//! as each catalog file.
#![no_main]

use std::sync::OnceLock;

use coffre_vault_store::crypto::VaultKeys;
use coffre_vault_store::format::sealed_file;

static KEYS: OnceLock<VaultKeys> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::catalog_files::fuzz_sealed_entry(
        KEYS.get_or_init(sealed_file::fuzz_keys),
        data,
    );
});
