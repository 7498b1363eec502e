//! Exit codes (documented in the README, "Exit codes").

use coffre_engine::EngineError;
use coffre_engine::snapshotter::SnapError;
use coffre_engine::store::StoreError;
use coffre_engine::store::crypto::CryptoError;

// 0 is success.
/// Any failure not listed below.
pub const FAILURE: u8 = 1;
// 2 is clap's usage error.
/// `verify` found problems.
pub const VERIFY_PROBLEMS: u8 = 3;
/// The vault is locked by another process, or a libvirt domain is being
/// backed up by another coffre process on this host.
pub const LOCKED: u8 = 4;
/// Not a vault, or a vault of an unsupported version, or a corrupt config.
pub const NOT_A_VAULT: u8 = 5;
/// The image changed while it was backed up.
pub const SOURCE_CHANGED: u8 = 6;
/// Stored data is damaged (restore could not read a point back intact).
pub const DAMAGED: u8 = 7;
/// No space left on a device.
pub const NO_SPACE: u8 = 8;
/// `job wait` gave up before the job ended.
pub const TIMEOUT: u8 = 9;
/// `job wait`: the job ended CompletedWithWarnings.
pub const JOB_WARNINGS: u8 = 10;
/// `job wait`: the job ended Failed or Cancelled; `backup`: the job was cancelled.
pub const JOB_FAILED: u8 = 11;
/// A synchronous copy (LRS replica) or the GRS secondary is missing or
/// unwritable (writers: unless `--degraded-ok`).
pub const COPY_UNAVAILABLE: u8 = 12;
/// The vault's index is incomplete (a rebuild of it is running or was
/// interrupted): nothing was done; `coffre vault rebuild-index` finishes it.
pub const INDEX_INCOMPLETE: u8 = 13;
/// The restore target is in use: a running VM (QEMU's image lock) or
/// another writer holds the image, or the block device is mounted or held
/// open exclusively. Nothing was written; stop the VM (or unmount) and
/// run the restore again.
pub const TARGET_IN_USE: u8 = 14;
/// An encrypted vault's key is missing or wrong: no key source was given,
/// or no key slot opens with it (or the config's sealed settings fail
/// authentication with it).
pub const WRONG_KEY: u8 = 15;

fn store_code(e: &StoreError) -> u8 {
    match e {
        StoreError::VaultLocked { .. }
        | StoreError::GcRunning { .. }
        | StoreError::GcHoldLost { .. }
        | StoreError::PointTaken { .. }
        | StoreError::CatalogChanged { .. } => LOCKED,
        StoreError::NotAVault { .. }
        | StoreError::UnsupportedVersion { .. }
        | StoreError::CorruptConfig { .. } => NOT_A_VAULT,
        StoreError::NoSpace { .. } => NO_SPACE,
        StoreError::IndexIncomplete { .. } | StoreError::RebuildRefused { .. } => INDEX_INCOMPLETE,
        StoreError::CopyUnavailable { .. } | StoreError::Object { .. } => COPY_UNAVAILABLE,
        StoreError::CorruptChunk { .. } | StoreError::ChunkMissing { .. } => DAMAGED,
        StoreError::KeyNeeded { .. } => WRONG_KEY,
        StoreError::Crypto { error, .. } => crypto_code(error),
        _ => FAILURE,
    }
}

fn crypto_code(e: &CryptoError) -> u8 {
    match e {
        CryptoError::WrongKey { .. } | CryptoError::Forged { .. } => WRONG_KEY,
        // No terminal, an unreadable key file, a failing password command:
        // the key did not reach coffre.
        CryptoError::Malformed { .. } => WRONG_KEY,
        _ => FAILURE,
    }
}

/// Picks the exit code for an error chain.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            if e.is_no_space() {
                return NO_SPACE;
            }
            return match e {
                EngineError::Store(s) => store_code(s),
                EngineError::Snap(SnapError::SourceChanged { .. }) => SOURCE_CHANGED,
                EngineError::Snap(SnapError::DomainInUse { .. }) => LOCKED,
                EngineError::Snap(SnapError::Store(s)) => store_code(s),
                EngineError::DamagedBlock { .. } | EngineError::DamagedBlockMap { .. } => DAMAGED,
                EngineError::Cancelled { .. } => JOB_FAILED,
                EngineError::TargetInUse { .. } | EngineError::TargetBusy { .. } => TARGET_IN_USE,
                _ => FAILURE,
            };
        }
        if let Some(e) = cause.downcast_ref::<SnapError>() {
            return match e {
                _ if e.is_no_space() => NO_SPACE,
                SnapError::SourceChanged { .. } => SOURCE_CHANGED,
                SnapError::DomainInUse { .. } => LOCKED,
                SnapError::Store(s) => store_code(s),
                _ => FAILURE,
            };
        }
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return store_code(s);
        }
        if let Some(c) = cause.downcast_ref::<CryptoError>() {
            return crypto_code(c);
        }
    }
    FAILURE
}
