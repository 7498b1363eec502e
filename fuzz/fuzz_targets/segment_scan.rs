//! Fuzzes the segment scan without the index (`coffre_vault_store::format::scan`): resynchronises on damage, never reads past the data.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::scan::fuzz_entry(data);
});
