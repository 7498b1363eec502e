//! Fuzzes the key slots of an encrypted vault's config
//! (`coffre_vault_store::crypto::slot`): arbitrary bytes read as a list of
//! slots (or one slot), checked, and unlocked with a fixed passphrase and a
//! fixed key file, with a tiny Argon2id budget: never a panic, never
//! Argon2id out of bounds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::crypto::slot::fuzz_entry(data);
});
