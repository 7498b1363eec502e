//! Integration tests: each module is one behaviour, driving the real
//! `coffre` binary on images generated at test time.

mod common;

mod backup_restore_roundtrip;
mod bad_input;
mod disk_full;
mod ext4_two_days;
mod flipped_byte;
mod fuzz_corpus_replay;
mod image_resized;
mod kill9_during_backup;
mod source_changed;
mod vault_create;
mod vault_locked;
