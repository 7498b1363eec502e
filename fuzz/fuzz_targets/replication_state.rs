//! Fuzzes the GRS replication state file (`coffre_vault_store::format::repl_state`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    coffre_vault_store::format::repl_state::fuzz_entry(data);
});
