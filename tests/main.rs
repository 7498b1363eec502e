//! Integration tests: each module is one behaviour, driving the real
//! `coffre` binary on images generated at test time.

mod common;

mod adopted_pack;
mod backup_restore_roundtrip;
mod bad_input;
mod bench_smoke;
mod changed_blocks;
mod copy_invariants;
mod crash_kill;
mod daemon;
mod disk_full;
mod dst_schedule;
mod ext4_two_days;
mod flipped_byte;
mod fuzz_corpus_replay;
mod gc_interleave;
mod image_resized;
mod install_deps;
mod job_phases;
mod kill9_during_backup;
mod nbd_qcow2;
mod object_store;
mod policy_rules;
mod power_loss;
mod protection;
mod rebuild_kill;
mod redundancy;
mod reflink_cbt;
mod replica_disk_lost;
mod restore_in_place;
mod retention_400_days;
mod shell_completions;
mod snapshot_clone_xfs;
mod snapshot_hooks;
mod snapshot_tier;
mod snapshot_writer;
mod source_changed;
mod vault_create;
mod vault_locked;
mod vault_permissions;
