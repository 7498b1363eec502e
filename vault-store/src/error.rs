//! The vault-store error type.
//!
//! Rules for this enum:
//! - every variant says *what happened* and carries the path, segment or
//!   chunk it happened to, so the CLI can print a message a user can act on;
//! - I/O errors keep their `std::io::Error` as the source, and "disk full"
//!   is lifted into its own variant because users must react to it
//!   differently;
//! - decoding problems of on-disk bytes are [`RecordError`]s, wrapped with
//!   the location they were found at.

use std::io;
use std::path::PathBuf;

use crate::format::chunk_id::ChunkId;
use crate::format::record::RecordError;

/// Result alias for vault-store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the vault storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory is not a coffre vault (no readable `config`).
    #[error("{path} is not a coffre vault (no vault config found)")]
    NotAVault { path: PathBuf },

    /// `vault create` on a directory that already holds something.
    #[error("{path} already exists and is not empty; refusing to create a vault there")]
    AlreadyExists { path: PathBuf },

    /// The vault was written by a newer coffre.
    #[error(
        "{path}: vault format version {found} is newer than this coffre supports (up to {supported}); upgrade coffre"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// An encrypted vault opened without its key.
    #[error(
        "vault {path} is encrypted: give its key (--key-file, COFFRE_KEY_FILE, COFFRE_PASSWORD_COMMAND, or a passphrase at the prompt)"
    )]
    KeyNeeded { path: PathBuf },

    /// A wrong key, or sealed bytes that failed authentication.
    #[error("{path}: {error}")]
    Crypto {
        path: PathBuf,
        error: crate::crypto::CryptoError,
    },

    /// The vault config exists but cannot be decoded.
    #[error("{path}: corrupt vault config: {reason}")]
    CorruptConfig { path: PathBuf, reason: String },

    /// Another process holds the writer lock.
    #[error("vault {path} is in use by another coffre process (pid {pid}); wait for it to finish")]
    VaultLocked { path: PathBuf, pid: String },

    /// A write was attempted on a vault opened read-only.
    #[error("vault {path} was opened read-only")]
    ReadOnly { path: PathBuf },

    /// An earlier fsync failed; the session refuses further writes because
    /// the kernel may have dropped dirty pages.
    #[error(
        "an earlier write or fsync to {path} failed, and the kernel may have dropped unsynced data: this handle accepts no further writes; reopen the vault (run the command again)"
    )]
    Poisoned { path: PathBuf },

    /// The filesystem is full.
    #[error("no space left on device while writing {path}")]
    NoSpace { path: PathBuf },

    /// Any other I/O failure.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The RocksDB index failed.
    #[cfg(feature = "index")]
    #[error("index {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },

    /// A value in the index cannot be decoded.
    #[error("index {path}: corrupt {what} entry: {reason}")]
    CorruptIndex {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },

    /// A chunk id is not in the index.
    #[error("chunk {id} is not in the vault index")]
    ChunkMissing { id: ChunkId },

    /// The bytes of a stored chunk are damaged.
    #[error("chunk {id} in {path} at offset {offset}: {reason}")]
    CorruptChunk {
        id: ChunkId,
        path: PathBuf,
        offset: u64,
        #[source]
        reason: Box<RecordError>,
    },

    /// A segment file is shorter than the index says it is.
    #[error("segment {path} is {actual} bytes but the index records {committed} committed bytes")]
    SegmentTruncated {
        path: PathBuf,
        committed: u64,
        actual: u64,
    },

    /// A small state file (job record, snapshot file) cannot be decoded.
    #[error("{path}: corrupt {what}: {reason}")]
    CorruptFile {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },

    /// No job with that id.
    #[error("no job {id:?} in the vault")]
    JobNotFound { id: String },

    /// A job id prefix matches several jobs.
    #[error("job id {id:?} matches {count} jobs; give more digits")]
    JobAmbiguous { id: String, count: usize },

    /// A copy of the vault (replica or secondary) cannot be used.
    #[error(
        "copy {path} of the vault cannot be used: {reason} (give --degraded-ok to back up without it; the next `coffre verify --read-data --repair` refills it)"
    )]
    CopyUnavailable { path: PathBuf, reason: String },

    /// A replica or the secondary was opened for writing on its own.
    #[error(
        "{path} is a {role} copy of a vault, not the vault; it can be read (restore, points, verify) but not written"
    )]
    CopyNotWritable { path: PathBuf, role: String },

    /// The vault's index is gone.
    #[error("vault {path} has no index; rebuild it from a copy with `coffre vault rebuild-index`")]
    IndexMissing { path: PathBuf },

    /// The vault's index is not known to be complete (a rebuild of it is
    /// running or was interrupted): nothing may trust it, so the vault is
    /// neither read nor written, and nothing was deleted.
    #[error(
        "vault {path}: its index is incomplete ({reason}); nothing was read, written or deleted. Finish the rebuild with `coffre vault rebuild-index --vault {path}` (add `--from COPY` to rebuild from a replica)"
    )]
    IndexIncomplete { path: PathBuf, reason: String },

    /// Replication would have taken data from the secondary that the
    /// primary cannot account for.
    #[error("replication to {path} refused: {reason}")]
    ReplicationRefused { path: PathBuf, reason: String },

    /// Another host committed a point under the same name first.
    #[error("{file}: another host committed this point meanwhile; run the backup again")]
    PointTaken {
        /// The manifest's URL.
        file: String,
    },

    /// Another host changed an item or policy this commit replaces.
    #[error("{file}: another host changed it meanwhile; nothing was overwritten, run again")]
    CatalogChanged {
        /// The file's URL.
        file: String,
    },

    /// A writer's lease ran out before it committed.
    #[error(
        "writer lease {lease} expired at {expired}; nothing was committed, run the backup again"
    )]
    LeaseExpired {
        /// The lease object.
        lease: String,
        /// When it expired.
        expired: String,
    },

    /// Another GC holds the shared vault's GC state.
    #[error("GC of {url} cannot run: another GC (host tag {host_tag:04x}) holds it until {until}")]
    GcRunning {
        /// The store.
        url: String,
        /// The other GC's host.
        host_tag: u16,
        /// Until when (or why).
        until: String,
    },

    /// A shared GC lost its hold on `gc/state` (it lapsed, or another GC
    /// took over): it stopped before writing or deleting anything more.
    #[error(
        "GC epoch {epoch} of {url} stopped: it lost its hold on gc/state ({reason}); it wrote and deleted nothing more, run gc again"
    )]
    GcHoldLost {
        /// The store.
        url: String,
        /// The epoch this GC held.
        epoch: u64,
        /// What happened.
        reason: String,
    },

    /// A rebuild of the index found what it cannot judge (a catalog file
    /// no copy holds decodable, a segment a read failed in) and left the
    /// index incomplete instead of installing one that lacks it.
    #[error(
        "vault {path}: the index was not rebuilt, and stays incomplete (nothing was deleted or cut): {reason}"
    )]
    RebuildRefused {
        /// The vault directory.
        path: PathBuf,
        /// What it could not read, naming the files, and what to do.
        reason: String,
    },

    /// A shared GC found what it cannot judge (an undecodable point, an
    /// unreadable lease or segment) and stopped before deleting anything.
    #[error("GC of {url} stopped, nothing was condemned or deleted: {reason}")]
    GcIncomplete {
        /// The store.
        url: String,
        /// What it could not read, naming the files, and what to do.
        reason: String,
    },

    /// An object-store request failed.
    #[error("object store {url}: {op} failed: {reason}")]
    Object {
        /// The object's URL.
        url: String,
        /// What was being done.
        op: &'static str,
        /// What the store answered.
        reason: String,
    },

    /// Vault settings given at creation are invalid.
    #[error("invalid vault setting {field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
}

impl StoreError {
    /// Wraps an I/O error, lifting ENOSPC/EDQUOT into [`StoreError::NoSpace`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { path },
            _ => StoreError::Io { op, path, source },
        }
    }

    /// True when the error means the disk is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}
