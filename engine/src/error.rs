//! The engine error type.
//!
//! Rules: every variant names the file, item, point, block or chunk it is
//! about, so a message alone tells the user what to look at. Storage-layer
//! failures pass through unchanged as [`EngineError::Store`].

use std::path::PathBuf;

use coffre_snapshotter::SnapError;
use coffre_vault_store::{ChunkId, StoreError};

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A vault-store failure.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// A snapshotter failure (reading the image, the snapshot area,
    /// hooks, snapshot files).
    #[error(transparent)]
    Snap(#[from] SnapError),

    /// `coffre bench` could not run a stage.
    #[error("benchmark failed: {0}")]
    Bench(String),

    /// An item name breaks the naming rule.
    #[error("{0}")]
    InvalidItemName(String),

    /// No item of that name.
    #[error("no item {item:?} in the vault")]
    ItemNotFound { item: String },

    /// The item has no points.
    #[error("item {item:?} has no recovery points")]
    NoPoints { item: String },

    /// No point matches the selector.
    #[error("item {item:?} has no recovery point {point:?}")]
    PointNotFound { item: String, point: String },

    /// The selector matches more than one point.
    #[error("point id prefix {point:?} of item {item:?} is ambiguous")]
    PointAmbiguous { item: String, point: String },

    /// Restore refused to replace an existing file.
    #[error("{path} already exists; pass --force to overwrite it")]
    TargetExists { path: PathBuf },

    /// A live restore (`restore --live`) cannot go on: says what the
    /// target holds now and what to run.
    #[error("live restore into {target}: {reason}")]
    LiveRestore { target: PathBuf, reason: String },

    /// An unattended resume (`coffre daemon`'s) found what needs a human
    /// to decide; it changed nothing and is not tried again until a run
    /// of the restore writes its run file anew.
    #[error("live restore into {target}: {reason}")]
    LiveNeedsHuman { target: PathBuf, reason: String },

    /// The point is not held in the tier asked for.
    #[error(
        "point {point} of item {item:?} has no copy in the {tier} tier (see `coffre points`: its snapshot expired, or its transfer has not completed)"
    )]
    PointNotInTier {
        item: String,
        point: String,
        tier: &'static str,
    },

    /// An in-place restore target does not exist.
    #[error(
        "restore target {path} does not exist; --in-place writes into an existing file or block device"
    )]
    TargetMissing { path: PathBuf },

    /// An in-place restore target is neither a regular file nor a block device.
    #[error("restore target {path} is not a regular file or block device")]
    TargetNotRegular { path: PathBuf },

    /// An in-place restore target is smaller than the image.
    #[error(
        "restore target {path} holds {size} bytes, smaller than the {needed}-byte image; grow it first"
    )]
    TargetTooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },

    /// A block device is mounted or held open exclusively.
    #[error("restore target {path} is in use: {reason}; unmount or release it first")]
    TargetBusy { path: PathBuf, reason: String },

    /// An existing image file is in use (a running VM, or another writer).
    #[error(
        "restore target {path} is in use: {reason}; the VM must be off: shut it down (virsh shutdown DOMAIN), then restore onto its disk"
    )]
    TargetInUse { path: PathBuf, reason: String },

    /// The target's image format does not allow this restore.
    #[error("restore target {path}: {reason}")]
    TargetFormat { path: PathBuf, reason: String },

    /// `qemu-img` is missing, or failed to write the qcow2 image.
    #[error("cannot write the qcow2 image {path}: {reason}")]
    QemuImg {
        path: PathBuf,
        reason: String,
        /// The device ran out of space.
        no_space: bool,
    },

    /// Restore target cannot be written.
    #[error("cannot write restore target {path}: {source}")]
    TargetUnwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A block of a point cannot be read back intact.
    #[error("point {point} of item {item:?}, block {block}: chunk {chunk} is damaged: {source}")]
    DamagedBlock {
        item: String,
        point: String,
        block: u64,
        chunk: ChunkId,
        #[source]
        source: Box<StoreError>,
    },

    /// A block map node of a point is damaged or inconsistent.
    #[error("point {point} of item {item:?}: block map is damaged: {reason}")]
    DamagedBlockMap {
        item: String,
        point: String,
        reason: String,
    },

    /// A policy was refused.
    #[error(transparent)]
    InvalidPolicy(#[from] crate::policy::PolicyError),

    /// No policy of that name.
    #[error("no policy {name:?} in the vault (see `coffre policy list`)")]
    PolicyNotFound { name: String },

    /// A policy of that name exists.
    #[error("policy {name:?} already exists; use `coffre policy set` to change it")]
    PolicyExists { name: String },

    /// A policy protects items.
    #[error(
        "policy {name:?} protects {items}; move them to another policy or unprotect them first"
    )]
    PolicyInUse { name: String, items: String },

    /// The image is protected by another vault or item.
    #[error(
        "{path} is already protected as item {item:?} in vault {vault_name} ({vault_dir}); an image is protected in only one vault"
    )]
    AlreadyProtected {
        path: PathBuf,
        item: String,
        vault_name: String,
        vault_dir: PathBuf,
    },

    /// The item's state does not allow the operation.
    #[error("item {item:?} {reason}")]
    ItemState { item: String, reason: String },

    /// The vault's redundancy can no longer change.
    #[error(
        "the redundancy of vault {vault} is locked: it protects {items}; it was fixed when the first item was protected"
    )]
    RedundancyLocked { vault: String, items: String },

    /// Another snapshot of the item is running.
    #[error(
        "another snapshot of item {item:?} is running ({holder}); at most one snapshot phase per item at a time"
    )]
    SnapshotBusy { item: String, holder: String },

    /// The job was cancelled.
    #[error("job {id} was cancelled")]
    Cancelled { id: String },

    /// The job cannot be cancelled any more.
    #[error("job {id} cannot be cancelled: {reason}")]
    NotCancellable { id: String, reason: String },

    /// The transfer was abandoned because the process is shutting down.
    #[error(
        "transfer abandoned at shutdown; nothing of it was recorded, the next backup redoes it"
    )]
    Abandoned,

    /// The host registry of protected images cannot be used.
    #[error("registry of protected images {path}: {reason}")]
    Registry { path: PathBuf, reason: String },

    /// Thread pool creation failed.
    #[error("cannot start worker threads: {0}")]
    Threads(String),

    /// `vault copy` cannot copy between these two vaults.
    #[error("cannot copy from vault {from} to vault {to}: {reason}")]
    CopyRefused {
        from: PathBuf,
        to: PathBuf,
        reason: String,
    },
}

impl EngineError {
    /// True when the underlying cause is a full disk.
    pub fn is_no_space(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_no_space(),
            EngineError::Snap(e) => e.is_no_space(),
            EngineError::TargetUnwritable { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            EngineError::QemuImg { no_space, .. } => *no_space,
            _ => false,
        }
    }
}
