//! Fuzzes the index value decoders (`coffre_vault_store::format::index_values`):
//! chunk location, segment entry, reference count, each checked to
//! encode back to the bytes it decoded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::index_values::fuzz_entry(data);
});
