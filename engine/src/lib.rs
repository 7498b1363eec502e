//! coffre backup engine: it orchestrates the snapshotter and the vault.
//!
//! Two folders show the split. [`data`] is the data path: the transfer
//! ([`backup`]) moves a snapshot into the vault, [`reader`] walks a point's
//! block map, [`restore`] writes byte-identical images from either tier
//! (new files, or in place via [`restore_target`]), [`verify`] audits a
//! vault, [`points`] lists and selects points of both tiers;
//! [`point_source`] reads a point as an image and [`ingest`] writes an
//! image straight into a point (`vault copy`, [`vault_copy`]). [`service`] is
//! what runs around it: backups as jobs ([`backup_job`]: the snapshot phase,
//! then the transfer), items ([`protection`], [`registry`]) protected under
//! [`policy`]s ([`policies`]) whose [`schedule`] the [`scheduler`] follows
//! and whose [`retention`] rules [`prune`] applies, job records
//! ([`job_record`]) and vault settings ([`vault_ops`]). Time comes from an
//! injected [`clock`]; progress goes to a [`progress::Progress`]. Images,
//! snapshots and the snapshot area are `coffre-snapshotter`'s; the vault's
//! bytes are `coffre-vault-store`'s.

pub mod access;
pub mod clock;
pub mod data;
pub mod error;
pub mod service;

#[cfg(test)]
pub(crate) use data::test_vault;
pub use data::{
    backup, bench, ingest, per_thread, point_source, points, reader, restore, restore_qcow2,
    restore_target, verify,
};
pub use service::{
    backup_job, domain_backup, job_record, policies, policy, protection, prune, registry,
    retention, schedule, scheduler, vault_copy, vault_ops,
};

pub use backup::{BackupOptions, BackupOutcome, backup};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{EngineError, Result};
pub use progress::{NoProgress, Progress};
pub use restore::{RestoreOptions, RestoreSummary, restore};
pub use source::{FileImage, ImageSource, MemImage};
pub use verify::{Finding, Severity, VerifyOptions, VerifyReport, verify};

/// The crates the engine builds on, for callers.
pub use coffre_snapshotter as snapshotter;
pub use coffre_snapshotter::{SnapError, cbt, nbd, progress, sigbus, source, throttle};
pub use coffre_vault_store as store;
