//! The snapshotter error type.
//!
//! Rules: every variant names the image, the snapshot area or the file it
//! is about, and says what to do where there is something to do.
//! Storage-layer failures pass through as [`SnapError::Store`].

use std::path::PathBuf;

use coffre_vault_store::StoreError;

/// Result alias for snapshotter operations.
pub type Result<T, E = SnapError> = std::result::Result<T, E>;

/// Everything the snapshotter can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapError {
    /// A vault-store failure (codecs, durable writes).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// An NBD export cannot be reached or read.
    #[error("NBD export {uri}: {reason}")]
    Nbd { uri: String, reason: String },

    /// QEMU's monitor (QMP) cannot be reached, answered what coffre
    /// cannot use, or refused a command.
    #[error("QEMU monitor {socket}: {reason}")]
    Qmp { socket: PathBuf, reason: String },

    /// The guest agent cannot be reached, or refused or failed a command.
    #[error("guest agent {socket}: {reason}")]
    GuestAgent { socket: PathBuf, reason: String },

    /// A libvirt domain cannot be backed up: unknown, libvirt unreachable,
    /// `virsh` missing or refusing a command, or a reply coffre cannot use.
    #[error("libvirt domain {domain}: {reason}")]
    Libvirt { domain: String, reason: String },

    /// The guest's filesystems could not be thawed after a freeze: they
    /// may still be frozen. Says how to thaw them.
    #[error(
        "libvirt domain {domain}: the guest's filesystems may still be frozen: {attempts} thaws failed (the last: {last}); thaw them with `virsh --connect {connect} domfsthaw {domain}`"
    )]
    GuestMayBeFrozen {
        domain: String,
        connect: String,
        attempts: usize,
        last: String,
    },

    /// Another coffre process on this host is backing the domain up (it
    /// holds the domain's lock, `lock`).
    #[error(
        "libvirt domain {domain} ({connect}) is being backed up by another coffre process ({holder}) on this host (lock {lock}); try again when it is done"
    )]
    DomainInUse {
        domain: String,
        connect: String,
        /// `pid N`, or what is known of the holder.
        holder: String,
        lock: PathBuf,
    },

    /// A dirty bitmap was asked of a raw image.
    #[error(
        "dirty bitmap {bitmap} needs a qcow2 image or an NBD source (nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=PATH); {path} is a raw image"
    )]
    BitmapNeedsNbd { path: PathBuf, bitmap: String },

    /// A changed-block list cannot be used.
    #[error("changed-block list {path}: {reason}")]
    ChangedBlocks { path: PathBuf, reason: String },

    /// The image does not exist.
    #[error("image {path} does not exist")]
    SourceNotFound { path: PathBuf },

    /// The image is a directory.
    #[error("image {path} is a directory, not a disk image")]
    SourceIsDirectory { path: PathBuf },

    /// The image is neither a regular file nor a block device.
    #[error("image {path} is not a regular file or block device")]
    SourceNotRegular { path: PathBuf },

    /// The image cannot be opened or read.
    #[error("image {path} cannot be read: {source}")]
    SourceUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The image changed while it was read and never settled.
    #[error(
        "image {path} changed during the backup ({reason}); no point was recorded, retry when it is quiescent (or add pre/post-snapshot hooks that freeze it)"
    )]
    SourceChanged { path: PathBuf, reason: String },

    /// A name that would become a path breaks the naming rule.
    #[error(transparent)]
    BadName(#[from] coffre_vault_store::format::name::NameError),

    /// A snapshot manifest holds a name that would leave its folder.
    #[error("snapshot {path} is refused: {source}")]
    RefusedName {
        path: PathBuf,
        #[source]
        source: coffre_vault_store::format::name::NameError,
    },

    /// A folder coffre would keep snapshots in is not coffre's to use.
    #[error(
        "snapshot folder {dir} is refused: {reason}; choose another with `coffre vault set --snapshot-area DIR`"
    )]
    AreaRefused { dir: PathBuf, reason: String },

    /// The snapshot area is locked against writes.
    #[error(
        "snapshot area {dir} is locked ({lock}); the backup cannot take its snapshot there. Remove the lock, or choose another area with `coffre vault set --snapshot-area DIR`"
    )]
    AreaLocked { dir: PathBuf, lock: String },

    /// The snapshot area cannot be created or used.
    #[error(
        "snapshot area {dir} cannot be used: {source}; choose another with `coffre vault set --snapshot-area DIR`"
    )]
    AreaUnusable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The capture might not fit in the snapshot area.
    #[error(
        "snapshot area {dir} has {free} bytes free; the capture of {image} may need up to {needed}. Free space there or choose another area with `coffre vault set --snapshot-area DIR`"
    )]
    AreaFull {
        dir: PathBuf,
        image: PathBuf,
        free: u64,
        needed: u64,
    },

    /// A snapshot file or pack is damaged.
    #[error("snapshot {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },

    /// Writing the snapshot failed.
    #[error("cannot write snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A hook command is not a valid argv.
    #[error("hook {command:?} cannot be parsed into arguments (unbalanced quotes?)")]
    BadHook { command: String },

    /// A point in time taken once was asked for again.
    #[error("the point in time of item {item} was already handed over")]
    AlreadyTaken { item: String },

    /// Cancelled between windows.
    #[error("snapshot of {path} cancelled")]
    Cancelled { path: PathBuf },
}

impl SnapError {
    /// True when the error is a full disk.
    pub fn is_no_space(&self) -> bool {
        match self {
            SnapError::AreaFull { .. } => true,
            SnapError::Store(e) => e.is_no_space(),
            SnapError::Write { source, .. } | SnapError::AreaUnusable { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> SnapError {
        SnapError::Write {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn damaged(path: impl Into<PathBuf>, reason: impl Into<String>) -> SnapError {
        SnapError::Damaged {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
