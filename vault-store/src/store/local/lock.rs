//! Cross-process locks of a vault, all advisory `flock`s that the kernel
//! drops when the holder dies (a `kill -9` never leaves a stale lock):
//! - the writer lock (`VAULT/lock`): one index writer per vault; the file
//!   records the holder's pid so a second writer is told who is in the way;
//! - the reader lease (`VAULT/readers`): shared by every reader, taken
//!   exclusively by GC only to give space back to the filesystem;
//! - item phase locks (`VAULT/locks/ITEM.snapshot|transfer`): at most one
//!   snapshot phase and one transfer phase per item at any moment;
//! - job locks (`VAULT/jobs/ID.lock`): held while a job runs, so a job
//!   whose process died is recognised.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, StoreError};

/// File name of the lock inside a vault.
pub const LOCK_FILE: &str = "lock";

/// A held writer lock; released on drop.
#[derive(Debug)]
pub struct VaultLock {
    lock: NamedLock,
}

impl VaultLock {
    /// Takes the writer lock of the vault in `vault_dir`, or fails at once
    /// with [`StoreError::VaultLocked`] naming the holder's pid.
    pub fn acquire(vault_dir: &Path) -> Result<Self> {
        let path = vault_dir.join(LOCK_FILE);
        match NamedLock::try_acquire(&path, &std::process::id().to_string())? {
            Ok(lock) => Ok(VaultLock { lock }),
            Err(pid) => Err(StoreError::VaultLocked {
                path: vault_dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid
                },
            }),
        }
    }

    /// Takes the writer lock, waiting up to `wait` for its holder.
    pub fn acquire_wait(vault_dir: &Path, wait: Duration) -> Result<Self> {
        let deadline = Instant::now() + wait;
        loop {
            match Self::acquire(vault_dir) {
                Err(StoreError::VaultLocked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        self.lock.path()
    }
}

/// File name of the reader lease.
pub const READERS_FILE: &str = "readers";

fn open_lock_file(path: &Path) -> Result<File> {
    crate::store::local::private::open_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))
}

/// A held reader lease (shared) or GC's exclusive hold on it.
#[derive(Debug)]
pub struct ReaderLease {
    _file: File,
}

impl ReaderLease {
    /// Takes a shared lease, waiting while GC holds it exclusively (GC
    /// holds it only while it deletes files or punches holes).
    pub fn shared(vault_dir: &Path) -> Result<Self> {
        let path = vault_dir.join(READERS_FILE);
        let file = open_lock_file(&path)?;
        file.lock_shared()
            .map_err(|e| StoreError::io("lock", &path, e))?;
        Ok(ReaderLease { _file: file })
    }

    /// Takes the lease exclusively if no reader holds it.
    pub fn try_exclusive(vault_dir: &Path) -> Result<Option<Self>> {
        let path = vault_dir.join(READERS_FILE);
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ReaderLease { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(StoreError::io("lock", &path, e)),
        }
    }
}

/// Folder of the item phase locks.
pub const ITEM_LOCKS_DIR: &str = "locks";

/// A held, named, exclusive lock whose file records who holds it.
#[derive(Debug)]
pub struct NamedLock {
    _file: File,
    path: PathBuf,
}

impl NamedLock {
    /// Takes the lock at `path` if it is free, recording `holder` in it;
    /// `Ok(Err(holder))` says who has it.
    pub fn try_acquire(path: &Path, holder: &str) -> Result<std::result::Result<Self, String>> {
        if let Some(dir) = path.parent() {
            crate::store::local::private::create_dir_all(dir)
                .map_err(|e| StoreError::io("create directory", dir, e))?;
        }
        let mut file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut who = String::new();
                let _ = file.read_to_string(&mut who);
                return Ok(Err(who.trim().to_string()));
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io("lock", path, e)),
        }
        (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(format!("{holder}\n").as_bytes())
        })()
        .map_err(|e| StoreError::io("write", path, e))?;
        Ok(Ok(NamedLock {
            _file: file,
            path: path.to_path_buf(),
        }))
    }

    /// True when somebody holds the lock at `path` (a missing file is free).
    pub fn is_held(path: &Path) -> Result<bool> {
        let file = match OpenOptions::new().read(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io("open", path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(TryLockError::WouldBlock) => Ok(true),
            Err(TryLockError::Error(e)) => Err(StoreError::io("lock", path, e)),
        }
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The phases of a backup that must not overlap for one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemPhase {
    /// Capturing the point in time.
    Snapshot,
    /// Moving data into the vault.
    Transfer,
}

/// Path of an item's phase lock.
pub fn item_phase_lock_path(vault_dir: &Path, item: &str, phase: ItemPhase) -> PathBuf {
    let ext = match phase {
        ItemPhase::Snapshot => "snapshot",
        ItemPhase::Transfer => "transfer",
    };
    // The name may come from a vault file: one that breaks the naming
    // rule is spelt in hex, so the lock stays in the lock folder.
    let item = match crate::format::name::check_name("item", item) {
        Ok(n) => n.to_string(),
        Err(_) => format!("bad-name-{}", hex::encode(item.as_bytes())),
    };
    vault_dir.join(ITEM_LOCKS_DIR).join(format!("{item}.{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_item_name_keeps_its_lock_in_the_lock_folder() {
        let base = Path::new("/v");
        for bad in ["/tmp/x", "../x", "a/../../b"] {
            let p = item_phase_lock_path(base, bad, ItemPhase::Snapshot);
            assert_eq!(
                p.parent(),
                Some(base.join(ITEM_LOCKS_DIR).as_path()),
                "{bad}"
            );
        }
    }

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = VaultLock::acquire(dir.path()).unwrap();
        match VaultLock::acquire(dir.path()) {
            Err(StoreError::VaultLocked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected VaultLocked, got {other:?}"),
        }
        drop(held);
        VaultLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn named_locks_and_leases() {
        let dir = tempfile::tempdir().unwrap();
        let p = item_phase_lock_path(dir.path(), "vm", ItemPhase::Transfer);
        assert!(!NamedLock::is_held(&p).unwrap());
        let held = NamedLock::try_acquire(&p, "job j1").unwrap().unwrap();
        assert!(NamedLock::is_held(&p).unwrap());
        assert_eq!(
            NamedLock::try_acquire(&p, "job j2").unwrap().unwrap_err(),
            "job j1"
        );
        drop(held);
        assert!(NamedLock::try_acquire(&p, "job j2").unwrap().is_ok());

        let r = ReaderLease::shared(dir.path()).unwrap();
        assert!(ReaderLease::try_exclusive(dir.path()).unwrap().is_none());
        drop(r);
        assert!(ReaderLease::try_exclusive(dir.path()).unwrap().is_some());
    }
}
