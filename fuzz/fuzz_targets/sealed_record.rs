//! Fuzzes the sealed chunk record (`coffre_vault_store::format::record`,
//! version 2): arbitrary bytes decoded as a record of an encrypted vault
//! of each cipher (AES-256-GCM and XChaCha20-Poly1305) with fixed test
//! keys; what opens must describe its plaintext exactly.
#![no_main]

use std::sync::{Arc, OnceLock};

use coffre_vault_store::crypto::{Cipher, VaultKeys};
use coffre_vault_store::format::record;

static KEYS: OnceLock<[Arc<VaultKeys>; 2]> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let keys = KEYS.get_or_init(|| {
        [
            record::fuzz_keys(Cipher::Aes256Gcm),
            record::fuzz_keys(Cipher::XChaCha20Poly1305),
        ]
    });
    record::fuzz_sealed_entry(keys, data);
});
