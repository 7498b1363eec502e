//! coffre backup engine.
//!
//! Turns raw disk images into recovery points in a vault and back:
//! [`source`] reads images window by window through memory maps (with the
//! [`sigbus`] guard against images that shrink), [`backup`] hashes, diffs,
//! compresses and stores blocks, [`reader`] walks the
//! per-point block map (whose bytes `coffre-vault-store` owns), [`restore`] writes sparse byte-identical images,
//! [`verify`] audits a vault, [`vault_ops`] creates and summarises vaults,
//! [`points`] selects points. Backups run as jobs ([`backup_job`]): a
//! [`snapshot`] phase, then a transfer ([`backup`]). Items are protected
//! ([`protection`], [`registry`]) under [`policy`]s ([`policies`]) whose
//! [`schedule`] the [`scheduler`] follows and whose [`retention`] rules
//! [`prune`] applies. Time comes from an injected [`clock`];
//! progress goes to a [`progress::Progress`]. Storage is
//! `coffre-vault-store`'s business.

pub mod backup;
pub mod backup_job;
pub mod clock;
pub mod error;
pub mod job_record;
pub mod per_thread;
pub mod points;
pub mod policies;
pub mod policy;
pub mod progress;
pub mod protection;
pub mod prune;
pub mod reader;
pub mod registry;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod scheduler;
pub mod sigbus;
pub mod snapshot;
pub mod source;
pub mod throttle;
pub mod vault_ops;
pub mod verify;

pub use backup::{BackupOptions, BackupOutcome, backup};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{EngineError, Result};
pub use progress::{NoProgress, Progress};
pub use restore::{RestoreOptions, RestoreSummary, restore};
pub use source::{FileImage, ImageSource, MemImage};
pub use verify::{Finding, Severity, VerifyOptions, VerifyReport, verify};

/// Re-exported storage types callers need.
pub use coffre_vault_store as store;
